"""The simulator's physics and engine against closed forms, on a round-number device built in code."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from mfbench import policies, sim
from mfbench.contracts.program import Buffer, Op, StepProgram
from mfbench.sim.thermal import ThermalNetwork
from mfbench.plan.shards import plan_io
from mfbench.spec.profile import DeviceProfile
from mfbench.spec.workload import PolicySpec

MB = 2**20


def q(v):
    return {"value": v, "estimated": "round number for a closed-form test"}


def toy_device(**change) -> DeviceProfile:
    """One 4-core cluster at 1 or 2 GHz (0.5 / 1 W a core, 10 GFLOP/s a core at 2 GHz),
    10 GB/s DRAM (40 pJ/B), 1 GB/s storage reads with 100 us latency (1 nJ/B), 1 W idle, a 1000 mAh battery
    at a flat 4 V with 0.1 ohm, a 10 C/W x 100 J/C thermal mass in 25 C air."""
    d = {
        "name": "toy", "display_name": "Toy", "kind": "phone", "soc": "toy",
        "ram": {"total_mb": q(8192), "os_reserved_mb": q(2048), "app_limit_mb": q(4096),
                "runtime_overhead_mb": q(0)},
        "clusters": [{"name": "big", "cores": 4, "freqs_mhz": q([1000, 2000]), "power_w_per_core": q([0.5, 1.0]),
                      "gemm_gflops_per_core": q(10), "skinny_gemm_gflops_per_core": q(5)}],
        "memory": {"bandwidth_gbs": q(10), "energy_pj_per_byte": q(40)},
        "storage": {"kind": "toy", "seq_read_gbs": q(1), "seq_write_gbs": q(0.5), "latency_us": q(100),
                    "energy_nj_per_byte": q(1)},
        "power": {"idle_w": q(1.0)},
        "battery": {"capacity_mah": q(1000), "ocv_soc_pct": q([0, 100]), "ocv_v": q([4.0, 4.0]),
                    "internal_resistance_ohm": q(0.1)},
        "thermal": {"resistance_c_per_w": q(10), "capacitance_j_per_c": q(100), "ambient_c": q(25),
                    "throttling": [{"above_c": 40, "freq_cap": 0.5}]},
    }
    for path, value in change.items():  # "thermal.ambient_c" -> d["thermal"]["ambient_c"]
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[last] = value
    return DeviceProfile.model_validate(d)


SIZES: dict[str, int] = {}  # bytes of every kept buffer the toy ops below allocate


def op(name, flops=0.0, bytes_moved=0.0, shard=None, alloc=0, free=(), phase="forward", kind="linear"):
    """A toy op; `alloc` is bytes (a buffer named after the op) or {buffer: bytes}; `free`
    names the buffers its end frees."""
    alloc = {name: alloc} if isinstance(alloc, int) else alloc
    SIZES.update(alloc)
    names = tuple(n for n, b in alloc.items() if b)
    return Op(name, kind, phase, 0, None, shard, names, tuple(free), flops, bytes_moved)


def program(ops, shards=None, param_bytes=None, grad_bytes=0, optimizer_bytes=0, tokens=100, sharding=None):
    """A toy step program: parameter shards, unsharded parameters, gradients and optimizer
    state as static buffers, and the kept buffers the ops allocate. With a `sharding` policy
    the shards are sharded and mfbench.plan.shards inserts the io ops."""
    shards = shards or {}
    extra = (param_bytes if param_bytes is not None else sum(shards.values())) - sum(shards.values())
    static = [Buffer(f"params.{s}", b, "sharded" if sharding else "static", s) for s, b in shards.items()]
    if sharding:
        ops = plan_io(list(ops), {f"params.{s}": b for s, b in shards.items()}, sharding, False, True, None)
    static += [Buffer(n, b, "static") for n, b in
               (("lora.params", extra), ("grads.all", grad_bytes), ("optimizer.m", optimizer_bytes)) if b]
    kept = [Buffer(n, SIZES[n], "kept") for n in dict.fromkeys(n for o in ops if o.phase != "io" for n in o.alloc)]
    return StepProgram("toy", "gpt2", "full", tokens, 1, 1, 1, 1, 0, tuple(static + kept), tuple(ops))


def run(prog, device=None, steps=1, **options):
    return sim.run_program(prog, device or toy_device(), steps, progress=False, **options)


# ------------------------------------------------------------------------- thermal

def test_rc_heating_and_cooling_follow_the_exponential():
    thermal = ThermalNetwork(toy_device().thermal)  # one node: the lumped body
    R, C, ambient, P = 10.0, 100.0, 25.0, 2.0
    tau = R * C
    for t in (1.0, 100.0, 1000.0, 5000.0):
        thermal.set_temperatures([ambient])
        # many constant-power pieces compose to the single exponential
        pieces = np.full(7, t / 7)
        thermal.advance(thermal.response(pieces, np.full(7, P), np.zeros(7)), t)
        assert thermal.skin_c == pytest.approx(ambient + P * R * (1 - math.exp(-t / tau)), rel=1e-12)
    hot = thermal.skin_c
    thermal.advance(thermal.response(np.array([300.0]), np.zeros(1), np.zeros(1)), 300.0)
    assert thermal.skin_c == pytest.approx(ambient + (hot - ambient) * math.exp(-300 / tau), rel=1e-12)


def test_a_step_heats_the_device_by_the_closed_form():
    # one op of 4e10 FLOPs on 4 threads x 10 GFLOP/s = 1 s at 1 W idle + 4 x 1 W cores; the
    # battery's own loss I^2 R heats the body too (the toy has no battery node)
    summary, events = run(program([op("gemm", flops=4e10)]), threads=4, steps=3)
    assert summary.median_step_s == pytest.approx(1.0)
    current = min(np.roots([0.1, -4.0, 5.0]).real)  # P = (V - I R) I at 4 V, 0.1 ohm
    expected = 25 + (5.0 + current**2 * 0.1) * 10 * (1 - math.exp(-3 / 1000))
    last = [e for e in events if e["type"] == "sample"][-1]
    assert last["temperature"] == pytest.approx(expected, rel=1e-12)
    assert summary.energy_j == pytest.approx(15.0)


def test_throttling_caps_the_frequency_and_slows_compute():
    hot = toy_device(**{"thermal.ambient_c": q(41)})  # above the 40 C step from the start
    summary, events = run(program([op("gemm", flops=4e10)]), hot, threads=4)
    assert summary.median_step_s == pytest.approx(2.0)  # half the frequency, half the FLOP/s
    assert [e["frequency"] for e in events if e["type"] == "sample"][-1] == 1000


# ------------------------------------------------------------------------- battery

def test_coulomb_counting_over_a_constant_load():
    steps, P, V, R = 50, 5.0, 4.0, 0.1
    summary, events = run(program([op("gemm", flops=4e10)]), threads=4, steps=steps)
    # independent: the smaller root of R I^2 - V I + P = 0
    current = min(np.roots([R, -V, P]).real)
    assert current * (V - current * R) == pytest.approx(P)
    drop_pct = 100 * current * steps * 1.0 / (1000 * 3.6)
    assert summary.battery_drop_pct == pytest.approx(drop_pct, rel=1e-12)
    last = [e for e in events if e["type"] == "sample"][-1]
    assert last["current"] == pytest.approx(current)
    assert last["voltage"] == pytest.approx(V - current * R)


def test_charging_raises_the_charge():
    summary, _ = run(program([op("gemm", flops=4e10)]), threads=4, steps=10, battery_start_pct=50, charging=True)
    assert summary.battery_end_pct > 50  # a 10 W charger beats a 5 W load


def test_an_empty_battery_ends_the_run():
    summary, _ = run(program([op("gemm", flops=4e10)]), threads=4, steps=10_000, battery_start_pct=1)
    assert summary.killed and "battery" in summary.kill_reason
    assert 0 < summary.steps < 10_000 and summary.battery_end_pct == 0


# --------------------------------------------------------------------- compute, I/O

@pytest.mark.parametrize("flops, bytes_moved, threads, expected", [
    (2e10, 1e6, 2, 2e10 / (2 * 10e9)),        # compute bound
    (1e6, 5e9, 4, 5e9 / 10e9),                # memory bound: bytes / bandwidth
    (3e10, 3e9, 3, max(3e10 / 30e9, 0.3)),    # both sides of the roofline
])
def test_roofline_op_time(flops, bytes_moved, threads, expected):
    summary, events = run(program([op("x", flops=flops, bytes_moved=bytes_moved)]), threads=threads)
    assert [e for e in events if e["type"] == "op"][0]["duration"] == pytest.approx(expected)


def test_skinny_gemm_runs_at_its_own_rate_and_threads_cap_at_the_cores():
    summary, _ = run(program([op("lora", flops=2e10, kind="lora")]), threads=16)
    assert summary.median_step_s == pytest.approx(2e10 / (4 * 5e9))


def test_io_time_is_latency_plus_bytes_over_bandwidth():
    shard = 200 * 10**6
    lru = policies.make("sharding", PolicySpec(policy="lru", budget_mb=500))
    prog = program([op("use", flops=4e10, shard="w")], shards={"w": shard}, sharding=lru)
    summary, events = run(prog, threads=4, sharding=lru)
    io = [e for e in events if e["type"] == "io"]
    assert len(io) == 1 and io[0]["kind"] == "load"
    assert io[0]["duration"] == pytest.approx(100e-6 + shard / 1e9)
    assert summary.median_step_s == pytest.approx(1.0 + 100e-6 + shard / 1e9)
    assert summary.io_read_bytes == shard


def test_a_shard_file_the_page_cache_holds_is_mapped_not_read():
    """With page-cache rates in the profile, a load maps the cached file (bytes / cached_map_gbs,
    no latency, no flash energy) and an evict unmaps it (bytes / unmap_gbs), as long as the
    files fit beside the run in the RAM the OS leaves free (total - os_reserved); past that,
    every load is read from flash again."""
    shard = 200 * 10**6
    lru = policies.LRU(budget_mb=500)
    prog = program([op("use", flops=4e10, shard="w")], shards={"w": shard}, sharding=lru)
    rates = {"storage.cached_map_gbs": q(10), "storage.cached_write_gbs": q(4), "storage.unmap_gbs": q(40)}
    summary, events = sim.run_program(prog, toy_device(**rates), steps=3, progress=False, threads=4, sharding=lru)
    io = [e for e in events if e["type"] == "io"]
    assert io[0]["duration"] == pytest.approx(shard / 10e9)
    assert summary.median_step_s == pytest.approx(1.0 + shard / 10e9 + shard / 40e9)
    assert summary.energy_j / summary.steps == pytest.approx(1.0 * summary.median_step_s + 4 * 1.0 * 1.0, rel=1e-9)
    # 100 MB free beside a 200 MB file: from flash (the evict still unmaps)
    small = toy_device(**rates, **{"ram.os_reserved_mb": q(8192 - 100)})
    summary, _ = sim.run_program(prog, small, steps=3, progress=False, threads=4, sharding=lru)
    assert summary.median_step_s == pytest.approx(1.0 + 100e-6 + shard / 1e9 + shard / 40e9)
    with pytest.raises(ValueError, match="go together"):  # a load rate without a store rate means nothing
        toy_device(**{"storage.cached_map_gbs": q(10)})


def test_a_load_from_the_page_cache_hides_behind_compute_only_with_a_core_to_spare():
    """Prefetch overlaps a load with compute; from the page cache the load is a copy, CPU work:
    with every core of the device computing it has no core of its own and adds its time to the
    step, with one core free it hides as a flash read does."""
    shard = 200 * 10**6
    prefetch = policies.Prefetch(budget_mb=1000, ahead=1)
    prog = program([op("a", flops=4e10, shard="v"), op("b", flops=4e10, shard="w")],
                   shards={"v": shard, "w": shard}, sharding=prefetch)
    rates = {"storage.cached_map_gbs": q(10), "storage.cached_write_gbs": q(4), "storage.unmap_gbs": q(40)}
    load, unmap = shard / 10e9, shard / 40e9  # both loaded ahead (the budget holds both), evicted at the end
    for threads, step in ((4, 2 * load + 2 * 4e10 / 40e9 + 2 * unmap), (3, load + 2 * 4e10 / 30e9 + 2 * unmap)):
        summary, _ = sim.run_program(prog, toy_device(**rates), steps=3, progress=False, threads=threads,
                                     sharding=prefetch)
        assert summary.median_step_s == pytest.approx(step)
    # from flash (no page-cache rates) the second load hides behind the first op on all 4 cores
    summary, _ = sim.run_program(prog, toy_device(), steps=3, progress=False, threads=4, sharding=prefetch)
    assert summary.median_step_s == pytest.approx(100e-6 + shard / 1e9 + 2 * 4e10 / 40e9)


def test_energy_counts_cores_idle_dram_and_storage():
    shard = 100 * 10**6
    lru = policies.LRU(budget_mb=500)
    prog = program([op("use", flops=4e10, bytes_moved=2e9, shard="w")], shards={"w": shard}, sharding=lru)
    summary, _ = run(prog, threads=4, sharding=lru)
    load_s = 100e-6 + shard / 1e9
    expected = (1.0 * (1.0 + load_s)   # idle floor over the whole step
                + 4 * 1.0 * 1.0        # four cores at the top step for the 1 s op
                + 2e9 * 40e-12         # DRAM traffic
                + shard * 1e-9)        # storage traffic
    assert summary.energy_j == pytest.approx(expected, rel=1e-9)


# -------------------------------------------------------------------------- memory

def test_peak_of_a_known_allocation_sequence():
    static = 100 * MB + 50 * MB + 200 * MB  # params + grads + optimizer state
    # kept buffers: resident from their first write to the step's end (the arena keeps their
    # pages), so a free releases nothing and writing `w` again adds nothing
    ops = [op("a", flops=1e9, alloc=30 * MB),                                         # 30
           op("b", flops=1e9, alloc={"b": 40 * MB, "w": 25 * MB}, free=["w"]),        # 95
           op("c", flops=1e9, alloc=10 * MB, free=["a", "b"]),                        # 105
           op("d", flops=1e9, alloc={"d": 55 * MB, "w": 25 * MB}, free=["c", "d", "w"])]  # 160, then 0
    prog = program(ops, param_bytes=100 * MB, grad_bytes=50 * MB, optimizer_bytes=200 * MB)
    summary, events = run(prog, steps=2)
    assert summary.peak_memory_bytes == static + 160 * MB
    memory = [e["rss"] for e in events if e["type"] == "sample"]
    assert max(memory) == static + 160 * MB and memory[-1] == static  # everything freed at the end
    # recomputed buffers (checkpointing) come and go as the ops say
    recomputed = dataclasses.replace(prog, buffers=tuple(
        dataclasses.replace(b, lifetime="recomputed") if b.lifetime == "kept" else b for b in prog.buffers))
    summary, _ = run(recomputed, steps=2)
    assert summary.peak_memory_bytes == static + 95 * MB


def test_an_allocation_past_the_limit_kills_the_run_at_that_moment():
    device = toy_device(**{"ram.app_limit_mb": q(1000)})
    ops = [op(f"fill{i}", flops=4e10, alloc=300 * MB) for i in range(5)]  # 300, 600, 900, 1200: dies at fill3
    summary, events = run(program(ops), device, threads=4, steps=5)
    assert summary.killed and summary.steps == 0
    assert "fill3" in summary.kill_reason and "low-memory" in summary.kill_reason
    assert summary.wall_s == pytest.approx(3.0)  # three 1-second ops ran before it
    assert summary.energy_j == pytest.approx(15.0)
    assert summary.peak_memory_bytes == 1200 * MB


def test_weights_alone_over_the_limit_kill_the_run_before_it_starts():
    device = toy_device(**{"ram.app_limit_mb": q(1000)})
    summary, _ = run(program([op("fill", flops=4e10, shard="w")], {"w": 1500 * MB}), device, threads=4, steps=3)
    assert summary.killed and summary.steps == 0
    assert summary.wall_s == 0 and summary.energy_j == 0
    assert summary.peak_memory_bytes == 1500 * MB


# ------------------------------------------------------------------- fast-forward

def test_fast_forward_is_identical_to_stepping_through():
    from mfbench.spec.profile import load_device
    blocks = 6
    ops = [op(f"f{i}", flops=2e10, bytes_moved=1e8, shard=f"s{i}", alloc=20 * MB) for i in range(blocks)]
    ops += [op(f"b{i}", flops=4e10, bytes_moved=2e8, shard=f"s{i}", free=[f"f{i}"], phase="backward")
            for i in reversed(range(blocks))]
    ops += [op(f"u{i}", bytes_moved=1e8, shard=f"s{i}", phase="update", kind="update") for i in range(blocks)]
    prefetch = policies.Prefetch(budget_mb=160, ahead=2)
    prog = program(ops, shards={f"s{i}": 50 * MB for i in range(blocks)}, grad_bytes=300 * MB, sharding=prefetch)
    device = load_device("pixel8")  # leakage, the RC network, the governor, CC/CV, memory pressure

    def once(fast_forward, **options):
        return run(prog, device, steps=300, fast_forward=fast_forward, trace_ops_steps=2,
                   sharding=prefetch, scheduling=policies.PaperRule(), **options)

    for options in ({"threads": 4, "battery_start_pct": 30, "ambient_c": 33.0},
                    {"cluster": "mid+little", "threads": 8, "balance": "dynamic", "charging": True,
                     "battery_start_pct": 60, "ambient_c": 35.0}):
        fast, fast_trace = once(True, **options)
        slow, slow_trace = once(False, **options)
        assert fast == slow
        assert fast_trace == slow_trace
        assert len({e["frequency"] for e in fast_trace if e["type"] == "sample"}) > 2  # the governor acted
        assert any(e["choice"] == {"sleep_s": 2.0} for e in fast_trace if e["type"] == "decision")
        assert fast.steps == 300 and fast.details["max_severity"] >= 2


# ---------------------------------------------------------------- end to end (compiled)

ROOT = Path(__file__).resolve().parent.parent
GPT2_LORA = ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml"


def test_peak_activations_fall_with_the_micro_batch_size():
    from mfbench.plan import compile_workload
    from mfbench.spec.workload import load_workload
    workload = load_workload(GPT2_LORA).model_copy(update={"batch": 8})
    peaks = []
    for micro_batch in (8, 4, 2, 1):
        prog = compile_workload(workload.model_copy(update={"micro_batch": micro_batch}), base_dir=GPT2_LORA.parent)
        summary, _ = run(prog, toy_device(**{"ram.app_limit_mb": q(1e6)}), steps=1)
        peaks.append(summary.peak_memory_bytes - prog.static_bytes)
        assert prog.tokens_per_step == 8 * workload.seq_len
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > 2 * peaks[-1]


def test_max_fit_chooses_the_micro_batch_that_fits():
    from mfbench.spec.workload import load_workload
    workload = load_workload(GPT2_LORA).model_copy(update={"batch": 8})
    roomy = toy_device(**{"ram.app_limit_mb": q(1e6)})

    def peak(**change):
        summary, _ = sim.simulate(workload.model_copy(update=change), roomy, steps=1, progress=False,
                                  base_dir=GPT2_LORA.parent)
        return summary.peak_memory_bytes

    peaks = {m: peak(micro_batch=m) for m in (2, 4)}
    budget_mb = (peaks[2] + peaks[4]) / 2 / MB  # 2 fits, 4 does not
    assert peak(micro_batch=8, accumulation=PolicySpec(policy="max_fit", budget_mb=budget_mb)) == peaks[2]


def test_simulate_cli_writes_trace_summary_and_chrome(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "mfbench.cli", "simulate", str(GPT2_LORA), "--device", "pixel8",
                             "--steps", "20", "--battery-start", "50", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "J/token" in result.stdout and "peak memory" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["battery_start_pct"] == 50 and summary["source"] == "predicted"
    made = summary["provenance"]  # what produced it, as resolved
    assert made["command"].startswith("mfbench simulate") and made["device"]["name"] == "pixel8"
    assert made["device"]["ram"]["app_limit_mb"]["value"] > 0 and made["workload"]["threads"] >= 1
    assert made["mfbench_version"] and made["ambient_c"] is not None and made["charging"] is False
    assert len((out / "trace.jsonl").read_text().splitlines()) > 20
    assert json.loads((out / "trace.chrome.json").read_text())["traceEvents"]

    bad = subprocess.run([sys.executable, "-m", "mfbench.cli", "simulate", str(GPT2_LORA), "--device", "pixel99"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unknown device" in bad.stderr and "Traceback" not in bad.stderr


def test_fast_forward_is_identical_on_a_compiled_sharded_full_ft_run():
    from mfbench.spec.workload import load_workload
    workload = load_workload(ROOT / "workloads" / "paper" / "gpt2-full-seq128.yaml")
    workload = workload.model_copy(update={
        "memory": workload.memory.model_copy(update={"sharding": PolicySpec(policy="prefetch", budget_mb=300, ahead=2)}),
        "scheduling": PolicySpec(policy="paper")})

    def once(fast_forward):
        return sim.simulate(workload, "pixel8", steps=40, battery_start_pct=21, ambient_c=41, progress=False,
                            fast_forward=fast_forward, base_dir=ROOT / "workloads" / "paper")

    fast, slow = once(True), once(False)
    assert fast == slow
    assert fast[0].io_write_bytes > 0 and fast[0].steps == 40  # updated shards were written back


def test_max_fit_prices_a_sharded_micro_batch_with_only_the_budget_resident():
    from mfbench.plan import compile_program, compile_workload
    from mfbench.spec.workload import load_workload
    base = ROOT / "workloads" / "paper"
    workload = load_workload(base / "gpt2-full-seq128.yaml").model_copy(update={"threads": 4})
    shard_budget = 200 * MB
    eight = compile_workload(workload.model_copy(update={"micro_batch": 8}), base, threads=4)
    unsharded = eight.peak_bytes()
    sharded = unsharded - sum(eight.shards.values()) + shard_budget  # parameters over the budget stay on flash
    budget_mb = (sharded + unsharded) / 2 / MB

    def with_policies(sharding):
        return workload.model_copy(update={
            "accumulation": PolicySpec(policy="max_fit", budget_mb=budget_mb),
            "memory": workload.memory.model_copy(update={"sharding": sharding})})

    assert compile_program(with_policies(PolicySpec(policy="lru", budget_mb=200)), base, threads=4).micro_batch == 8
    assert compile_program(with_policies(PolicySpec()), base, threads=4).micro_batch < 8
    # the chosen program, run with its 200 MB of shards, peaks within the price it was chosen at
    summary, _ = sim.simulate(with_policies(PolicySpec(policy="lru", budget_mb=200)),
                              toy_device(**{"ram.app_limit_mb": q(1e6)}), steps=2, progress=False, base_dir=base)
    assert summary.provenance["workload"]["micro_batch"] == 8
    assert sharded - shard_budget < summary.peak_memory_bytes <= sharded


# ------------------------------------------------------------------ the default cluster

def cluster(name, cores, gflops):
    return {"name": name, "cores": cores, "freqs_mhz": q([1000, 2000]), "power_w_per_core": q([0.5, 1.0]),
            "gemm_gflops_per_core": q(gflops), "skinny_gemm_gflops_per_core": q(gflops / 2)}


def test_auto_runs_all_cores_of_the_cluster_with_the_most_throughput(capsys):
    phone = toy_device(clusters=[cluster("prime", 1, 30), cluster("big", 4, 10)])  # 1 x 30 < 4 x 10 GFLOP/s
    assert sim.start_cluster(phone, "auto") == ("big", 4)
    assert sim.start_cluster(phone, 4) == ("big", 4)
    assert sim.start_cluster(phone, 1) == ("prime", 1)
    assert capsys.readouterr().err == ""


def test_more_threads_than_the_chosen_cluster_has_cores_warns_and_runs_its_cores(capsys):
    phone = toy_device(clusters=[cluster("prime", 1, 30), cluster("big", 4, 10)])  # 2 threads: 1 x 30 > 2 x 10
    assert sim.start_cluster(phone, 2) == ("prime", 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mfbench: warning: threads: 2") and "prime" in err
    summary, _ = run(program([op("gemm", flops=3e10)]), phone, threads=2)
    assert (summary.details["cluster"], summary.details["threads"]) == ("prime", 1) and summary.median_step_s == pytest.approx(1.0)


@pytest.mark.parametrize("listed", [("fast", "wide"), ("wide", "fast")])
def test_a_throughput_tie_goes_to_the_faster_core_then_to_the_first_listed(listed):
    clusters = {"fast": cluster("fast", 2, 20), "wide": cluster("wide", 4, 10)}  # 40 GFLOP/s each
    assert sim.start_cluster(toy_device(clusters=[clusters[n] for n in listed]), "auto") == ("fast", 2)
    twins = toy_device(clusters=[cluster(listed[0], 4, 10), cluster(listed[1], 4, 10)])
    assert sim.start_cluster(twins, "auto") == (listed[0], 4)
