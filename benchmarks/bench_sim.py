"""Simulator speed: GPT-2 small Full-FT on Pixel 8 with all of the physics and the paper's scheduler.

    python benchmarks/bench_sim.py            # prints wall-clock seconds per run

Targets (issue 5): 2,000 steps in under 2 s and 20,000 steps in under 4 s on a 2-core host.
The device is on its charger so every step runs (from a full battery, Pixel 8 empties well
before 20,000 steps of GPT-2 Full-FT): static, uncore and temperature-dependent leakage power,
the junction/board/battery RC network, the Thermal HAL governor with hysteresis and polling,
CC/CV charging with its heat and hot cut, R(T) and I^2 R, and memory pressure draws, all
integrated every step; fast-forward is keyed on the clusters, threads, frequencies and shards.
Also times stepping through every step in SimPy (fast-forward off), for comparison.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mfbench import sim  # noqa: E402
from mfbench.spec.profile import load_device  # noqa: E402
from mfbench.spec.workload import PolicySpec, load_workload  # noqa: E402

WORKLOAD = ROOT / "workloads" / "paper" / "gpt2-full-seq128.yaml"


def timed(steps: int, fast_forward: bool = True) -> tuple[float, object]:
    workload = load_workload(WORKLOAD).model_copy(update={"scheduling": PolicySpec(policy="paper")})
    device = load_device("pixel8")
    start = time.perf_counter()
    summary, _ = sim.simulate(workload, device, steps=steps, charging=True, progress=False,
                              fast_forward=fast_forward, base_dir=WORKLOAD.parent)
    return time.perf_counter() - start, summary


def main() -> None:
    print(f"{'run':<38} {'seconds':>8}  {'target':>7}  steps  simulated")
    for steps, fast_forward, target in ((2_000, True, 2.0), (20_000, True, 4.0), (2_000, False, None)):
        seconds, s = timed(steps, fast_forward)
        name = f"{steps:,} steps, fast-forward {'on' if fast_forward else 'off'}"
        verdict = "" if target is None else (f"< {target:g} s" + (" ok" if seconds < target else " MISSED"))
        print(f"{name:<38} {seconds:8.2f}  {verdict:>7}  {s.steps:>5}  {s.wall_s / 3600:.1f} h, "
              f"max {s.max_temperature_c:.1f} C, {s.median_step_s:.2f} s/step")


if __name__ == "__main__":
    main()
