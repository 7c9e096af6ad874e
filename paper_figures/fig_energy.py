"""Energy-aware scheduling on Pixel 8: GPT-2 small Full-FT (seq 128, batch 8) under each of the
paper's scheduling scenarios, 300 steps from 35 % battery and off the charger, so that the
governor throttles and the battery floor (20 %) is reached; battery, temperature and steps
completed over time, from the simulated trace's `sample` and `step` events."""
from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

from matplotlib.figure import Figure

from mfbench import sim
from mfbench.analysis.figures import PAPER_WORKLOADS, save_png, write_csv
from mfbench.spec.profile import load_device
from mfbench.spec.workload import load_workload
from mfbench.units import MB

DEVICE = "pixel8"
STEPS = 300
BATTERY_START_PCT = 35.0
SCENARIOS = ["none", "paper", "battery-floor", "charging-only", "thermal-pacer"]


def make(out_dir: Path) -> list[Path]:
    device = load_device(DEVICE)
    rows, runs = [], []
    for scenario in SCENARIOS:
        path = PAPER_WORKLOADS / f"gpt2-full-energy-{scenario}.yaml"
        scheduler = load_workload(path).scheduling.policy
        summary, events = sim.simulate(path, device, steps=STEPS, battery_start_pct=BATTERY_START_PCT,
                                       progress=False)
        step_times = [e["t"] for e in events if e["type"] == "step"]
        samples = [e for e in events if e["type"] == "sample"]
        for e in samples:
            rows.append({"scheduler": scheduler, "workload": path.stem, "t_s": round(e["t"], 3),
                         "steps_done": bisect_right(step_times, e["t"]), "battery_pct": round(e["battery"], 4),
                         "temperature_c": round(e["temperature"], 3), "frequency_mhz": e["frequency"],
                         "rss_mb": round(e["rss"] / MB, 1)})
        ended = f"stopped after {summary.steps} steps" if summary.stop_reason else f"{summary.steps} steps"
        runs.append((f"{scheduler} ({ended}, {summary.wall_s / 3600:.2f} h)", samples, step_times))

    fig = Figure(figsize=(14, 4.8), layout="constrained")
    battery, temperature, progress = fig.subplots(1, 3)
    styles = ["-", "--", "-.", ":", (0, (5, 2, 1, 2))]
    for (label, samples, step_times), style in zip(runs, styles):
        minutes = [e["t"] / 60 for e in samples]
        battery.plot(minutes, [e["battery"] for e in samples], linestyle=style, label=label)
        temperature.plot(minutes, [e["temperature"] for e in samples], linestyle=style, label=label)
        progress.plot([0] + [t / 60 for t in step_times], range(len(step_times) + 1), linestyle=style, label=label)
    caps = device.thermal.throttling
    for step in caps:
        threshold = temperature.axhline(step.above_c, color="gray", linewidth=0.8, linestyle=":")
    temperature.legend(handles=[threshold], labels=[
        "governor caps frequency at " + " / ".join(f"{s.freq_cap:.0%}" for s in caps)
        + "\nabove " + " / ".join(f"{s.above_c:g}" for s in caps) + " °C"], loc="lower right", fontsize=8.5)
    floor = battery.axhline(20, color="gray", linewidth=0.8, linestyle=":")
    battery.legend(handles=[floor], labels=["20 %: battery_floor pauses below it"], loc="upper right", fontsize=8.5)
    for ax, title, ylabel in [(battery, "Battery", "state of charge (%)"),
                              (temperature, "Temperature", "device temperature (°C)"),
                              (progress, "Progress", "optimizer steps completed")]:
        ax.set_title(title)
        ax.set_xlabel("time (min)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    progress.legend(loc="upper left", fontsize=8.5, title="scheduler")
    fig.suptitle(f"Energy-aware scheduling: GPT-2 small Full-FT on Pixel 8, {STEPS} steps from "
                 f"{BATTERY_START_PCT:g} % battery, off the charger (simulated)")

    png = save_png(fig, out_dir / "energy.png")
    return [png, write_csv(out_dir / "energy.csv", rows)]
