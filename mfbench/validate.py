"""`mfbench validate`: the simulator's error against measured runs, workload by workload.

For each workload: the prediction (`mfbench simulate` on the profile) and `repeat` measured
runs (`mfbench run` on the target, stored as RUNS/WORKLOAD/measured-TARGET-i and reused
unless `fresh`). Measured step time is the median over the runs of each run's median step;
peak memory the median of their peak RSS. The error is (predicted - measured) / measured;
the spread is how far apart the runs are: (max - min) / median. Before each fresh local run
a probe GEMM (PROBE) and a reference training step (calibrate.REFERENCE) are timed, and the
report gives the machine's speed by both against its calibration. Writes report.txt,
validation.csv, validation.json and validation.png to `out`; returns the table.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path

from mfbench.calibrate import REFERENCE, reference_step_seconds, run_bench
from mfbench.errors import InputError
from mfbench.units import MB

DEFAULT_RUNS = Path("runs") / "validation"
PREDICT_STEPS = 5   # simulated steps (identical after the first: the simulator is deterministic)
METRICS = ("step_s", "peak_mb", "io_read_mb", "io_write_mb", "energy_j_per_step")  # I/O: MB a step


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured in %; None when either is unknown or measured is 0."""
    if predicted is None or measured is None or measured == 0:
        return None
    return 100.0 * (predicted - measured) / measured


def spread_pct(values: list[float]) -> float | None:
    """(max - min) / median of repeated measurements, in %."""
    if len(values) < 2:
        return None
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


# A GEMM every calibration times (calibrate.GRID, cold), timed again before each measured run
# on this machine: how fast the machine is then against when it was calibrated (a shared
# virtual machine's speed wanders over minutes). Reported, never used to correct anything.
PROBE = (1024, 1024, 1024)
PROBE_GEMM = [0, 0, *PROBE, 1]  # as mfbench-bench's spec and results name it: no transpose, cold


def probe_seconds() -> float:
    """The probe GEMM's median time now, on every usable core (the fastest cluster's)."""
    from mfbench.device.run import usable_cores
    from mfbench.device.runners import Local
    result = run_bench({"gemm": [PROBE_GEMM], "threads": [usable_cores()], "min_time_s": 0.3}, Local())
    return min(g["seconds"] for c in result["clusters"] for g in c["gemm"])


def calibrated_probes(profile_name: str) -> dict:
    """The probe GEMM's time and the reference step's in the profile's calibration
    (runs/calibrate-NAME/bench.json), where kept: {"gemm_s", "reference_step_s"}."""
    from mfbench.device.run import usable_cores
    try:
        raw = json.loads((Path("runs") / f"calibrate-{profile_name}" / "bench.json").read_text())["result"]
        times = [g["seconds"] for c in raw["clusters"] for g in c["gemm"]
                 if g["shape"] == PROBE_GEMM and g["threads"] == usable_cores()]
    except (OSError, ValueError, KeyError, TypeError):
        return {"gemm_s": None, "reference_step_s": None}
    return {"gemm_s": min(times) if times else None, "reference_step_s": raw.get("reference_step_s")}


def measured_run(workload: Path, target: str, runs: Path, i: int, fresh: bool, steps: int | None,
                 command: str) -> tuple:
    """(summary, probes) of measured run `i` of `workload` (run now when missing or fresh; the
    probes, the GEMM's `seconds` and the `reference_step_s`, timed just before a local run)."""
    from mfbench.contracts.trace import read_summary
    from mfbench.device import run
    from mfbench.files import write_atomic

    folder = runs / workload.stem / f"measured-{target}-{i}"
    if fresh or not (folder / "summary.json").is_file():
        os.sync()  # the page cache's dirty pages written first, so that no earlier run's write-back slows this one
        probe = {"shape": PROBE, "seconds": probe_seconds() if target == "local" else None,
                 "reference_step_s": reference_step_seconds(target) if target == "local" else None}
        summary, _ = run.run(workload, target=target, steps=steps, out=folder, command=command, checkpoint_every=0)
        write_atomic(folder / "probe.json", json.dumps(probe) + "\n")
    else:
        summary = read_summary(folder / "summary.json")
        try:
            probe = json.loads((folder / "probe.json").read_text())
        except (OSError, ValueError):
            probe = {}
    return summary, probe


