"""Parameter sharding on Pixel 8: GPT-2 small LoRA with the paper's LRU sharding under budgets
of 1200, 650, 250 and 200 MB, and without sharding; simulated peak memory, step time and flash
reads. GPT-2 small's float32 parameters are 476 MB, so 1200 and 650 MB evict nothing."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from mfbench import sim
from mfbench.analysis.figures import PAPER_WORKLOADS, save_png, write_csv
from mfbench.spec.workload import load_workload
from mfbench.units import MB

DEVICE = "pixel8"
STEPS = 10  # a sharded run starts with every shard on flash: average the first load over some steps
WORKLOADS = ["gpt2-lora-seq128", "gpt2-lora-shard-1200mb", "gpt2-lora-shard-650mb",
             "gpt2-lora-shard-250mb", "gpt2-lora-shard-200mb"]


def make(out_dir: Path) -> list[Path]:
    rows = []
    for name in WORKLOADS:
        path = PAPER_WORKLOADS / f"{name}.yaml"
        sharding = load_workload(path).memory.sharding
        summary, _ = sim.simulate(path, DEVICE, steps=STEPS, progress=False)
        rows.append({"workload": name, "device": DEVICE, "sharding": sharding.policy,
                     "budget_mb": sharding.params.get("budget_mb", ""), "steps": summary.steps,
                     "peak_memory_bytes": summary.peak_memory_bytes,
                     "peak_memory_mb": round(summary.peak_memory_bytes / MB, 1),
                     "median_step_s": round(summary.median_step_s, 3), "io_read_bytes": summary.io_read_bytes,
                     "io_read_mb_per_step": round(summary.io_read_bytes / MB / summary.steps, 1),
                     "killed": summary.killed})

    fig = Figure(figsize=(14, 4.5), layout="constrained")
    panels = fig.subplots(1, 3)
    labels = [f"{r['budget_mb']} MB" if r["budget_mb"] != "" else "none" for r in rows]
    x = range(len(rows))
    for ax, key, title, ylabel, color in [
            (panels[0], "peak_memory_mb", "Peak memory", "peak memory (MB)", "tab:blue"),
            (panels[1], "median_step_s", "Step time", "optimizer step time (s)", "tab:red"),
            (panels[2], "io_read_mb_per_step", f"Flash reads (mean of {STEPS} steps)", "read per step (MB)",
             "tab:green")]:
        values = [r[key] for r in rows]
        ax.bar(x, values, color=color, width=0.6)
        for i, v in zip(x, values):
            ax.annotate(f"{v:,.1f}", (i, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("sharding budget (LRU)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(values) * 1.15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Parameter sharding: GPT-2 small LoRA, seq 128, batch 8 (simulated, Pixel 8)")

    png = save_png(fig, out_dir / "sharding.png")
    return [png, write_csv(out_dir / "sharding.csv", rows)]
