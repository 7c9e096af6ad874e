"""Fake sysfs trees for the trainer's telemetry (--sysfs-root DIR): the files a phone's kernel
shows under /sys, written by the test, and a tiny trainer run over them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from native_fixtures import make_gpt2, random_token_file

from mfbench.device import control
from mfbench.device.native import trainer_binary


def write_battery(root: Path, name: str = "battery", **files) -> None:
    """<root>/sys/class/power_supply/<name>/ with type Battery and the given files
    (capacity=50, status="Discharging", current_now=-500000, voltage_now=3900000, temp=300);
    a value of None removes that file."""
    d = root / "sys" / "class" / "power_supply" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "type").write_text("Battery\n")
    for key, value in files.items():
        if value is None:
            (d / key).unlink(missing_ok=True)
        else:
            (d / key).write_text(f"{value}\n")


def write_zone(root: Path, index: int, type_: str, millideg: int) -> None:
    d = root / "sys" / "class" / "thermal" / f"thermal_zone{index}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "type").write_text(type_ + "\n")
    (d / "temp").write_text(f"{millideg}\n")


def write_cpufreq(root: Path, cpu: int, max_khz: int, cur_khz: int) -> None:
    d = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpufreq"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpuinfo_max_freq").write_text(f"{max_khz}\n")
    (d / "scaling_cur_freq").write_text(f"{cur_khz}\n")


def trainer_args(model: Path, tokens: Path, out: Path, steps: int, root: Path | None, threads: int = 2) -> list:
    args = [trainer_binary(), "--config", model / "config.json", "--data", tokens, "--seq-len", 8, "--batch", 2,
            "--steps", steps, "--threads", threads, "--out", out, "--no-save", "--quiet", "--sample-ms", 20]
    return args + (["--sysfs-root", root] if root is not None else [])


def controlled(model, tokens, out, steps, root, scheduling, *extra, threads=2):
    """A run driven by `scheduling` over --control stdio: (exit code, stderr lines, trace
    events, summary or None)."""
    code, lines = control.run([*trainer_args(model, tokens, out, steps, root, threads), *extra], scheduling, echo=False)
    trace = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()] if code == 0 else []
    summary = json.loads((out / "summary.json").read_text()) if code == 0 else None
    return code, lines, trace, summary


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random-init GPT-2 saved as an HF folder."""
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "model", seed=0)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return random_token_file(tmp_path_factory.mktemp("data") / "t.tok", 2000, 101, seed=1)
