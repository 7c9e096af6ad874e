"""Fleets: a small fleet equals per-phone simulations; drops carry their reasons; Ray equals
in-process; the daily windows integrate as a brute-force sum does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from mfbench import sim
from mfbench.errors import InputError
from mfbench.scale import fleet
from mfbench.scale.engine import Engine
from mfbench.spec.profile import load_device
from mfbench.spec.workload import load_workload

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "workloads" / "examples" / "gpt2-lora-quickstart.yaml"
INLINE = Engine(inline=True)


def write_fleet(tmp_path, **fields):
    data = {"name": "small", "workload": str(WORKLOAD), "phones": 8, "rounds": 3, "local_steps": 2,
            "deadline_s": 3600, "start_hour": 23, "seed": 1,
            "devices": [{"device": "pixel8"}, {"device": "galaxy-a54"}],
            "ambient_c": {"uniform": [18, 34]}, "battery_start_pct": {"uniform": [15, 90]},
            "charging": {"start_h": 23.0, "hours": {"values": [0, 8]}}}
    data.update(fields)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_small_fleet_equals_per_phone_simulations(tmp_path):
    rounds, classes, out, _ = fleet.run_fleet(write_fleet(tmp_path), tmp_path / "out", INLINE, progress=False)
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    workload = load_workload(WORKLOAD)
    assert len(clients) == sum(r["selected"] for r in rounds) == 3 * 8
    assert any(c["charging"] for c in clients) and not all(c["charging"] for c in clients)
    for c in clients:  # each client's training, simulated on its own from its situation
        s, _ = sim.simulate(workload, load_device(c["device"]), steps=2, battery_start_pct=c["sim_battery_pct"],
                            ambient_c=c["sim_ambient_c"], charging=c["charging"], progress=False,
                            base_dir=WORKLOAD.parent)
        assert (c["train_s"], c["train_energy_j"], c["steps"], c["peak_memory_bytes"]) == (
            s.wall_s, s.energy_j, s.steps, s.peak_memory_bytes)
        assert c["outcome"] == "completed"
        assert c["end_s"] == pytest.approx(c["download_s"] + c["train_s"] + c["upload_s"])
        assert c["sim_battery_pct"] == round(c["battery_pct"])  # 1 % resolution
        assert c["battery_drop_pct"] == pytest.approx(s.battery_drop_pct, abs=0.01 if not c["charging"] else 0)  \
            if c["charging"] else c["battery_drop_pct"] > s.battery_drop_pct  # plus the radio's share
    for r in rounds:
        mine = [c for c in clients if c["round"] == r["round"]]
        assert r["round_s"] == pytest.approx(max(c["end_s"] for c in mine))
        assert r["completed"] == len(mine) and r["success"]
    assert rounds[1]["start_s"] == pytest.approx(rounds[0]["round_s"])
    # a phone's next round starts from where its last one left it (plus any charging between)
    by_phone = {}
    for c in clients:
        by_phone.setdefault(c["phone"], []).append(c)
    for history in by_phone.values():
        for a, b in zip(history, history[1:]):
            assert b["battery_pct"] >= a["battery_end_pct"] - 1e-9
            if not a["charging"] and not b["charging"]:
                assert b["battery_pct"] == pytest.approx(a["battery_end_pct"])
    assert {c["class"]: c["selected"] for c in classes} == {
        d: sum(c["device"] == d for c in clients) for d in ("pixel8", "galaxy-a54")}


def test_a_client_that_cannot_fit_is_dropped_with_its_reason(tmp_path):
    path = write_fleet(tmp_path, devices=[
        {"device": "pixel8"},
        {"device": "pixel8", "label": "tiny", "sets": ["ram.app_limit_mb.value=400"]}], rounds=6, clients_per_round=2, seed=4)
    rounds, classes, out, _ = fleet.run_fleet(path, tmp_path / "out", INLINE, progress=False)
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    tiny = [c for c in clients if c["device"] == "tiny"]
    assert tiny and all(c["outcome"] == "low_memory" and "low-memory kill" in c["reason"] and c["steps"] == 0
                        for c in tiny)
    assert all(c["outcome"] == "completed" for c in clients if c["device"] == "pixel8")
    assert sum(r["drop_low_memory"] for r in rounds) == len(tiny)
    first_kill = min(c["round"] for c in tiny)
    assert first_kill > 0  # rounds without a drop reason come first: the table's types do not depend on them
    assert {c["class"]: c["drop_low_memory"] for c in classes} == {"pixel8": 0, "tiny": len(tiny)}


def test_stragglers_and_closing_windows_drop(tmp_path):
    # one phone class is slower than the other; a deadline between their times drops the slower
    same = {"rounds": 1, "ambient_c": 22, "battery_start_pct": 90, "charging": {"hours": 0}, "network": {
        "wifi_fraction": 1, "wifi": {"up_mbps": 20, "down_mbps": 50, "active_w": 0.1, "nj_per_byte_up": 100,
                                     "nj_per_byte_down": 100}}}
    rounds, _, out, _ = fleet.run_fleet(write_fleet(tmp_path, **same), tmp_path / "a", INLINE, progress=False)
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    time = {d: {c["end_s"] for c in clients if c["device"] == d} for d in ("pixel8", "galaxy-a54")}
    assert all(len(t) == 1 for t in time.values())  # same situation, same time
    (fast, t_fast), (slow, t_slow) = sorted(((d, t.pop()) for d, t in time.items()), key=lambda x: x[1])
    deadline = (t_fast + t_slow) / 2
    rounds, _, out, _ = fleet.run_fleet(write_fleet(tmp_path, **same, deadline_s=deadline),
                                        tmp_path / "b", INLINE, progress=False)
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert {c["device"]: c["outcome"] for c in clients} == {fast: "completed", slow: "deadline"}
    assert rounds[0]["round_s"] == deadline and rounds[0]["drop_deadline"] == sum(c["device"] == slow for c in clients)
    # a window that closes 5 s into the round (before anyone is done): everyone leaves
    path = write_fleet(tmp_path, rounds=1, available={"start_h": 22.0, "hours": 1 + 5 / 3600}, start_hour=23)
    rounds, _, out, _ = fleet.run_fleet(path, tmp_path / "c", INLINE, progress=False)
    assert rounds[0]["drop_left"] == rounds[0]["selected"] == 8 and rounds[0]["round_s"] == pytest.approx(5)


def test_fleet_on_ray_equals_in_process(tmp_path):
    path = write_fleet(tmp_path, phones=20, clients_per_round=6)
    engine = Engine(cpus=2)
    try:
        a = fleet.run_fleet(path, tmp_path / "a", INLINE, progress=False)
        b = fleet.run_fleet(path, tmp_path / "b", engine, progress=False)
    finally:
        engine.shutdown()
    assert a[0] == b[0] and a[1] == b[1]
    assert pq.read_table(tmp_path / "a" / "clients.parquet").equals(pq.read_table(tmp_path / "b" / "clients.parquet"))


def test_daily_windows_integrate_like_a_sum():
    rng = np.random.default_rng(0)
    start, hours = rng.uniform(0, 24, 50), rng.uniform(0, 24, 50)
    t = rng.uniform(0, 3 * fleet.DAY_S, 50)
    for s, h, end in zip(start, hours, t):
        grid = np.arange(0, end, 10.0) + 5.0  # midpoints of 10 s cells
        inside, _ = fleet.in_window(np.full(len(grid), s), np.full(len(grid), h), grid)
        expected = inside.sum() * 10.0
        got = fleet.daily_seconds(np.array([s]), np.array([h]), np.array([end]))[0]
        assert got == pytest.approx(expected, abs=20.0)


@pytest.mark.parametrize("fields, field", [
    ({"phones": 0}, "phones"),
    ({"devices": [{"device": "pixel99"}]}, "devices[0]"),
    ({"devices": [{"device": "pixel8"}, {"device": "pixel8"}]}, "devices"),
    ({"workload": "nope.yaml"}, "workload"),
    ({"sets": ["micro_batch=3"]}, "sets"),
    ({"ambient_c": {"uniform": [1]}}, "ambient_c"),
])
def test_bad_fleets_name_the_field(tmp_path, fields, field):
    with pytest.raises(InputError) as e:
        fleet.FleetRun(write_fleet(tmp_path, **fields))
    assert e.value.file == tmp_path / "fleet.yaml" and e.value.field.startswith(field)


def test_phones_from_a_trace_file(tmp_path):
    (tmp_path / "phones.csv").write_text("device,ambient_c,battery_start_pct,network\n"
                                         "pixel8,30,55,wifi\ngalaxy-a54,20,70,cellular\n")
    run = fleet.FleetRun(write_fleet(tmp_path, phones_file="phones.csv"))
    assert run.n == 2 and list(run.soc) == [55, 70] and list(run.ambient) == [30, 20] and list(run.wifi) == [True, False]
    (tmp_path / "phones.csv").write_text("device,ambient_c\npixel9,30\n")
    with pytest.raises(InputError) as e:
        fleet.FleetRun(write_fleet(tmp_path, phones_file="phones.csv"))
    assert "row 2: device" in e.value.field
