"""The simulator's new physics against closed forms: the RC network, leakage, the governor's
hysteresis, CC/CV charging, the cutoff voltage, R(T), several clusters on a step, placement
and memory pressure. Round-number devices built in code (tests/test_sim.py's toy)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, linalg
from test_sim import op, program, q, run, toy_device

from mfbench import policies, sim
from mfbench.errors import InputError
from mfbench.sim.battery import Battery, BatteryEmpty
from mfbench.sim.thermal import Governor, ThermalNetwork
from mfbench.spec.profile import DeviceProfile

MB = 2**20


def network_device(**change) -> DeviceProfile:
    """The toy with a junction (2 C/W, 5 J/C) and a battery node (4 C/W, 40 J/C) on its board
    (10 C/W to ambient, 100 J/C)."""
    return toy_device(**{"thermal.junction": {"resistance_c_per_w": q(2), "capacitance_j_per_c": q(5)},
                         "thermal.battery": {"resistance_c_per_w": q(4), "capacitance_j_per_c": q(40)}, **change})


# ------------------------------------------------------------------------- the RC network

def test_network_step_response_matches_the_matrix_exponential():
    net = ThermalNetwork(network_device().thermal)
    # independent: C dx/dt = -G x + p with x = T - ambient, nodes (board, junction, battery)
    G = np.array([[1 / 10 + 1 / 2 + 1 / 4, -1 / 2, -1 / 4], [-1 / 2, 1 / 2, 0], [-1 / 4, 0, 1 / 4]])
    C = np.diag([100.0, 5.0, 40.0])
    A = -np.linalg.solve(C, G)
    P = 3.0  # W into the junction
    b = np.linalg.solve(C, np.array([0.0, P, 0.0]))
    for t in (0.5, 10.0, 100.0, 3000.0):
        net.set_temperatures([25.0] * 3)
        pieces = np.full(5, t / 5)  # pieces compose to one interval
        net.advance(net.response(pieces, np.full(5, P), np.zeros(5)), t)
        expected = 25 + np.linalg.solve(A, (linalg.expm(A * t) - np.eye(3)) @ b)
        assert net.temperatures == pytest.approx(expected.tolist(), rel=1e-10)
    # steady state: the heat crosses R_jb then R_ba; the battery, off the path, sits at the board
    net.advance(net.response(np.array([1e6]), np.array([P]), np.zeros(1)), 1e6)
    board, junction, battery = net.temperatures
    assert board == pytest.approx(25 + P * 10) and battery == pytest.approx(board)
    assert junction == pytest.approx(25 + P * (10 + 2))


def test_heat_constant_over_a_step_adds_like_a_profile():
    net, ref = (ThermalNetwork(network_device().thermal) for _ in range(2))
    dt = np.array([3.0, 7.0])
    net.advance(net.response(dt, np.array([1.0, 2.0]), np.zeros(2)), 10.0, net.heat(0.5, 0.2, 0.3))
    # the same heat as part of the profile: battery heat enters through the battery column
    ref.advance(ref.response(dt, np.array([1.5, 2.5]), np.full(2, 0.2)), 10.0, ref.heat(0.0, 0.0, 0.3))
    assert net.temperatures == pytest.approx(ref.temperatures, rel=1e-12)


# ------------------------------------------------------------------------------ leakage

LEAKY = {"clusters": [{"name": "big", "cores": 4, "freqs_mhz": q([1000, 2000]), "power_w_per_core": q([0.5, 1.0]),
                       "volts": q([0.6, 1.0]), "static_w": q(0.2), "leakage_w_per_core": q(0.1),
                       "gemm_gflops_per_core": q(10), "skinny_gemm_gflops_per_core": q(5)}],
         "power": {"idle_w": q(1.0), "uncore_w": q(0.3), "leakage_ref_c": q(25), "leakage_per_c": q(0.03)}}


@pytest.mark.parametrize("ambient", [25.0, 45.0])
def test_a_step_pays_static_uncore_and_leakage_at_the_junction_temperature(ambient):
    # one step of 1 s on 4 cores at the top point; the junction starts at ambient (no throttling: limit raised)
    device = toy_device(**LEAKY, **{"thermal.ambient_c": q(ambient), "thermal.throttling": []})
    summary, _ = run(program([op("gemm", flops=4e10)]), device, threads=4)
    leak = 4 * 0.1 * 1.0 * math.exp(0.03 * (ambient - 25))
    assert summary.energy_j == pytest.approx(1.0 + 4 * 1.0 + 0.2 + 0.3 + leak, rel=1e-12)


def test_leakage_scales_with_voltage_at_a_throttled_point():
    device = toy_device(**LEAKY, **{"thermal.ambient_c": q(45)})  # above the 40 C step: the 1 GHz, 0.6 V point
    summary, _ = run(program([op("gemm", flops=4e10)]), device, threads=4)
    leak = 4 * 0.1 * 0.6 * math.exp(0.03 * 20)
    assert summary.median_step_s == pytest.approx(2.0)
    assert summary.energy_j == pytest.approx(2.0 * (1.0 + 4 * 0.5 + 0.2 + 0.3 + leak), rel=1e-12)


# ---------------------------------------------------------------------------- the governor

def governor(**thermal) -> Governor:
    return Governor(toy_device(**{f"thermal.{k}": v for k, v in thermal.items()}).thermal)


def test_governor_hysteresis_cycle():
    g = governor(throttling=[{"above_c": 39, "freq_cap": 0.8, "hysteresis_c": 2},
                             {"above_c": 43, "freq_cap": 0.5, "hysteresis_c": 2}])
    cycle = [(38.0, 1.0), (39.5, 0.8), (43.5, 0.5), (42.0, 0.5), (41.5, 0.5),  # 43 - 2 = 41 releases the second
             (40.9, 0.8), (37.5, 0.8), (36.9, 1.0), (39.0, 1.0), (39.1, 0.8)]  # 39 - 2 = 37 releases the first
    caps = []
    for t, (skin, _) in enumerate(cycle):
        g.poll(float(t), skin, skin)
        caps.append(g.cap())
    assert caps == [cap for _, cap in cycle]
    assert g.max_level == 2


def test_governor_polls_the_skin_every_period_but_trips_on_the_junction_at_once():
    g = governor(throttling=[{"above_c": 39, "freq_cap": 0.8}], polling_s=q(7),
                 junction_trip={"above_c": 90, "freq_cap": 0.4, "hysteresis_c": 5})
    g.poll(0.0, 30.0, 50.0)
    g.poll(3.0, 45.0, 50.0)   # hot skin between polls: not seen yet
    assert g.cap() == 1.0
    g.poll(7.0, 45.0, 50.0)
    assert g.cap() == 0.8
    g.poll(8.0, 45.0, 95.0)   # the junction trip acts at once
    assert g.cap() == 0.4
    g.poll(9.0, 45.0, 86.0)   # above 90 - 5: still tripped
    assert g.cap() == 0.4
    g.poll(10.0, 45.0, 84.0)
    assert g.cap() == 0.8


def test_skin_above_shutdown_ends_the_run():
    device = toy_device(**{"thermal.ambient_c": q(60), "thermal.shutdown_c": q(55)})
    summary, _ = run(program([op("gemm", flops=4e10)]), device, threads=4, steps=3)
    assert summary.killed and summary.steps == 0 and "thermal shutdown" in summary.kill_reason


# ---------------------------------------------------------------------------- the battery

LINEAR = {"battery.ocv_soc_pct": q([0, 100]), "battery.ocv_v": q([3.0, 4.2]), "battery.internal_resistance_ohm": q(0.1)}


def charger(**change):
    c = {"charger_w": q(100), "efficiency": q(0.9), "cc_a": q(1.0), "cv_v": q(4.2), "termination_a": q(0.05),
         "hot_cut_c": q(45)}
    return {**c, **change}


def test_cc_cv_charge_time_is_the_closed_form():
    spec = toy_device(**LINEAR, **{"battery.charging": charger()}).battery
    battery, t = Battery(spec, 50.0), 0
    while not battery.full:
        battery.charge(1.0, 0.0, 25.0)
        t += 1
    full_s = t - 1 + battery.full_after_s
    # CC at 1 A until OCV + I R = 4.2 V, i.e. OCV = 4.1 V: 0.5 V of a 1.2 V / 3600 C slope = 1500 C = 1500 s;
    # then CV: I = I0 exp(-t s / R), tau = R / s = 300 s, down to 0.05 A: tau ln(1 / 0.05)
    assert full_s == pytest.approx(1500 + 300 * math.log(20), rel=1e-9)
    assert battery.soc_pct == pytest.approx((4.2 - 0.05 * 0.1 - 3.0) / 1.2 * 100, rel=1e-9)


def test_on_a_flat_ocv_the_cv_current_holds():
    spec = toy_device(**{"battery.charging": charger(cv_v=q(4.05))}).battery  # the toy's OCV is a flat 4 V
    battery = Battery(spec, 50.0)
    battery.charge(10.0, 0.0, 25.0)
    assert battery.current == pytest.approx(-(4.05 - 4.0) / 0.1)  # (cv - OCV) / R, all step long
    assert battery.soc_pct == pytest.approx(50 + 100 * 0.5 * 10 / 3600) and not battery.full


def test_charging_serves_the_load_first_and_its_loss_heats_the_board():
    spec = toy_device(**LINEAR, **{"battery.charging": charger(charger_w=q(10), cc_a=q(5))}).battery
    battery = Battery(spec, 20.0)  # OCV 3.24 V: far from CV
    cell_w, board_w = battery.charge(1.0, 4.0, 25.0)
    surplus = 10 * 0.9 - 4.0  # what is left for the cell after the load
    current = (math.sqrt(3.24**2 + 4 * 0.1 * surplus) - 3.24) / (2 * 0.1)  # (OCV + I R) I = surplus
    assert battery.current == pytest.approx(-current)
    assert cell_w == pytest.approx(current**2 * 0.1)
    assert board_w == pytest.approx(10 * 0.1)  # the whole 10 W drawn, 10 % lost


def test_a_hot_battery_takes_no_charge_current():
    spec = toy_device(**LINEAR, **{"battery.charging": charger()}).battery
    battery = Battery(spec, 50.0)
    battery.charge(10.0, 1.0, 46.0)
    assert battery.soc_pct == 50.0 and battery.current == 0.0


def test_cutoff_voltage_ends_discharge_at_the_closed_form_charge():
    spec = toy_device(**LINEAR, **{"battery.cutoff_v": q(3.4)}).battery
    battery, P, steps = Battery(spec, 100.0), 5.0, 0
    with pytest.raises(BatteryEmpty, match="cutoff"):
        while True:
            battery.draw(np.array([1.0]), np.array([P]))
            steps += 1
    # at cutoff V I = P with V = 3.4: I = P / 3.4, OCV = 3.4 + I R
    ocv_cut = 3.4 + P / 3.4 * 0.1
    soc_cut = (ocv_cut - 3.0) / 1.2 * 100
    step_drop = 100 * (P / 3.4) / 3600  # the most one 1 s step takes
    assert soc_cut - step_drop <= battery.soc_pct <= soc_cut + step_drop
    # time to get there: t = integral dq / I(OCV(q)), the current the root of P = (OCV - I R) I
    def current(q_c):
        ocv = 3.0 + 1.2 * q_c / 3600
        return (ocv - math.sqrt(ocv * ocv - 4 * 0.1 * P)) / (2 * 0.1)
    expected, _ = integrate.quad(lambda q_c: 1 / current(q_c), soc_cut / 100 * 3600, 3600)
    assert abs(steps - expected) <= 2


def test_internal_resistance_rises_in_the_cold():
    spec = toy_device(**{"battery.resistance_activation_k": q(2500)}).battery
    battery = Battery(spec, 50.0)
    assert battery.resistance(25.0) == pytest.approx(0.1)
    assert battery.resistance(0.0) == pytest.approx(0.1 * math.exp(2500 * (1 / 273.15 - 1 / 298.15)))
    assert battery.resistance(0.0) / 0.1 == pytest.approx(2.155, abs=0.01)
    # the same load sags the terminal voltage more in the cold
    cold = Battery(spec, 50.0)
    battery.draw(np.array([1.0]), np.array([5.0]), 25.0)
    cold.draw(np.array([1.0]), np.array([5.0]), 0.0)
    assert cold.voltage < battery.voltage


# --------------------------------------------------------------- clusters, placement, memory

TWO = [{"name": "big", "cores": 4, "freqs_mhz": q([1000, 2000]), "power_w_per_core": q([0.5, 1.0]),
        "gemm_gflops_per_core": q(10), "skinny_gemm_gflops_per_core": q(5)},
       {"name": "little", "cores": 4, "freqs_mhz": q([1000, 2000]), "power_w_per_core": q([0.1, 0.2]),
        "gemm_gflops_per_core": q(5), "skinny_gemm_gflops_per_core": q(2)}]


@pytest.mark.parametrize("balance, seconds", [("static", 6e10 / (8 * 5e9)),              # the slowest core sets the pace
                                              ("dynamic", 6e10 / (4 * 10e9 + 4 * 5e9))])  # rates add up
def test_several_clusters_on_one_step(balance, seconds):
    device = toy_device(clusters=TWO)
    summary, _ = run(program([op("gemm", flops=6e10)]), device, cluster="big+little", threads=8, balance=balance)
    assert summary.median_step_s == pytest.approx(seconds)
    assert summary.energy_j == pytest.approx(seconds * (1.0 + 4 * 1.0 + 4 * 0.2))  # every thread busy to the end


def test_background_placement_keeps_the_app_on_its_cpuset():
    device = toy_device(clusters=TWO, cpusets={"foreground": ["big", "little"], "background": ["little"]})
    assert sim.start_cluster(device, "auto", sim.allowed_clusters(device, "background")) == ("little", 4)
    summary, _ = run(program([op("gemm", flops=4e10)]), device, threads="auto", placement="background")
    assert summary.details["cluster"] == "little" and summary.median_step_s == pytest.approx(4e10 / 20e9)
    with pytest.raises(InputError, match="background"):
        run(program([op("gemm", flops=4e10)]), device, cluster="big", threads=4, placement="background")
    probe = policies.Cores(cluster="big")  # a scheduler sees only the clusters it may use
    with pytest.raises(InputError, match="unknown cluster"):
        run(program([op("gemm", flops=4e10)]), device, threads="auto", placement="background", scheduling=probe)


def test_a_low_memory_kill_is_a_probability_under_memory_pressure():
    # peak 1000 MB against a limit drawn from N(1100 MB, 100 MB): killed when the draw is below the peak
    device = toy_device(**{"ram.app_limit_mb": q(1100), "ram.pressure": {"sd_mb": q(100), "period_s": q(60)}})
    prog = program([op("fill", flops=1e9, alloc=1000 * MB)])
    kills = [run(prog, device, seed=seed)[0].killed for seed in range(400)]
    p = 0.5 * math.erfc(1 / math.sqrt(2))  # P(limit < peak) = Phi(-1)
    assert abs(sum(kills) / 400 - p) < 4 * math.sqrt(p * (1 - p) / 400)
    assert run(prog, device, seed=7)[0] == run(prog, device, seed=7)[0]  # seeded
    assert run(prog, device)[0].details["lmk_risk_per_draw"] == pytest.approx(p)


# ------------------------------------------------------------------ the ablation's profiles

def test_each_ablation_takes_its_effect_out_and_nothing_else():
    from mfbench.analysis import ablation
    from mfbench.spec.profile import load_device
    pixel8 = load_device("pixel8")
    full = pixel8.model_dump(mode="json", exclude_none=True)
    for name, change in ablation.EFFECTS.items():
        out = ablation.variant(pixel8, change).model_dump(mode="json", exclude_none=True)
        changed = {k for k in full if full[k] != out.get(k)}
        assert changed and changed <= {"clusters", "power", "thermal", "battery"}, name
    old = ablation.variant(pixel8, *ablation.EFFECTS.values(), ablation.flat_charger)
    assert all(c.static_w is None and c.leakage_w_per_core is None and len(c.freqs_mhz.values) == 6
               for c in old.clusters)
    assert old.thermal.junction is None and old.thermal.battery is None and old.thermal.polling_s is None
    assert [(s.above_c, s.hysteresis_c) for s in old.thermal.throttling] == [(40, 0), (43, 0), (46, 0)]
    assert old.battery.charging is None and old.battery.cutoff_v is None and old.power.uncore_w is None
    assert ablation.scaled_resistance(pixel8, 0.5).thermal.resistance_c_per_w.value == 5
