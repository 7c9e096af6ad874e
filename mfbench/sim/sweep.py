"""Sweeps: simulate devices x workloads x scheduling policies in parallel; a CSV and a Pareto plot.

A sweep file (`workloads/sweeps/*.yaml`):

    name: paper
    steps: 500                 # optimizer steps of every run (default: each workload's)
    battery_start_pct: 100
    devices: [pixel8, pixel7pro]
    workloads: [../paper/gpt2-full-seq128.yaml]     # relative to the sweep file
    scheduling:                # each replaces the workload's own scheduling policy
      - {policy: paper}
      - {policy: thermal_pacer, limit_c: 42}
"""
from __future__ import annotations

import csv
import itertools
import multiprocessing
from dataclasses import asdict
from pathlib import Path

from pydantic import Field

from mfbench.errors import InputError, Int, Strict, load_schema
from mfbench.files import atomic
from mfbench.spec.profile import AmbientC, BatteryPct
from mfbench.spec.workload import PolicySpec
from mfbench.units import MB

COLUMNS = ["workload", "device", "scheduling", "steps", "median_step_s", "wall_s", "wall_tokens_per_s", "energy_j",
           "j_per_token", "peak_memory_bytes", "battery_drop_pct", "max_temperature_c", "io_read_bytes", "killed",
           "kill_reason", "stop_reason"]


class Sweep(Strict):
    name: str
    steps: Int | None = Field(None, gt=0)
    battery_start_pct: BatteryPct = 100.0
    ambient_c: AmbientC | None = None
    devices: tuple[str, ...] = Field(min_length=1)
    workloads: tuple[str, ...] = Field(min_length=1)
    scheduling: tuple[PolicySpec, ...] = (PolicySpec(),)


def label(spec: PolicySpec) -> str:
    """`thermal_pacer(limit_c=40)`, or just `paper` without parameters."""
    params = ",".join(f"{k}={v}" for k, v in spec.params.items())
    return f"{spec.policy}({params})" if params else spec.policy


def load_sweep(path: str | Path) -> tuple[Sweep, list[tuple[Path, str, PolicySpec]]]:
    """Validate the sweep file and everything it names; return it with its list of runs."""
    from mfbench import policies
    from mfbench.spec.profile import load_device
    from mfbench.spec.workload import load_workload

    path = Path(path)
    sweep = load_schema(Sweep, path)
    for i, device in enumerate(sweep.devices):
        try:
            load_device(device)
        except InputError as e:
            raise InputError(path, f"devices[{i}]", e.message) from None
    for i, spec in enumerate(sweep.scheduling):
        try:
            policies.make("scheduling", spec)
        except InputError as e:
            raise InputError(path, f"scheduling[{i}]" + (f".{e.field}" if e.field else ""), e.message) from None
    workloads = [(path.parent / w).resolve() for w in sweep.workloads]
    for i, w in enumerate(workloads):
        if not w.exists():
            raise InputError(path, f"workloads[{i}]", f"expected a workload file (relative to the sweep file); "
                             f"{w} does not exist")
        load_workload(w)
    return sweep, list(itertools.product(workloads, sweep.devices, sweep.scheduling))


def run_one(job) -> dict:
    """One simulation of the sweep (runs in a worker process)."""
    from mfbench import sim
    from mfbench.spec.workload import load_workload

    sweep, (workload_path, device, spec) = job
    workload = load_workload(workload_path).model_copy(update={"scheduling": spec})
    s, _ = sim.simulate(workload, device, steps=sweep.steps, battery_start_pct=sweep.battery_start_pct,
                        ambient_c=sweep.ambient_c, trace_ops_steps=0, progress=False,
                        base_dir=workload_path.parent)
    row = {**asdict(s), "device": device, "scheduling": label(spec)}  # summary fields by their schema names
    return {k: row[k] for k in COLUMNS}


def run_sweep(path: str | Path, out_dir: str | Path | None = None, processes: int = 2, progress: bool = True):
    """Run every device x workload x scheduling policy; write results.csv and pareto.png."""
    from tqdm import tqdm

    sweep, jobs = load_sweep(path)
    out = Path(out_dir or f"runs/sweep-{sweep.name}")
    out.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        rows = list(tqdm(pool.imap(run_one, [(sweep, job) for job in jobs]), total=len(jobs), unit="run",
                         desc=f"sweep {sweep.name}", disable=not progress))
    with atomic(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_pareto(rows, out / "pareto.png", f"sweep {sweep.name}: {sweep.steps or 'workload'} steps "
                f"from {sweep.battery_start_pct:g} % battery")
    return rows, out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((a <= x and b <= y) and (a < x or b < y) for a, b in points)]


def plot_pareto(rows: list[dict], path: Path, title: str) -> None:
    """One panel per workload: completion time vs energy per token; color = device,
    marker = scheduling policy, size = peak memory; the Pareto front is drawn and labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    schedulers = list(dict.fromkeys(r["scheduling"] for r in rows))
    colors = dict(zip(devices, plt.cm.tab10.colors))
    markers = dict(zip(schedulers, "osD^vP*Xph"))
    cols = min(2, len(workloads))
    nrows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, 5.2 * nrows), squeeze=False)
    peak_max = max(r["peak_memory_bytes"] for r in rows) or 1
    for ax, workload in zip(axes.flat, workloads):
        done = [r for r in rows if r["workload"] == workload and not r["killed"] and r["steps"] > 0]
        for r in done:
            ax.scatter(r["wall_s"] / 3600, r["j_per_token"], s=30 + 270 * r["peak_memory_bytes"] / peak_max,
                       c=[colors[r["device"]]], marker=markers[r["scheduling"]], alpha=0.75, edgecolors="k",
                       linewidths=0.5)
        front = sorted((done[i] for i in pareto_front([(r["wall_s"], r["j_per_token"]) for r in done])),
                       key=lambda r: r["wall_s"])
        if front:
            ax.plot([r["wall_s"] / 3600 for r in front], [r["j_per_token"] for r in front], "k--", lw=1,
                    label="Pareto front")
            for k, r in enumerate(front):  # alternate above and below so neighbours do not collide
                ax.annotate(f"{r['device']} · {r['scheduling']}", (r["wall_s"] / 3600, r["j_per_token"]),
                            textcoords="offset points", xytext=(10, 10 if k % 2 == 0 else -14), fontsize=7,
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})
        killed = [r for r in rows if r["workload"] == workload and (r["killed"] or r["steps"] == 0)]
        note = f"; not shown, killed or stopped: {len(killed)}" if killed else ""
        ax.set_title(f"{workload}{note}", fontsize=10)
        if killed and len(killed) == sum(r["workload"] == workload for r in rows):
            ax.text(0.5, 0.5, f"every run killed or stopped\n(peak {max(r['peak_memory_bytes'] for r in killed) / MB:,.0f} MB)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=10, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("completion time (h, sleeps included)")
        ax.set_ylabel("energy per token (J)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.12)  # room for the labels at the edges
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    handles = ([Line2D([], [], ls="", marker="o", color=colors[d], label=d) for d in devices] +
               [Line2D([], [], ls="", marker=markers[s], color="grey", label=s) for s in schedulers] +
               [Line2D([], [], ls="--", color="k", label="Pareto front (time, energy)")])
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
               title=f"marker size: peak memory (largest {peak_max / MB:,.0f} MB)", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * (len(handles) // 6), 1, 0.97))
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
