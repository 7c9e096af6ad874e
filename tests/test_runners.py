"""The runners of `mfbench run --target` (mfbench.device.runners), through the real CLI.

Error paths: with PATH holding only what the test puts there, a missing adb, qemu-aarch64 or
cross compiler, no phone, an unauthorized phone are one line and exit 2.

The adb runner against a recorded adb session: `adb` here is a stand-in for the external tool,
written below. It replays what a real adb prints (`adb devices -l`, getprop, push and pull
summaries, their exit codes), keeps the phone's /data/local/tmp in a temporary folder, and its
`shell` runs the command there with the arm64 binary under qemu-aarch64, so the trainer really
runs and a user policy really drives it over the control channel. The test checks the exact
adb command sequence the runner issues. No phone was attached when this was written.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from native_fixtures import make_gpt2, make_tokenizer

from mfbench.device import native
from mfbench.device.data import pydoc_text
from mfbench.errors import InputError

SERIAL = "37281FDJH004XS"
VOCAB = 300
# `adb devices -l` as a real adb 1.0.41 prints it (a Pixel 8 by USB; the same phone before
# its USB-debugging prompt was accepted; a second phone)
LISTED = ("List of devices attached\n"
          f"{SERIAL}         device usb:3-2 product:shiba model:Pixel_8 device:shiba transport_id:1\n\n")
UNAUTHORIZED = f"List of devices attached\n{SERIAL}         unauthorized usb:3-2 transport_id:2\n\n"
TWO = LISTED.rstrip("\n") + "\nR5CW30ABCDE            device usb:3-1 product:e1sxeea model:SM_S921B device:e1s transport_id:3\n\n"
NONE = "List of devices attached\n\n"

# The stand-in adb: argv and the device folder in, a real adb's output and exit code out.
FAKE_ADB = r'''#!{python}
import json, os, shutil, subprocess, sys
HERE = os.path.dirname(os.path.abspath(__file__))
PHONE = os.path.join(HERE, "phone")       # the phone's /data/local/tmp
ROOT = "/data/local/tmp"
args = sys.argv[1:]
with open(os.path.join(HERE, "adb.log"), "a") as log:
    log.write(json.dumps(args) + "\n")
listed = open(os.path.join(HERE, "devices.txt")).read()
ready = [l.split()[0] for l in listed.splitlines()[1:] if l.split()[1:2] == ["device"]]
serial = None
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
if args == ["devices", "-l"]:
    sys.stdout.write(listed)
    sys.exit(0)
if serial is None and len(ready) != 1:
    sys.exit("adb: error: failed to get feature set: " + ("no devices/emulators found" if not ready else
             "more than one device/emulator"))
if serial is not None and serial not in ready:
    sys.exit(f"adb: error: failed to get feature set: device '{serial}' not found")

def phone(path):  # a path on the phone -> its place in the folder
    if not path.startswith(ROOT):
        sys.exit(f"adb: error: failed to copy to '{path}': remote Read-only file system")
    return PHONE + path[len(ROOT):]

def size(path):
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        return len(files), sum(os.path.getsize(f) for f in files)
    return 1, os.path.getsize(path)

def copy(src, dst):  # adb push/pull: into dst/ when dst is a folder; folders recursively
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)   # keeps the mode: an executable stays executable

cmd, rest = args[0], args[1:]
if cmd == "shell":
    line = " ".join(rest)   # adb joins the words; the phone's sh splits them again
    if line == "getprop ro.product.cpu.abi":
        print("arm64-v8a")
        sys.exit(0)
    # the phone's files are the folder's; its arm64 binaries run under qemu-aarch64
    line = line.replace(ROOT + "/mfbench/bin/", "{qemu} " + PHONE + "/mfbench/bin/").replace(ROOT, PHONE)
    sys.exit(subprocess.call(["sh", "-c", line]))
if cmd == "push":
    *sources, dest = rest
    for src in sources:
        if not os.path.exists(src):
            sys.exit(f"adb: error: cannot stat '{src}': No such file or directory")
    for src in sources:
        copy(src, phone(dest))
        n, b = size(src)
        print(f"{src}: {n} file{'s' if n != 1 else ''} pushed, 0 skipped. 212.3 MB/s ({b} bytes in 0.001s)")
    sys.exit(0)
if cmd == "pull":
    src, dest = rest
    if not os.path.exists(phone(src)):
        sys.exit(f"adb: error: failed to stat remote object '{src}': No such file or directory")
    n, b = size(phone(src))
    copy(phone(src), dest)
    print(f"{src}/: {n} files pulled, 0 skipped. 35.1 MB/s ({b} bytes in 0.004s)")
    sys.exit(0)
sys.exit(f"adb: unknown command {cmd}")
'''


def tools(folder: Path, *names: str) -> Path:
    """A PATH folder holding only these host tools (symlinks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        found = shutil.which(name)
        assert found, f"{name} not installed (see the README's test command)"
        (folder / name).symlink_to(found)
    return folder


def fake_adb(folder: Path, listed: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "adb"
    script.write_text(FAKE_ADB.replace("{python}", sys.executable).replace("{qemu}", shutil.which("qemu-aarch64")))
    script.chmod(0o755)
    (folder / "devices.txt").write_text(listed)
    (folder / "phone").mkdir(exist_ok=True)
    return folder


def issued(folder: Path) -> list[list[str]]:
    log = folder / "adb.log"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A workload folder: a tiny GPT-2 with its tokenizer, prose, a user scheduling policy that
    logs what it observes, and a LoRA workload driven by it."""
    d = tmp_path_factory.mktemp("runners")
    make_tokenizer(make_gpt2(d / "tiny", vocab_size=VOCAB), VOCAB)
    (d / "data.txt").write_text(pydoc_text()[:20_000])
    (d / "my_policies.py").write_text(
        "import json\nfrom mfbench.policies import Scheduling\n\n"
        "class Alternate(Scheduling):\n"
        "    '''One thread on odd steps, two on even ones; every observation appended to `log`.'''\n"
        "    def __init__(self, log):\n        self.log = log\n\n"
        "    def decide(self, obs):\n"
        "        with open(self.log, 'a') as f:\n            f.write(json.dumps(obs) + '\\n')\n"
        "        return {'threads': 1 if obs['step'] % 2 else 2}\n")
    base = {"name": "tiny-lora", "model": "tiny", "method": {"kind": "lora", "targets": ["attn.c_attn"]},
            "data": {"source": "data.txt"}, "seq_len": 16, "batch": 2, "steps": 3, "threads": 2}
    (d / "plain.yaml").write_text(yaml.safe_dump(base))
    (d / "policy.yaml").write_text(yaml.safe_dump(
        {**base, "scheduling": {"policy": "my_policies:Alternate", "log": str(d / "observed.jsonl")}}))
    return d


def mfbench_run(work: Path, *args, path: str):
    env = {**os.environ, "PATH": path, "XDG_CACHE_HOME": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    env.pop(native.NDK_ENV, None)
    return subprocess.run([sys.executable, "-m", "mfbench.cli", "run", *map(str, args)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)


def one_line_exit_2(r, *texts):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("mfbench: error: --target: "), lines
    for text in texts:
        assert text in lines[0], lines[0]


# ---------------------------------------------------------------------------------- error paths

def test_no_adb_says_what_to_install(work, tmp_path):
    r = mfbench_run(work, "plain.yaml", "--target", "adb", path=str(tools(tmp_path / "bin", "cmake")))
    one_line_exit_2(r, "adb not found", "apt-get install adb")


@pytest.mark.parametrize("listed, target, texts", [
    (NONE, "adb", ["no phone attached", "USB debugging"]),
    (UNAUTHORIZED, "adb", [f"phone {SERIAL} is unauthorized", "Allow USB debugging"]),
    (UNAUTHORIZED, f"adb:{SERIAL}", [f"phone {SERIAL} is unauthorized"]),
    (LISTED, "adb:R5CW30ABCDE", ["phone R5CW30ABCDE not attached", f"lists {SERIAL}"]),
    (TWO, "adb", ["2 phones attached", f"{SERIAL}, R5CW30ABCDE", "--target adb:SERIAL"]),
])
def test_no_usable_phone_says_what_to_connect(work, tmp_path, listed, target, texts):
    bin_ = fake_adb(tmp_path / "adb", listed)
    r = mfbench_run(work, "plain.yaml", "--target", target, path=str(bin_))
    one_line_exit_2(r, *texts)
    assert issued(bin_) == [["devices", "-l"]]  # nothing is pushed to a phone that cannot be used


def test_no_qemu_or_no_cross_compiler_says_what_to_install(work, tmp_path):
    r = mfbench_run(work, "plain.yaml", "--target", "qemu-arm64", path=str(tools(tmp_path / "a", "cmake")))
    one_line_exit_2(r, "qemu-aarch64 not found", "apt-get install qemu-user")
    r = mfbench_run(work, "plain.yaml", "--target", "qemu-arm64", path=str(tools(tmp_path / "b", "cmake", "qemu-aarch64")))
    one_line_exit_2(r, "aarch64-linux-gnu-g++ not found", "apt-get install g++-aarch64-linux-gnu")


def test_unknown_target(work, tmp_path):
    r = mfbench_run(work, "plain.yaml", "--target", "adb:", path=os.environ["PATH"])
    one_line_exit_2(r, "unknown target 'adb:'", "local, qemu-arm64, adb or adb:SERIAL")


# ------------------------------------------------------------------- a run over the recorded adb

def test_adb_run_issues_the_expected_commands_and_a_user_policy_drives_it(work, tmp_path):
    """`mfbench run policy.yaml --target adb`: the binary, model, tokens and run spec go to
    /data/local/tmp/mfbench, the trainer runs there under `adb shell` with the control channel on
    stdio (the user policy's decisions reach it), and the outputs come back."""
    bin_ = fake_adb(tmp_path / "adb", LISTED)
    out = tmp_path / "out"
    r = mfbench_run(work, "policy.yaml", "--target", "adb", "--out", out,
                    path=os.pathsep.join([str(bin_), os.environ["PATH"]]))
    assert r.returncode == 0, r.stderr
    assert "ANDROID_NDK_HOME not set: pushing the static linux-arm64 (glibc) build" in r.stderr

    run_dir = "/data/local/tmp/mfbench/runs/tmp_path-out".replace("tmp_path", tmp_path.name)
    spec = json.loads((out / "run.json").read_text())
    s = ["-s", SERIAL]
    assert issued(bin_) == [
        ["devices", "-l"],
        [*s, "shell", "getprop ro.product.cpu.abi"],
        [*s, "shell", "nproc"],
        [*s, "push", str(native.build_dir("arm64") / "mfbench-train"), "/data/local/tmp/mfbench/bin/mfbench-train"],
        [*s, "push", spec["model"]["config"], f"{run_dir}/model/config.json"],
        [*s, "push", spec["model"]["weights"], f"{run_dir}/model/model.safetensors"],
        [*s, "push", spec["data"]["tokens"], f"{run_dir}/data/tokens.bin"],
        [*s, "push", str(out / ".adb" / "run.json"), f"{run_dir}/run.json"],
        [*s, "shell", f"rm -rf {run_dir}/out && mkdir -p {run_dir}/out"],
        [*s, "shell", f"cd {run_dir} && /data/local/tmp/mfbench/bin/mfbench-train --workload run.json "
                      "--sample-ms 50 --checkpoint-every 10 --control stdio --policy Alternate"],
        [*s, "pull", f"{run_dir}/out", str(out / ".adb" / "out")],
    ]
    # the spec on the phone names its files relative to the run's folder
    pushed = json.loads((bin_ / "phone" / run_dir.removeprefix("/data/local/tmp/") / "run.json").read_text())
    assert (pushed["model"], pushed["data"], pushed["out"]) == (
        {"config": "model/config.json", "weights": "model/model.safetensors"}, {"tokens": "data/tokens.bin"}, "out")
    assert spec["provenance"]["device"] == {"name": f"adb:{SERIAL}", "model": "Pixel_8", "abi": "arm64-v8a",
                                            "cpus": os.cpu_count(), "build": "static linux-arm64 (glibc)"}

    # the outputs came back, and the policy drove the run: it saw steps 0, 1, 2 and the trainer
    # ran each step with the threads it chose
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and "openblas" in summary["details"]["gemm"]
    assert (out / "trace.chrome.json").is_file() and (out / "adapter_model.safetensors").is_file()
    observed = [json.loads(x) for x in (work / "observed.jsonl").read_text().splitlines()]
    assert [(o["step"], o["threads"]) for o in observed] == [(0, 2), (1, 2), (2, 1)]
    decisions = [e["choice"] for e in events if e["type"] == "decision"]
    assert decisions == [{"threads": 2}, {"threads": 1}, {"threads": 2}]


def test_a_run_killed_on_the_phone_resumes_there(work, tmp_path, monkeypatch):
    """A policy error at step 4 kills the trainer on the phone; the checkpoints come back with
    the outputs; `--resume` pushes them to the phone again and the run ends as an uninterrupted
    run of the same binary does (losses equal)."""
    from mfbench.device import run
    bin_ = fake_adb(tmp_path / "adb", LISTED)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_), os.environ["PATH"]]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "cache"))
    monkeypatch.delenv(native.NDK_ENV, raising=False)
    monkeypatch.syspath_prepend(str(work))
    (work / "stops.py").write_text(
        "from pathlib import Path\nfrom mfbench.policies import Scheduling\n\n"
        "class StopAt(Scheduling):\n"
        "    # logs each step it is asked about; fails at the step written in the file `stop`, if any\n"
        "    def __init__(self, log, stop):\n        self.log, self.stop = Path(log), Path(stop)\n\n"
        "    def decide(self, obs):\n"
        "        with self.log.open('a') as f:\n            f.write(f\"{obs['step']}\\n\")\n"
        "        if self.stop.exists() and obs['step'] == int(self.stop.read_text()):\n"
        "            raise RuntimeError(f\"stopped at step {obs['step']}\")\n"
        "        return {}\n")
    log, stop = tmp_path / "asked", tmp_path / "stop"
    (work / "stop.yaml").write_text(yaml.safe_dump({
        "name": "tiny-lora", "model": "tiny", "method": {"kind": "lora", "targets": ["attn.c_attn"]},
        "data": {"source": "data.txt"}, "seq_len": 16, "batch": 2, "steps": 6, "threads": 2,
        "scheduling": {"policy": "stops:StopAt", "log": str(log), "stop": str(stop)}}))

    out = tmp_path / "out"
    stop.write_text("4")
    with pytest.raises(InputError, match="RuntimeError: stopped at step 4"):
        run.run(work / "stop.yaml", target="adb", out=out, checkpoint_every=2)
    stop.unlink()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-2.bin", "ckpt-4.bin"]
    before = len(issued(bin_))
    summary, _ = run.run(work / "stop.yaml", target="adb", out=out, resume=True, checkpoint_every=2)
    pushed = [c[3] for c in issued(bin_)[before:] if c[2:3] == ["push"]]
    assert {Path(p).name for p in pushed} >= {"checkpoints", "trace.jsonl.partial"}, pushed
    # the policy was asked before steps 0-4, then (resumed from ckpt-4) before steps 4 and 5
    assert log.read_text().split() == ["0", "1", "2", "3", "4", "4", "5"]

    whole, _ = run.run(work / "stop.yaml", target="qemu-arm64", out=tmp_path / "whole")
    steps = [[json.loads(x) for x in (o / "trace.jsonl").read_text().splitlines()] for o in (out, tmp_path / "whole")]
    losses = [[(e["index"], e["loss"]) for e in t if e["type"] == "step"] for t in steps]
    assert summary.steps == whole.steps == 6 and [i for i, _ in losses[0]] == list(range(6))
    assert losses[0] == losses[1]


