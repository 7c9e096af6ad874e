"""The trainer's telemetry over fake sysfs trees (--sysfs-root, MFBENCH_SYSFS_ROOT): absent
sensors are null, present ones are read in the kernel's units, energy is integrated from
voltage x current only when both exist."""
from __future__ import annotations

import json

import pytest
from sysfs_fixtures import (  # noqa: F401 (model, tokens: fixtures)
    controlled,
    model,
    tokens,
    trainer_args,
    write_battery,
    write_cpufreq,
    write_zone,
)

from mfbench.contracts import trace as trace_contract
from mfbench.device.native import run_trainer
from mfbench.policies import Scheduling


class Recorder(Scheduling):
    """Decides nothing; keeps every observation."""

    def __init__(self):
        self.seen = []

    def decide(self, obs):
        self.seen.append(obs)
        return {}


def samples_of(out):
    events = trace_contract.read_trace(out / "trace.jsonl")
    samples = [e for e in events if e["type"] == "sample"]
    assert samples
    for e in samples:  # the shared schema, no more, no less
        assert set(e) == {"type", *trace_contract.EVENT_KEYS["sample"]}
    return samples


def test_absent_sensors_are_null_never_invented(model, tokens, tmp_path):
    root = tmp_path / "empty-phone"
    root.mkdir()
    out = tmp_path / "out"
    # the root prefix through the environment this time
    run_trainer(trainer_args(model, tokens, out, 3, None)[1:], env={"MFBENCH_SYSFS_ROOT": str(root)})
    for e in samples_of(out):
        for key in ("battery", "current", "voltage", "temperature", "frequency", "charging", "zones", "frequencies"):
            assert e[key] is None, (key, e)
        assert e["rss"] > 0 and e["peak_rss"] >= e["rss"] and len(e["cpus"]) == 2
        assert e["pss"] is None or e["pss"] > 0  # /proc/self/smaps_rollup: Linux 4.14 and later
    summary = json.loads((out / "summary.json").read_text())
    for key in ("energy_j", "j_per_token", "battery_start_pct", "battery_end_pct", "battery_drop_pct",
                "max_temperature_c"):
        assert summary[key] is None, key


def test_battery_zones_and_frequency_in_the_kernels_units(model, tokens, tmp_path):
    root = tmp_path / "phone"
    # a USB supply first (not a battery), then a battery without current_now, voltage in mV
    usb = root / "sys" / "class" / "power_supply" / "usb"
    usb.mkdir(parents=True)
    (usb / "type").write_text("USB\n")
    (usb / "capacity").write_text("7\n")
    write_battery(root, capacity=64, status="Charging", voltage_now=3870, temp=315)
    write_zone(root, 0, "cpu-0-0", 45500)
    write_zone(root, 1, "skin", 33)  # a vendor zone in whole degrees
    write_cpufreq(root, 0, 1800000, 1200000)
    write_cpufreq(root, 1, 1800000, 1800000)
    out = tmp_path / "out"
    rec = Recorder()
    code, lines, _, summary = controlled(model, tokens, out, 2, root, rec)
    assert code == 0, lines
    for e in samples_of(out):
        assert (e["battery"], e["voltage"], e["current"], e["charging"]) == (64, 3.87, None, True)
        assert e["temperature"] == 31.5  # the battery's, in tenths of a degree
        assert e["zones"] == [{"type": "cpu-0-0", "c": 45.5}, {"type": "skin", "c": 33}]
        assert e["frequencies"] == {"cpu0-1": 1200} and e["frequency"] == 1200  # one cluster: cpu0's MHz
    assert summary["energy_j"] is None and summary["j_per_token"] is None  # no current: no energy
    assert (summary["battery_start_pct"], summary["battery_drop_pct"], summary["max_temperature_c"]) == (64, 0, 31.5)
    obs = rec.seen[-1]
    assert (obs["battery_pct"], obs["temperature_c"], obs["charging"], obs["power_w"]) == (64, 31.5, True, None)
    assert obs["clusters"] == {"cpu0-1": 2} and obs["cluster"] == "cpu0-1"

    # no battery temperature: the hottest zone
    write_battery(root, temp=None)
    code, lines, _, _ = controlled(model, tokens, tmp_path / "out2", 1, root, Recorder())
    assert code == 0, lines
    assert {e["temperature"] for e in samples_of(tmp_path / "out2")} == {45.5}


def test_energy_is_voltage_times_current_integrated(model, tokens, tmp_path):
    root = tmp_path / "phone"
    # discharging; this driver reports discharge as a negative current
    write_battery(root, capacity=80, status="Discharging", current_now=-500000, voltage_now=3900000, temp=300)
    rec = Recorder()
    code, lines, trace, summary = controlled(model, tokens, tmp_path / "out", 3, root, rec)
    assert code == 0, lines
    assert {(e["current"], e["voltage"]) for e in trace if e["type"] == "sample"} == {(0.5, 3.9)}
    watts = 0.5 * 3.9
    assert rec.seen[0]["power_w"] is None and rec.seen[0]["last_step_s"] is None
    for obs in rec.seen[1:]:
        assert obs["power_w"] == pytest.approx(watts, rel=1e-9) and obs["last_step_s"] > 0
    steps = [e for e in trace if e["type"] == "step"]
    first_start = steps[0]["t"] - steps[0]["duration"]
    last_t = max(e["t"] for e in trace if e["type"] in ("sample", "step"))
    # constant power: energy = watts x the span of the readings, which covers every step
    assert watts * (steps[-1]["t"] - first_start) <= summary["energy_j"] <= watts * (last_t + 0.5)
    assert summary["j_per_token"] == pytest.approx(summary["energy_j"] / (3 * 2 * 8))

    # charging: the status makes the current negative whatever sign the driver uses
    write_battery(root, status="Charging", current_now=700000)
    code, lines, trace, _ = controlled(model, tokens, tmp_path / "out2", 1, root, Recorder())
    assert code == 0, lines
    assert {e["current"] for e in trace if e["type"] == "sample"} == {-0.7}


def test_sysfs_root_flag_beats_the_environment(model, tokens, tmp_path):
    flag_root, env_root = tmp_path / "flag", tmp_path / "env"
    write_battery(flag_root, capacity=11)
    write_battery(env_root, capacity=99)
    out = tmp_path / "out"
    run_trainer(trainer_args(model, tokens, out, 1, flag_root)[1:], env={"MFBENCH_SYSFS_ROOT": str(env_root)})
    assert {e["battery"] for e in samples_of(out)} == {11}
