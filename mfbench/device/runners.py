"""Where a native binary runs: `local` (this machine), `qemu-arm64` (the static arm64 build
under qemu-aarch64: for correctness, not timing) or `adb[:SERIAL]` (an Android phone over adb).

One interface (`Runner`), used by `mfbench run` and by anything else that runs a binary of
kernels_native on a target:

- `prepare(spec)`: build the binary for the target, ship it and the run spec's files there;
  return the spec's path as the target sees it;
- `command(args)`: the command line that runs the binary there with `args` (stdin, stdout and
  stderr pass through, so the control channel works the same on every target);
- `fetch(out)`: bring the run's outputs back into `out`;
- `workdir(local)`, `put(file, there)`, `get(there, file)`: a folder on the target for a
  tool's own files (mfbench-bench's spec and result), and copies to and from it.

A missing tool, an absent or unauthorized phone is an InputError (one line, exit 2) saying
what to install or connect.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mfbench.device.native import BINARY_NAME as TRAINER
from mfbench.errors import InputError

QEMU = "qemu-aarch64"
ADB = "adb"
ADB_ROOT = "/data/local/tmp/mfbench"  # the one folder a shell user may write and execute from
ABI = "arm64-v8a"
FIELD = "--target"
TARGETS = "local, qemu-arm64, adb or adb:SERIAL"


def get(target: str) -> Runner:
    """The runner of a --target value; checks its tools (and the phone) now."""
    name, colon, serial = target.partition(":")
    if name == "local" and not colon:
        return Local()
    if name == "qemu-arm64" and not colon:
        return Qemu()
    if name == "adb" and (serial or not colon):
        return Adb(serial or None)
    raise InputError(None, FIELD, f"unknown target {target!r} (expected {TARGETS})")


def _need(tool: str, install: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise InputError(None, FIELD, f"{tool} not found: {install}")
    return path


def _built(variant: str, name: str) -> Path:
    """A current binary of a build variant; a failed build is a TrainerError (exit 1)."""
    from mfbench.device import native
    if variant == "arm64":
        _need(native.CROSS_CXX, "install the arm64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    return native.built(variant, name=name)


class Runner:
    """A target. `target` is its --target value (recorded in the trace's provenance)."""
    target: str

    def cpus(self) -> int:
        """The CPUs the binary may use there (`threads: auto`)."""
        from mfbench.device.run import usable_cores
        return usable_cores()

    def device(self) -> dict:
        """What the target is, as far as the runner can tell (the trace's provenance.device)."""
        import platform
        return {"name": self.target, "hostname": platform.node(), "machine": platform.machine(),
                "system": f"{platform.system()} {platform.release()}", "cpus": os.cpu_count(),
                "usable_cpus": self.cpus()}

    def prepare(self, spec: Path, resume: bool = False, name: str = TRAINER) -> str:
        """Build and ship what a run of `spec` (run.json) needs; return the spec's path there."""
        self.binary(name)
        return str(spec)

    def binary(self, name: str = TRAINER) -> str:
        raise NotImplementedError

    def command(self, args: list, name: str = TRAINER) -> list[str]:
        raise NotImplementedError

    def fetch(self, out: Path) -> None:
        """Outputs are written in place on this machine."""

    def workdir(self, local: Path) -> str:
        """A folder on the target for a tool's files, standing for `local` on this machine."""
        return str(local)

    def put(self, file: Path, there: str) -> None:
        """Copy a file of this machine to `there` on the target (here: the same file)."""

    def get(self, there: str, file: Path) -> None:
        """Copy the target's file `there` to `file` on this machine (here: the same file)."""


class Local(Runner):
    target = "local"

    def binary(self, name: str = TRAINER) -> str:
        from mfbench.device import native
        return str(native.trainer_binary() if name == TRAINER else native.built("host", name=name))

    def command(self, args: list, name: str = TRAINER) -> list[str]:
        return [self.binary(name), *map(str, args)]


class Qemu(Runner):
    """The static arm64 build under qemu-aarch64, on this machine's files."""
    target = "qemu-arm64"

    def __init__(self):
        self.qemu = _need(QEMU, "install qemu-user (apt-get install qemu-user)")

    def device(self) -> dict:
        return {**super().device(), "machine": "aarch64", "emulator": QEMU}

    def binary(self, name: str = TRAINER) -> str:
        return str(_built("arm64", name))

    def command(self, args: list, name: str = TRAINER) -> list[str]:
        return [self.qemu, self.binary(name), *map(str, args)]


class Adb(Runner):
    """An Android phone over adb. The binary goes to ADB_ROOT/bin; a run's files to
    ADB_ROOT/runs/<run>/ (config, weights, tokens and run.json with paths relative to it),
    where the trainer runs and writes out/; `fetch` pulls out/ back. The adb shell carries
    stdin, stdout, stderr and the exit code (adb's shell protocol, Android 7 and later)."""

    def __init__(self, serial: str | None):
        self.adb = _need(ADB, "install Android's adb (apt-get install adb) and connect a phone with USB debugging on")
        self.serial, self.target, self.run_dir = None, "adb", None
        self.serial, self.model = self._pick(serial)
        self.target = f"adb:{self.serial}"
        abi = self._shell("getprop ro.product.cpu.abi").strip()
        if abi != ABI:
            raise InputError(None, FIELD, f"{self.target} is {abi or 'of an unknown ABI'} (expected an {ABI} phone)")
        self._cpus = int(self._shell("nproc").strip())
        from mfbench.device import native
        self.variant = "android" if os.environ.get(native.NDK_ENV) else "arm64"

    # -- the phone

    def _adb(self, *args) -> subprocess.CompletedProcess:
        """Run an adb command on the phone (once one is picked); a failure is one line."""
        r = subprocess.run([self.adb, *(["-s", self.serial] if self.serial else []), *map(str, args)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
            raise InputError(None, FIELD, f"adb {' '.join(map(str, args))[:120]} failed on {self.target}: {last}")
        return r

    def _shell(self, command: str) -> str:
        return self._adb("shell", command).stdout

    def _pick(self, serial: str | None) -> tuple[str, str | None]:
        """(serial, model) of the phone to use, from `adb devices -l`."""
        listed = self._adb("devices", "-l").stdout
        devices = {}  # serial -> (state, {key: value})
        for line in listed.splitlines():
            parts = line.split()
            if not parts or line.startswith(("List of devices", "*")):
                continue
            devices[parts[0]] = (parts[1] if len(parts) > 1 else "unknown",
                                 dict(p.split(":", 1) for p in parts[2:] if ":" in p))
        connect = "connect it by USB with USB debugging on (Settings > Developer options)"
        if serial is None:
            ready = [s for s, (state, _) in devices.items() if state == "device"]
            if len(ready) > 1:
                raise InputError(None, FIELD, f"{len(ready)} phones attached ({', '.join(ready)}): "
                                 "pick one with --target adb:SERIAL")
            if not devices:
                raise InputError(None, FIELD, f"no phone attached (adb devices -l lists none): {connect}")
            serial = ready[0] if ready else next(iter(devices))
        if serial not in devices:
            raise InputError(None, FIELD, f"phone {serial} not attached (adb devices -l lists "
                             f"{', '.join(devices) or 'none'}): {connect}")
        state, info = devices[serial]
        if state == "unauthorized":
            raise InputError(None, FIELD, f"phone {serial} is unauthorized: unlock it and accept the "
                             "'Allow USB debugging?' prompt, then run again")
        if state != "device":
            raise InputError(None, FIELD, f"phone {serial} is {state} (expected device): reconnect it, or "
                             "`adb kill-server` and run again")
        return serial, info.get("model")

    def cpus(self) -> int:
        return self._cpus

    def device(self) -> dict:
        return {"name": self.target, "model": self.model, "abi": ABI, "cpus": self.cpus(),
                "build": "android-ndk" if self.variant == "android" else "static linux-arm64 (glibc)"}

    # -- the runner

    def binary(self, name: str = TRAINER) -> str:
        if self.variant == "arm64":
            print("mfbench: ANDROID_NDK_HOME not set: pushing the static linux-arm64 (glibc) build, which runs "
                  "on Android as a static binary", file=sys.stderr, flush=True)
        local = _built(self.variant, name)
        remote = f"{ADB_ROOT}/bin/{name}"
        self._adb("push", local, remote)
        return remote

    def prepare(self, spec: Path, resume: bool = False, name: str = TRAINER) -> str:
        """Push the binary, the model, the tokens and a run.json whose paths are relative to
        the run's folder on the phone; a fresh run starts with an empty out/, a resumed one
        with this machine's copy of it (its checkpoints and trace)."""
        self.binary(name)
        spec = Path(spec)
        run = json.loads(spec.read_text())
        out = Path(run["out"])
        self.run_dir = f"{ADB_ROOT}/runs/" + re.sub(r"[^A-Za-z0-9._-]", "_", f"{out.parent.name}-{out.name}")
        # every path a run spec holds (a new one, such as a shard folder, is added here)
        shipped = {("model", "config"): "model/config.json", ("model", "weights"): "model/model.safetensors",
                   ("data", "tokens"): "data/tokens.bin"}
        for (section, key), there in shipped.items():
            if run[section].get(key):
                self._adb("push", run[section][key], f"{self.run_dir}/{there}")
                run[section][key] = there
        run["out"] = "out"
        staged = out / ".adb" / "run.json"
        from mfbench.files import write_atomic
        write_atomic(staged, json.dumps(run, indent=2) + "\n")
        self._adb("push", staged, f"{self.run_dir}/run.json")
        self._shell(f"rm -rf {self.run_dir}/out && mkdir -p {self.run_dir}/out")
        if resume:
            for entry in sorted(out.iterdir()):
                if entry.name not in (".adb", "run.json") and not entry.name.startswith("."):
                    self._adb("push", entry, f"{self.run_dir}/out/{entry.name}")
        return "run.json"

    def command(self, args: list, name: str = TRAINER) -> list[str]:
        """`adb shell` running ADB_ROOT/bin/NAME (pushed by `binary`) in the run's folder."""
        return [self.adb, "-s", self.serial, "shell",
                f"cd {self.run_dir or ADB_ROOT} && " + shlex.join([f"{ADB_ROOT}/bin/{name}", *map(str, args)])]

    def workdir(self, local: Path) -> str:
        there = f"{ADB_ROOT}/work"
        self._shell(f"mkdir -p {there}")
        return there

    def put(self, file: Path, there: str) -> None:
        self._adb("push", file, there)

    def get(self, there: str, file: Path) -> None:
        self._adb("pull", there, file)

    def fetch(self, out: Path) -> None:
        """Pull the phone's out/ into `out` (via a fresh folder, so adb copies the contents)."""
        staging = out / ".adb" / "out"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        self._adb("pull", f"{self.run_dir}/out", staging)
        for entry in staging.iterdir():
            dest = out / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
        shutil.rmtree(staging)
