"""Built-in policies and the policy API: closed forms on the toy device of test_sim."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_sim import op, program, q, run, toy_device

from mfbench import policies, sim
from mfbench.contracts import policy
from mfbench.errors import InputError
from mfbench.spec.workload import PolicySpec

MB = 2**20


def spec(name, **params):
    return PolicySpec(policy=name, **params)


# ---------------------------------------------------------------------------- make()

@pytest.mark.parametrize("kind, spec_, field, words", [
    ("scheduling", spec("napping"), "policy", "known: none, paper"),
    ("sharding", spec("lru"), "budget_mb", "missing"),
    ("sharding", spec("lru", budget_mb=-5), "budget_mb", "positive"),
    ("sharding", spec("prefetch", budget_mb=100, ahead=1.5), "ahead", "positive integer"),
    ("sharding", spec("lru", budget_mb=100, budget_gb=1), "budget_gb", "known: budget_mb"),
    ("checkpointing", spec("every_k", k=0), "k", "positive integer"),
    ("scheduling", spec("battery_floor", floor_pct=120), "floor_pct", "0 to 100"),
    ("scheduling", spec("thermal_pacer", limit_c="hot"), "limit_c", "expected a number"),
    ("scheduling", spec("no_such_module_xyz:Policy"), "policy", "cannot import"),
    ("scheduling", spec("mfbench.policies:Nope"), "policy", "has no 'Nope'"),
    ("scheduling", spec("mfbench.policies:MB"), "policy", "decide() hook"),
])
def test_bad_policies_are_input_errors_naming_the_field(kind, spec_, field, words):
    with pytest.raises(InputError) as e:
        policies.make(kind, spec_)
    assert e.value.field == field and words in e.value.message


def test_every_builtin_is_made_with_its_defaults():
    required = {"lru": {"budget_mb": 100}, "prefetch": {"budget_mb": 100}, "every_k": {"k": 2},
                "max_fit": {"budget_mb": 1000}}
    for kind, names in policies.BUILTINS.items():
        for name, cls in names.items():
            assert isinstance(policies.make(kind, spec(name, **required.get(name, {}))), cls)


# ------------------------------------------------------------------------ scheduling

def obs(step=5, battery=80.0, temperature=30.0, charging=False):
    return {"step": step, "t": 100.0, "battery_pct": battery, "temperature_c": temperature, "charging": charging,
            "last_step_s": 1.0, "threads": 4, "cluster": "big", "clusters": {"big": 4}}


@pytest.mark.parametrize("battery, temperature, sleep_s", [
    (80.0, 30.0, 0.5), (20.0, 42.0, 0.5),      # at the thresholds: not below 20 %, not above 42 C
    (19.99, 30.0, 2.0), (80.0, 42.01, 2.0), (10.0, 50.0, 2.0), (None, 30.0, 0.5),
])
def test_paper_rule_sleeps_500_or_2000_ms(battery, temperature, sleep_s):
    assert policies.PaperRule().decide(obs(battery=battery, temperature=temperature)) == {"sleep_s": sleep_s}


def test_paper_rule_rechooses_its_rate_every_k_steps_only():
    rule = policies.PaperRule(every_k_steps=3)
    assert rule.decide(obs(step=0)) == {}  # the sleep follows an optimizer step
    assert rule.decide(obs(step=1, battery=80)) == {"sleep_s": 0.5}
    assert rule.decide(obs(step=2, battery=10)) == {"sleep_s": 0.5}  # not a K-th step: rate kept
    assert rule.decide(obs(step=3, battery=10)) == {"sleep_s": 2.0}


def test_paper_rule_in_a_run_adds_exactly_its_sleeps():
    steps = 10
    summary, events = run(program([op("gemm", flops=4e10)]), threads=4, steps=steps, scheduling=policies.PaperRule())
    assert summary.wall_s == pytest.approx(steps * 1.0 + (steps - 1) * 0.5)
    assert summary.energy_j == pytest.approx(steps * 5.0 + (steps - 1) * 0.5 * 1.0)  # sleeping at 1 W idle


def test_battery_floor_pauses_and_a_hopeless_pause_ends_the_run():
    big_battery = toy_device(**{"battery.capacity_mah": q(20_000)})  # idles through the hour of pausing
    summary, _ = run(program([op("gemm", flops=4e10)]), big_battery, threads=4, steps=1000, battery_start_pct=20.05,
                     scheduling=policies.BatteryFloor(floor_pct=20))
    assert 0 < summary.steps < 1000 and not summary.killed and "paused" in summary.stop_reason
    assert summary.wall_s > sim.MAX_PAUSE_S


def test_charging_only_trains_only_on_the_charger():
    prog = program([op("gemm", flops=4e10)])
    off, _ = run(prog, threads=4, steps=5, scheduling=policies.ChargingOnly())
    on, _ = run(prog, threads=4, steps=5, scheduling=policies.ChargingOnly(), charging=True)
    assert off.steps == 0 and off.stop_reason and on.steps == 5


def test_cores_policy_picks_cluster_and_threads():
    from mfbench.spec.profile import load_device
    pixel8 = load_device("pixel8")
    prog = program([op("gemm", flops=1e10)])
    summary, events = run(prog, pixel8, steps=3, scheduling=policies.Cores(cluster="little", threads=4))
    little = next(c for c in pixel8.clusters if c.name == "little")
    # the first step runs on the default cluster; the decision applies from the first decide() on
    assert summary.median_step_s == pytest.approx(1e10 / (4 * little.gemm_gflops_per_core.value * 1e9))
    with pytest.raises(InputError, match="unknown cluster 'tiny'"):
        run(prog, pixel8, scheduling=policies.Cores(cluster="tiny"))


@pytest.mark.parametrize("decision, words", [
    ({"nap_s": 1.0}, "unknown key 'nap_s'; expected keys: sleep_s, pause, threads, cluster"),
    ({"threads": 2.0}, "threads = 2.0; expected a positive integer"),
    ({"threads": 0}, "threads = 0; expected a positive integer"),
    ({"threads": True}, "threads = True; expected a positive integer"),
    ({"cluster": "tiny"}, "cluster = 'tiny'; expected a cluster of this device: big, little"),
    ({"sleep_s": -0.5}, "sleep_s = -0.5; expected seconds, a finite number >= 0"),
    ({"sleep_s": float("inf")}, "sleep_s = inf; expected seconds"),
    ({"pause": "yes"}, "pause = 'yes'; expected True or False"),
    (5, "must return a dict"),
])
def test_a_bad_decision_is_an_input_error_naming_the_key(decision, words):
    with pytest.raises(InputError) as e:
        policy.check_decision(decision, {"big": 4, "little": 4})
    assert e.value.field == "scheduling" and words in e.value.message


def test_a_good_decision_passes_as_it_is():
    good = {"sleep_s": 1.5, "pause": False, "threads": 2, "cluster": "little"}
    assert policy.check_decision(good, {"big": 4, "little": 4}) == good
    assert policy.check_decision(None, {}) == {} and policy.check_decision({}, {}) == {}
    with pytest.raises(TypeError, match="missing"):
        policy.observation(step=0)


class Negative(policies.Scheduling):
    def decide(self, obs):
        return {"sleep_s": -1.0}


def test_a_run_stops_at_a_bad_decision():
    with pytest.raises(InputError) as e:
        run(program([op("gemm", flops=4e10)]), threads=4, steps=2, scheduling=Negative())
    assert e.value.field == "scheduling" and "sleep_s = -1.0" in e.value.message


class Recorder(policies.Scheduling):
    """Wraps a policy and records what it saw and what it decided."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def decide(self, obs):
        decision = self.inner.decide(dict(obs))
        self.seen.append((obs, decision))
        return decision


