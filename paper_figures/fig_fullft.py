"""Full fine-tuning of GPT-2 small (sequence 128, batch 8).

(a) loss curves of the native trainer and PyTorch from one init on one token file, measured
on this machine (`mfbench compare`); (b) step time and (c) peak memory per device: simulated
for every profile, and measured here for the native trainer and PyTorch."""
from __future__ import annotations

from mfbench.analysis.figures import (
    DOUBLE,
    PAPER_WORKLOADS,
    Context,
    look,
    loss_panel,
    short_name,
)
from mfbench.sim import simulate
from mfbench.spec.profile import device_names
from mfbench.units import MB

WORKLOAD = "gpt2-full-seq128"
COMPARE = f"{WORKLOAD}/compare"


def make(ctx: Context):
    rows = []
    devices = device_names()
    for device in devices:
        summary, _ = simulate(PAPER_WORKLOADS / f"{WORKLOAD}.yaml", device, steps=2, progress=False)
        rows.append({"device": device, "source": "predicted", "engine": "native", "median_step_s": summary.median_step_s,
                     "peak_memory_bytes": summary.peak_memory_bytes, "killed": summary.killed, "step": "", "loss": ""})
    curves = {}
    for engine in ("native", "pytorch"):
        stored = ctx.stored(COMPARE, engine)
        if stored is None:
            continue
        summary, events = stored
        curves[engine] = [(e["index"] + 1, e["loss"]) for e in events if e["type"] == "step"]
        rows.append({"device": "host", "source": "measured", "engine": engine, "median_step_s": summary.median_step_s,
                     "peak_memory_bytes": summary.peak_memory_bytes, "killed": summary.killed, "step": "", "loss": ""})
        rows += [{"device": "host", "source": "measured", "engine": engine, "median_step_s": "", "peak_memory_bytes": "",
                  "killed": "", "step": step, "loss": loss} for step, loss in curves[engine]]
    if len(curves) < 2:
        ctx.missing("GPT-2 Full-FT, native and PyTorch", f"mfbench compare workloads/paper/{WORKLOAD}.yaml --steps 40")

    fig = ctx.figure(DOUBLE, 2.6)
    loss, time, memory = fig.subplots(1, 3, width_ratios=[1, 1.3, 1.3])
    loss_panel(loss, {{"native": "native trainer", "pytorch": "PyTorch"}[engine]:
                      (points, {"color": look(engine)["color"], "linestyle": "-" if engine == "native" else "--"})
                      for engine, points in curves.items()}, "(a) this machine: loss, same init", "mfbench compare")
    names = [short_name(d) for d in devices]
    for ax, key, scale, label in ((time, "median_step_s", 1, "step time (s)"),
                                  (memory, "peak_memory_bytes", 1 / MB / 1024, "peak memory (GB)")):
        predicted = [next(r for r in rows if r["device"] == d and r["source"] == "predicted") for d in devices]
        ax.bar(range(len(devices)), [r[key] * scale for r in predicted], 0.6, color=look("predicted")["color"],
               label="predicted (simulator)")
        for r in predicted:
            if r["killed"]:
                ax.annotate("killed", (devices.index(r["device"]), r[key] * scale), xytext=(0, 2),
                            textcoords="offset points", ha="center", fontsize=6)
        for engine, marker in (("native", "o"), ("pytorch", "s")):
            measured = [r for r in rows if r["source"] == "measured" and r["engine"] == engine and r["median_step_s"] != ""]
            if measured:
                ax.plot([devices.index("host")], [measured[0][key] * scale], linestyle="none", marker=marker,
                        color=look(engine)["color"], markersize=5,
                        label=f"measured, {'native trainer' if engine == 'native' else 'PyTorch'}")
        ax.set_xticks(range(len(devices)), names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="x", visible=False)
    time.set_title("(b) step time")
    memory.set_title("(c) peak memory")
    fig.legend(*memory.get_legend_handles_labels(), loc="outside lower center", ncols=3)
    return ctx.save(fig, "fullft", rows)
