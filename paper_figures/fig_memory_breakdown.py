"""Memory of one training step, by kind of buffer, for every paper LoRA workload (sequence
length 128 and 256) and GPT-2 small Full-FT, from the step program (what `mfbench plan`
prints), against each phone's per-app memory limit."""
from __future__ import annotations

from mfbench.analysis.figures import (
    DOUBLE,
    OKABE_ITO,
    PAPER_WORKLOADS,
    Context,
    short_name,
)
from mfbench.plan import compile_program
from mfbench.spec.profile import device_names, load_device
from mfbench.spec.workload import load_workload
from mfbench.units import MB

PARTS = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "AdamW m, v"),
         ("activations", "kept for backward"), ("scratch", "scratch (logits chunk incl.)"),
         ("other", "token ids, rotary tables")]


def breakdown(path) -> dict:
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


def make(ctx: Context):
    paths = sorted(PAPER_WORKLOADS.glob("*-lora-seq???.yaml")) + [PAPER_WORKLOADS / "gpt2-full-seq128.yaml"]
    rows = sorted((breakdown(p) for p in paths), key=lambda r: (r["params"], r["method"] != "full", r["seq_len"]))
    phones = sorted((d for d in map(load_device, device_names()) if d.kind == "phone"),
                    key=lambda d: d.ram.app_limit_mb.value)
    limits = []  # [(lowest GB, highest GB, [phones])]: limits closer than 0.5 GB share a label
    for phone in phones:
        gb, name = phone.ram.app_limit_mb.value / 1024, short_name(phone.name)
        if limits and gb - limits[-1][0] < 0.5:
            limits[-1] = (limits[-1][0], gb, limits[-1][2] + [name])
        else:
            limits.append((gb, gb, [name]))

    fig = ctx.figure(DOUBLE, 2.9)
    ax = fig.add_subplot()
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for (key, label), color in zip(PARTS, OKABE_ITO):
        heights = [r[f"{key}_bytes"] / MB / 1024 for r in rows]
        ax.bar(x, heights, bottom=bottom, label=label, width=0.7, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for low, high, _ in limits:
        for gb in {low, high}:
            ax.axhline(gb, color="0.35", linestyle=":", linewidth=0.8)
    phones_axis = ax.twinx()  # the limits named on the right, outside the bars
    phones_axis.set_ylim(ax.get_ylim())
    phones_axis.grid(False)
    phones_axis.set_yticks([(low + high) / 2 for low, high, _ in limits],
                           ["\n".join(names) + (f"\n{low:.1f} GB" if low == high else f"\n{low:.1f}-{high:.1f} GB")
                            for low, high, names in limits], fontsize=6)
    phones_axis.tick_params(length=0)
    ax.set_xticks(list(x), [f"{r['model']}\n{'Full-FT' if r['method'] == 'full' else 'LoRA'} T={r['seq_len']}"
                            for r in rows], rotation=35, ha="right", fontsize=6.5)
    ax.set_ylabel("planned peak memory (GB)")
    ax.set_title("One step's memory by buffer (fp32, batch 8, no sharding) vs phone app limits")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", ncols=2)
    return ctx.save(fig, "memory_breakdown", rows)
