"""Trace files, summaries and the Chrome/Perfetto export."""
from __future__ import annotations

import json

from test_sim import op, program, run

from mfbench import policies
from mfbench.contracts import trace

MB = 2**20


def simulated():
    prefetch = policies.Prefetch(budget_mb=60)
    prog = program([op("f0", flops=4e9, shard="s0", alloc=10 * MB), op("f1", flops=4e9, shard="s1", free=["f0"])],
                   shards={"s0": 50 * 10**6, "s1": 50 * 10**6}, sharding=prefetch)
    return run(prog, threads=4, steps=4, sharding=prefetch, scheduling=policies.PaperRule(), trace_ops_steps=2)


def test_trace_and_summary_round_trip(tmp_path):
    summary, events = simulated()
    trace.write_trace(tmp_path / "trace.jsonl", events)
    trace.write_summary(tmp_path / "summary.json", summary)
    assert trace.read_trace(tmp_path / "trace.jsonl") == events
    assert trace.read_summary(tmp_path / "summary.json") == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "trace.jsonl"]  # no temporary left


def test_events_follow_the_shared_schema():
    summary, events = simulated()
    keys = {"op": {"name", "start", "duration", "shard", "bytes"},
            "io": {"kind", "shard", "start", "duration", "bytes"},
            "sample": {"t", "rss", "battery", "current", "voltage", "temperature", "frequency",
                       "peak_rss", "pss", "charging", "zones", "frequencies", "cpus"},
            "step": {"index", "t", "duration", "tokens", "loss", "lr", "grad_norm"},
            "decision": {"t", "policy", "choice"}}
    for e in events:
        assert set(e) == keys[e["type"]] | {"type"}
    ops_by_step = [e for e in events if e["type"] == "op"]
    assert len(ops_by_step) == 2 * 2  # op detail for the first two steps only
    assert [e["index"] for e in events if e["type"] == "step"] == [0, 1, 2, 3]
    assert set(json.loads(summary.to_json())) == {
        "schema", "source", "workload", "device", "steps", "tokens_per_step", "median_step_s", "step_tokens_per_s",
        "wall_s", "wall_tokens_per_s", "peak_memory_bytes", "energy_j", "j_per_token", "battery_start_pct",
        "battery_end_pct", "battery_drop_pct", "max_temperature_c", "io_read_bytes", "io_write_bytes", "final_loss",
        "killed", "kill_reason", "stop_reason", "provenance", "details"}
    # throughput, one meaning on both sides: the median step, and the whole run with its sleeps
    assert summary.step_tokens_per_s == summary.tokens_per_step / summary.median_step_s
    assert summary.wall_tokens_per_s == 4 * summary.tokens_per_step / summary.wall_s < summary.step_tokens_per_s


def test_chrome_export_has_tracks_and_counters():
    _, events = simulated()
    chrome = json.loads(json.dumps(trace.to_chrome(events)))
    complete = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in complete} == {0, 1, 2}  # steps, compute, storage
    op0 = next(e for e in complete if e["name"] == "f0.forward")
    source = next(e for e in events if e["type"] == "op" and e["name"] == "f0.forward")
    assert op0["ts"] == source["start"] * 1e6 and op0["dur"] == source["duration"] * 1e6
    counters = {e["name"] for e in chrome["traceEvents"] if e["ph"] == "C"}
    assert counters == {"memory", "battery", "current", "voltage", "temperature", "frequency"}
    names = {e["args"]["name"] for e in chrome["traceEvents"] if e["ph"] == "M"}
    assert names == {"steps", "compute", "storage", "policy"}


def test_summary_table_is_readable():
    summary, _ = simulated()
    table = trace.format_summary(summary)
    assert "steps" in table and "4" in table and "J/token" in table and "completed" in table
    assert f"{summary.peak_memory_bytes / MB:,.1f} MB" in table


def test_the_reader_rejects_a_summary_with_a_key_missing_or_unknown(tmp_path):
    import pytest

    from mfbench.errors import InputError
    summary, _ = simulated()
    data = json.loads(summary.to_json())
    for change, field in [({k: v for k, v in data.items() if k != "final_loss"}, "final_loss"),
                          ({**data, "tokens_per_s": 1.0}, "tokens_per_s"), ({**data, "schema": 0}, "schema")]:
        (tmp_path / "summary.json").write_text(json.dumps(change))
        with pytest.raises(InputError) as e:
            trace.read_summary(tmp_path / "summary.json")
        assert e.value.field == field and str(tmp_path) in str(e.value)
