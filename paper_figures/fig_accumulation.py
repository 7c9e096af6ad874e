"""Gradient accumulation on Pixel 8: Gemma-3-270M LoRA at effective batch 8 as micro-batch x
accumulation steps 8x1 (none), 4x2, 2x4 and 1x8; simulated peak memory and step time."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from mfbench import sim
from mfbench.analysis.figures import PAPER_WORKLOADS, save_png, write_csv
from mfbench.spec.workload import load_workload
from mfbench.units import MB

DEVICE = "pixel8"
STEPS = 3  # every step of these runs is the same (no sharding, no throttling in 3 steps)
WORKLOADS = ["gemma3-270m-lora-seq128", "gemma3-270m-lora-seq128-accum-4x2",
             "gemma3-270m-lora-seq128-accum-2x4", "gemma3-270m-lora-seq128-accum-1x8"]


def make(out_dir: Path) -> list[Path]:
    rows = []
    for name in WORKLOADS:
        path = PAPER_WORKLOADS / f"{name}.yaml"
        workload = load_workload(path)
        summary, _ = sim.simulate(path, DEVICE, steps=STEPS, progress=False)
        rows.append({"workload": name, "device": DEVICE, "micro_batch": workload.micro_batch_size,
                     "accumulation_steps": workload.accumulation_steps, "peak_memory_bytes": summary.peak_memory_bytes,
                     "peak_memory_mb": round(summary.peak_memory_bytes / MB, 1),
                     "median_step_s": round(summary.median_step_s, 3), "step_tokens_per_s": round(summary.step_tokens_per_s, 2),
                     "killed": summary.killed})

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    memory, time = fig.subplots(1, 2)
    micro = [r["micro_batch"] for r in rows]
    labels = [f"{r['micro_batch']}x{r['accumulation_steps']}" for r in rows]
    for ax, key, ylabel, color in [(memory, "peak_memory_mb", "peak memory (MB)", "tab:blue"),
                                   (time, "median_step_s", "optimizer step time (s)", "tab:red")]:
        values = [r[key] for r in rows]
        ax.plot(micro, values, marker="o", color=color, label=f"Gemma-3-270M LoRA, {DEVICE}")
        for m, v, label in zip(micro, values, labels):
            ax.annotate(f"{label}: {v:,.1f}", (m, v), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.margins(x=0.12)
        ax.set_xticks(micro, [str(m) for m in micro])
        ax.set_xlabel("micro-batch (sequences of 128 tokens; effective batch 8)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(values) * 1.2)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    memory.set_title("Peak memory")
    time.set_title("Step time (8 sequences per step)")
    fig.suptitle("Gradient accumulation: micro-batch x accumulation steps (simulated, Pixel 8)")

    png = save_png(fig, out_dir / "accumulation.png")
    return [png, write_csv(out_dir / "accumulation.csv", rows)]
