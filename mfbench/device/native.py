"""Find, build and run the native C++ trainer (`kernels_native/`, binary `mfbench-train`).

`trainer_binary()` builds it with CMake the first time (and whenever a source is newer than
the binary); `run_trainer()` runs it; `train()` is the keyword-argument front end that
`mfbench train` uses.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from mfbench import shipped
from mfbench.device.data import cache_dir, digest

KERNELS = shipped.folder("kernels_native")
# a source tree builds beside its sources; an installed package builds in the user's cache
# (site-packages may be read-only, and pip would not remove a build left inside it)
BUILD = KERNELS / "build" if KERNELS.parent == shipped.PACKAGE.parent else cache_dir("build") / digest(str(KERNELS))[:12]
BINARY_NAME = "mfbench-train"
BENCH_NAME = "mfbench-bench"
ENV_OVERRIDE = "MFBENCH_TRAINER"


class TrainerError(RuntimeError):
    """The trainer failed to build or exited nonzero; `line` is its one-line message."""

    def __init__(self, line: str, returncode: int | None = None, stderr: str = ""):
        self.line, self.returncode, self.stderr = line, returncode, stderr
        super().__init__(line)


def _sources() -> list[Path]:
    return [KERNELS / "CMakeLists.txt", *sorted((KERNELS / "src").rglob("*")), *sorted((KERNELS / "cmake").glob("*"))]


# The builds of the trainer: (build folder, the target it runs on, what it needs). `host` is
# tuned for this machine; `arm64` is static linux-arm64 (Debian's cross compiler), which runs
# under qemu-aarch64 and, being static, on Android too; `android` goes through the NDK.
VARIANTS = {
    "host": "this machine (-march=native, the system BLAS)",
    "arm64": "static linux-arm64 (g++-aarch64-linux-gnu; Debian's arm64 OpenBLAS when installed)",
    "android": "Android arm64-v8a, API 28 (the NDK's CMake toolchain, $ANDROID_NDK_HOME)",
    "sanitize": "this machine with AddressSanitizer and UBSan (CMake MFB_SANITIZE; the fuzz tests)",
}
CROSS_CXX = "aarch64-linux-gnu-g++"
NDK_ENV = "ANDROID_NDK_HOME"
ANDROID_PLATFORM = "android-28"


def build_dir(variant: str = "host") -> Path:
    return BUILD if variant == "host" else BUILD.with_name(f"{BUILD.name}-{variant}")


def _configure(variant: str, blas: bool) -> list[str]:
    """CMake's configure flags for a build variant (a missing tool raises TrainerError)."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", f"-DMFB_BLAS={'ON' if blas else 'OFF'}"]
    if variant == "host":
        return flags
    if variant == "sanitize":
        return ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DMFB_BLAS={'ON' if blas else 'OFF'}", "-DMFB_SANITIZE=ON"]
    if variant == "arm64":
        if shutil.which(CROSS_CXX) is None:
            raise TrainerError(f"{CROSS_CXX} not found: install the arm64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
        return [*flags, f"-DCMAKE_TOOLCHAIN_FILE={KERNELS / 'cmake' / 'aarch64-linux-gnu.cmake'}", "-DMFB_STATIC=ON"]
    if variant == "android":
        ndk = os.environ.get(NDK_ENV, "")
        toolchain = Path(ndk) / "build" / "cmake" / "android.toolchain.cmake"
        if not ndk or not toolchain.is_file():
            raise TrainerError(f"{NDK_ENV}={ndk}: {toolchain} not found (expected the Android NDK's folder)")
        # the NDK's sysroot must not see the host's /usr/include: only nlohmann/ is linked in
        include = build_dir(variant) / "include"
        include.mkdir(parents=True, exist_ok=True)
        if not (include / "nlohmann").exists():
            (include / "nlohmann").symlink_to("/usr/include/nlohmann")
        return ["-DCMAKE_BUILD_TYPE=Release", "-DMFB_BLAS=OFF", f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                "-DANDROID_ABI=arm64-v8a", f"-DANDROID_PLATFORM={ANDROID_PLATFORM}",
                f"-DNLOHMANN_JSON_INCLUDE={include}"]
    raise TrainerError(f"unknown build variant {variant!r} (expected one of {', '.join(VARIANTS)})")


def _stale(binary: Path) -> bool:
    if not binary.is_file() or not (binary.parent / BENCH_NAME).is_file():  # the build makes both
        return True
    stamp = binary.parent / ".build-stamp"  # touched after every successful build, even a no-op one
    built = max(binary.stat().st_mtime, stamp.stat().st_mtime if stamp.exists() else 0.0)
    return any(p.is_file() and p.stat().st_mtime > built for p in _sources())


def build(blas: bool = True, jobs: int = 2, quiet: bool = False, variant: str = "host") -> Path:
    """Configure and build a variant of the trainer (VARIANTS) into its build folder; return
    the binary's path."""
    if shutil.which("cmake") is None:
        raise TrainerError("cmake not found: install cmake (and a C++17 compiler, libopenblas-dev, nlohmann-json3-dev)")
    out = build_dir(variant)
    configure = _configure(variant, blas)
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"mfbench: building {BINARY_NAME} ({variant}) in {out} (cmake, -j{jobs}) ...", file=sys.stderr, flush=True)
    steps = [["cmake", "-S", str(KERNELS), "-B", str(out), *configure], ["cmake", "--build", str(out), f"-j{jobs}"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-20:])
            raise TrainerError(f"building {BINARY_NAME} failed: {' '.join(cmd)}", r.returncode, tail)
        if not quiet:  # CMake's one line on which GEMM the build uses (a missing arm64 OpenBLAS says so)
            for line in r.stdout.splitlines():
                if "GEMM backend" in line:
                    print(f"mfbench: {line.strip(' -')}", file=sys.stderr, flush=True)
    (out / ".build-stamp").touch()
    return out / BINARY_NAME


