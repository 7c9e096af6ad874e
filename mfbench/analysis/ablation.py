"""The simulator's physics, effect by effect: the tables of docs/simulator.md.

    python -m mfbench.analysis.ablation [--steps 300] [--out runs/ablation.md] [--only ablation sensitivity schedulers]

- ablation: GPT-2 Full-FT and Qwen2.5-0.5B LoRA on three phones; the full model against the
  same model with one effect taken out of the profile (and against the old model, with all
  of them out), from a full battery at 25 C; charging from 20 % at 25 C for the charger.
- sensitivity: the full model with the board's thermal resistance scaled.
- clusters: the background cpuset, and every cluster on one step (static and dynamic balance).
- schedulers: the built-in schedulers on every phone at equal threads and starting cluster
  (threads: auto), on battery at 25 C and on the charger at 35 C.

Every table is computed here from simulator runs; nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mfbench import sim
from mfbench.files import write_atomic
from mfbench.spec.profile import DeviceProfile, load_device
from mfbench.spec.workload import PolicySpec, load_workload

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = {"GPT-2 Full-FT": ROOT / "workloads/paper/gpt2-full-seq128.yaml",
             "Qwen2.5-0.5B LoRA": ROOT / "workloads/paper/qwen2.5-0.5b-lora-seq128.yaml"}
PHONES = ("pixel8", "pixel7pro", "galaxy-s24-ultra")
ALL_PHONES = ("pixel8", "pixel8pro", "pixel7pro", "galaxy-s24-ultra", "galaxy-a54")


# --------------------------------------------------------------- effects, taken out of a profile

def without_static(d):
    for c in d["clusters"]:
        c.pop("static_w", None)
    d["power"].pop("uncore_w", None)


def without_leakage(d):
    for c in d["clusters"]:
        c.pop("leakage_w_per_core", None)
    d["power"].pop("leakage_per_c", None)
    d["power"].pop("leakage_ref_c", None)


def without_network(d):
    d["thermal"].pop("junction", None)
    d["thermal"].pop("battery", None)


def old_governor(d):
    """The old governor: three skin steps ~40/43/46 C (Samsung +1 C), no hysteresis, polled
    every step, no junction trip, no shutdown."""
    t = d["thermal"]
    first = t["throttling"][0]["above_c"]
    base = 41 if first >= 41 else 40
    t["throttling"] = [{"above_c": base, "freq_cap": 0.85}, {"above_c": base + 3, "freq_cap": 0.70},
                       {"above_c": base + 6, "freq_cap": 0.55 if base == 41 else 0.50}]
    for key in ("junction_trip", "shutdown_c", "polling_s"):
        t.pop(key, None)


def thin_dvfs(d):
    """Six operating points a cluster (the old tables' size), the top one kept."""
    for c in d["clusters"]:
        n = len(c["freqs_mhz"]["value"])
        keep = sorted(set(np.linspace(0, n - 1, 6).round().astype(int).tolist()))
        for key in ("freqs_mhz", "power_w_per_core", "volts"):
            if key in c:
                c[key]["value"] = [c[key]["value"][i] for i in keep]


def without_battery_limits(d):
    if d.get("battery"):
        d["battery"].pop("cutoff_v", None)
        d["battery"].pop("resistance_activation_k", None)


def flat_charger(d):
    if d.get("battery"):
        d["battery"].pop("charging", None)


EFFECTS = {  # name -> how to take it out
    "static + uncore power": without_static,
    "leakage(T)": without_leakage,
    "RC network (junction, battery)": without_network,
    "HAL governor (levels, hysteresis, polling)": old_governor,
    "full DVFS tables": thin_dvfs,
    "cutoff voltage + R(T)": without_battery_limits,
}


def variant(device: DeviceProfile, *changes) -> DeviceProfile:
    d = device.model_dump(mode="json", exclude_none=True)
    for change in changes:
        change(d)
    return DeviceProfile.model_validate(d)


def scaled_resistance(device: DeviceProfile, factor: float) -> DeviceProfile:
    def scale(d):
        r = d["thermal"]["resistance_c_per_w"]
        r["value"] *= factor
    return variant(device, scale)


# --------------------------------------------------------------------------------------- runs

def measure(workload, device, steps, **options) -> dict:
    summary, events = sim.simulate(workload, device, steps=steps, progress=False, base_dir=ROOT / "workloads/paper",
                                   **options)
    d = summary.details
    durations = [e["duration"] for e in events if e["type"] == "step"]
    return {"steps": summary.steps, "step_s": sum(durations) / len(durations),  # mean: throttling changes it by steps
            "j_per_token": summary.j_per_token,
            "hours": summary.wall_s / 3600, "skin_c": summary.max_temperature_c, "junction_c": d["max_junction_c"],
            "battery_c": d["max_battery_c"], "drop": summary.battery_drop_pct, "end": summary.battery_end_pct,
            "killed": summary.kill_reason and summary.kill_reason.split(":")[0], "cluster": f"{d['cluster']} x {d['threads']}",
            "severity": d["max_severity"]}


def pct(new, base):
    return f"{100 * (new - base) / base:+.1f} %" if base else "n/a"


def ended(r: dict) -> str:
    return f" (ended after {r['steps']} steps: {r['killed']})" if r["killed"] else ""


def cases():
    """(workload label, workload, phone name, profile) for every workload x phone of the ablation."""
    for wname, path in WORKLOADS.items():
        workload = load_workload(path)
        for name in PHONES:
            yield wname, workload, name, load_device(name)


def ablation(steps: int) -> str:
    lines = ["| workload | device | model | mean s/step | J/token (mJ) | completion (h) | peak skin °C | peak junction °C |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    effect_rows = ["| workload | device | effect (full model vs without it) | mean s/step | J/token | completion | peak skin |",
                   "|---|---|---|---:|---:|---:|---:|"]
    for wname, workload, name, device in cases():
        full = measure(workload, device, steps)
        runs = {"full model": full}
        runs.update({f"without {e}": measure(workload, variant(device, f), steps) for e, f in EFFECTS.items()})
        runs["old model (all out)"] = measure(workload, variant(device, *EFFECTS.values(), flat_charger), steps)
        on = measure(workload, device, steps, charging=True, battery_start_pct=20)
        flat = measure(workload, variant(device, flat_charger), steps, charging=True, battery_start_pct=20)
        runs["on the charger from 20 %: CC/CV charger"] = on
        runs["on the charger from 20 %: flat 10 W, no heat"] = flat
        for label, r in runs.items():
            lines.append(f"| {wname} | {name} | {label}{ended(r)} | {r['step_s']:.2f} | {1000 * r['j_per_token']:.1f} | "
                         f"{r['hours']:.2f} | {r['skin_c']:.1f} | {r['junction_c']:.1f} |")
        # what each effect moves: the full model against the model without it
        for e in list(EFFECTS) + ["charger (CC/CV, loss as heat, hot cut)"]:
            base = runs.get(f"without {e}", flat)
            mine = full if e in EFFECTS else on
            effect_rows.append(f"| {wname} | {name} | {e} | {pct(mine['step_s'], base['step_s'])} | "
                               f"{pct(mine['j_per_token'], base['j_per_token'])} | {pct(mine['hours'], base['hours'])} | "
                               f"{mine['skin_c'] - base['skin_c']:+.1f} °C |")
        print(f"ablation: {wname} on {name} done", file=sys.stderr)
    return "\n".join(effect_rows) + "\n\nThe runs behind it:\n\n" + "\n".join(lines)


def sensitivity(steps: int) -> str:
    factors = (0.5, 0.75, 1.0, 1.5, 2.0)
    lines = ["| workload | device | R (°C/W) | mean s/step | J/token (mJ) | completion (h) | peak skin °C | vs R x 1 (time, J/token) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for wname, workload, name, device in cases():
        runs = {f: measure(workload, scaled_resistance(device, f), steps) for f in factors}
        for f, r in runs.items():
            base = runs[1.0]
            lines.append(f"| {wname} | {name} | {device.thermal.resistance_c_per_w.value * f:g}{ended(r)} | {r['step_s']:.2f} | "
                         f"{1000 * r['j_per_token']:.1f} | {r['hours']:.2f} | {r['skin_c']:.1f} | "
                         f"{pct(r['hours'], base['hours'])}, {pct(r['j_per_token'], base['j_per_token'])} |")
        print(f"sensitivity: {wname} on {name} done", file=sys.stderr)
    return "\n".join(lines)


def clusters(steps: int) -> str:
    """Placement and several clusters on one step: GPT-2 Full-FT, from a full battery at 25 C."""
    workload = load_workload(WORKLOADS["GPT-2 Full-FT"])
    lines = ["| device | runs on | mean s/step | J/token (mJ) | completion (h) | peak skin °C |",
             "|---|---|---:|---:|---:|---:|"]
    for name in PHONES:
        device = load_device(name)
        every = "+".join(c.name for c in device.clusters)
        choices = {"foreground, default cluster": {}, "background cpuset": {"placement": "background"},
                   "every cluster, static balance": {"cluster": every},
                   "every cluster, dynamic balance": {"cluster": every, "balance": "dynamic"}}
        for label, options in choices.items():
            r = measure(workload, device, steps, **options)
            lines.append(f"| {name} | {label}: {r['cluster']}{ended(r)} | {r['step_s']:.2f} | {1000 * r['j_per_token']:.1f} | "
                         f"{r['hours']:.2f} | {r['skin_c']:.1f} |")
        print(f"clusters: {name} done", file=sys.stderr)
    return "\n".join(lines)


SCHEDULERS = (PolicySpec(policy="none"), PolicySpec(policy="paper"), PolicySpec(policy="thermal_pacer", limit_c=42),
              PolicySpec(policy="thermal_budget"), PolicySpec(policy="energy_probe"))


def schedulers(steps: int) -> str:
    workload = load_workload(WORKLOADS["GPT-2 Full-FT"])
    lines = ["| scenario | device | scheduler | ends on | completion (h) | J/token (mJ) | battery (%) | peak skin °C | peak junction °C | top severity |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    scenarios = {"battery, 25 °C": {"battery_start_pct": 100.0},
                 "charger, 35 °C": {"battery_start_pct": 50.0, "charging": True, "ambient_c": 35.0}}
    for scenario, options in scenarios.items():
        for name in ALL_PHONES:
            device = load_device(name)
            for spec in SCHEDULERS:
                w = workload.model_copy(update={"scheduling": spec})
                r = measure(w, device, steps, **options)
                label = spec.policy + "".join(f"({k}={v})" for k, v in spec.params.items())
                battery = f"-{r['drop']:.1f}" if r["drop"] >= 0 else f"+{-r['drop']:.1f}"
                lines.append(f"| {scenario} | {name} | {label}{ended(r)} | {r['cluster']} | {r['hours']:.2f} | "
                             f"{1000 * r['j_per_token']:.1f} | {battery} | {r['skin_c']:.1f} | {r['junction_c']:.1f} | "
                             f"{r['severity']} |")
            print(f"schedulers: {scenario} on {name} done", file=sys.stderr)
    return "\n".join(lines)


TABLES = {"ablation": ablation, "sensitivity": sensitivity, "clusters": clusters, "schedulers": schedulers}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps a run (equal work for every variant)")
    parser.add_argument("--scheduler-steps", type=int, default=1000)
    parser.add_argument("--only", nargs="*", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--out", default="runs/ablation.md")
    args = parser.parse_args(argv)
    parts = []
    for name in args.only:
        steps = args.scheduler_steps if name == "schedulers" else args.steps
        parts.append(f"## {name} ({steps} steps a run)\n\n{TABLES[name](steps)}\n")
    text = "\n".join(parts)
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