@pytest.mark.parametrize("name", list(policies.BUILTINS["scheduling"]))
def test_builtin_schedulers_see_the_observation_and_decide_within_the_protocol(name):
    from mfbench.spec.profile import load_device
    params = {"cores": {"cluster": "little", "threads": 2}, "thermal_pacer": {"limit_c": 20},  # below ambient
              "thermal_budget": {"limit_c": 20},
              "battery_floor": {"floor_pct": 50}, "energy_probe": {"every_steps": 5}}.get(name, {})
    recorder = Recorder(policies.make("scheduling", spec(name, **params)))
    pixel8 = load_device("pixel8")
    run(program([op("gemm", flops=4e10)]), pixel8, steps=12, battery_start_pct=45, scheduling=recorder)
    keys = [k.name for k in policy.OBSERVATION]
    assert recorder.seen and all(list(obs) == keys for obs, _ in recorder.seen)
    clusters = {c.name: c.cores for c in pixel8.clusters}
    for obs, decision in recorder.seen:
        assert obs["clusters"] == clusters
        assert policy.check_decision(decision, clusters) == (decision or {})
    assert any(decision for _, decision in recorder.seen) == (name != "none")


def doc_table(text: str, header: str) -> list[tuple[str, ...]]:
    """The rows of the markdown table whose header row starts with `header`."""
    lines = text.split(header, 1)[1].splitlines()[2:]  # past the header row and the separator
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        name, *rest = (c.strip() for c in line.strip().strip("|").split("|"))
        rows.append((name.strip("`"), *rest))
    return rows


