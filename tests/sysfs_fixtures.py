"""Fake sysfs trees for the trainer's telemetry (--sysfs-root DIR): the files a phone's kernel
shows under /sys, written by the test, and a tiny trainer run over them."""
from __future__ import annotations

import json
import math
import os
import threading
import time
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


class EmulatedPhone:
    """A phone's battery and skin sensors over a fake sysfs tree, driven by what a process does.

    Every `tick` seconds the battery's current is what the emulated CPU draws,
    P = idle + static (while any core runs) + busy cores x dyn(f): busy cores are the process's
    threads running or waiting for a CPU (state R in /proc/PID/task/*/stat) more than half of
    the last 0.25 s, f the frequency limit it set (scaling_max_freq of its CPUs; the table is
    `dyn_w`'s keys, kHz). The skin zone is one RC node heated by P: T = ambient + x,
    R C dx/dt = P R - x, exact over each tick. A closed form of its own, not the simulator's
    network."""

    def __init__(self, root: Path, cpus: list[int], idle_w: float, static_w: float, dyn_w: dict[int, float],
                 r_c_per_w: float, c_j_per_c: float, ambient_c: float, volts: float = 3.9, tick: float = 0.02,
                 table: bool = True):
        self.root, self.cpus, self.idle_w, self.static_w, self.dyn_w = root, cpus, idle_w, static_w, dyn_w
        self.r, self.c, self.ambient, self.volts, self.tick = r_c_per_w, c_j_per_c, ambient_c, volts, tick
        self.x = idle_w * r_c_per_w  # at rest: idle power's steady state
        khz = sorted(dyn_w)
        for cpu in cpus:
            d = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpufreq"
            d.mkdir(parents=True, exist_ok=True)
            for name, value in (("cpuinfo_max_freq", khz[-1]), ("scaling_available_frequencies", " ".join(map(str, khz))),
                                ("scaling_min_freq", khz[0]), ("scaling_max_freq", khz[-1]), ("scaling_cur_freq", khz[-1])):
                if table or name != "scaling_available_frequencies":  # without it: the governor's (no steps to set)
                    (d / name).write_text(f"{value}\n")
        write_battery(root, capacity=80, status="Discharging", voltage_now=int(volts * 1e6), current_now=0, temp=None)
        write_zone(root, 0, "skin-therm", 0)
        self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def limit_khz(self) -> int:
        d = self.root / "sys" / "devices" / "system" / "cpu" / f"cpu{self.cpus[0]}" / "cpufreq" / "scaling_max_freq"
        try:
            return int(d.read_text())
        except ValueError:  # caught mid-write
            return max(self.dyn_w)

    def power_w(self, busy: float, khz: int) -> float:
        return self.idle_w + self.static_w * min(1.0, busy) + busy * self.dyn_w[khz]

    def start(self, pid: int) -> None:
        self.pid = pid
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _running(self) -> set[str] | None:
        """The process's threads running or waiting for a CPU now (state R); None once it ended."""
        running, tasks = set(), Path(f"/proc/{self.pid}/task")
        try:
            for task in tasks.iterdir():
                try:
                    if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                        running.add(task.name)
                except (OSError, IndexError):
                    pass
        except OSError:
            return None
        return running
    def _write(self, p: float = 0.0) -> None:
        for path, value in ((self.root / "sys/class/power_supply/battery/current_now", int(p / self.volts * 1e6)),
                            (self.root / "sys/class/thermal/thermal_zone0/temp", int((self.ambient + self.x) * 1000))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(f"{value}\n")
            os.replace(tmp, path)

    def _loop(self) -> None:
        history = []  # (time, threads running)
        last = time.monotonic()
        while not self._stop.wait(self.tick):
            now, running = time.monotonic(), self._running()
            if running is None:
                break
            history = [h for h in history if now - h[0] < 0.25] + [(now, running)]
            # a busy core: a thread that wants one more than half of the last 0.25 s (the
            # benchmark's GEMM threads, even when another process holds the CPU; not its sampler)
            busy = sum(sum(tid in r for _, r in history) > len(history) / 2 for tid in running)
            p = self.power_w(min(busy, len(self.cpus)), self.limit_khz())
            e = math.exp(-(now - last) / (self.r * self.c))
            self.x = self.x * e + p * self.r * (1 - e)
            last = now
            self._write(p)
