"""Parameter sharding: GPT-2 small Full-FT (sequence 128, batch 8) with its parameters sharded
to flash under budgets from 1200 MB down to the largest shard, LRU (load on demand) vs
prefetch (load the next shard while the current one computes), with and without the
optimizer state and gradients offloaded with their shard.

Rows: Pixel 8 (simulated) and this machine (simulated with the host profile; measured where a
stored `mfbench run` exists). Columns: peak memory and step time against the budget. The
authors' repository reports 2.4 GB without sharding and 1.0 GB at a 512 MB budget for GPT-2
small; it does not state the batch, sequence length, or whether optimizer state was offloaded."""
from __future__ import annotations

import math

from mfbench.analysis.figures import DOUBLE, PAPER_WORKLOADS, Context, look
from mfbench.plan import compile_program
from mfbench.plan.shards import smallest_budget_of
from mfbench.sim import simulate
from mfbench.spec.workload import load_workload
from mfbench.units import MB

WORKLOAD = "gpt2-full-seq128"
BUDGETS = [1200, 900, 650, 512, 400, 300, 250, 200]
QUICK_BUDGETS = [1200, 512, 250]
DEVICES = [("pixel8", "Pixel 8 (simulated)"), ("host", "this machine")]
VARIANTS = [("lru", False), ("prefetch", False), ("lru", True), ("prefetch", True)]
REPORTED = {"none": 2.4 * 1024, 512: 1.0 * 1024}  # MB, the authors' repository README (GPT-2 small)


def sets(policy: str, budget: int, offload: bool) -> list[str]:
    return [f"memory.sharding.policy={policy}", f"memory.sharding.budget_mb={budget}"] + (
        ["memory.offload=[optimizer, gradients]"] if offload else [])


def run_name(policy: str, budget: int, offload: bool) -> str:
    return f"sharding/{WORKLOAD}-{policy}-{budget}mb" + ("-offload" if offload else "")


def make(ctx: Context):
    path = PAPER_WORKLOADS / f"{WORKLOAD}.yaml"
    steps = 2 if ctx.quick else 4  # every sharded step loads and stores the same bytes (the plan's io ops)
    rows = []
    for device, _ in DEVICES:
        base, _ = simulate(path, device, steps=steps, progress=False)
        rows.append({"device": device, "sharding": "none", "offload": False, "budget_mb": "", "source": "predicted",
                     "peak_memory_bytes": base.peak_memory_bytes, "median_step_s": base.median_step_s,
                     "io_read_bytes": base.io_read_bytes})
        for policy, offload in VARIANTS:
            workload = load_workload(path, sets(policy, 1200, offload))
            largest = smallest_budget_of(compile_program(workload, path.parent)) / MB
            budgets = [b for b in (QUICK_BUDGETS if ctx.quick else BUDGETS) if b >= largest]
            budgets.append(math.ceil(largest))  # the smallest budget that runs
            for budget in budgets:
                summary, _ = simulate(load_workload(path, sets(policy, budget, offload)), device, steps=steps,
                                      progress=False, base_dir=path.parent)
                rows.append({"device": device, "sharding": policy, "offload": offload, "budget_mb": budget,
                             "source": "predicted", "peak_memory_bytes": summary.peak_memory_bytes,
                             "median_step_s": summary.median_step_s, "io_read_bytes": summary.io_read_bytes})
                if device == "host":
                    stored = ctx.stored(run_name(policy, budget, offload))
                    if stored is None:
                        ctx.missing(f"{policy} at {budget} MB" + (" with offload" if offload else ""),
                                    f"mfbench run workloads/paper/{WORKLOAD}.yaml --steps 10 "
                                    + " ".join(f"--set '{s}'" for s in sets(policy, budget, offload))
                                    + f" --out runs/{run_name(policy, budget, offload)}/measured-local")
                    else:
                        measured = stored[0]
                        rows.append({**rows[-1], "source": "measured", "peak_memory_bytes": measured.peak_memory_bytes,
                                     "median_step_s": measured.median_step_s, "io_read_bytes": measured.io_read_bytes})

    fig = ctx.figure(DOUBLE, 4.2)
    axes = fig.subplots(len(DEVICES), 2, sharex=True)
    for (device, title), (memory, time) in zip(DEVICES, axes):
        none = next(r for r in rows if r["device"] == device and r["sharding"] == "none")
        for ax, key, scale in ((memory, "peak_memory_bytes", 1 / MB), (time, "median_step_s", 1)):
            ax.axhline(none[key] * scale, color="0.4", linestyle=":", linewidth=0.9, label="no sharding")
            for policy, offload in VARIANTS:
                for source in ("predicted", "measured"):
                    points = sorted((r["budget_mb"], r[key] * scale) for r in rows if r["device"] == device
                                    and r["sharding"] == policy and r["offload"] == offload and r["source"] == source)
                    if points:
                        style = look(policy)
                        ax.plot(*zip(*points), color=style["color"], marker=style["marker"] if source == "predicted" else "o",
                                linestyle="--" if offload else "-", markerfacecolor="none" if source == "measured" else None,
                                markersize=5 if source == "measured" else 3, linewidth=1 if source == "predicted" else 0,
                                label=f"{policy}{' + offload' if offload else ''}" + (" (measured)" if source == "measured" else ""))
        if device == "host":
            memory.plot([512], [REPORTED[512]], linestyle="none", label="authors' repo: 512 MB budget",
                        **{**look("paper (reported)"), "marker": "*", "markersize": 7})
            memory.axhline(REPORTED["none"], color=look("paper (reported)")["color"], linestyle="-.", linewidth=0.8,
                           label="authors' repo: no sharding")
        memory.set_ylabel("peak memory (MB)")
        time.set_ylabel("step time (s)")
        memory.set_title(f"{title}: peak memory")
        time.set_title(f"{title}: step time")
        for ax in (memory, time):
            ax.set_ylim(bottom=0)
    axes[0][0].invert_xaxis()  # budgets shrink left to right, as memory is squeezed (the x axis is shared)
    for ax in axes[-1]:
        ax.set_xlabel("parameter budget in RAM (MB)")
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=4)
    return ctx.save(fig, "sharding", rows)
