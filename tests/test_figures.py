"""The paper figures: every script writes its PNG and CSV, and the plotted numbers behave as
the physics says (checked against facts independent of the figure code)."""
import csv

import pytest

from mfbench.analysis import figures
from mfbench.errors import InputError

GPT2_PARAMS = 124_439_808  # GPT-2 small (HF GPT2LMHeadModel, tied embeddings)

COLUMNS = {
    "memory_breakdown": {"workload", "parameters_bytes", "gradients_bytes", "optimizer_bytes",
                         "activations_bytes", "scratch_bytes", "total_bytes"},
    "accumulation": {"workload", "micro_batch", "accumulation_steps", "peak_memory_bytes", "median_step_s"},
    "sharding": {"workload", "budget_mb", "peak_memory_bytes", "median_step_s", "io_read_bytes"},
    "energy": {"scheduler", "t_s", "steps_done", "battery_pct", "temperature_c"},
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    figures.run_all(out, progress=False)
    return out


def rows(out, name):
    with open(out / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def test_every_figure_writes_png_and_csv(out):
    assert sorted(COLUMNS) == figures.figure_names()
    for name, columns in COLUMNS.items():
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        table = rows(out, name)
        assert table and columns <= set(table[0])


def test_only_runs_one_figure_and_rejects_unknown_names(tmp_path):
    paths = figures.run_all(tmp_path, only="fig_accumulation", progress=False)
    assert [p.name for p in paths] == ["accumulation.png", "accumulation.csv"]
    with pytest.raises(InputError, match="--only"):
        figures.run_all(tmp_path, only="nonsense", progress=False)


def test_memory_breakdown_parameters_are_gpt2s_float32_weights(out):
    full = next(r for r in rows(out, "memory_breakdown") if r["workload"] == "gpt2-full-seq128")
    assert int(full["parameters_bytes"]) == GPT2_PARAMS * 4
    # AdamW keeps two float32 moments per trained parameter: twice the gradients
    assert int(full["optimizer_bytes"]) == 2 * int(full["gradients_bytes"]) == 2 * GPT2_PARAMS * 4


def test_accumulation_peak_memory_falls_as_micro_batch_shrinks(out):
    table = sorted(rows(out, "accumulation"), key=lambda r: -int(r["micro_batch"]))
    assert [int(r["micro_batch"]) * int(r["accumulation_steps"]) for r in table] == [8] * len(table)
    peaks = [int(r["peak_memory_bytes"]) for r in table]
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks


def test_sharding_trades_memory_for_flash_reads(out):
    table = rows(out, "sharding")
    budget = {r["budget_mb"]: r for r in table}
    order = [""] + sorted((b for b in budget if b), key=lambda b: -float(b))  # no sharding, then shrinking
    peaks = [int(budget[b]["peak_memory_bytes"]) for b in order]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    assert int(budget["200"]["io_read_bytes"]) > int(budget["1200"]["io_read_bytes"])