# ------------------------------------------------------------- calibrate over the recorded adb

def test_calibrate_s_benchmarks_run_on_the_phone(tmp_path, monkeypatch):
    """`mfbench calibrate --target adb` runs mfbench-bench on the phone: the binary goes to
    /data/local/tmp/mfbench/bin once, each benchmark's spec to its work folder, where the
    benchmark writes its result and its storage file; the result comes back by `adb pull`."""
    from mfbench import calibrate
    from mfbench.device.native import BENCH_NAME
    bin_ = fake_adb(tmp_path / "adb", LISTED)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_), os.environ["PATH"]]))
    monkeypatch.delenv(native.NDK_ENV, raising=False)
    runner = calibrate.check_target("adb")
    runner.binary(BENCH_NAME)
    work = "/data/local/tmp/mfbench/work"
    # (the stand-in maps the phone's paths on command lines only, so the storage folder is
    # named relative to the benchmark's working folder, /data/local/tmp/mfbench)
    spec = {"quiet": True, "gemm": [[0, 0, 64, 48, 32, 0]], "threads": [1], "min_time_s": 0.001,
            "storage": {"dir": "work", "bytes": 1 << 20, "reads": 4}, "power": {"idle_s": 60}}
    result = calibrate.run_bench(spec, runner)
    s = ["-s", SERIAL]
    commands = issued(bin_)
    assert commands[:4] == [["devices", "-l"], [*s, "shell", "getprop ro.product.cpu.abi"], [*s, "shell", "nproc"],
                            [*s, "push", str(native.build_dir("arm64") / BENCH_NAME), f"/data/local/tmp/mfbench/bin/{BENCH_NAME}"]]
    local = commands[5][3]  # the spec, written in a temporary folder here
    assert commands[4:] == [
        [*s, "shell", f"mkdir -p {work}"],
        [*s, "push", local, f"{work}/spec.json"],
        [*s, "shell", f"cd /data/local/tmp/mfbench && /data/local/tmp/mfbench/bin/{BENCH_NAME} {work}/spec.json "
                      f"--out {work}/result.json"],
        [*s, "pull", f"{work}/result.json", str(Path(local).with_name("result.json"))],
    ]
    assert json.loads((bin_ / "phone" / "mfbench" / "work" / "spec.json").read_text()) == spec
    (gemm,) = [g for c in result["clusters"] for g in c["gemm"]]
    assert gemm["shape"] == [0, 0, 64, 48, 32, 0] and gemm["threads"] == 1 and gemm["seconds"] > 0
    assert result["storage"]["bytes"] == 1 << 20 and result["storage"]["write_s"] > 0
    assert result["power"] is None  # no battery behind this phone's /sys (the host's, under qemu)
    # the storage benchmark's file was written there and removed
    assert sorted(p.name for p in (bin_ / "phone" / "mfbench" / "work").iterdir()) == ["result.json", "spec.json"]


def test_calibrate_refuses_qemu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mfbench.cli", "calibrate", "--target", "qemu-arm64", "--out",
                        str(tmp_path / "x.yaml")], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == ("mfbench: error: --target: qemu-arm64 runs the arm64 build for correctness, not timing: "
                        "calibrate on local or adb[:SERIAL]")
