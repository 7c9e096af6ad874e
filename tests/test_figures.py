"""The paper figures: every script writes PDF, PNG and CSV, deterministically, and the plotted
numbers behave as the physics says (checked against facts independent of the figure code)."""
import csv

import pytest

from mfbench.analysis import figures
from mfbench.contracts.trace import RunWriter, Summary
from mfbench.errors import InputError
from mfbench.spec.profile import device_names, load_device

GPT2_PARAMS = 124_439_808  # GPT-2 small (HF GPT2LMHeadModel, tied embeddings)

COLUMNS = {
    "devices": {"device", "soc", "ram_mb", "app_limit_mb", "n_spec", "n_estimated", "n_measured"},
    "models": {"model", "params", "gflops_per_token_fwd_bwd", "full_float32_peak_mb", "lora_float32_peak_mb",
               "lora_bfloat16_peak_mb"},
    "memory_breakdown": {"workload", "parameters_bytes", "gradients_bytes", "optimizer_bytes",
                         "activations_bytes", "scratch_bytes", "total_bytes"},
    "accumulation": {"workload", "micro_batch", "accumulation_steps", "pixel8_peak_memory_bytes",
                     "pixel8_median_step_s", "host_predicted_step_s", "host_measured_step_s"},
    "sharding": {"device", "sharding", "offload", "budget_mb", "source", "peak_memory_bytes", "median_step_s"},
    "scheduling": {"device", "scheduler", "steps", "finished", "wall_s", "j_per_token", "max_temperature_c"},
    "fullft": {"device", "source", "engine", "median_step_s", "peak_memory_bytes", "step", "loss"},
    "lora": {"workload", "device", "source", "seq_len", "peak_memory_mb", "killed"},
    "validation": {"workload", "runs"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stored measured runs, as `mfbench compare` would leave them (real files, known numbers)."""
    runs = tmp_path_factory.mktemp("runs")
    for engine, losses, step_s, peak in (("native", [5.0, 4.5, 4.2], 4.8, 2_600_000_000),
                                         ("pytorch", [5.0, 4.5, 4.2], 7.1, 4_700_000_000)):
        summary = Summary.of_steps([step_s] * 3, 3 * step_s, 1024, source="measured", workload="gpt2-full-seq128",
                                   device="local", peak_memory_bytes=peak, energy_j=None, j_per_token=None,
                                   battery_start_pct=None, battery_end_pct=None, battery_drop_pct=None,
                                   max_temperature_c=None, io_read_bytes=0, io_write_bytes=0, final_loss=losses[-1],
                                   killed=False, kill_reason=None, stop_reason=None)
        steps = [{"type": "step", "index": i, "t": (i + 1) * step_s, "duration": step_s, "tokens": 1024, "loss": v,
                  "lr": 1e-4, "grad_norm": 1.0} for i, v in enumerate(losses)]
        with RunWriter(runs / "gpt2-full-seq128" / "compare" / engine) as writer:
            writer += steps
            writer.commit(summary)
    store_validation_report(runs)
    return runs


def store_validation_report(runs):
    """A `mfbench validate` report as it writes it (known numbers: errors 10 % and -1 %)."""
    import json
    rows = [{"workload": "w1", "runs": 2, "predicted": {"step_s": 1.1, "peak_mb": 99.0},
             "measured": {"step_s": 1.0, "peak_mb": 100.0}, "error_pct": {"step_s": 10.0, "peak_mb": -1.0},
             "spread_pct": {"step_s": 1.0, "peak_mb": 0.1}},
            {"workload": "w2", "error": "not runnable"}]
    folder = runs / "validation" / "report-host"
    folder.mkdir(parents=True)
    (folder / "validation.json").write_text(json.dumps({"device": "host", "rows": rows}))


@pytest.fixture(scope="module")
def out(tmp_path_factory, runs):
    out = tmp_path_factory.mktemp("figures")
    figures.run_all(out, quick=True, runs=runs, progress=False)
    return out


def rows(out, name):
    with open(out / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def test_every_figure_writes_pdf_png_and_csv(out):
    assert sorted(COLUMNS) == figures.figure_names()
    for name, columns in COLUMNS.items():
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        table = rows(out, name)
        assert table and columns <= set(table[0]), name


def test_output_is_deterministic(tmp_path, runs):
    for folder in (tmp_path / "a", tmp_path / "b"):
        figures.run_all(folder, only="accumulation,devices", quick=True, runs=runs, progress=False)
    for suffix in ("pdf", "png", "csv"):
        for name in ("accumulation", "devices"):
            assert (tmp_path / "a" / f"{name}.{suffix}").read_bytes() == (tmp_path / "b" / f"{name}.{suffix}").read_bytes()


def test_only_rejects_unknown_names_and_out_must_be_a_folder(tmp_path):
    with pytest.raises(InputError, match="did you mean sharding"):
        figures.run_all(tmp_path, only="shardin", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="a file is in the way"):
        figures.run_all(tmp_path / "file", only="devices", progress=False)


def test_missing_runs_are_named_with_the_command_that_makes_them(tmp_path):
    figures.run_all(tmp_path, only="fullft", quick=True, runs=tmp_path / "none", progress=False)
    assert "mfbench compare workloads/paper/gpt2-full-seq128.yaml" in (tmp_path / "missing-runs.sh").read_text()


def test_device_table_lists_every_profile_with_its_provenance(out):
    table = {r["device"]: r for r in rows(out, "devices")}
    assert sorted(table) == device_names()
    for name, r in table.items():
        assert int(r["app_limit_mb"]) == round(load_device(name).ram.app_limit_mb.value)
        assert int(r["n_spec"]) + int(r["n_estimated"]) + int(r["n_measured"]) > 10


def test_model_table_counts_gpt2_exactly_and_orders_methods(out):
    table = {r["model"]: r for r in rows(out, "models")}
    assert int(table["gpt2"]["params"]) == GPT2_PARAMS
    # forward + backward of a dense model: about 6 FLOPs per parameter per token
    assert 6 * GPT2_PARAMS / 1e9 < float(table["gpt2"]["gflops_per_token_fwd_bwd"]) < 6.6 * GPT2_PARAMS / 1e9
    for r in table.values():
        assert float(r["full_float32_peak_mb"]) > float(r["lora_float32_peak_mb"]) > float(r["lora_bfloat16_peak_mb"])


def test_memory_breakdown_parameters_are_gpt2s_float32_weights(out):
    full = next(r for r in rows(out, "memory_breakdown") if r["workload"] == "gpt2-full-seq128")
    assert int(full["parameters_bytes"]) == GPT2_PARAMS * 4
    # AdamW keeps two float32 moments per trained parameter: twice the gradients
    assert int(full["optimizer_bytes"]) == 2 * int(full["gradients_bytes"]) == 2 * GPT2_PARAMS * 4


def test_accumulation_peak_memory_falls_as_micro_batch_shrinks(out):
    table = sorted(rows(out, "accumulation"), key=lambda r: -int(r["micro_batch"]))
    assert [int(r["micro_batch"]) * int(r["accumulation_steps"]) for r in table] == [8] * len(table)
    peaks = [int(r["pixel8_peak_memory_bytes"]) for r in table]
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks
    for r in table:  # the op classes add up to the step
        parts = sum(float(r[f"pixel8_{k}_s"]) for k in ("gemm", "skinny_gemm", "attention", "memory", "update"))
        assert parts == pytest.approx(float(r["pixel8_median_step_s"]), rel=0.02)


def test_sharding_trades_memory_for_time_as_the_budget_shrinks(out):
    table = [r for r in rows(out, "sharding") if r["source"] == "predicted"]
    for device in {r["device"] for r in table}:
        none = next(r for r in table if r["device"] == device and r["sharding"] == "none")
        for policy in ("lru", "prefetch"):
            points = sorted(((int(r["budget_mb"]), int(r["peak_memory_bytes"]), float(r["median_step_s"]))
                             for r in table if r["device"] == device and r["sharding"] == policy
                             and r["offload"] == "False"), reverse=True)
            assert len(points) >= 3
            assert all(a[1] >= b[1] for a, b in zip(points, points[1:])), points  # memory falls
            if policy == "lru":  # every load and store inline: time rises as the budget shrinks
                assert all(a[2] <= b[2] + 1e-9 for a, b in zip(points, points[1:])), points
            else:  # prefetch may hide a small budget's write-back that a large one leaves to the step's end
                assert all(p[2] >= float(none["median_step_s"]) - 1e-9 for p in points), points
            assert points[-1][1] < int(none["peak_memory_bytes"])
        lru = {r["budget_mb"]: float(r["median_step_s"]) for r in table if r["device"] == device and r["sharding"] == "lru"}
        prefetch = {r["budget_mb"]: float(r["median_step_s"]) for r in table if r["device"] == device
                    and r["sharding"] == "prefetch"}
        from mfbench.spec.profile import load_device
        if load_device(device).storage.cached_map_gbs is None:  # loads from flash overlap compute: never a cost
            assert all(prefetch[b] <= lru[b] + 1e-9 for b in lru if b in prefetch)
        else:  # the page cache's copies take their time from compute on every core: no gain, and little loss
            assert all(abs(prefetch[b] / lru[b] - 1) < 0.01 for b in lru if b in prefetch)


def test_scheduling_sleeps_cost_time_and_charging_only_waits_off_the_charger(out):
    table = rows(out, "scheduling")
    for device in {r["device"] for r in table}:
        mine = {r["scheduler"]: r for r in table if r["device"] == device}
        assert float(mine["paper"]["wall_s"]) > float(mine["none"]["wall_s"])  # the paper's rule sleeps
        assert mine["charging_only"]["finished"] == "False" and int(mine["charging_only"]["steps"]) == 0


def test_lora_marks_kills_above_each_phones_limit_and_shows_the_papers_numbers(out):
    table = rows(out, "lora")
    reported = {(r["workload"], float(r["peak_memory_mb"])) for r in table if r["source"] == "paper (reported)"}
    assert reported == {("qwen2.5-0.5b-lora-seq128", 2887), ("gemma3-270m-lora-seq128", 4014),
                        ("qwen2.5-0.5b-lora-seq256", 3437)}
    for r in table:
        if r["source"] == "predicted" and r["killed"] == "False":
            assert float(r["peak_memory_mb"]) <= load_device(r["device"]).ram.app_limit_mb.value


def test_fullft_reads_the_stored_runs(out):
    table = rows(out, "fullft")
    measured = {r["engine"]: r for r in table if r["source"] == "measured" and r["median_step_s"]}
    assert float(measured["native"]["median_step_s"]) == 4.8 and float(measured["pytorch"]["median_step_s"]) == 7.1
    assert [float(r["loss"]) for r in table if r["engine"] == "pytorch" and r["loss"]] == [5.0, 4.5, 4.2]
    assert {r["device"] for r in table if r["source"] == "predicted"} == set(device_names())


def test_validation_plots_the_stored_report(out):
    table = rows(out, "validation")
    assert [(r["workload"], float(r["error_pct_step_s"]), float(r["predicted_peak_mb"])) for r in table] == [
        ("w1", 10.0, 99.0)]  # the workload that could not run is left out
