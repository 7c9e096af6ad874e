"""Policy search: NSGA-II finds the Pareto front that brute force (a full sweep) computes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mfbench.errors import InputError
from mfbench.scale import search
from mfbench.scale.engine import Engine
from mfbench.scale.plot import pareto_front
from mfbench.sim import sweep

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml"
INLINE = Engine(inline=True)
LIMIT = 850 * 2**20
PARAMS = {"memory.checkpointing": [{"policy": "none"}, {"policy": "every_k", "k": 3}, {"policy": "every_k", "k": 2},
                                   {"policy": "every_block"}],
          "scheduling.limit_c": [30, 60], "scheduling.max_sleep_s": [2, 5]}


def write(tmp_path, filename, **fields):
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(fields))
    return path


def test_search_finds_the_brute_force_front(tmp_path):
    """16 configurations, 2 objectives (time, peak memory), a constraint (peak under 850 MB):
    the sweep of all 16 gives the true front (configurations that tie on both objectives are
    all on it); the search, 32 trials, must reach every point of it and call nothing else optimal."""
    common = {"steps": 3, "battery_start_pct": 100, "ambient_c": 35}
    brute = write(tmp_path, "sweep.yaml", name="brute", devices=["pixel8"], workloads=[str(WORKLOAD)],
                  axes={"scheduling": [{"policy": "thermal_pacer"}], **PARAMS}, **common)
    rows, _, _ = sweep.run_sweep(brute, tmp_path / "brute", INLINE, progress=False)
    assert len(rows) == 16
    ok = [r for r in rows if r["peak_memory_bytes"] < LIMIT and not r["killed"]]
    assert 0 < len(ok) < 16  # the constraint binds
    truth = {(r["memory.checkpointing"], r["scheduling.limit_c"], r["scheduling.max_sleep_s"])
             for r in (ok[i] for i in pareto_front([(r["wall_s"], r["peak_memory_bytes"]) for r in ok]))}
    assert len(truth) >= 2  # a real trade-off

    spec = write(tmp_path, "search.yaml", name="small", workload=str(WORKLOAD), devices=["pixel8"],
                 sets=["scheduling={policy: thermal_pacer}"], params=PARAMS,
                 objectives=["wall_s", "peak_memory_bytes"], constraints={"killed": False,
                                                                          "peak_memory_bytes": {"max": LIMIT}},
                 trials=32, population=8, seed=0, **common)
    trials, front, out = search.run_search(spec, tmp_path / "search", INLINE, progress=False)
    assert len(trials) == 32
    found = {(r["param.memory.checkpointing"], r["param.scheduling.limit_c"], r["param.scheduling.max_sleep_s"])
             for r in front}
    assert found <= truth  # everything it calls optimal is
    best = {(r["wall_s"], r["peak_memory_bytes"]) for r in ok if (r["memory.checkpointing"], r["scheduling.limit_c"],
                                                               r["scheduling.max_sleep_s"]) in truth}
    assert {(r["wall_s"], r["peak_memory_bytes"]) for r in front} == best  # and it reaches every optimal trade-off
    assert all(r["feasible"] == (r["peak_memory_bytes"] < LIMIT) for r in trials)
    assert (out / "pareto.csv").exists() and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("fields, field", [
    ({"objectives": ["speed"]}, "objectives[0]"),
    ({"constraints": {"killed": True}}, "constraints.killed"),
    ({"constraints": {"wall_s": {"least": 1}}}, "constraints.wall_s"),
    ({"params": {"micro_batch": {"uniform": [8, 1]}}}, "params.micro_batch"),
    ({"workload": "nope.yaml"}, "workload"),
])
def test_bad_searches_name_the_field(tmp_path, fields, field):
    data = {"name": "x", "workload": str(WORKLOAD), "devices": ["pixel8"], "params": {"micro_batch": [1, 2]},
            **fields}
    with pytest.raises(InputError) as e:
        search.load_search(write(tmp_path, "s.yaml", **data))
    assert e.value.field == field


def test_ctrl_c_keeps_the_trials_done(tmp_path):
    """A real SIGINT in the middle of a search: exit 130, and the trials finished so far are in
    trials.csv (as a sweep or a fleet keeps what it did)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import re

    params = {"scheduling.limit_c": {"uniform": [30, 60]}, "scheduling.max_sleep_s": {"uniform": [1, 5]}}
    spec = write(tmp_path, "search.yaml", name="long", workload=str(WORKLOAD), devices=["pixel8"], steps=3,
                 sets=["scheduling={policy: thermal_pacer}"], params=params, trials=4000, population=4, seed=0)
    proc = subprocess.Popen([sys.executable, "-m", "mfbench.cli", "search", str(spec), "--out", str(tmp_path / "out"),
                             "--inline"], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a job started in the background inherits SIGINT ignored, and Python then
                            # installs no KeyboardInterrupt handler: give the child the default back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = "", time.monotonic() + 300
    done = 0  # trials done, from the progress bar (every trial is a new point: none is looked up)
    while done < 8 and time.monotonic() < deadline:  # two populations
        seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        done = max((int(n) for n in re.findall(r"(\d+)/4000", seen)), default=0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-500:]
    lines = (tmp_path / "out" / "trials.csv").read_text().splitlines()
    assert 8 <= len(lines) - 1 < 4000
