"""Memory of one training step, by kind of buffer, for every paper LoRA workload (sequence
length 128 and 256) and GPT-2 small Full-FT, from the step program (what `mfbench plan`
prints), against each phone's per-app memory limit."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from mfbench.analysis.figures import PAPER_WORKLOADS, save_png, write_csv
from mfbench.plan import compile_program
from mfbench.spec.profile import device_names, load_device
from mfbench.spec.workload import load_workload
from mfbench.units import MB

PARTS = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer state (AdamW m, v)"),
         ("activations", "kept for backward (at peak)"), ("scratch", "scratch (a logits chunk included)"),
         ("other", "token ids, rotary tables")]


def breakdown(path: Path) -> dict:
    """The planned peak split by buffer, as `mfbench plan` prints it (the runtime's own
    overhead, a device profile number, is left out)."""
    workload = load_workload(path)
    program = compile_program(workload, path.parent)
    scratch = sum(b.bytes for b in program.buffers if b.lifetime == "scratch")
    state = program.param_bytes + program.grad_bytes + program.optimizer_bytes
    row = {"workload": workload.name, "model": workload.model, "method": workload.method.kind,
           "seq_len": workload.seq_len, "params": program.params,
           "parameters_bytes": program.param_bytes, "gradients_bytes": program.grad_bytes,
           "optimizer_bytes": program.optimizer_bytes, "activations_bytes": program.activation_peak()[0],
           "scratch_bytes": scratch, "other_bytes": program.static_bytes - scratch - state}
    row["total_bytes"] = sum(row[f"{key}_bytes"] for key, _ in PARTS)
    return row


def make(out_dir: Path) -> list[Path]:
    paths = sorted(PAPER_WORKLOADS.glob("*-lora-seq???.yaml")) + [PAPER_WORKLOADS / "gpt2-full-seq128.yaml"]
    rows = sorted((breakdown(p) for p in paths), key=lambda r: (r["params"], r["method"] != "full", r["seq_len"]))
    phones = [d for d in map(load_device, device_names()) if d.kind == "phone"]

    fig = Figure(figsize=(13, 6.5), layout="constrained")
    ax = fig.add_subplot()
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, label in PARTS:
        heights = [r[f"{key}_bytes"] / MB for r in rows]
        ax.bar(x, heights, bottom=bottom, label=label, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    lines = [("tab:brown", "--"), ("black", ":"), ("tab:gray", "-."), ("tab:olive", "--"), ("tab:cyan", "-")]
    for phone, (color, style) in zip(sorted(phones, key=lambda d: d.ram.app_limit_mb.value), lines * 2):
        limit = phone.ram.app_limit_mb.value
        ax.axhline(limit, color=color, linestyle=style, linewidth=1.8,
                   label=f"{phone.display_name} app limit ({limit:,.0f} MB)")
    ax.set_xticks(list(x), [f"{r['model']}\n{'Full-FT' if r['method'] == 'full' else 'LoRA'} T={r['seq_len']}"
                            for r in rows], rotation=35, ha="right", fontsize=9)
    ax.set_ylabel("memory at the step's peak (MB)")
    ax.set_title("Step memory by buffer (float32, batch 8, no sharding/checkpointing) vs phone app limits")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8.5, ncols=2)

    png = save_png(fig, out_dir / "memory_breakdown.png")
    return [png, write_csv(out_dir / "memory_breakdown.csv", rows)]