REGIONS = ("blocks.forward", "blocks.recompute", "blocks.backward", "head", "embed", "update", "other")


def region_of(op_name: str) -> str:
    """The region an op event belongs to, as the trainer times them: blocks by phase, the head
    (forward and backward: the trainer runs them together chunk by chunk), the embeddings,
    the update. Simulated ops are named mbK.OWNER.KERNEL.PHASE, the trainer's OWNER.PHASE."""
    parts = op_name.split(".")
    if parts[0] == "update":
        return "update"
    owner = parts[1] if parts[0][:2] == "mb" and parts[0][2:].isdigit() else parts[0]
    if owner.startswith("block"):
        return f"blocks.{parts[-1]}"
    return owner if owner in REGIONS else "other"


def regions(events: list[dict]) -> dict | None:
    """Seconds a step in each region (REGIONS), from the op events of the second and third
    steps (the trainer's first warms up); `other` is the rest of the step: io waits, zeroing
    the gradients. None without op events."""
    steps = [e for e in events if e["type"] == "step"][1:3]
    ops = [e for e in events if e["type"] == "op"]
    out = dict.fromkeys(REGIONS, 0.0)
    for step in steps:
        begin = step["t"] - step["duration"]
        inside = [e for e in ops if begin <= e["start"] < step["t"]]
        if not inside:
            return None
        for e in inside:
            out[region_of(e["name"])] += e["duration"]
        out["other"] += step["duration"] - sum(e["duration"] for e in inside)
    return {k: v / len(steps) for k, v in out.items()} if steps else None


def row(workload: Path, predicted, runs: list[tuple]) -> dict:
    """One workload's predicted and measured values, errors and spreads; runs: (summary, probes)."""
    measured = [s for s, _ in runs]
    def energy_per_step(s):
        return s.energy_j / s.steps if s.energy_j is not None and s.steps else None
    m_steps = [s.median_step_s for s in measured if s.median_step_s is not None]
    m_peaks = [s.peak_memory_bytes / MB for s in measured]
    m_energy = [e for e in map(energy_per_step, measured) if e is not None]
    r = {"workload": workload.stem, "runs": len(measured), "steps": [s.steps for s in measured],
         "predicted": {"step_s": predicted.median_step_s, "peak_mb": predicted.peak_memory_bytes / MB,
                       "io_read_mb": predicted.io_read_bytes / MB / predicted.steps,
                       "io_write_mb": predicted.io_write_bytes / MB / predicted.steps,
                       "energy_j_per_step": energy_per_step(predicted) if m_energy else None},
         "measured": {"step_s": statistics.median(m_steps) if m_steps else None,
                      "peak_mb": statistics.median(m_peaks),
                      "io_read_mb": statistics.median(s.io_read_bytes / MB / s.steps for s in measured if s.steps),
                      "io_write_mb": statistics.median(s.io_write_bytes / MB / s.steps for s in measured if s.steps),
                      "energy_j_per_step": statistics.median(m_energy) if m_energy else None},
         "spread_pct": {"step_s": spread_pct(m_steps), "peak_mb": spread_pct(m_peaks)},
         "probe_s": [p.get("seconds") for _, p in runs],
         "reference_step_s": [p.get("reference_step_s") for _, p in runs]}
    r["error_pct"] = {k: error_pct(r["predicted"][k], r["measured"][k]) for k in METRICS}
    # a step of either side moves the same bytes (the runs differ in their number of steps)
    r["io_exact"] = (predicted.io_read_bytes * measured[0].steps == measured[0].io_read_bytes * predicted.steps and
                     predicted.io_write_bytes * measured[0].steps == measured[0].io_write_bytes * predicted.steps)
    return r


def mape(rows: list[dict], metric: str) -> float | None:
    errors = [abs(r["error_pct"][metric]) for r in rows if r.get("error_pct", {}).get(metric) is not None]
    return sum(errors) / len(errors) if errors else None