def test_docs_show_the_protocol_as_the_module_defines_it():
    text = (Path(__file__).resolve().parent.parent / "docs" / "policies.md").read_text()
    assert doc_table(text, "| observation key |") == [tuple(k) for k in policy.OBSERVATION]
    assert doc_table(text, "| decision key |") == [tuple(k) for k in policy.DECISION]


def test_thermal_pacer_sleeps_in_proportion_to_the_excess():
    pacer = policies.ThermalPacer(limit_c=40, gain_s_per_c=2, max_sleep_s=5)
    assert pacer.decide(obs(temperature=39)) == {}
    assert pacer.decide(obs(temperature=41)) == {"sleep_s": 2.0}
    assert pacer.decide(obs(temperature=60)) == {"sleep_s": 5.0}


def test_thermal_budget_is_a_pi_controller_with_anti_windup():
    budget = policies.ThermalBudget(limit_c=40, kp_s_per_c=2, ki_s_per_c_s=0.1, max_sleep_s=10)
    assert budget.decide({**obs(temperature=39), "t": 0.0}) == {}       # cool: no sleep, nothing banked
    assert budget.decide({**obs(temperature=41), "t": 10.0}) == {"sleep_s": pytest.approx(2 + 0.1 * 10)}
    assert budget.decide({**obs(temperature=41), "t": 20.0}) == {"sleep_s": pytest.approx(2 + 0.1 * 20)}
    assert budget.decide({**obs(temperature=40), "t": 30.0}) == {"sleep_s": pytest.approx(0.1 * 20)}  # at the limit: the integral holds
    assert budget.decide({**obs(temperature=60), "t": 1000.0}) == {"sleep_s": 10}  # capped
    assert budget.integral == pytest.approx(10 / 0.1)                        # and the integral with it
    assert budget.decide({**obs(temperature=20), "t": 1010.0}) == {}        # far below: the integral drains to nothing
    assert budget.integral == 0


