"""Sweeps: validation, the Pareto front, Ray against in-process run for run, resume and
extend, errors as rows, random sampling, plots with many devices and policies."""
from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mfbench.errors import InputError
from mfbench.scale import plot
from mfbench.scale.engine import Engine
from mfbench.sim import sweep

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "workloads" / "paper"
INLINE = Engine(inline=True)


@pytest.fixture(scope="module")
def ray_engine():
    engine = Engine(cpus=2)  # one local Ray start for the module
    yield engine
    engine.shutdown()


def test_pareto_front_by_brute_force():
    points = [(1, 9), (2, 5), (3, 6), (4, 2), (5, 2), (6, 1), (2, 5), (9, 9)]
    front = plot.pareto_front(points)
    for i, (x, y) in enumerate(points):
        dominated = any(a <= x and b <= y and (a, b) != (x, y) for a, b in points)
        assert (i in front) == (not dominated)
    assert [points[i] for i in front] == [(1, 9), (2, 5), (4, 2), (6, 1), (2, 5)]


def write_sweep(tmp_path, **fields):
    data = {"name": "tiny", "steps": 3, "devices": ["pixel8", "galaxy-a54"],
            "workloads": [str(PAPER / "gpt2-lora-seq128.yaml")],
            "scheduling": [{"policy": "paper"}, {"policy": "energy_probe"}]}
    data.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("fields, field, words", [
    ({"devices": ["pixel99"]}, "devices[0]", "unknown device"),
    ({"workloads": ["nope.yaml"]}, "workloads[0]", "does not exist"),
    ({"scheduling": [{"policy": "paper", "every_k_steps": 0}]}, "scheduling[0].every_k_steps", "positive"),
    ({"steps": 0}, "steps", "greater than 0"),
    ({"axes": {"micro_batch": [4, 0]}}, "axes.micro_batch[1]", "micro_batch"),
    ({"axes": {"memory.shardng": [1]}}, "axes.memory.shardng[0]", "unknown field"),
    ({"axes": {"device.ram.app_limit_mb.value": [-1]}}, "axes.device.ram.app_limit_mb.value[0]", "greater than 0"),
    ({"axes": {"battery_start_pct": [120]}}, "axes.battery_start_pct[0]", "percentage"),
    ({"axes": {"micro_batch": {"uniform": [1, 8]}}}, "axes.micro_batch", "random"),
])
def test_bad_sweeps_name_the_field(tmp_path, fields, field, words):
    path = write_sweep(tmp_path, **fields)
    with pytest.raises(InputError) as e:
        sweep.load_sweep(path)
    assert e.value.file == path and e.value.field == field and words in e.value.message


