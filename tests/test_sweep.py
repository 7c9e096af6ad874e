"""Sweeps: validation, the Pareto front, and one small sweep end to end in two processes."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from mfbench.errors import InputError
from mfbench.sim import sweep

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "workloads" / "paper"


def test_pareto_front_by_brute_force():
    points = [(1, 9), (2, 5), (3, 6), (4, 2), (5, 2), (6, 1), (2, 5), (9, 9)]
    front = sweep.pareto_front(points)
    for i, (x, y) in enumerate(points):
        dominated = any(a <= x and b <= y and (a, b) != (x, y) for a, b in points)
        assert (i in front) == (not dominated)
    assert [points[i] for i in front] == [(1, 9), (2, 5), (4, 2), (6, 1), (2, 5)]


def write_sweep(tmp_path, **fields):
    data = {"name": "tiny", "steps": 4, "devices": ["pixel8", "galaxy-a54"],
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
])
def test_bad_sweeps_name_the_field(tmp_path, fields, field, words):
    path = write_sweep(tmp_path, **fields)
    with pytest.raises(InputError) as e:
        sweep.load_sweep(path)
    assert e.value.file == path and e.value.field == field and words in e.value.message


def test_a_small_sweep_writes_csv_and_plot(tmp_path):
    rows, out = sweep.run_sweep(write_sweep(tmp_path), tmp_path / "out", processes=2, progress=False)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 1 * 2 * 2
    assert {(r["device"], r["scheduling"]) for r in table} == {
        (d, s) for d in ("pixel8", "galaxy-a54") for s in ("paper", "energy_probe")}
    assert all(int(r["steps"]) == 4 for r in table)
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