def built(variant: str = "host", rebuild: bool = False, name: str = BINARY_NAME) -> Path:
    """Path of a current binary `name` of a build variant, built here when missing or older
    than its sources (one build at a time: pytest-xdist, parallel CLIs)."""
    binary = build_dir(variant) / name
    if rebuild or _stale(binary):
        binary.parent.mkdir(parents=True, exist_ok=True)
        with open(binary.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if rebuild or _stale(binary):
                build(variant=variant)
    return binary


def sanitized_binary() -> Path:
    """Path of a current AddressSanitizer + UBSan build of the trainer (the fuzz tests)."""
    return built("sanitize")


def trainer_binary(rebuild: bool = False) -> Path:
    """Path of a current `mfbench-train`: $MFBENCH_TRAINER, else the repo's build (built or
    rebuilt here when missing or older than its sources), else one on PATH."""
    if os.environ.get(ENV_OVERRIDE):
        p = Path(os.environ[ENV_OVERRIDE])
        if not p.is_file():
            raise TrainerError(f"{ENV_OVERRIDE}={p}: no such file (expected the path of {BINARY_NAME})")
        return p
    if (KERNELS / "CMakeLists.txt").is_file():
        return built("host", rebuild)
    found = shutil.which(BINARY_NAME)
    if found:
        return Path(found)
    raise TrainerError(f"{BINARY_NAME} not found: run from a source checkout (it builds itself) or put it on PATH")


def bench_binary() -> Path:
    """Path of a current `mfbench-bench` (the kernels' microbenchmarks, built with the trainer)."""
    binary = trainer_binary().parent / BENCH_NAME
    if not binary.is_file():
        raise TrainerError(f"{BENCH_NAME} not found beside {BINARY_NAME} in {binary.parent}: build kernels_native "
                           "(cmake --build) or unset " + ENV_OVERRIDE)
    return binary


def run_trainer(args: list[str], *, check: bool = True, timeout: float | None = None,
                capture: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mfbench-train ARGS`; with check, a nonzero exit raises TrainerError(its last line)."""
    cmd = [str(trainer_binary()), *map(str, args)]
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        lines = (r.stderr or "").strip().splitlines()
        raise TrainerError(lines[-1] if lines else f"{BINARY_NAME} exited with {r.returncode}", r.returncode, r.stderr or "")
    return r


def train(*, model: str | Path | None = None, config: str | Path | None = None, data: str | Path,
          out: str | Path, method: str = "full", quiet: bool = True, **options) -> dict:
    """Run one training job and return its summary.json as a dict.

    Options map to the binary's flags: seq_len=128 -> --seq-len 128; True -> a bare flag
    (no_save=True -> --no-save); lists -> comma-joined (lora_targets=["c_attn", "c_proj"]).
    """
    args: list[str] = []
    if model is not None:
        args += ["--model", str(model)]
    if config is not None:
        args += ["--config", str(config)]
    args += ["--data", str(data), "--out", str(out), "--method", method]
    for k, v in options.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif isinstance(v, (list, tuple)):
            args += [flag, ",".join(map(str, v))]
        else:
            args += [flag, str(v)]
    if quiet:
        args.append("--quiet")
    run_trainer(args)
    return json.loads((Path(out) / "summary.json").read_text())


def usage() -> str | None:
    """The trainer's --help text, read from its source (config.cpp's kUsage), so that help
    needs no build; None without the sources."""
    try:
        source = (KERNELS / "src" / "config.cpp").read_text()
    except OSError:
        return None
    start = source.find('kUsage = R"(')
    end = source.find(')";', start)
    return source[start + len('kUsage = R"('):end] if start >= 0 and end > start else None


def main(argv: list[str] | None = None) -> int:
    """`mfbench train ARGS...`: pass ARGS to the binary, stream its output, return its exit
    code (128 + N when a signal N killed it)."""
    argv = sys.argv[1:] if argv is None else argv
    if ("--help" in argv or "-h" in argv) and not os.environ.get(ENV_OVERRIDE) and (text := usage()):
        print(text, end="")  # without building the trainer first (a minute on a small machine)
        return 0
    try:
        binary = trainer_binary()
    except TrainerError as e:
        print(f"mfbench: error: {e.line}", file=sys.stderr)
        if e.stderr:
            print(e.stderr, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during the build
        print("mfbench: interrupted", file=sys.stderr)
        return 130
    trainer = subprocess.Popen([str(binary), *argv])
    while True:
        try:
            code = trainer.wait()
            return code if code >= 0 else 128 - code
        except KeyboardInterrupt:
            # Ctrl-C reached the trainer too (one process group): it checkpoints and stops by
            # itself. A SIGINT sent to this process alone is passed on; a second one is harmless.
            trainer.send_signal(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
