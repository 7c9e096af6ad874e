"""Long runs (issue 14): a simulation streams its trace to disk and keeps running aggregates,
so 10^6 steps fit in bounded memory; Ctrl-C keeps what was done, written as a whole set;
`mfbench train` passes Ctrl-C to the trainer without a traceback."""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mfbench import sim
from mfbench.contracts import trace
from mfbench.contracts.trace import Durations

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml"


def simulate_cli(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "mfbench.cli", "simulate", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def step_events(path: Path) -> int:
    return sum(1 for e in trace.iter_trace(path) if e["type"] == "step")


def test_durations_median_is_the_median_of_the_list():
    rng = random.Random(3)
    for n in (1, 2, 3, 10, 11, 1000, 1001):
        values = [rng.choice([0.5, 0.25, 1.0, 2.0, 0.125]) * rng.choice([1, 1, 3]) for _ in range(n)]
        assert Durations(values).median() == statistics.median(values), n
        assert len(Durations(values)) == n and Durations(values).last == values[-1]
    assert Durations().median() is None


def test_a_streamed_run_writes_what_the_list_holds(tmp_path):
    summary, events = sim.simulate(WORKLOAD, "pixel8", steps=40, progress=False, trace_ops_steps=2)
    with trace.RunWriter(tmp_path) as writer:
        streamed, _ = sim.simulate(WORKLOAD, "pixel8", steps=40, progress=False, trace_ops_steps=2, trace=writer)
        writer.commit(streamed)
    assert trace.read_trace(tmp_path / "trace.jsonl") == json.loads(json.dumps(events))
    assert json.loads((tmp_path / "trace.chrome.json").read_text()) == json.loads(json.dumps(trace.to_chrome(events)))
    assert trace.read_summary(tmp_path / "summary.json").to_json() == streamed.to_json() == summary.to_json()


def test_a_failed_run_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "summary.json").write_text("old")
    with pytest.raises(RuntimeError), trace.RunWriter(tmp_path) as writer:
        writer.append({"type": "step", "index": 0, "t": 1.0, "duration": 1.0, "tokens": 8, "loss": None, "lr": None,
                       "grad_norm": None})
        raise RuntimeError("the simulation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert (tmp_path / "summary.json").read_text() == "old"


# mfbench's main, then its own peak resident memory (VmHWM) into a file: the kernel's
# ru_maxrss of a child counts the forked copy of this (large) test process before exec
MEASURED = ("import sys; from mfbench import cli; code = cli.main(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(open('/proc/self/status').read()); sys.exit(code)")


def run_measured(steps: int, out: Path):
    """`mfbench simulate` of `steps` steps on the mains-powered host profile: (exit code,
    peak RSS in MB of that process, stderr)."""
    status = out.parent / "status"
    p = subprocess.run([sys.executable, "-c", MEASURED, str(status), "simulate", str(WORKLOAD), "--device", "host",
                        "--steps", str(steps), "--out", str(out)], capture_output=True, text=True, timeout=3600)
    hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return p.returncode, int(hwm.split()[1]) / 1024, p.stderr


def check_long_run(steps: int, limit_mb: float, tmp_path: Path):
    out = tmp_path / "long"
    code, peak_mb, stderr = run_measured(steps, out)
    assert code == 0, stderr[-2000:]
    assert peak_mb < limit_mb, f"{steps:,} steps took {peak_mb:.0f} MB"
    assert f"{steps}/{steps}" in stderr  # the progress bar reached the end
    summary = trace.read_summary(out / "summary.json")
    assert summary.steps == steps and not summary.killed and summary.stop_reason is None
    assert step_events(out / "trace.jsonl") == steps


def test_50k_steps_run_in_bounded_memory(tmp_path):
    check_long_run(50_000, 150, tmp_path)  # holding the trace in memory took 230 MB


@pytest.mark.slow
def test_a_million_steps_run_in_under_500_mb(tmp_path):
    check_long_run(1_000_000, 500, tmp_path)  # holding the trace in memory took 5.3 GB


def test_ctrl_c_keeps_the_steps_done(tmp_path):
    out = tmp_path / "run"
    p = simulate_cli(WORKLOAD, "--device", "host", "--steps", 10**8, "--out", out)
    deadline = time.monotonic() + 120
    while not any(f.stat().st_size > 100_000 for f in out.glob(".trace.jsonl.*")):  # the staged trace grows
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    summary = trace.read_summary(out / "summary.json")
    assert summary.stop_reason == sim.INTERRUPTED and not summary.killed
    assert 0 < summary.steps < 10**8
    assert step_events(out / "trace.jsonl") == summary.steps
    chrome = json.loads((out / "trace.chrome.json").read_text())
    assert sum(e["name"].startswith("step ") for e in chrome["traceEvents"] if e["ph"] == "X") == summary.steps
    assert not list(out.glob(".*"))  # nothing staged is left behind


def test_ctrl_c_in_mfbench_train_stops_the_trainer_without_a_traceback(tmp_path):
    from native_fixtures import gpt2_config, pattern_token_file

    config = gpt2_config()
    config.save_pretrained(tmp_path / "model")
    tokens = pattern_token_file(tmp_path / "tokens.bin", config.vocab_size)
    out = tmp_path / "run"
    from mfbench.device.native import trainer_binary
    trainer_binary()  # built before the clock starts
    p = subprocess.Popen([sys.executable, "-m", "mfbench.cli", "train", "--config", str(tmp_path / "model" / "config.json"),
                          "--data", str(tokens), "--out", str(out), "--seq-len", "16", "--batch", "2", "--steps",
                          "100000", "--threads", "1", "--checkpoint-every", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(f.stat().st_size > 2000 for f in out.glob("trace*")):  # steps are being written
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
    _, stderr = p.communicate(timeout=120)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    assert p.returncode == 0, stderr[-2000:]  # the trainer checkpointed and stopped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "signal SIGINT" and 0 < summary["steps"] < 100000