def test_ray_sweep_equals_in_process_run_for_run(tmp_path, ray_engine):
    path = write_sweep(tmp_path, axes={"micro_batch": [4, 8], "ambient_c": [20, 35]})
    inline, out_a, ran_a = sweep.run_sweep(path, tmp_path / "inline", INLINE, progress=False)
    on_ray, out_b, ran_b = sweep.run_sweep(path, tmp_path / "ray", ray_engine, progress=False)
    assert ran_a == ran_b == len(inline) == 2 * 2 * 2 * 2
    assert {r["key"]: r for r in inline} == {r["key"]: r for r in on_ray}
    assert {(r["device"], r["scheduling"], r["micro_batch"], r["ambient_c"]) for r in on_ray} == {
        (d, s, m, a) for d in ("pixel8", "galaxy-a54") for s in ("paper", "energy_probe") for m in (4, 8)
        for a in (20, 35)}
    hot = {(r["device"], r["scheduling"], r["micro_batch"]): r["max_temperature_c"] for r in on_ray if r["ambient_c"] == 35}
    assert all(r["max_temperature_c"] < hot[r["device"], r["scheduling"], r["micro_batch"]]
               for r in on_ray if r["ambient_c"] == 20)  # the ambient axis reached the simulator
    with open(out_b / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16 and all(int(r["steps"]) == 3 for r in table)
    assert pq.read_table(out_b / "results.parquet").num_rows == 16
    png = (out_b / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_with_bad_input_is_a_row_and_the_sweep_ends(tmp_path, ray_engine):
    """The hang of issue 14: a cores policy naming a cluster one device lacks (Galaxy A54 has
    no `mid`). The sweep finishes on Ray; that device's run is a row with the error."""
    path = write_sweep(tmp_path, scheduling=[{"policy": "cores", "cluster": "mid"}])
    rows, _, _ = sweep.run_sweep(path, tmp_path / "out", ray_engine, progress=False)
    by_device = {r["device"]: r for r in rows}
    assert by_device["pixel8"]["error"] is None and by_device["pixel8"]["steps"] == 3
    assert "unknown cluster 'mid'" in by_device["galaxy-a54"]["error"]


def test_a_combination_the_schema_refuses_is_a_row(tmp_path):
    """Each value is valid alone; micro_batch 8 of a batch of 4 is not (a row with its error)."""
    path = write_sweep(tmp_path, devices=["pixel8"], scheduling=None, axes={"batch": [4, 8], "micro_batch": [4, 8]})
    rows, _, ran = sweep.run_sweep(path, tmp_path / "out", INLINE, progress=False)
    assert ran == 4
    refused = [r for r in rows if r["error"]]
    assert [(r["batch"], r["micro_batch"]) for r in refused] == [(4, 8)]
    assert "micro_batch (8) must divide batch (4)" in refused[0]["error"] and refused[0]["steps"] is None
    assert all(r["steps"] == 3 for r in rows if not r["error"])


def test_resume_skips_finished_points_and_extends(tmp_path):
    path = write_sweep(tmp_path, devices=["pixel8"], axes={"micro_batch": [4, 8]})
    first, out, ran = sweep.run_sweep(path, tmp_path / "out", INLINE, progress=False)
    assert ran == 4
    again, _, ran = sweep.run_sweep(path, out, INLINE, progress=False)
    assert ran == 0 and again == first
    write_sweep(tmp_path, devices=["pixel8"], axes={"micro_batch": [2, 4, 8]})  # one more value
    extended, _, ran = sweep.run_sweep(path, out, INLINE, progress=False)
    assert ran == 2 and len(extended) == 6
    assert [r for r in extended if r["micro_batch"] != 2] == first  # old rows kept as they were
    # a stop leaves parts; the next run merges them and runs only the rest
    (out / "results.parquet").rename(tmp_path / "old.parquet")
    (out / "parts").mkdir()
    pq.write_table(pq.read_table(tmp_path / "old.parquet").slice(0, 2), out / "parts" / "part-00000.parquet")
    resumed, _, ran = sweep.run_sweep(path, out, INLINE, progress=False)
    assert ran == 4 and sorted(r["key"] for r in resumed) == sorted(r["key"] for r in extended)


def test_random_points_are_reproducible_and_a_larger_sample_keeps_them(tmp_path):
    axes = {"ambient_c": {"uniform": [15, 35]}, "micro_batch": [2, 4, 8]}
    _, small, _ = sweep.load_sweep(write_sweep(tmp_path, random=5, seed=3, axes=axes))
    _, large, _ = sweep.load_sweep(write_sweep(tmp_path, random=9, seed=3, axes=axes))
    assert [p.values for p in large[:5]] == [p.values for p in small]
    assert all(15 <= p.values["ambient_c"] <= 35 and p.values["micro_batch"] in (2, 4, 8) for p in large)
    assert len({p.values["ambient_c"] for p in large}) == 9


def test_plot_with_many_devices_and_policies(tmp_path):
    """More than ten of each (the old plot ran out of markers); markers stay with their policy."""
    rows = [{"workload": "w", "device": f"phone{d}", "scheduling": f"policy{p}(x=1)", "wall_s": 100.0 + d + p,
             "j_per_token": 1.0 / (1 + p), "killed": False, "steps": 3, "error": None}
            for d in range(12) for p in range(12)]
    plot.plot_fronts(rows, tmp_path / "p.png", "many")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    builtins = ["none", "paper", "battery_floor", "charging_only", "thermal_pacer", "cores", "energy_probe"]
    assert len({plot.policy_marker(p) for p in builtins}) == len(builtins)
    assert plot.policy_marker("thermal_pacer(limit_c=40)") == plot.policy_marker("thermal_pacer")
    assert plot.device_color("pixel8") == plot.device_color("pixel8") != plot.device_color("galaxy-a54")