def format_table(rows: list[dict], device: str, target: str, calibrated: dict | None = None) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    head = ("workload", "pred s", "meas s", "err %", "spread %", "pred MB", "meas MB", "err %", "spread %",
            "I/O", "energy err %")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append((r["workload"], "not runnable: " + r["error"], *[""] * (len(head) - 2)))
            continue
        p, m, e, s = r["predicted"], r["measured"], r["error_pct"], r["spread_pct"]
        lines.append((r["workload"], f(p["step_s"], ".3f"), f(m["step_s"], ".3f"), f(e["step_s"], "+.1f"),
                      f(s["step_s"], ".1f"), f(p["peak_mb"], ",.1f"), f(m["peak_mb"], ",.1f"), f(e["peak_mb"], "+.1f"),
                      f(s["peak_mb"], ".1f"), "exact" if r["io_exact"] else "differs",
                      f(e["energy_j_per_step"], "+.1f") if p["energy_j_per_step"] is not None else "no sensor"))
    ok = [r for r in rows if "error" not in r]
    widths = [max(len(str(line[i])) for line in lines if not str(line[1]).startswith("not runnable") or i == 0)
              for i in range(len(head))]
    out = []
    for line in lines:
        if str(line[1]).startswith("not runnable"):
            out.append(f"{line[0]:<{widths[0]}}  {line[1]}")
        else:
            out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    out.insert(1, "  ".join("-" * w for w in widths))
    spreads = [r["spread_pct"]["step_s"] for r in ok if r["spread_pct"]["step_s"] is not None]
    out += ["", f"device {device}, target {target}, {len(ok)} workloads measured"
            + (f", {len(rows) - len(ok)} not runnable" if len(rows) > len(ok) else ""),
            f"step-time MAPE {f(mape(ok, 'step_s'), '.1f')} %, peak-memory MAPE {f(mape(ok, 'peak_mb'), '.1f')} %, "
            f"I/O bytes exact in {sum(r['io_exact'] for r in ok)} of {len(ok)}",
            f"spread of repeated runs' median step: at most {f(max(spreads) if spreads else None, '.1f')} %, "
            f"median {f(statistics.median(spreads) if spreads else None, '.1f')} %"]
    calibrated = calibrated or {}
    for key, what, at in (("probe_s", f"probe GEMM {'x'.join(map(str, PROBE))}", "gemm_s"),
                          ("reference_step_s", f"reference step ({REFERENCE.stem})", "reference_step_s")):
        probes = [p for r in ok for p in r.get(key, []) if p is not None]
        if probes:  # the machine's speed run by run (a shared host drifts), and at calibration
            out.append(f"{what} before each run: {min(probes) * 1e3:.1f} to {max(probes) * 1e3:.1f} ms (median "
                       f"{statistics.median(probes) * 1e3:.1f}); at calibration "
                       + (f"{calibrated[at] * 1e3:.1f} ms" if calibrated.get(at) else "not kept"))
    return "\n".join(out)


def format_regions(rows: list[dict]) -> str:
    """Where a step's time goes, region by region: predicted / measured ms a step."""
    from mfbench.table import table
    shown = [r for r in rows if "error" not in r and all(r["regions"].values())]
    used = [k for k in REGIONS if any(r["regions"]["predicted"][k] or r["regions"]["measured"][k] for r in shown)]
    cells = [(r["workload"], *(f"{r['regions']['predicted'][k] * 1e3:.0f}/{r['regions']['measured'][k] * 1e3:.0f}"
                               for k in used)) for r in shown]
    return ("where a step's time goes, predicted/measured ms (the second and third steps; head: its forward and "
            "backward; other: io waits, zeroing)\n" + table(cells, ("workload", *used), right=range(1, len(used) + 1)))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels: step time and peak memory, % error per workload, with the targets' bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mfbench.files import atomic
    ok = [r for r in rows if "error" not in r]
    names = [r["workload"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(ok) + 2.2), sharey=True)
    for ax, metric, label, band in ((axes[0], "step_s", "step time", 5.0), (axes[1], "peak_mb", "peak memory", 2.0)):
        errs = [r["error_pct"][metric] or 0.0 for r in ok]
        spreads = [r["spread_pct"][metric] or 0.0 for r in ok]
        y = range(len(ok))
        ax.axvspan(-band, band, color="tab:green", alpha=0.12, label=f"target ±{band:g} %")
        ax.barh(y, errs, xerr=[s / 2 for s in spreads], color=["tab:blue" if abs(e) <= band else "tab:red" for e in errs],
                capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("(predicted − measured) / measured, %")
        m = mape(ok, metric)
        ax.set_title(f"{label}: MAPE {m:.1f} %" if m is not None else label)
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, -1.5 * band), max(hi, 1.5 * band))
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(range(len(ok))), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title + "\n(whiskers: ± half the spread of the repeated measured runs)", fontsize=10)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    from mfbench.files import write_atomic
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["workload", "runs", *(f"{side}_{m}" for side in ("predicted", "measured") for m in METRICS),
                *(f"error_pct_{m}" for m in METRICS), "spread_pct_step_s", "spread_pct_peak_mb", "io_exact", "not_runnable"])
    for r in rows:
        if "error" in r:
            w.writerow([r["workload"], 0, *[""] * (3 * len(METRICS) + 3), r["error"]])
            continue
        w.writerow([r["workload"], r["runs"], *(r[side][m] for side in ("predicted", "measured") for m in METRICS),
                    *(r["error_pct"][m] for m in METRICS), r["spread_pct"]["step_s"], r["spread_pct"]["peak_mb"],
                    r["io_exact"], ""])
    write_atomic(path, buf.getvalue())