def test_user_policy_from_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(
        "from mfbench.policies import Scheduling\n\n"
        "class Nap(Scheduling):\n"
        "    def __init__(self, seconds=1.0):\n"
        "        self.seconds = seconds\n\n"
        "    def decide(self, obs):\n"
        "        return {'sleep_s': self.seconds} if obs['step'] else {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    nap = policies.make("scheduling", spec("my_policies:Nap", seconds=3.0))
    summary, events = run(program([op("gemm", flops=4e10)]), threads=4, steps=4, scheduling=nap)
    assert summary.wall_s == pytest.approx(4 * 1.0 + 3 * 3.0)
    assert [e["policy"] for e in events if e["type"] == "decision"] == ["Nap"]
    with pytest.raises(InputError) as e:
        policies.make("scheduling", spec("my_policies:Nap", minutes=3))
    assert e.value.field == "minutes"


# -------------------------------------------------------------------------- sharding

def test_lru_never_holds_more_than_its_budget():
    sizes = {f"s{i}": (30 + 17 * i % 50) * MB for i in range(8)}
    order = [0, 1, 2, 3, 1, 4, 5, 0, 6, 7, 2, 5, 3, 3, 6, 1, 7, 0, 4]
    ops = [op(f"o{k}", flops=4e9, shard=f"s{i}") for k, i in enumerate(order)]
    ops += [op(f"u{i}", flops=4e8, shard=f"s{i}", phase="update") for i in (7, 3, 0)]  # dirty: written back
    budget_mb = 150
    for sharding in (policies.LRU(budget_mb), policies.Prefetch(budget_mb, ahead=2), policies.Prefetch(budget_mb, ahead=4)):
        summary, events = run(program(ops, shards=sizes, sharding=sharding), threads=4, steps=3, sharding=sharding,
                              trace_ops_steps=3)
        held = [e["rss"] for e in events if e["type"] == "sample"]  # no activations: rss is the shards
        assert max(held) <= budget_mb * MB
        assert max(held) > budget_mb * MB - max(sizes.values())  # and it does use the budget
        assert summary.io_write_bytes > 0 and not summary.killed


def forward_only(blocks, shard_bytes, sharding=None):
    ops = [op(f"block{i}", flops=4e9, shard=f"s{i}") for i in range(blocks)]  # 0.1 s each on 4 threads
    return program(ops, shards={f"s{i}": shard_bytes for i in range(blocks)}, sharding=sharding)


def forward_backward(blocks, shard_bytes, sharding=None):
    ops = [op(f"block{i}.forward", flops=4e9, shard=f"s{i}") for i in range(blocks)]
    ops += [op(f"block{i}.backward", flops=4e9, shard=f"s{i}", phase="backward") for i in reversed(range(blocks))]
    return program(ops, shards={f"s{i}": shard_bytes for i in range(blocks)}, sharding=sharding)


def test_prefetch_hides_io_when_bandwidth_suffices():
    blocks, compute, load = 40, 0.1, 100e-6 + 0.05  # 50 MB a shard at 1 GB/s: less than an op
    alone, _ = run(forward_backward(blocks, 50 * 10**6), threads=4, steps=3)
    assert alone.median_step_s == pytest.approx(2 * blocks * compute)
    ahead = policies.Prefetch(budget_mb=150)
    prefetch, _ = run(forward_backward(blocks, 50 * 10**6, ahead), threads=4, steps=3, sharding=ahead)
    assert prefetch.median_step_s == pytest.approx(alone.median_step_s, rel=0.02)
    # on demand, every shard costs a load in the open but the 3 most recent ones backward
    # finds still resident (a step starts with none)
    lru = policies.LRU(budget_mb=150)
    on_demand, _ = run(forward_backward(blocks, 50 * 10**6, lru), threads=4, steps=3, sharding=lru)
    assert on_demand.median_step_s == pytest.approx(2 * blocks * compute + (2 * blocks - 3) * load)


def test_prefetch_is_io_bound_when_bandwidth_is_short():
    blocks, shard_bytes = 40, 500 * 10**6  # 0.5 s a load, five times an op
    ahead = policies.Prefetch(budget_mb=1500)
    summary, _ = run(forward_only(blocks, shard_bytes, ahead), threads=4, steps=3, sharding=ahead)
    assert summary.median_step_s == pytest.approx(blocks * shard_bytes / 1e9, rel=0.02)


def test_a_shard_larger_than_the_budget_is_an_input_error():
    with pytest.raises(InputError) as e:
        forward_only(2, 300 * MB, policies.LRU(budget_mb=100))
    assert e.value.field == "memory.sharding.budget_mb"


# ---------------------------------------------------------- accumulation, checkpointing

def test_max_fit_picks_the_largest_micro_batch_under_the_budget():
    peak = {m: 1000 * MB + m * 300 * MB for m in (1, 2, 4, 8, 16)}
    assert policies.MaxFit(budget_mb=2300).micro_batch(16, 16, peak.__getitem__) == 4
    assert policies.MaxFit(budget_mb=100_000).micro_batch(16, 2, peak.__getitem__) == 16
    assert policies.MaxFit(budget_mb=500).micro_batch(16, 16, peak.__getitem__) == 1
    assert policies.Fixed().micro_batch(16, 2, peak.__getitem__) == 2


def test_checkpointing_layer_choices():
    assert policies.NoCheckpointing().layers(12) == set()
    assert policies.EveryBlock().layers(4) == {0, 1, 2, 3}
    assert policies.EveryK(k=3).layers(12) == {0, 3, 6, 9}


class Scripted(policies.Sharding):
    """Evicts the scripted shards first (None: give up), then the least recently used; records
    the `resident` list (least recently used first) of every victim() call."""

    def __init__(self, budget_mb, ahead, script):
        self.budget_bytes, self.ahead, self.script, self.seen = budget_mb * MB, ahead, list(script), []

    def victim(self, resident, keep):
        self.seen.append(list(resident))
        return self.script.pop(0) if self.script else super().victim(resident, keep)


@pytest.mark.parametrize("first", ["A", "B"])
def test_a_failed_fetch_leaves_the_resident_order_as_it_was(first):
    # A, B, C load in that order and fill the 300 MB budget; prefetching D (200 MB) after C
    # needs two victims: the policy names one, then gives up. D's own load must then see
    # [A, B, C] again and evict A and B, the least recently used.
    ops = [op(name, flops=4e9, shard=name) for name in "ABCD"]
    policy = Scripted(300, ahead=1, script=[f"params.{first}", None])
    prog = program(ops, shards={"A": 100 * MB, "B": 100 * MB, "C": 100 * MB, "D": 200 * MB}, sharding=policy)
    summary, events = run(prog, threads=4, sharding=policy)
    abc = ["params.A", "params.B", "params.C"]
    assert policy.seen[0] == abc                                    # the failed search
    assert policy.seen[2:] == [abc, abc[1:]]                        # D's load, in the order before it
    assert [e["shard"] for e in events if e["type"] == "io"] == ["A", "B", "C", "D"] and not summary.killed
