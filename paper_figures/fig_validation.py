"""Validation: the simulator's prediction against the native trainer's measurement, workload
by workload, on this machine with its calibrated profile (`mfbench validate`, read from its
stored report). Left: median step time; right: peak memory; the dashed band is the target
(step time within 5 %, peak memory within 2 %); the title gives the mean absolute % error."""
from __future__ import annotations

import json

from mfbench.analysis.figures import DOUBLE, Context, look

DEVICE = "host"
BANDS = {"step_s": 5.0, "peak_mb": 2.0}


def make(ctx: Context):
    report = ctx.runs / "validation" / f"report-{DEVICE}" / "validation.json"
    rows = []
    if report.is_file():
        data = json.loads(report.read_text())
        for r in data["rows"]:
            if "error" in r:  # a workload the trainer could not run
                continue
            rows.append({"workload": r["workload"], "runs": r["runs"],
                         **{f"{side}_{m}": r[side][m] for side in ("predicted", "measured") for m in BANDS},
                         **{f"error_pct_{m}": r["error_pct"][m] for m in BANDS},
                         **{f"spread_pct_{m}": r["spread_pct"][m] for m in BANDS}})
    else:
        ctx.missing("the validation set on this machine",
                    "mfbench calibrate --target local --out devices/host.yaml && "
                    "mfbench validate workloads/validation/*.yaml --device host --fresh")
    fig = ctx.figure(DOUBLE, 2.8)
    for ax, metric, label in zip(fig.subplots(1, 2), BANDS, ("median step time (s)", "peak memory (MB)")):
        points = [(r[f"measured_{metric}"], r[f"predicted_{metric}"]) for r in rows
                  if r[f"measured_{metric}"] is not None and r[f"predicted_{metric}"] is not None]
        if points:
            lo, hi = min(min(p) for p in points) / 1.3, max(max(p) for p in points) * 1.3
            band = BANDS[metric] / 100
            ax.fill_between([lo, hi], [lo * (1 - band), hi * (1 - band)], [lo * (1 + band), hi * (1 + band)],
                            color="0.85", label=f"within ±{BANDS[metric]:g} %")
            ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.8, linestyle="--", label="predicted = measured")
            ax.plot(*zip(*points), linestyle="none", label="a validation workload", **look("measured"))
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            errors = [abs(r[f"error_pct_{metric}"]) for r in rows if r[f"error_pct_{metric}"] is not None]
            ax.set_title(f"MAPE {sum(errors) / len(errors):.1f} % ({len(errors)} workloads)")
            ax.legend(loc="upper left")
        else:
            ax.text(0.5, 0.5, "no stored report:\nmfbench validate", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
    return ctx.save(fig, "validation", rows or [{"workload": "", "runs": 0}])