def validate(workloads: list[str | Path], device: str | Path, *, target: str = "local", runs: str | Path | None = None,
             fresh: bool = False, steps: int | None = None, out: str | Path | None = None, repeat: int = 2,
             command: str = "", progress: bool = True) -> str:
    """Predict and measure (or read stored measurements of) each workload; write the report
    files to `out` and return the table."""
    from mfbench import sim
    from mfbench.contracts.trace import read_trace
    from mfbench.device import runners
    from mfbench.files import write_atomic
    from mfbench.spec.profile import load_device

    runners.get(target)  # an unknown target, a missing tool or phone is named before any work
    if repeat < 1:
        raise InputError(None, "--repeat", f"expected at least 1 run, got {repeat}")
    profile = load_device(device)
    paths = [Path(w) for w in workloads]
    for p in paths:
        if not p.is_file():
            raise InputError(p, None, "file not found (expected a workload YAML)")
    runs = Path(runs) if runs else DEFAULT_RUNS
    # the repeats in rounds (every workload once, then again): their spread then shows how far
    # the machine's speed moved over the whole check, not over a minute
    measured: dict[Path, list] = {p: [] for p in paths}
    errors: dict[Path, str] = {}
    for i in range(1, repeat + 1):
        for p in paths:
            if p in errors:
                continue
            try:
                measured[p].append(measured_run(p, target, runs, i, fresh, steps, command))
            except InputError as e:  # a value the trainer cannot run yet: reported, not fatal
                errors[p] = e.message if e.field is None else f"{e.field}: {e.message}"
    rows = []
    for p in paths:
        if p in errors:
            rows.append({"workload": p.stem, "error": errors[p]})
            continue
        predicted, events = sim.simulate(p, profile, steps=PREDICT_STEPS, progress=False, trace_ops_steps=3)
        r = row(p, predicted, measured[p])
        try:
            measured_events = read_trace(runs / p.stem / f"measured-{target}-1" / "trace.jsonl")
        except (OSError, InputError):  # a run kept without its trace: no breakdown
            measured_events = []
        r["regions"] = {"predicted": regions(events), "measured": regions(measured_events)}
        rows.append(r)
    out = Path(out) if out else runs / f"report-{profile.name}"
    table = format_table(rows, profile.name, target, calibrated_probes(profile.name)) + "\n\n" + \
        format_regions(rows)
    write_atomic(out / "report.txt", table + "\n")
    write_atomic(out / "validation.json", json.dumps({"device": profile.name, "target": target, "command": command,
                                                      "mape_step_pct": mape(rows, "step_s"),
                                                      "mape_peak_pct": mape(rows, "peak_mb"), "rows": rows}, indent=1) + "\n")
    write_csv(rows, out / "validation.csv")
    plot(rows, out / "validation.png", f"mfbench validate: {profile.name} (predicted) vs {target} (measured)")
    return table + f"\n\nwrote {out}/report.txt, validation.csv, validation.json, validation.png"
