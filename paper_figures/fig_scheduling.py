"""Energy-aware scheduling (simulated): GPT-2 small Full-FT (sequence 128, batch 8) under the
paper's scheduling scenarios, every one at the same threads and cluster (the workloads differ
only in `scheduling`), from a 35 % battery, off the charger.

Top: battery, temperature, CPU frequency and power over time on Pixel 8 for no scheduler, the
paper's rule (a sleep after each step, longer when the battery is low or the phone hot), and
the scheduler with the lowest energy per token among those that finish. Bottom: energy per
token and time to finish per phone, for every scheduler that runs off the charger
(`charging_only` waits for a charger, so here it never trains; its row is in the CSV)."""
from __future__ import annotations

from mfbench.analysis.figures import DOUBLE, PAPER_WORKLOADS, Context, look, short_name
from mfbench.sim import simulate
from mfbench.spec.profile import device_names, load_device
from mfbench.spec.workload import load_workload

DEVICE = "pixel8"
BATTERY_START_PCT = 35.0
SCENARIOS = ["none", "paper", "battery-floor", "charging-only", "thermal-pacer"]


def run(scenario: str, device: str, steps: int):
    path = PAPER_WORKLOADS / f"gpt2-full-energy-{scenario}.yaml"
    summary, events = simulate(path, device, steps=steps, battery_start_pct=BATTERY_START_PCT, progress=False)
    return load_workload(path).scheduling.policy, summary, events


def minute_mean(samples: list[dict], values: list[float]) -> list[float]:
    """Each value averaged over the minute before it (steps and sleeps alternate faster than
    a plot can show). A sample's value holds for the interval since the previous sample."""
    out, start, total, weights = [], 1, 0.0, 0.0
    for i in range(1, len(samples)):
        dt = samples[i]["t"] - samples[i - 1]["t"]
        total, weights = total + values[i] * dt, weights + dt
        while samples[start]["t"] <= samples[i]["t"] - 60:
            dt0 = samples[start]["t"] - samples[start - 1]["t"]
            total, weights, start = total - values[start] * dt0, weights - dt0, start + 1
        out.append(total / weights if weights > 0 else values[i])
    return [out[0] if out else values[0]] + out


def make(ctx: Context):
    steps = 60 if ctx.quick else 300
    phones = [d for d in device_names() if load_device(d).kind == "phone"]
    if ctx.quick:
        phones = [p for p in phones if p in ("pixel8", "galaxy-s24-ultra", "galaxy-a54")] or phones[:3]
    rows, series = [], {}
    for device in phones:
        for scenario in SCENARIOS:
            scheduler, summary, events = run(scenario, device, steps)
            rows.append({"device": device, "scheduler": scheduler, "steps": summary.steps,
                         "finished": summary.steps == steps and not summary.killed, "wall_s": round(summary.wall_s, 2),
                         "energy_j": round(summary.energy_j, 2),
                         "j_per_token": summary.j_per_token and round(summary.j_per_token, 5),  # None: no step done
                         "max_temperature_c": round(summary.max_temperature_c, 2),
                         "battery_drop_pct": round(summary.battery_drop_pct, 3),
                         "stop_reason": summary.stop_reason or "", "kill_reason": summary.kill_reason or ""})
            if device == DEVICE:
                series[scheduler] = [e for e in events if e["type"] == "sample"]
    on_phone = [r for r in rows if r["device"] == DEVICE]
    finished = [r for r in on_phone if r["finished"]] or on_phone
    best = min(finished, key=lambda r: r["j_per_token"] or float("inf"))["scheduler"]
    shown = list(dict.fromkeys(["none", "paper", best]))

    fig = ctx.figure(DOUBLE, 4.0)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1])
    panels = top.subplots(1, 4)
    for scheduler in shown:
        samples = series[scheduler]
        minutes = [e["t"] / 60 for e in samples]
        power = minute_mean(samples, [e["current"] * e["voltage"] for e in samples])
        style = {"color": look(scheduler)["color"], "label": scheduler + (" (least J/token)" if scheduler == best else "")}
        for ax, values in zip(panels, ([e["battery"] for e in samples], [e["temperature"] for e in samples],
                                       [e["frequency"] for e in samples], power)):
            ax.plot(minutes, values, linewidth=0.9, **style)
    for ax, title in zip(panels, ["battery (%)", "temperature (°C)", "CPU frequency (MHz)", "power, 1-min mean (W)"]):
        ax.set_title(title)
        ax.set_xlabel("time (min)")
    panels[0].legend(loc="upper right")
    top.suptitle(f"Pixel 8, {BATTERY_START_PCT:g} % battery, off the charger")
    energy, finish = bottom.subplots(1, 2)
    width = 0.8 / (len(SCENARIOS) - 1)
    schedulers = [s for s in dict.fromkeys(r["scheduler"] for r in rows) if s != "charging_only"]
    for i, scheduler in enumerate(schedulers):
        mine = [next(r for r in rows if r["device"] == d and r["scheduler"] == scheduler) for d in phones]
        x = [p + (i - (len(schedulers) - 1) / 2) * width for p in range(len(phones))]
        energy.bar(x, [(r["j_per_token"] or 0) * 1000 for r in mine], width, color=look(scheduler)["color"], label=scheduler)
        finish.bar(x, [r["wall_s"] / 60 for r in mine], width, color=look(scheduler)["color"],
                   hatch=["" if r["finished"] else "////" for r in mine], edgecolor="white", linewidth=0)
    names = [short_name(d) for d in phones]
    for j, device in enumerate(phones):  # a phone whose battery cannot carry the load at all
        mine = [r for r in rows if r["device"] == device and r["scheduler"] in schedulers]
        if all(r["steps"] == 0 for r in mine):
            for ax in (energy, finish):
                ax.annotate("no step: " + mine[0]["kill_reason"].split(":")[0] + "\nat the start", (j, 0),
                            xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=6)
    bottom.suptitle("every phone, every scheduler that trains off the charger")
    for ax, title in ((energy, "energy per token (mJ)"), (finish, f"time for {steps} steps (min; hatched: stopped early)")):
        ax.set_xticks(range(len(phones)), names)
        ax.set_title(title)
        ax.grid(axis="x", visible=False)
    bottom.legend(*energy.get_legend_handles_labels(), ncols=len(schedulers), loc="outside lower center")
    return ctx.save(fig, "scheduling", rows)
