"""Gradient accumulation: Gemma-3-270M LoRA at effective batch 8 and sequence 128 as
micro-batch x accumulation steps 8x1, 4x2, 2x4 and 1x8.

(a) planned peak memory on Pixel 8 (simulated), split into what one micro-batch keeps for
backward and the rest; (b) Pixel 8 step time split by op class of the step program, which
shows where accumulation's overhead comes from: the same FLOPs run as smaller GEMMs, the
per-micro-batch work (embedding, norms, loss) repeats, and the update runs once a step;
(c) this machine: the step time the simulator predicts with the host profile and, where a
stored `mfbench run` exists, the measured median."""
from __future__ import annotations

from collections import defaultdict

from matplotlib.patches import Patch

from mfbench.analysis.figures import DOUBLE, OKABE_ITO, PAPER_WORKLOADS, Context, look
from mfbench.plan import compile_program
from mfbench.sim import simulate
from mfbench.spec.workload import load_workload
from mfbench.units import MB

DEVICE = "pixel8"
WORKLOADS = ["gemma3-270m-lora-seq128", "gemma3-270m-lora-seq128-accum-4x2",
             "gemma3-270m-lora-seq128-accum-2x4", "gemma3-270m-lora-seq128-accum-1x8"]
CLASSES = [("gemm", "dense GEMM", OKABE_ITO[0]), ("skinny_gemm", "LoRA GEMM", OKABE_ITO[2]),
           ("attention", "attention", OKABE_ITO[4]), ("memory", "memory-bound (norms, loss, embedding)", OKABE_ITO[3]),
           ("update", "optimizer update", OKABE_ITO[6])]


def op_seconds(program, events) -> dict[str, float]:
    """Seconds of the first traced step spent in each op class."""
    op_class = {f"{op.name}.{op.phase}": ("update" if op.phase == "update" else op.op_class) for op in program.ops}
    end = next(e["t"] for e in events if e["type"] == "step")
    seconds = defaultdict(float)
    for e in events:
        if e["type"] == "op" and e["start"] < end:
            seconds[op_class[e["name"]]] += e["duration"]
    return seconds


def make(ctx: Context):
    rows = []
    for name in WORKLOADS:
        path = PAPER_WORKLOADS / f"{name}.yaml"
        workload = load_workload(path)
        program = compile_program(workload, path.parent)
        phone, events = simulate(path, DEVICE, steps=2, progress=False)  # every step of these runs is the same
        host, _ = simulate(path, "host", steps=2, progress=False)
        measured = ctx.stored(name)
        if measured is None:
            ctx.missing(f"{name} on this machine", f"mfbench run workloads/paper/{name}.yaml --steps 20")
        seconds = op_seconds(program, events)
        rows.append({"workload": name, "micro_batch": workload.micro_batch_size,
                     "accumulation_steps": workload.accumulation_steps,
                     "pixel8_peak_memory_bytes": phone.peak_memory_bytes,
                     "activation_peak_bytes": program.activation_peak()[0],
                     "pixel8_median_step_s": round(phone.median_step_s, 4),
                     **{f"pixel8_{key}_s": round(seconds[key], 4) for key, _, _ in CLASSES},
                     "host_predicted_step_s": round(host.median_step_s, 4),
                     "host_measured_step_s": round(measured[0].median_step_s, 4) if measured else "",
                     "host_measured_peak_bytes": measured[0].peak_memory_bytes if measured else "",
                     "pixel8_killed": phone.killed})

    fig = ctx.figure(DOUBLE, 2.5)
    memory, time, host = fig.subplots(1, 3)
    labels = [f"{r['micro_batch']}x{r['accumulation_steps']}" for r in rows]
    x = list(range(len(rows)))
    kept = [r["activation_peak_bytes"] / MB for r in rows]
    rest = [(r["pixel8_peak_memory_bytes"] - r["activation_peak_bytes"]) / MB for r in rows]
    memory.bar(x, rest, width=0.6, color=OKABE_ITO[5])
    memory.bar(x, kept, bottom=rest, width=0.6, color=OKABE_ITO[1])
    for i, r in enumerate(rows):
        memory.annotate(f"{r['pixel8_peak_memory_bytes'] / MB:,.0f}", (i, r["pixel8_peak_memory_bytes"] / MB),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
    memory.set_ylim(0, max(r["pixel8_peak_memory_bytes"] for r in rows) / MB * 1.15)
    memory.set_ylabel("peak memory (MB)")
    memory.set_title("(a) Pixel 8: peak memory")
    bottom = [0.0] * len(rows)
    for key, _, color in CLASSES:
        heights = [r[f"pixel8_{key}_s"] for r in rows]
        time.bar(x, heights, bottom=bottom, width=0.6, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, r in enumerate(rows):
        time.annotate(f"{r['pixel8_median_step_s']:.2f}", (i, bottom[i]), xytext=(0, 2), textcoords="offset points",
                      ha="center", fontsize=6)
    time.set_ylim(0, max(bottom) * 1.15)
    time.set_ylabel("step time (s)")
    time.set_title("(b) Pixel 8: step time by op class")
    host.plot(x, [r["host_predicted_step_s"] for r in rows], linestyle="--", label="predicted (host profile)",
              **look("predicted"))
    measured = [(i, r["host_measured_step_s"]) for i, r in enumerate(rows) if r["host_measured_step_s"] != ""]
    if measured:
        host.plot(*zip(*measured), linestyle="-", label="measured (mfbench run)", **look("measured"))
    host.set_ylim(0, max([r["host_predicted_step_s"] for r in rows] + [v for _, v in measured]) * 1.2)
    host.set_ylabel("step time (s)")
    host.set_title("(c) this machine, 2 threads")
    host.legend(loc="lower right")
    for ax in (memory, time, host):
        ax.set_xticks(x, labels)
        ax.set_xlabel("micro-batch x accumulation")
        ax.grid(axis="x", visible=False)
    handles = [Patch(color=OKABE_ITO[5], label="parameters, adapters, optimizer, scratch, runtime"),
               Patch(color=OKABE_ITO[1], label="kept for backward (one micro-batch)")]
    handles += [Patch(color=color, label=label) for _, label, color in CLASSES]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return ctx.save(fig, "accumulation", rows)
