"""Pareto fronts and their plot: one panel per workload, one front per device across policies.

A policy keeps its marker and a device its colour in every plot (built-ins by a fixed table,
others by a hash of the name), so two plots can be read side by side; any number of devices
and policies can be drawn (markers and colours repeat past the tables, the legend still names
each). The legend sits outside the axes and the figure is cropped to include it.
"""
from __future__ import annotations

import zlib
from pathlib import Path

from mfbench.files import atomic
from mfbench.units import MB

# Okabe & Ito's colour-blind-safe palette, then more distinguishable hues
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
          "#882255", "#44AA99", "#999933", "#AA4499")
DEVICE_ORDER = ("pixel8", "pixel8pro", "pixel7pro", "galaxy-s24-ultra", "galaxy-a54", "host", "macbook-air-m2")
POLICY_MARKERS = {"none": "o", "paper": "s", "battery_floor": "D", "charging_only": "v", "thermal_pacer": "^",
                  "cores": "P", "energy_probe": "X"}
MORE_MARKERS = ("<", ">", "p", "h", "*", "d", "8", "H")


def device_color(device: str) -> str:
    if device in DEVICE_ORDER:
        return COLORS[DEVICE_ORDER.index(device)]
    return COLORS[len(DEVICE_ORDER) + zlib.crc32(device.encode()) % (len(COLORS) - len(DEVICE_ORDER))]


def policy_marker(scheduling: str) -> str:
    name = scheduling.split("(")[0]
    return POLICY_MARKERS.get(name) or MORE_MARKERS[zlib.crc32(name.encode()) % len(MORE_MARKERS)]


def pareto_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point beats on every coordinate (lower is better)."""
    return [i for i, p in enumerate(points)
            if not any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p)) for q in points)]


def finished(row: dict) -> bool:
    return not row.get("error") and not row["killed"] and (row["steps"] or 0) > 0


def plot_fronts(rows: list[dict], path: Path, title: str, x: str = "wall_s", y: str = "j_per_token",
                labels: dict[str, str] | None = None) -> None:
    """Completed runs as points (x against y, both lower-better), one front per device per workload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = {"wall_s": "completion time (h, sleeps included)", "j_per_token": "energy per token (J)",
             "peak_memory_bytes": "peak memory (MB)", "battery_drop_pct": "battery drop (%)",
             **(labels or {})}
    scale = {"peak_memory_bytes": 1 / MB}
    if x == "wall_s" and any(r[x] and r[x] > 3600 for r in rows):  # hours for long runs, seconds for short
        scale["wall_s"] = 1 / 3600
    else:
        names["wall_s"] = "completion time (s, sleeps included)"
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    policies = list(dict.fromkeys(r["scheduling"].split("(")[0] for r in rows))
    cols = min(2, len(workloads)) or 1
    nrows = max(1, -(-len(workloads) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False)
    for ax, workload in zip(axes.flat, workloads):
        mine = [r for r in rows if r["workload"] == workload]
        for device in devices:
            done = [r for r in mine if r["device"] == device and finished(r) and r[x] is not None and r[y] is not None]
            for r in done:
                ax.scatter(r[x] * scale.get(x, 1), r[y] * scale.get(y, 1), s=22, c=device_color(device),
                           marker=policy_marker(r["scheduling"]), alpha=0.8, edgecolors="k", linewidths=0.3)
            front = sorted((done[i] for i in pareto_front([(r[x], r[y]) for r in done])), key=lambda r: r[x])
            if front:  # a line through the front, a ring round each of its points (a front may be one point)
                fx, fy = [r[x] * scale.get(x, 1) for r in front], [r[y] * scale.get(y, 1) for r in front]
                ax.plot(fx, fy, "-", color=device_color(device), lw=0.9, alpha=0.9, zorder=0)
                ax.scatter(fx, fy, s=70, facecolors="none", edgecolors=device_color(device), linewidths=0.9)
        lost = [r for r in mine if not finished(r)]
        ax.set_title(workload + (f" ({len(lost)} of {len(mine)} killed, stopped or failed: not drawn)" if lost
                                 else ""), fontsize=7)
        if len(lost) == len(mine):
            ax.text(0.5, 0.5, "no run finished", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                    color="grey")
        ax.set_xlabel(names.get(x, x), fontsize=7)
        ax.set_ylabel(names.get(y, y), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    handles = ([Line2D([], [], ls="-", marker="o", color=device_color(d), label=d, lw=0.9, ms=4) for d in devices] +
               [Line2D([], [], ls="", marker=policy_marker(p), color="grey", label=p, ms=4) for p in policies])
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=6.5, frameon=False,
               title="device (ring and line: its Pareto front)\nscheduler (marker)", title_fontsize=6.5,
               ncol=1 + len(handles) // 24)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=200, bbox_inches="tight")
    plt.close(fig)
