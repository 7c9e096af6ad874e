"""Scheduling through the trainer's control channel (--control stdio): telemetry from fake
sysfs trees drives the simulator's policy objects; decisions are applied (sleeps, pauses,
threads, clusters) and recorded; bad decisions stop the run with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from native_fixtures import TINY_GPT2
from sysfs_fixtures import controlled, model, tokens, write_battery, write_cpufreq, write_zone  # noqa: F401 (fixtures)

from mfbench.contracts import policy
from mfbench.device.data import pydoc_text
from mfbench.errors import InputError
from mfbench.policies import BatteryFloor, EnergyProbe, PaperRule, Scheduling


def events(trace, kind):
    return [e for e in trace if e["type"] == kind]


# battery %, battery temperature (tenths of °C) the phone shows before steps 0, 1, 2, 3
SCRIPT = [(50, 300), (19, 300), (50, 425), (50, 300)]


class ScriptedPaper(PaperRule):
    """The paper's rule, on a phone whose battery and temperature follow SCRIPT: after
    deciding step s the test sets the sensors the trainer reads for step s + 1."""

    def __init__(self, root):
        super().__init__()
        self.root, self.seen, self.made = root, [], []

    def decide(self, obs):
        self.seen.append(obs)
        decision = super().decide(obs)
        self.made.append(decision)
        if obs["step"] + 1 < len(SCRIPT):
            capacity, temp = SCRIPT[obs["step"] + 1]
            write_battery(self.root, capacity=capacity, temp=temp)
        return decision


def test_telemetry_drives_the_paper_rule_to_the_simulators_sleeps(model, tokens, tmp_path):
    root = tmp_path / "phone"
    write_battery(root, capacity=SCRIPT[0][0], temp=SCRIPT[0][1], status="Discharging")
    write_zone(root, 0, "cpu", 38000)  # cooler than the battery: the battery's temperature counts
    pol = ScriptedPaper(root)
    code, lines, trace, summary = controlled(model, tokens, tmp_path / "out", len(SCRIPT), root, pol)
    assert code == 0, lines
    # the observations carry the scripted readings, in the protocol's units
    assert [(o["battery_pct"], o["temperature_c"], o["charging"]) for o in pol.seen] == \
        [(b, t / 10, False) for b, t in SCRIPT]
    # the simulator's PaperRule, fed the same readings, sleeps exactly as much
    sim_rule = PaperRule()
    expected = [sim_rule.decide(policy.observation(
        step=s, t=0.0, battery_pct=float(b), temperature_c=t / 10, charging=False, last_step_s=None, power_w=None,
        threads=2, cluster="cpu0-1", clusters={"cpu0-1": 2})) for s, (b, t) in enumerate(SCRIPT)]
    assert expected == [{}, {"sleep_s": 2.0}, {"sleep_s": 2.0}, {"sleep_s": 0.5}]  # battery < 20, > 42 °C, neither
    assert pol.made == expected
    # the trainer slept them: each step starts at least sleep_s after the previous one ended
    steps = events(trace, "step")
    for s in range(1, len(SCRIPT)):
        gap = (steps[s]["t"] - steps[s]["duration"]) - steps[s - 1]["t"]
        assert gap >= expected[s]["sleep_s"], (s, gap)
    assert summary["wall_s"] >= 4.5
    # and recorded each change of decision
    assert [(e["policy"], e["choice"]) for e in events(trace, "decision")] == \
        [("ScriptedPaper", {"sleep_s": 2.0}), ("ScriptedPaper", {"sleep_s": 0.5})]
    assert (summary["battery_start_pct"], summary["battery_end_pct"], summary["max_temperature_c"]) == (50, 50, 42.5)


class Recording(EnergyProbe):
    """EnergyProbe, keeping what it saw and decided; it also naps 0.15 s before each step so
    that the 20 Hz samples see the threads where the decision put them."""

    def __init__(self, every_steps):
        super().__init__(every_steps)
        self.seen, self.made = [], []

    def decide(self, obs):
        self.seen.append(json.loads(json.dumps(obs)))  # a copy: the policy may keep state
        self.made.append(super().decide(obs))
        return {**self.made[-1], "sleep_s": 0.15}


def windows(trace):
    """Per step but the last: the samples from its start to just before the next step's start
    (a decision is applied after its sleep, right before its step)."""
    starts = [e["t"] - e["duration"] for e in events(trace, "step")]
    return [[e for e in events(trace, "sample") if starts[i] < e["t"] < starts[i + 1] - 0.02]
            for i in range(len(starts) - 1)]


def two_clusters(root):
    """This 2-CPU host as a phone with a little (cpu0) and a big (cpu1) core, drawing 2 W."""
    write_cpufreq(root, 0, 1800000, 1700000)
    write_cpufreq(root, 1, 2400000, 2300000)
    write_battery(root, capacity=70, status="Discharging", current_now=500000, voltage_now=4000000, temp=310)


def test_same_policy_same_observations_same_decisions_and_clusters_are_applied(model, tokens, tmp_path):
    root = tmp_path / "phone"
    two_clusters(root)
    pol = Recording(every_steps=3)
    code, lines, trace, summary = controlled(model, tokens, tmp_path / "out", 6, root, pol, threads=2)
    assert code == 0, lines
    # inside the simulator, Run.decide calls decide(obs) on the object and checks the result:
    # a fresh object fed the observations the trainer sent decides the same, step by step
    fresh = EnergyProbe(every_steps=3)
    direct = [policy.check_decision(fresh.decide(o), o["clusters"]) for o in pol.seen]
    assert direct == pol.made
    assert pol.seen[0]["clusters"] == {"cpu0": 1, "cpu1": 1} and pol.seen[0]["cluster"] == "cpu1"
    assert [d["cluster"] for d in pol.made[:2]] == ["cpu0", "cpu1"]  # it measures each cluster first
    # each decision is in force at the next observation
    for d, nxt in zip(pol.made, pol.seen[1:]):
        assert (nxt["cluster"], nxt["threads"]) == (d["cluster"], d["threads"])
    # recorded: every change of decision, and the CPU of the one worker thread in samples
    sent = [{**d, "sleep_s": 0.15} for d in pol.made]
    changes = [d for i, d in enumerate(sent) if i == 0 or d != sent[i - 1]]
    assert [(e["policy"], e["choice"]) for e in events(trace, "decision")] == [("Recording", d) for d in changes]
    for during, d in zip(windows(trace), pol.made):
        assert during, "no sample between steps"
        assert all(e["cpus"] == [int(d["cluster"][3:])] for e in during), (d, during)
        assert all(e["frequency"] == {"cpu0": 1700, "cpu1": 2300}[d["cluster"]] for e in during)
    assert summary["details"]["threads"] == 1 and summary["details"]["cluster"] == pol.made[-1]["cluster"]


class Fixed(Scheduling):
    def __init__(self, decision):
        self.decision = decision

    def decide(self, obs):
        return self.decision


def test_threads_changed_between_steps_up_to_the_plans_capacity(model, tokens, tmp_path):
    class Alternate(Scheduling):
        def decide(self, obs):
            return {"threads": 1 if obs["step"] % 2 else 2, "sleep_s": 0.15}

    code, lines, trace, summary = controlled(model, tokens, tmp_path / "out", 3, tmp_path, Alternate())
    assert code == 0, lines
    assert [e["choice"]["threads"] for e in events(trace, "decision")] == [2, 1, 2]
    assert summary["details"]["threads"] == 2
    for during, n in zip(windows(trace), (2, 1, 2)):
        assert during and all(len(e["cpus"]) == n for e in during), (n, during)

    code, lines, _, _ = controlled(model, tokens, tmp_path / "out2", 2, tmp_path, Fixed({"threads": 3}))
    assert code == 2 and len([x for x in lines if "error:" in x]) == 1, lines
    assert "threads = 3 (expected at most the plan's 2 threads" in lines[-1]


def test_a_bad_decision_is_named_and_the_trainer_stops(model, tokens, tmp_path):
    with pytest.raises(InputError) as e:
        controlled(model, tokens, tmp_path / "out", 2, tmp_path, Fixed({"cluster": "big"}))
    assert e.value.field == "scheduling" and "cluster = 'big'" in e.value.message
    assert not (tmp_path / "out" / "summary.json").exists()


class FloorThenCharger(BatteryFloor):
    """The battery floor on a phone at 15 %: when it pauses, the user plugs the charger in."""

    def __init__(self, root):
        super().__init__(floor_pct=20)
        self.root, self.seen = root, []

    def decide(self, obs):
        self.seen.append(obs)
        d = super().decide(obs)
        if d["pause"]:
            write_battery(self.root, status="Charging")
        return d


def test_pause_polls_until_the_policy_lets_the_run_go_on(model, tokens, tmp_path):
    root = tmp_path / "phone"
    write_battery(root, capacity=15, status="Discharging")
    pol = FloorThenCharger(root)
    code, lines, trace, summary = controlled(model, tokens, tmp_path / "out", 2, root, pol, "--pause-poll-s", "0.3")
    assert code == 0, lines
    assert [(o["step"], o["charging"]) for o in pol.seen] == [(0, False), (0, True), (1, True)]
    assert [e["choice"] for e in events(trace, "decision")] == [{"pause": True}, {"pause": False}]
    assert events(trace, "step")[0]["t"] - events(trace, "step")[0]["duration"] >= 0.3
    assert summary["steps"] == 2 and summary["stop_reason"] is None


class PauseOnceAtStep2(Scheduling):
    """Pauses before step 2 and, while paused, looks at what the trainer has on disk."""

    def __init__(self, out):
        self.out, self.asked, self.on_disk = out, 0, None

    def decide(self, obs):
        if obs["step"] != 2:
            return {}
        self.asked += 1
        if self.asked == 1:
            return {"pause": True}
        self.on_disk = sorted(p.name for p in (self.out / "checkpoints").iterdir())
        return {}


def test_a_pause_checkpoints_first(model, tokens, tmp_path):
    """A paused phone may be killed at any moment: the trainer checkpoints when the pause begins."""
    pol = PauseOnceAtStep2(tmp_path / "out")
    code, lines, trace, summary = controlled(model, tokens, tmp_path / "out", 4, tmp_path / "none", pol,
                                             "--pause-poll-s", "0.1", "--checkpoint-every", "0")
    assert code == 0, lines
    assert pol.on_disk == ["ckpt-2.bin"] and summary["steps"] == 4


class PauseForever(Scheduling):
    def decide(self, obs):
        return {"pause": True} if obs["step"] == 2 else {}


def test_sigterm_stops_a_paused_run_at_once(model, tokens, tmp_path):
    """A phone paused for a long while is told to stop: the trainer does not wait for the
    pause to end; it has checkpointed, writes its summary and exits 0."""
    import signal
    import threading
    import time
    out = tmp_path / "out"

    def stop_when_paused():  # the pause checkpoints first: then SIGTERM the trainer
        deadline = time.monotonic() + 60
        while not (out / "checkpoints" / "ckpt-2.bin").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmdline and cmdline[0].endswith(b"mfbench-train"):
                os.kill(int(proc.name), signal.SIGTERM)

    killer = threading.Thread(target=stop_when_paused)
    killer.start()
    t0 = time.monotonic()
    code, lines, trace, summary = controlled(model, tokens, out, 4, tmp_path / "none", PauseForever(),
                                             "--pause-poll-s", "60")
    killer.join()
    assert code == 0, lines
    assert time.monotonic() - t0 < 30  # not the 60 s poll
    assert summary["stop_reason"] == "signal SIGTERM" and summary["steps"] == 2


def test_mfbench_run_drives_a_user_policy(tmp_path):
    """`mfbench run` with `scheduling: {policy: module:Class}`: the trainer asks, the user's
    object answers (here on this machine: no battery, so charging and no temperature)."""
    import yaml
    (tmp_path / "config.json").write_text(json.dumps({**TINY_GPT2, "model_type": "gpt2", "vocab_size": 300}))
    (tmp_path / "data.txt").write_text(pydoc_text()[:20_000])
    (tmp_path / "my_policies.py").write_text(
        "from mfbench.policies import Scheduling\n"
        "class Nap(Scheduling):\n"
        "    def __init__(self, seconds=0.2):\n"
        "        self.seconds = seconds\n"
        "    def decide(self, obs):\n"
        "        assert obs['charging'] is True and obs['temperature_c'] is None and obs['battery_pct'] is None\n"
        "        return {'sleep_s': self.seconds} if obs['step'] else {}\n")
    (tmp_path / "nap.yaml").write_text(yaml.safe_dump({
        "name": "nap", "model": "config.json", "method": {"kind": "lora", "targets": ["attn.c_attn"]},
        "data": {"source": "data.txt"}, "seq_len": 16, "batch": 2, "steps": 3, "threads": 1,
        "scheduling": {"policy": "my_policies:Nap", "seconds": 0.3}}))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MFBENCH_SYSFS_ROOT": str(tmp_path / "none"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mfbench.cli", "run", "nap.yaml", "--out", "out"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    trace = [json.loads(x) for x in (tmp_path / "out" / "trace.jsonl").read_text().splitlines()]
    assert [(e["policy"], e["choice"]) for e in events(trace, "decision")] == [("Nap", {"sleep_s": 0.3})]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["wall_s"] >= 0.6
