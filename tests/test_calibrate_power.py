"""`mfbench calibrate`'s power and heat: the benchmark's power phases and their fit.

A phone's sensors are emulated (sysfs_fixtures.EmulatedPhone): its battery current follows
what the real benchmark binary does (its running threads, the frequency limit it writes into
cpufreq), its skin zone one RC node of known R and C, in closed form. The fit must recover
them. The thermal fit is also held against a three-node network integrated by scipy's ODE
solver, the power fit against the simulator's power model written out, and a charging
battery must leave the profile alone.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from scipy.integrate import solve_ivp
from sysfs_fixtures import EmulatedPhone

from mfbench import calibrate
from mfbench.device.native import bench_binary
from mfbench.errors import validate
from mfbench.spec.profile import DEVICES_DIR, DeviceProfile

STAMP = "mfbench calibrate test"
DYN = {1000000: 0.4, 1500000: 0.75, 2000000: 1.3}  # W a busy core, at each step (kHz)


def base(name: str) -> dict:
    return yaml.safe_load((DEVICES_DIR / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The benchmark's power phases on an emulated two-core phone: (result, the phone)."""
    tmp = tmp_path_factory.mktemp("phone")
    phone = EmulatedPhone(tmp / "root", [0, 1], idle_w=0.8, static_w=0.25, dyn_w=DYN, r_c_per_w=8.0,
                          c_j_per_c=0.5, ambient_c=30.0)
    spec = {"quiet": True, "power": {"settle_s": 0.4, "window_s": 1.0, "idle_s": 1.0, "sample_s": 0.05},
            "heat": {"heat_s": 8, "cool_s": 8, "sample_s": 0.05}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    bench = subprocess.Popen([str(bench_binary()), str(tmp / "spec.json"), "--out", str(tmp / "out.json")],
                             env={**os.environ, "MFBENCH_SYSFS_ROOT": str(tmp / "root")}, stderr=subprocess.PIPE, text=True)
    phone.start(bench.pid)
    _, err = bench.communicate(timeout=120)
    phone.stop()
    assert bench.returncode == 0, err
    return json.loads((tmp / "out.json").read_text()), phone


def test_an_emulated_phone_s_power_and_heat_are_recovered(emulated):
    result, phone = emulated
    power = result["power"]
    assert power["clusters"] == [{"name": "cpu0-1", "cpus": [0, 1], "frequency_control": True,
                                  "available_mhz": [1000.0, 1500.0, 2000.0]}]
    loads = [(p["threads"], p["set_mhz"]) for p in power["phases"] if p["what"] == "load"]
    assert loads == [(n, f) for n in (1, 2) for f in (1000.0, 1500.0, 2000.0)]
    # the limits are put back as they were
    for cpu in phone.cpus:
        d = phone.root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpufreq"
        assert ((d / "scaling_min_freq").read_text().strip(), (d / "scaling_max_freq").read_text().strip()) == \
            ("1000000", "2000000")

    data = base("host")  # one cluster of two cores, as the emulated phone
    clusters = data["clusters"]
    report = calibrate.fit_power_and_heat(data, clusters, power, result["heat"], STAMP)
    assert data["power"]["idle_w"]["value"] == pytest.approx(phone.idle_w, rel=0.02)
    assert clusters[0]["static_w"]["value"] == pytest.approx(phone.static_w, abs=0.03)
    assert clusters[0]["freqs_mhz"]["value"] == [1000, 1500, 2000]
    assert clusters[0]["power_w_per_core"]["value"] == pytest.approx(list(DYN.values()), rel=0.04)
    assert data["thermal"]["resistance_c_per_w"]["value"] == pytest.approx(phone.r, rel=0.05)
    assert data["thermal"]["capacitance_j_per_c"]["value"] == pytest.approx(phone.c, rel=0.05)
    for field in (data["power"]["idle_w"], clusters[0]["static_w"], clusters[0]["power_w_per_core"],
                  data["thermal"]["resistance_c_per_w"]):
        assert field["measured"].startswith(STAMP)
    assert data["thermal"]["ambient_c"] == base("host")["thermal"]["ambient_c"]  # the room's, not stored
    assert any(k == "thermal fit" for k, _ in report)
    validate(DeviceProfile, data, "fitted")


def test_without_frequency_control_the_governor_s_step_is_measured(tmp_path):
    """No cpufreq table to set (as on a phone without root): each core count runs at the
    governor's frequency, sampled; the base curve is scaled to what it drew there."""
    phone = EmulatedPhone(tmp_path / "root", [0, 1], idle_w=0.8, static_w=0.25, dyn_w=DYN, r_c_per_w=8.0,
                          c_j_per_c=0.5, ambient_c=30.0, table=False)
    (tmp_path / "spec.json").write_text(json.dumps({"quiet": True, "power": {"settle_s": 0.4, "window_s": 1.0,
                                                                             "idle_s": 1.0, "sample_s": 0.05}}))
    bench = subprocess.Popen([str(bench_binary()), str(tmp_path / "spec.json"), "--out", str(tmp_path / "out.json")],
                             env={**os.environ, "MFBENCH_SYSFS_ROOT": str(phone.root)}, stderr=subprocess.PIPE, text=True)
    phone.start(bench.pid)
    _, err = bench.communicate(timeout=60)
    phone.stop()
    assert bench.returncode == 0, err
    power = json.loads((tmp_path / "out.json").read_text())["power"]
    assert power["clusters"][0]["frequency_control"] is False
    assert [(p["threads"], p["set_mhz"]) for p in power["phases"] if p["what"] == "load"] == [(1, None), (2, None)]
    data = yaml.safe_load((DEVICES_DIR / "host.yaml").read_text())
    data["clusters"][0]["freqs_mhz"]["value"] = [1000, 2000, 3000]
    data["clusters"][0]["power_w_per_core"]["value"] = [0.5, 2.0, 4.5]
    calibrate.fit_power_and_heat(data, data["clusters"], power, None, STAMP)
    scale = DYN[2000000] / 2.0  # measured at 2000 MHz, where the base says 2.0 W
    assert data["clusters"][0]["power_w_per_core"]["value"] == pytest.approx([0.5 * scale, 1.3, 4.5 * scale], rel=0.04)
    assert data["clusters"][0]["freqs_mhz"]["value"] == [1000, 2000, 3000]  # the base's table stays
    assert data["clusters"][0]["static_w"]["value"] == pytest.approx(phone.static_w, abs=0.03)


def test_without_a_battery_sensor_there_is_no_power_benchmark(tmp_path):
    """This host has no battery: the power part is skipped at once, and calibrate says so."""
    (tmp_path / "spec.json").write_text(json.dumps({"quiet": True, "power": {"idle_s": 60}, "heat": {"heat_s": 60}}))
    empty = tmp_path / "root"
    empty.mkdir()
    r = subprocess.run([str(bench_binary()), str(tmp_path / "spec.json"), "--out", str(tmp_path / "out.json")],
                       env={**os.environ, "MFBENCH_SYSFS_ROOT": str(empty)}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["power"] is None and result["heat"] is None and result["battery"]["present"] is False


def load_phases(truth: dict, cluster: dict, temperature_c: float) -> list[dict]:
    """Phases whose medians the simulator's power model gives (mfbench/sim/power.py written
    out): P = idle + uncore + static + n (dyn_j + leak (V_j / V_top) exp(k (T - T_ref)))."""
    f, v = cluster["freqs_mhz"]["value"], cluster["volts"]["value"]
    leak = cluster["leakage_w_per_core"]["value"] * np.exp(0.025 * (temperature_c - 25))
    phases = [{"what": "idle", "t0": 0, "t1": 5, "power_w": truth["idle"], "charging": False}]
    for n in range(1, cluster["cores"] + 1):
        for j in truth["steps"]:
            p = truth["idle"] + 0.25 + truth["static"] + n * (truth["dyn"][j] + leak * v[j] / v[-1])
            phases.append({"what": "load", "cluster": 0, "threads": n, "set_mhz": None, "mhz": {"big": f[j]},
                           "power_w": p, "temperature_c": temperature_c, "charging": False})
    return phases


def test_the_power_fit_inverts_the_simulator_s_power_model():
    """pixel8's big cluster (uncore 0.25 W, leakage 0.1 W a core at 25 C): with every step set,
    static and each step's power come back exactly; with the governor's step alone (cpufreq not
    writable), the base curve is scaled to it."""
    data = base("pixel8")
    big = copy.deepcopy(max(data["clusters"], key=lambda c: c["freqs_mhz"]["value"][-1]))
    big["cores"] = 3
    f = big["freqs_mhz"]["value"]
    dyn = [0.9 * w for w in big["power_w_per_core"]["value"]]
    truth = {"idle": 0.7, "static": 0.08, "dyn": dyn, "steps": range(len(f))}
    phases = load_phases(truth, big, 40.0)
    for p, j in zip(phases[1:], [j for _ in range(3) for j in range(len(f))]):
        p["set_mhz"] = f[j]
    found = [{"name": "big", "frequency_control": True, "available_mhz": f}]
    power, fields, _ = calibrate.fit_power(phases, [big], found, data["power"], STAMP)
    assert power["idle_w"]["value"] == pytest.approx(0.7)
    assert fields[0]["static_w"]["value"] == pytest.approx(0.08, abs=1e-4)
    assert fields[0]["power_w_per_core"]["value"] == pytest.approx(dyn, abs=1e-4)

    top = {**truth, "steps": [len(f) - 1]}  # the governor keeps the top step
    found = [{"name": "big", "frequency_control": False, "available_mhz": []}]
    _, fields, _ = calibrate.fit_power(load_phases(top, big, 40.0), [big], found, data["power"], STAMP)
    assert fields[0]["power_w_per_core"]["value"] == pytest.approx(dyn, abs=1e-3)
    assert "the governor's" in fields[0]["power_w_per_core"]["measured"]


def test_a_charging_battery_keeps_the_base_profile():
    data, before = base("pixel8"), base("pixel8")
    samples = [{"t": t, "voltage": 4.0, "current": -0.5, "charging": True, "frequencies": None,
                "zones": [{"type": "skin-therm", "c": 30 + t}]} for t in np.arange(0, 10, 0.5)]
    power = {"samples": samples, "phases": [{"what": "idle", "t0": 0, "t1": 10}], "clusters": []}
    heat = {"samples": samples, "phases": [{"what": "heat", "t0": 0, "t1": 5}, {"what": "cool", "t0": 5, "t1": 10}]}
    report = calibrate.fit_power_and_heat(data, data["clusters"], power, heat, STAMP)
    assert data == before
    assert [k for k, v in report if "charging" in v] == ["power", "thermal"]


def test_the_thermal_fit_recovers_a_three_node_network():
    """Skin and CPU zones of a phone whose board, junction and battery nodes (pixel8's network
    with other R and C on the board and junction) are integrated by scipy's ODE solver under a
    heat-up and a cool-down; the fit, from a wrong start, recovers the four, the battery (no
    sensor) kept."""
    thermal = base("pixel8")["thermal"]
    truth = {"board": (12.0, 60.0), "junction": (3.0, 5.0)}
    rb, cb = truth["board"]
    rj, cj = truth["junction"]
    rc, cc = thermal["battery"]["resistance_c_per_w"]["value"], thermal["battery"]["capacitance_j_per_c"]["value"]
    ambient, idle = 24.0, 0.6

    def watts(t):
        return 4.5 if 20 <= t < 320 else idle

    def rhs(t, x):  # x = (board, junction, battery) above ambient
        p = watts(t)
        b, j, c = x
        return [(-b / rb + (j - b) / rj + (c - b) / rc + min(p, idle)) / cb,
                (-(j - b) / rj + max(0.0, p - idle)) / cj,
                (-(c - b) / rc) / cc]

    t = np.arange(0, 620, 0.5)
    x0 = [idle * rb] * 3  # at rest: idle heat on the board
    sol = solve_ivp(rhs, (0, t[-1]), x0, t_eval=t, rtol=1e-9, atol=1e-9, max_step=0.5)
    series = {"t": t, "power_w": np.array([watts(x) for x in t]), "board": ambient + sol.y[0],
              "junction": ambient + sol.y[1]}
    nodes, fit = calibrate.fit_thermal(series, thermal, idle)
    assert set(nodes) == {"board", "junction"}
    for n, (r, c) in truth.items():
        assert nodes[n][0] == pytest.approx(r, rel=0.02) and nodes[n][1] == pytest.approx(c, rel=0.02)
    assert fit["ambient_c"] == pytest.approx(ambient, abs=0.1)
    assert fit["rms_c"] < 0.05


def test_a_signal_during_the_power_part_puts_the_frequency_limits_back(tmp_path):
    """SIGINT while a cluster is held at its lowest step: the benchmark stops within a second,
    says so in one line, exits 130, and the CPUs' limits are what they were before."""
    import signal
    import time
    phone = EmulatedPhone(tmp_path / "root", [0, 1], idle_w=0.8, static_w=0.25, dyn_w=DYN, r_c_per_w=8.0,
                          c_j_per_c=0.5, ambient_c=30.0)
    (tmp_path / "spec.json").write_text(json.dumps({"quiet": True, "power": {"settle_s": 0.2, "window_s": 30,
                                                                             "idle_s": 0.1, "sample_s": 0.05}}))
    limit = phone.root / "sys" / "devices" / "system" / "cpu" / "cpu1" / "cpufreq" / "scaling_max_freq"
    bench = subprocess.Popen([str(bench_binary()), str(tmp_path / "spec.json"), "--out", str(tmp_path / "out.json")],
                             env={**os.environ, "MFBENCH_SYSFS_ROOT": str(phone.root)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while limit.read_text().strip() != "1000000" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert limit.read_text().strip() == "1000000"  # the first load phase: both limits at the lowest step
    bench.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = bench.communicate(timeout=30)
    assert time.monotonic() - sent < 2
    assert bench.returncode == 130
    assert err.strip().splitlines() == ["mfbench-bench: stopped by signal SIGINT; the frequency limits are as they were"]
    for cpu in (0, 1):
        d = phone.root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpufreq"
        assert ((d / "scaling_min_freq").read_text().strip(), (d / "scaling_max_freq").read_text().strip()) == \
            ("1000000", "2000000")
    assert not (tmp_path / "out.json").exists()
