"""LoRA on GPT-2 small, Qwen2.5-0.5B and Gemma-3-270M (the paper's workloads).

(a) loss curves measured on this machine by the native trainer (`mfbench run`); (b) peak
memory per model and sequence length on each phone (simulated), an x where the phone's
low-memory killer ends the run, beside the peaks the paper reports on its phones. The paper
does not state its LoRA batch size; ours is 8."""
from __future__ import annotations

from mfbench.analysis.figures import (
    DOUBLE,
    OKABE_ITO,
    PAPER_WORKLOADS,
    Context,
    look,
    loss_panel,
    short_name,
)
from mfbench.sim import simulate
from mfbench.spec.profile import device_names, load_device
from mfbench.units import MB

CURVES = [("gpt2-lora-seq128", "GPT-2 small"), ("qwen2.5-0.5b-lora-seq128", "Qwen2.5-0.5B"),
          ("gemma3-270m-lora-seq128", "Gemma-3-270M")]
MODELS = [("gpt2-lora", "GPT-2"), ("gemma3-270m-lora", "Gemma\n270M"), ("qwen2.5-0.5b-lora", "Qwen\n0.5B"),
          ("gemma3-1b-lora", "Gemma\n1B")]
# MB, the paper (arXiv 2512.08211) on its phones: LoRA peak RSS, and one configuration killed on a Pixel 8
REPORTED = {("qwen2.5-0.5b-lora", 128): 2887, ("gemma3-270m-lora", 128): 4014, ("qwen2.5-0.5b-lora", 256): 3437}
REPORTED_KILLED_MB = 6111  # a Qwen2.5-0.5B configuration the paper saw killed on an 8 GB Pixel 8


def make(ctx: Context):
    rows, curves = [], {}
    for name, label in CURVES:
        stored = ctx.stored(name)
        if stored is None:
            ctx.missing(f"{label} LoRA on this machine", f"mfbench run workloads/paper/{name}.yaml --steps 40")
            continue
        curves[label] = [(e["index"] + 1, e["loss"]) for e in stored[1] if e["type"] == "step"]
        rows += [{"workload": name, "device": "host", "source": "measured", "seq_len": 128, "step": s, "loss": v,
                  "peak_memory_mb": round(stored[0].peak_memory_bytes / MB, 1), "killed": stored[0].killed}
                 for s, v in curves[label]]
    phones = [d for d in device_names() if load_device(d).kind == "phone"]
    if ctx.quick:
        phones = [p for p in phones if p in ("pixel8", "galaxy-a54")] or phones[:2]
    for prefix, _ in MODELS:
        for seq in (128, 256):
            for device in phones:
                summary, _ = simulate(PAPER_WORKLOADS / f"{prefix}-seq{seq}.yaml", device, steps=1, progress=False)
                rows.append({"workload": f"{prefix}-seq{seq}", "device": device, "source": "predicted", "seq_len": seq,
                             "step": "", "loss": "", "peak_memory_mb": round(summary.peak_memory_bytes / MB, 1),
                             "killed": summary.killed})
    for (prefix, seq), mb in REPORTED.items():
        rows.append({"workload": f"{prefix}-seq{seq}", "device": "paper's phones", "source": "paper (reported)",
                     "seq_len": seq, "step": "", "loss": "", "peak_memory_mb": mb, "killed": False})

    fig = ctx.figure(DOUBLE, 2.8)
    loss, memory = fig.subplots(1, 2, width_ratios=[1, 2])
    loss_panel(loss, {label: (points, {"color": color}) for (label, points), color
                      in zip(curves.items(), (OKABE_ITO[0], OKABE_ITO[3], OKABE_ITO[2]))},
               "(a) this machine: native trainer, LoRA", "mfbench run",
               loc="center right", bbox_to_anchor=(1, 0.42), fontsize="small")  # between GPT-2's curve and the larger models' (random init: higher losses)
    slots = [(prefix, seq) for prefix, _ in MODELS for seq in (128, 256)]
    width = 0.8 / len(phones)
    for i, device in enumerate(phones):
        mine = [next(r for r in rows if r["workload"] == f"{p}-seq{s}" and r["device"] == device) for p, s in slots]
        x = [j + (i - (len(phones) - 1) / 2) * width for j in range(len(slots))]
        style = look(device)
        memory.bar(x, [r["peak_memory_mb"] / 1024 for r in mine], width, color=style["color"],
                   label=short_name(device))
        killed = [(xi, r["peak_memory_mb"] / 1024) for xi, r in zip(x, mine) if r["killed"]]
        if killed:
            memory.plot(*zip(*killed), linestyle="none", marker="x", color="black", markersize=4)
    reported = [(slots.index(k), mb / 1024) for k, mb in REPORTED.items()]
    memory.plot(*zip(*reported), linestyle="none", marker="*", markersize=8, color=look("paper (reported)")["color"],
                label="paper, reported peak")
    memory.axhline(REPORTED_KILLED_MB / 1024, color=look("paper (reported)")["color"], linestyle="-.", linewidth=0.8,
                   label="paper: killed on Pixel 8 (Qwen2.5-0.5B)")
    memory.plot([], [], linestyle="none", marker="x", color="black", label="killed (simulated)")
    labels = dict(MODELS)
    memory.set_xticks(range(len(slots)), [f"{labels[p]}\n{s}" for p, s in slots], fontsize=6.5)
    memory.set_xlabel("model, sequence length")
    memory.set_ylabel("peak memory (GB)")
    memory.set_title("(b) phones: peak memory, batch 8 (simulated)")
    memory.grid(axis="x", visible=False)
    fig.legend(*memory.get_legend_handles_labels(), loc="outside lower center", ncols=4)
    return ctx.save(fig, "lora", rows)
