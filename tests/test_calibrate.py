"""`mfbench calibrate` and `mfbench validate`.

The fit recovers known parameters from a synthetic measurement set made by the cost model
itself; calibrate runs the real benchmark binary on this machine at a tiny size and writes a
profile that loads, with every fitted field marked and the rest untouched; validate on two
stored tiny runs of the real trainer reports % errors equal to those computed here from the
files (summary.json of the runs, the simulator's prediction).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mfbench import calibrate, sim, validate
from mfbench.contracts.trace import read_summary, read_trace
from mfbench.errors import InputError, load_yaml
from mfbench.sim import cost
from mfbench.spec.profile import load_device

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 64}


def test_gemm_fit_recovers_known_parameters():
    """Timings made by the GEMM model with known (peak, bandwidth from memory and from the
    caches, call, thread efficiency, size exponent), with 1 % multiplicative noise, over the
    kind of shapes a step program calls: its matmuls cold, attention's inner products cached,
    and the generic grid both ways."""
    truth = (85.0, 14.0, 40.0, 2.5, 0.8, 0.05)
    shapes = [(1024, 2304, 768), (1024, 768, 768), (1024, 8, 768), (768, 8, 1024), (2048, 8, 2048), (512, 4096, 128),
              (256, 50257, 768), (4096, 384, 1536)]
    inner = [(128, 128, 64), (128, 64, 128), (64, 64, 64), (512, 512, 64), (512, 64, 512)]
    samples = [(*s, p, True) for s in shapes for p in (1, 2)] + [(*s, p, False) for s in inner for p in (1, 2)]
    samples += [(*s, p, cold) for s in calibrate.GRID for p in (1, 2) for cold in (True, False)]
    rng = np.random.default_rng(0)
    seconds = calibrate.gemm_model(truth, samples) * np.exp(rng.normal(0, 0.01, len(samples)))
    fitted, errors = calibrate.fit_gemm(samples, list(seconds))
    for name, true in zip(calibrate.GEMM_PARAMS, truth):
        assert fitted[name] == pytest.approx(true, rel=0.08), name
    assert np.median(np.abs(errors)) < 0.02


def test_attention_fit_recovers_known_time_per_score():
    gemm = {"gemm_gflops_per_core": 90.0, "gemm_bandwidth_gbs": 20.0, "gemm_cached_bandwidth_gbs": 50.0,
            "gemm_call_us": 1.0, "thread_efficiency": 0.9, "gemm_size_exponent": 0.03}
    truth = {"attention_ns": 3.0, "attention_backward_ns": 7.0, "attention_me_ns": 5.0, "attention_me_backward_ns": 11.0}
    kernels = calibrate.kernels_of({**gemm, **truth})
    samples = []
    for shape in [(8, 128, 12, 12, 64, 0), (2, 512, 6, 2, 64, 0), (8, 128, 12, 12, 64, 1), (2, 512, 6, 1, 64, 1)]:
        for p in (1, 2):
            samples.append({"shape": list(shape), "threads": p,
                            "forward_s": cost.attention_seconds(shape, False, kernels, 90e9, p),
                            "backward_s": cost.attention_seconds(shape, True, kernels, 90e9, p)})
    fitted, errors = calibrate.fit_attention(samples, gemm)
    for name, true in truth.items():
        assert fitted[name] == pytest.approx(true, rel=1e-6), name
        assert np.max(np.abs(errors[name])) < 1e-6


def test_memory_rates_are_plan_bytes_over_time():
    """A layernorm forward moves 2 tensors of float32 per element (models.ELEMENTWISE), AdamW 8,
    LoRA dropout 2 forward and 5 backward."""
    samples = [{"kernel": "layernorm_forward", "elements": 1_000_000, "threads": 2, "seconds": 0.002},
               {"kernel": "adamw", "elements": 1_000_000, "threads": 2, "seconds": 0.016},
               {"kernel": "adamw", "elements": 1_000_000, "threads": 1, "seconds": 1.0},
               {"kernel": "lora_dropout_forward", "elements": 1_000_000, "threads": 2, "seconds": 0.001},
               {"kernel": "lora_dropout_backward", "elements": 1_000_000, "threads": 2, "seconds": 0.004}]
    rates = calibrate.memory_rates(samples, cores=2)
    assert rates == {"layernorm_gbs": pytest.approx(8e6 / 0.002 / 1e9), "update_gbs": pytest.approx(32e6 / 0.016 / 1e9),
                     "lora_dropout_gbs": pytest.approx(8e6 / 0.001 / 1e9),
                     "lora_dropout_backward_gbs": pytest.approx(20e6 / 0.004 / 1e9)}


def tiny_workload(folder: Path, name: str = "tiny-lora", method: str = "lora", steps: int = 6) -> Path:
    (folder / "tiny.json").write_text(json.dumps(TINY))
    kind = {"kind": method} if method == "full" else {"kind": "lora", "rank": 4, "alpha": 8, "targets": ["attn.c_attn"]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "model": "tiny.json", "method": kind, "data": {"source": "pydoc"},
                                    "seq_len": 32, "batch": 4, "steps": steps, "threads": 2}))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(d))
        yield d


def test_calibrate_on_this_machine_end_to_end(tmp_path, cache):
    """The real benchmark binary at a tiny size through the command line: the profile loads,
    every fitted field says `mfbench calibrate VERSION, DATE, target local`, what cannot be
    measured here (power, thermal, RAM size) keeps the base profile's value and provenance."""
    workload = tiny_workload(tmp_path)
    out = tmp_path / "devices" / "tinyhost.yaml"
    r = subprocess.run([sys.executable, "-m", "mfbench.cli", "calibrate", "--target", "local", "--out", str(out),
                        "--from", "host", "--workloads", str(workload), "--min-time", "0.002", "--storage-mb", "2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "GEMM" in r.stdout and "no battery current sensor" in r.stdout
    profile, base = load_device(out), load_device("host")
    assert profile.name == "tinyhost"
    k = profile.clusters[0].kernels
    assert k is not None
    import mfbench
    stamp = f"mfbench calibrate {mfbench.__version__}, "
    fitted = [profile.clusters[0].gemm_gflops_per_core, profile.memory.bandwidth_gbs, profile.storage.seq_read_gbs,
              profile.storage.seq_write_gbs, profile.storage.latency_us, profile.storage.cached_map_gbs,
              profile.storage.cached_write_gbs, profile.storage.unmap_gbs, profile.ram.runtime_overhead_mb,
              *(getattr(k, f) for f in type(k).model_fields)]
    for q in fitted:
        assert q.provenance == "measured" and q.measured.startswith(stamp) and ", target local" in q.measured
    assert profile.power == base.power and profile.thermal == base.thermal and profile.ram.total_mb == base.ram.total_mb
    assert profile.clusters[0].power_w_per_core == base.clusters[0].power_w_per_core
    raw = json.loads((tmp_path / "runs" / "calibrate-tinyhost" / "bench.json").read_text())
    assert raw["result"]["gemm_backend"] and raw["result"]["storage"]["bytes"] == 2 * 2**20
    assert raw["spec"]["power"] and raw["spec"]["heat"]["heat_s"] == 300  # asked for, and
    assert raw["result"]["power"] is None and raw["result"]["heat"] is None  # skipped: no battery here
    assert raw["result"]["rounds"] == 3  # the default
    assert 0 < raw["result"]["reference_step_s"] < 10  # the trainer's step on calibrate.REFERENCE
    # the calibrated profile drives the simulator through the cost model
    summary, _ = sim.simulate(workload, profile, steps=2, progress=False)
    assert summary.median_step_s > 0


def test_calibrate_bad_input(tmp_path):
    with pytest.raises(InputError, match="--out"):
        calibrate.calibrate("local", tmp_path / "x.txt")
    with pytest.raises(InputError, match="--target"):
        calibrate.calibrate("nowhere", tmp_path / "x.yaml")
    with pytest.raises(InputError, match="--rounds"):
        calibrate.calibrate("local", tmp_path / "x.yaml", workloads=[], rounds=0)
    with pytest.raises(InputError, match=r"--heat-s: expected seconds from 0 \(no heat-up run\) to 3600, got -1"):
        calibrate.calibrate("local", tmp_path / "x.yaml", workloads=[], heat_s=-1)


def test_rounds_merge_to_the_median_of_each_timing():
    """Three rounds of the same benchmarks: every timing becomes the median of its three (a slow
    moment in one round moves nothing), entries matched by shape and threads, not by position."""
    def result(k, slow=1.0, order=(0, 1)):
        gemm = [{"shape": [0, 0, 64, 64, 64], "threads": t, "seconds": (1 + k) * t * slow} for t in (1, 2)]
        return {"clusters": [{"name": "c", "gemm": [gemm[i] for i in order],
                              "attention": [{"shape": [1, 8, 1, 1, 8, 0], "threads": 2, "forward_s": k, "backward_s": 2 * k}],
                              "memory": [{"kernel": "triad", "threads": 2, "elements": 8, "seconds": 10 * k * slow}]}],
                "storage": {"bytes": 8, "map_s": k * slow, "reads": 3}}
    merged = calibrate.median_of_rounds([result(1), result(2, slow=100.0, order=(1, 0)), result(3)])
    c = merged["clusters"][0]
    assert [(g["threads"], g["seconds"]) for g in c["gemm"]] == [(1, 4.0), (2, 8.0)]
    assert c["attention"][0]["forward_s"] == 2 and c["attention"][0]["backward_s"] == 4
    assert c["memory"][0]["seconds"] == 30.0 and merged["storage"] == {"bytes": 8, "map_s": 3.0, "reads": 3}


def test_validate_on_stored_runs(tmp_path, cache):
    """Two measured runs of each of two tiny workloads, stored as `mfbench run` writes them;
    validate's errors and spreads equal those computed from the files."""
    workloads = [tiny_workload(tmp_path, "tiny-lora"), tiny_workload(tmp_path, "tiny-full", "full")]
    runs = tmp_path / "runs"
    for w in workloads:
        for i in (1, 2):
            r = subprocess.run([sys.executable, "-m", "mfbench.cli", "run", str(w), "--out",
                                str(runs / w.stem / f"measured-local-{i}"), "--checkpoint-every", "0"],
                               capture_output=True, text=True, cwd=tmp_path, timeout=600,
                               env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
            assert r.returncode == 0, r.stderr
    out = tmp_path / "report"
    table = validate.validate(workloads, "host", runs=runs, out=out)
    report = json.loads((out / "validation.json").read_text())
    rows = {r["workload"]: r for r in report["rows"]}
    for w in workloads:
        measured = [read_summary(runs / w.stem / f"measured-local-{i}" / "summary.json") for i in (1, 2)]
        predicted, _ = sim.simulate(w, "host", steps=validate.PREDICT_STEPS, progress=False)
        steps = [s.median_step_s for s in measured]
        peaks = [s.peak_memory_bytes / 2**20 for s in measured]
        m_step, m_peak = sum(steps) / 2, sum(peaks) / 2  # the median of two
        row = rows[w.stem]
        assert row["error_pct"]["step_s"] == pytest.approx(100 * (predicted.median_step_s - m_step) / m_step)
        assert row["error_pct"]["peak_mb"] == pytest.approx(100 * (predicted.peak_memory_bytes / 2**20 - m_peak) / m_peak)
        assert row["spread_pct"]["step_s"] == pytest.approx(100 * abs(steps[0] - steps[1]) / m_step)
        assert row["io_exact"] and row["error_pct"]["energy_j_per_step"] is None  # no I/O, no sensor here
        assert f"{row['error_pct']['step_s']:+.1f}" in table
        # where the time goes: each side's regions add up to its step (steps 2 and 3 of the trace)
        trace = [e for e in read_trace(runs / w.stem / "measured-local-1" / "trace.jsonl") if e["type"] == "step"]
        assert sum(row["regions"]["measured"].values()) == pytest.approx(sum(e["duration"] for e in trace[1:3]) / 2)
        assert sum(row["regions"]["predicted"].values()) == pytest.approx(predicted.median_step_s)
        for side in ("predicted", "measured"):
            r = row["regions"][side]
            assert min(r["blocks.forward"], r["blocks.backward"], r["head"], r["embed"], r["update"]) > 0
        # no checkpointing: no recompute region measured; predicted, only the norms backward re-applies
        assert row["regions"]["measured"]["blocks.recompute"] == 0
        assert row["regions"]["predicted"]["blocks.recompute"] < 0.1 * row["regions"]["predicted"]["blocks.backward"]
    assert "where a step's time goes" in table
    mape = sum(abs(r["error_pct"]["step_s"]) for r in rows.values()) / 2
    assert report["mape_step_pct"] == pytest.approx(mape)
    with open(out / "validation.csv") as f:
        assert [r["workload"] for r in csv.DictReader(f)] == [w.stem for w in workloads]
    assert (out / "validation.png").stat().st_size > 10_000
    assert all(row["probe_s"] == row["reference_step_s"] == [None, None] for row in rows.values())  # no probes


def test_validate_times_its_probes_before_each_fresh_run(tmp_path, cache, monkeypatch):
    """Before each fresh local run, validate times the probe GEMM (a shape every calibration
    times) and the reference training step (calibrate times it too) and keeps them beside the
    run; the report gives each probe's range and median, and the calibration's timing of it
    (runs/calibrate-NAME/bench.json)."""
    import statistics

    from mfbench.device.run import usable_cores
    w = tiny_workload(tmp_path, "tiny-lora")
    monkeypatch.chdir(tmp_path)
    raw = {"result": {"clusters": [{"gemm": [{"shape": validate.PROBE_GEMM, "threads": usable_cores(),
                                              "seconds": 0.0123}]}], "reference_step_s": 0.2345}}
    (tmp_path / "runs" / "calibrate-host").mkdir(parents=True)
    (tmp_path / "runs" / "calibrate-host" / "bench.json").write_text(json.dumps(raw))
    table = validate.validate([w], "host", runs=tmp_path / "runs", fresh=True, steps=2, repeat=2)
    kept = [json.loads((tmp_path / "runs" / w.stem / f"measured-local-{i}" / "probe.json").read_text()) for i in (1, 2)]
    for key, what, at in (("seconds", "probe GEMM 1024x1024x1024", "12.3"),
                          ("reference_step_s", "reference step (gpt2-lora-b8-s64)", "234.5")):
        probes = [k[key] for k in kept]
        assert all(0 < p < 10 for p in probes)
        assert (f"{what} before each run: {min(probes) * 1e3:.1f} to {max(probes) * 1e3:.1f} ms "
                f"(median {statistics.median(probes) * 1e3:.1f}); at calibration {at} ms") in table


def test_validate_reports_a_workload_the_trainer_cannot_run(tmp_path, cache):
    w = tiny_workload(tmp_path, "tiny-user-policy")  # a user's policy class runs in the simulator only
    data = load_yaml(w)
    data["memory"] = {**data.get("memory", {}), "checkpointing": {"policy": "mfbench.policies:EveryBlock"}}
    w.write_text(yaml.safe_dump(data))
    table = validate.validate([w], "host", runs=tmp_path / "runs", out=tmp_path / "report")
    assert "tiny-user-policy" in table and "not runnable: memory.checkpointing.policy" in table


def test_cost_model_prices_an_op_by_its_gemm_calls_and_its_bytes(tmp_path):
    """GPT-2 c_attn backward (Full-FT, N rows): dx = dy W^T (N x C by C x 3C) and dW = x^T dy
    (C x N by N x 3C), each call + F (F / 1 GFLOP)^g / peak + 4 (MK + KN + MN) / bandwidth with
    F = 2MNK (M N K >= 2e6: split over 2 threads at 1 + e); the bias gradient's bytes at the
    triad's bandwidth; the residual add fused (nothing)."""
    from mfbench.plan import compile_program
    from mfbench.spec.workload import load_workload
    w = tiny_workload(tmp_path, "tiny-full", "full")
    program = compile_program(load_workload(w), base_dir=tmp_path, threads=2)
    profile = load_device("host")
    values = {"gemm_bandwidth_gbs": 20.0, "gemm_call_us": 3.0, "thread_efficiency": 0.8, "gemm_size_exponent": 0.03}
    kernels = calibrate.kernels_of(values)
    cluster = profile.clusters[0].model_copy(update={"kernels": kernels})
    op = next(o for o in program.ops if o.name == "mb0.block0.attn.c_attn" and o.phase == "backward")
    N, C = 4 * 32, TINY["n_embd"]
    peak = cluster.gemm_gflops_per_core.value * 1e9

    def gemm(M, Nn, K):
        flops = 2 * M * Nn * K
        work = flops * (flops / 1e9) ** 0.03 / peak + 4 * (M * K + K * Nn + M * Nn) / 20e9
        return 3e-6 + (work / 1.8 if M * Nn * K >= 2e6 else work)
    bias = 4 * N * 3 * C / (profile.memory.bandwidth_gbs.value * 1e9)
    expected = gemm(N, C, 3 * C) + gemm(C, 3 * C, N) + bias
    top = cluster.freqs_mhz.values[-1]
    assert cost.op_seconds(op, cluster, 2, top, profile, program) == pytest.approx(expected)
    residual = next(o for o in program.ops if o.name == "mb0.block0.attn.c_proj" and o.phase == "forward")
    assert any(k.cls == "residual" for k in residual.kernels)
    assert cost.op_seconds(residual, cluster, 2, top, profile, program) == pytest.approx(
        gemm(N, C, C) + 4 * 2 * N * C / (profile.memory.bandwidth_gbs.value * 1e9))  # + its bias, no residual


def test_benchmark_binary_bad_spec_is_one_line(tmp_path):
    from mfbench.device.native import bench_binary
    for text, what in (("{", "not valid JSON"), ('{"gemm": [[0, 0, "x", 2, 2]]}', "bad field")):
        spec = tmp_path / "spec.json"
        spec.write_text(text)
        r = subprocess.run([str(bench_binary()), str(spec)], capture_output=True, text=True, timeout=60)
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert r.returncode == 2 and len(errors) == 1 and what in errors[0], r.stderr
    r = subprocess.run([str(bench_binary())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("mfbench-bench: error: no SPEC.json")


def test_cost_model_prices_lora_dropout_at_its_measured_rates(tmp_path):
    """A LoRA op with dropout costs its mask's bytes (2 tensors of the adapter's input forward,
    5 backward) at the calibrated lora_dropout rates more than without; at the triad's
    bandwidth when the profile has no such rate."""
    from mfbench.plan import compile_program
    from mfbench.spec.workload import load_workload
    w = tiny_workload(tmp_path, "tiny-lora")
    profile = load_device("host")
    kernels = calibrate.kernels_of({"lora_dropout_gbs": 3.0, "lora_dropout_backward_gbs": 5.0})
    cluster = profile.clusters[0].model_copy(update={"kernels": kernels})
    top = cluster.freqs_mhz.values[-1]

    base = load_workload(w)

    def lora_op(dropout: float, phase: str):
        workload = base.model_copy(update={"method": base.method.model_copy(update={"dropout": dropout})})
        program = compile_program(workload, base_dir=tmp_path, threads=2)
        op = next(o for o in program.ops if o.name == "mb0.block0.attn.c_attn.lora" and o.phase == phase)
        return op, program

    elements = 4 * 32 * TINY["n_embd"]  # N x in of c_attn
    for phase, tensors, gbs in (("forward", 2, 3.0), ("backward", 5, 5.0)):
        (with_dropout, p1), (without, p0) = lora_op(0.1, phase), lora_op(0.0, phase)
        extra = cost.op_seconds(with_dropout, cluster, 2, top, profile, p1) - \
            cost.op_seconds(without, cluster, 2, top, profile, p0)
        assert extra == pytest.approx(tensors * 4 * elements / (gbs * 1e9))
        old = cluster.model_copy(update={"kernels": kernels.model_copy(update={"lora_dropout_gbs": None,
                                                                               "lora_dropout_backward_gbs": None})})
        extra = cost.op_seconds(with_dropout, old, 2, top, profile, p1) - cost.op_seconds(without, old, 2, top, profile, p0)
        assert extra == pytest.approx(tensors * 4 * elements / (profile.memory.bandwidth_gbs.value * 1e9))
