"""`mfbench calibrate`: microbenchmarks on a target, fitted into a device profile.

The benchmark binary (`mfbench-bench`, kernels_native/src/bench_main.cpp) times the trainer's
own kernels: GEMM at the shapes the step programs of the calibration workloads call (and a
small generic grid), attention forward and backward, the memory-bound kernels, storage through
fsync'd file writes and cold reads, and what memory the runtime holds. The fit (scipy):

- GEMM: one call of M x K by K x N takes  call + 2 M N K / peak + 4 (M K + K N + M N) / bw,
  and p threads run a split call 1 + e (p - 1) times faster: (peak, bw, call, e) by least
  squares on the log of predicted over measured time, over every shape and thread count;
- attention: with the GEMM model fixed, the time per causal score beyond the GEMMs
  (standard and memory-efficient, forward and backward; linear least squares);
- memory-bound classes: bytes (as the plan counts them) over median time, on all cores;
- storage: bytes over seconds of the write (with fsync) and of the cold read; a 4 KiB read's
  median latency; the file, cached, mapped and unmapped as the trainer loads and evicts a shard;
- runtime overhead: the trainer itself, started on a tiny model for two steps: its peak RSS
  minus its planned peak (the engine and its libraries, thread stacks, the token file, the
  BLAS's packing buffers at small shapes).

Every fitted field is marked `measured: "mfbench calibrate VERSION, DATE, target T: ..."`;
everything else keeps the base profile's value and provenance (docs/validation.md).
"""
from __future__ import annotations

import datetime
import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from mfbench.errors import InputError
from mfbench.units import MB

VALIDATION_DIR = Path(__file__).resolve().parents[1] / "workloads" / "validation"
# a small generic grid beside the programs' own shapes: squares, and skinny products both ways
GRID = [(64, 64, 64), (256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048), (2048, 8, 2048), (2048, 2048, 8),
        (8, 2048, 2048), (512, 4096, 128)]
MAX_GEMM_SHAPES = 48       # distinct matmul shapes timed cold (the largest-work ones of the programs)
MAX_CACHED_SHAPES = 16     # and attention inner-product shapes timed cached; then the grid both ways
UPDATE_MAX = 1 << 24       # values in the optimizer and zeroing benchmarks (64 MB a tensor at most)


# ----------------------------------------------------------------------- what to time

def programs(workloads: list[str | Path], threads: int):
    """The step programs of the calibration workloads, as the trainer would run them here."""
    from mfbench.plan import compile_program
    from mfbench.spec.workload import load_workload
    out = []
    for w in workloads:
        workload = load_workload(w)
        out.append(compile_program(workload, base_dir=Path(w).resolve().parent, threads=threads))
    return out


POWER = {"settle_s": 1.0, "window_s": 3.0, "idle_s": 5.0, "sample_s": 0.1}  # a phase: settle, then the window


def bench_spec(progs, min_time_s: float, storage_dir: str, storage_bytes: int, heat_s: float = 300) -> dict:
    """The benchmark spec (mfbench-bench's input) for these programs."""
    from mfbench.sim import cost

    gemms: dict[tuple[int, int, int, int], float] = defaultdict(float)  # (M, N, K, cold): FLOPs a step
    attention = set()
    memory = {"rows": 256, "width": 256, "wide": 1024, "vocab": 4096, "ce_rows": 256, "update": 1 << 20}
    for p in progs:
        n = p.micro_batch * p.seq_len
        for op in p.ops:
            backward = op.phase == "backward"
            for k in op.kernels:
                if k.cls == "matmul":
                    chunk = p.ce_chunk_rows if k.name == "lm_head" else None
                    for shape in cost.matmul_calls(k, backward, chunk):
                        gemms[(*shape, 1)] += 2.0 * math.prod(shape)
                    if k.name == "lm_head":
                        memory["vocab"] = max(memory["vocab"], k.shape[2])
                        memory["ce_rows"] = max(memory["ce_rows"], p.ce_chunk_rows)
                elif k.cls == "attention" and k.shape:
                    attention.add(tuple(k.shape))
                elif k.cls in ("layernorm", "rmsnorm") and op.layer is not None and k.shape[0] % n == 0:
                    if k.shape[0] // n > memory["width"] or n > memory["rows"]:
                        memory["rows"], memory["width"] = max(n, memory["rows"]), max(k.shape[0] // n, memory["width"])
                elif k.cls in ("gelu", "swiglu", "geglu") and k.shape[0] % n == 0:
                    memory["wide"] = max(memory["wide"], k.shape[0] // n)
                elif k.cls == "update":
                    memory["update"] = min(UPDATE_MAX, max(memory["update"], k.shape[0]))
    for me in (0, 1):  # both kinds of attention are fitted, used by these programs or not
        if not any(a[5] == me for a in attention):
            attention.add((1, 128, 4, 2, 64, me))
    for B, T, H, KV, hd, me in list(attention):  # their inner products are GEMMs too, on cached operands
        inner = [(T, T, hd), (T, hd, T)] if not me else [(min(64, T), min(64, T), hd), (min(64, T), hd, min(64, T))]
        for s in inner:
            gemms[(*s, 0)] += 2.0 * math.prod(s) * B * H
    # a matmul's operands out of the caches (cold): in a step its weight was last used a step
    # before; timed hot, in repeated calls, the validation set's small shapes ran 5-30 % faster
    ranked = [s for s, _ in sorted(gemms.items(), key=lambda kv: -kv[1])]
    shapes = [s for s in ranked if s[3]][:MAX_GEMM_SHAPES] + [s for s in ranked if not s[3]][:MAX_CACHED_SHAPES]
    shapes += [(*s, cold) for s in GRID for cold in (1, 0) if (*s, cold) not in shapes]
    spec = {"min_time_s": min_time_s, "quiet": True,
            "gemm": [[0, 0, *s] for s in shapes],
            "attention": [list(a) for a in sorted(attention)],
            "memory": memory,
            "storage": {"dir": storage_dir, "bytes": storage_bytes},
            "power": POWER}
    if heat_s > 0:
        spec["heat"] = {"heat_s": heat_s, "cool_s": heat_s, "sample_s": 0.5}
    return spec


# --------------------------------------------------------------------------- running

def check_target(target: str):
    """The runner of `target` (its tools and phone checked now). qemu-arm64 is refused: an
    emulator's timings say nothing of the hardware."""
    from mfbench.device import runners
    runner = runners.get(target)
    if isinstance(runner, runners.Qemu):
        raise InputError(None, "--target", "qemu-arm64 runs the arm64 build for correctness, not timing: calibrate "
                         "on local or adb[:SERIAL]")
    return runner


def run_bench(spec: dict, runner) -> dict:
    """Run mfbench-bench with `spec` on the runner's target (its spec and result go through
    the runner's work folder there); its JSON result."""
    from mfbench.device.native import BENCH_NAME, TrainerError
    with tempfile.TemporaryDirectory(prefix="mfbench-calibrate-") as tmp:
        there = runner.workdir(Path(tmp))
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        runner.put(spec_path, f"{there}/spec.json")
        r = subprocess.run(runner.command([f"{there}/spec.json", "--out", f"{there}/result.json"], name=BENCH_NAME),
                           capture_output=True, text=True)
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines()
            raise TrainerError(lines[-1] if lines else f"{BENCH_NAME} exited with {r.returncode}", r.returncode, r.stderr)
        runner.get(f"{there}/result.json", out_path)
        return json.loads(out_path.read_text())


# the trainer's startup: a tiny GPT-2 trained for two steps (runtime overhead)
STARTUP_MODEL = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 128}


def trainer_startup(target: str, threads: int) -> dict:
    """Run the trainer on `target` on a tiny model; its peak RSS and planned peak (bytes)."""
    import yaml

    from mfbench.device import run
    with tempfile.TemporaryDirectory(prefix="mfbench-calibrate-") as tmp:
        (Path(tmp) / "tiny.json").write_text(json.dumps(STARTUP_MODEL))
        path = Path(tmp) / "startup.yaml"
        path.write_text(yaml.safe_dump({"name": "calibrate-startup", "model": "tiny.json", "method": {"kind": "full"},
                                        "data": {"source": "pydoc"}, "seq_len": 64, "batch": 2, "steps": 2,
                                        "threads": threads}))
        summary, _ = run.run(path, target=target, out=Path(tmp) / "out", checkpoint_every=0, command="mfbench calibrate")
        return {"peak_rss_bytes": summary.peak_memory_bytes, "planned_peak_bytes": summary.details["plan"]["peak_bytes"]}


TIMINGS = ("seconds", "forward_s", "backward_s")  # the timed fields of a benchmark entry; the rest name it


def median_of_rounds(results: list[dict]) -> dict:
    """One result from several rounds of the same benchmarks: each timing the median of its
    rounds (entries matched by everything but their timings; storage field by field)."""
    merged = json.loads(json.dumps(results[0]))
    for ci, cluster in enumerate(merged["clusters"]):
        for key in ("gemm", "attention", "memory"):
            for entry in cluster[key]:
                name = {k: v for k, v in entry.items() if k not in TIMINGS}
                same = [e for r in results for e in r["clusters"][ci][key]
                        if {k: v for k, v in e.items() if k not in TIMINGS} == name]
                for t in TIMINGS:
                    if t in entry:
                        entry[t] = statistics.median(e[t] for e in same)
    if merged.get("storage"):
        for k in merged["storage"]:
            if k.endswith("_s"):
                merged["storage"][k] = statistics.median(r["storage"][k] for r in results)
    return merged


# A short training step timed as a probe of the machine's speed, by calibrate and before each
# of validate's runs: a shared host can slow the trainer while a lone GEMM keeps its pace
REFERENCE = VALIDATION_DIR / "gpt2-lora-b8-s64.yaml"
REFERENCE_STEPS = 6


def reference_step_seconds(target: str) -> float:
    """The trainer's median step on REFERENCE now (the first, warm-up step left out)."""
    from mfbench.contracts.trace import read_trace
    from mfbench.device import run
    with tempfile.TemporaryDirectory(prefix="mfbench-reference-") as tmp:
        run.run(REFERENCE, target=target, steps=REFERENCE_STEPS, out=Path(tmp) / "out", checkpoint_every=0,
                command="mfbench reference step")
        steps = [e["duration"] for e in read_trace(Path(tmp) / "out" / "trace.jsonl") if e["type"] == "step"]
    return statistics.median(steps[1:])


def measure(spec: dict, runner, progress: bool = True, threads: int = 1, rounds: int = 1) -> dict:
    """Run the benchmark spec in parts, `rounds` times over (every part once a round, so that
    a few seconds of a slower machine fall on one round of many timings, not on all of one),
    each timing the median of its rounds; a progress bar over them; and start the trainer once
    for its runtime overhead."""
    from tqdm import tqdm

    common = {k: v for k, v in spec.items() if k not in ("gemm", "attention", "memory", "storage", "power", "heat")}
    parts = [{**common, "gemm": spec["gemm"][i:i + 8]} for i in range(0, len(spec["gemm"]), 8)]
    parts += [{**common, "attention": [a]} for a in spec["attention"]]
    parts += [{**common, "memory": spec["memory"], "storage": spec["storage"]}]
    results: list[dict] = []
    once = [k for k in ("power", "heat") if k in spec]  # minutes each where a battery reports its current
    with tqdm(total=rounds * len(parts) + 1 + len(once), desc="calibrating", unit="benchmark", file=sys.stderr,
              disable=not progress) as bar:
        for _ in range(rounds):
            merged: dict = {}
            for part in parts:
                result = run_bench(part, runner)
                bar.update()
                if not merged:
                    merged = result
                    continue
                for mine, theirs in zip(merged["clusters"], result["clusters"]):
                    for key in ("gemm", "attention", "memory"):
                        mine[key] += theirs[key]
                merged["storage"] = merged["storage"] or result["storage"]
            results.append(merged)
        out = median_of_rounds(results)
        out["rounds"] = rounds
        for key in once:
            bar.set_postfix_str(f"{key} (minutes, where a battery reports its current)")
            out[key] = run_bench({**common, key: spec[key]}, runner)[key]
            bar.update()
        bar.set_postfix_str("")
        out["startup"] = trainer_startup(runner.target, threads)
        out["reference_step_s"] = reference_step_seconds(runner.target)
        bar.update()
    return out


# ------------------------------------------------------------------------------- fit

GEMM_PARAMS = ("gemm_gflops_per_core", "gemm_bandwidth_gbs", "gemm_cached_bandwidth_gbs", "gemm_call_us",
               "thread_efficiency", "gemm_size_exponent")


def kernels_of(values: dict):
    """A profile Kernels block from plain numbers (placeholder provenance for fitting)."""
    from mfbench.spec.profile import Kernels
    fields = Kernels.model_fields
    return Kernels.model_validate({k: {"value": values.get(k, 1.0), "measured": "fit"} for k in fields})


def gemm_model(params, samples) -> np.ndarray:
    """Predicted seconds of each (M, N, K, threads, cold) sample under (peak GFLOP/s of a 1
    GFLOP product, bandwidth from memory and from the caches in GB/s, call us, e, size exponent)."""
    from mfbench.sim import cost
    peak, bw, cached, call, e, g = params
    k = kernels_of({"gemm_bandwidth_gbs": bw, "gemm_cached_bandwidth_gbs": cached, "gemm_call_us": call,
                    "thread_efficiency": e, "gemm_size_exponent": g})
    return np.array([cost.gemm_seconds(M, N, K, k, peak * 1e9, p, cached=not cold) for M, N, K, p, cold in samples])


def fit_gemm(samples: list[tuple[int, int, int, int, bool]], seconds: list[float]) -> tuple[dict, np.ndarray]:
    """GEMM_PARAMS and the relative error of each sample, from timed GEMM calls (M, N, K,
    threads, cold: operands out of the caches); cold and cached calls share all but the
    bandwidth."""
    from scipy.optimize import least_squares
    t = np.array(seconds)

    def params_of(x):  # the caches' bandwidth as a factor >= 1 of memory's
        peak, bw, faster, call, e, g = x
        return peak, bw, bw * faster, call, e, g

    def residual(x):
        return np.log(gemm_model(params_of(x), samples) / t)
    best_flops = max(2.0 * M * N * K / s for (M, N, K, p, _), s in zip(samples, t) if p == 1) / 1e9 if any(
        p == 1 for _, _, _, p, _ in samples) else 10.0
    x0 = [best_flops, 20.0, 2.0, 1.0, 0.9, 0.01]
    # soft L1: a timing disturbed by another process pulls the fit less than squared error would
    fit = least_squares(residual, x0, bounds=([0.1, 0.01, 1.0, 0.0, 1e-3, 0.0], [1e5, 1e4, 1e3, 1e4, 1.0, 0.2]),
                        x_scale="jac", loss="soft_l1", f_scale=0.05)
    params = dict(zip(GEMM_PARAMS, map(float, params_of(fit.x))))
    return params, np.exp(fit.fun) - 1


ATTENTION_PARAMS = {(0, False): "attention_ns", (0, True): "attention_backward_ns",
                    (1, False): "attention_me_ns", (1, True): "attention_me_backward_ns"}


def fit_attention(samples: list[dict], gemm: dict) -> tuple[dict, dict]:
    """Seconds per causal score beyond the GEMMs, per variant: linear least squares in
    relative error. Returns (ns per variant, relative errors per variant)."""
    from mfbench.sim import cost
    out, errors = {}, {}
    for (me, backward), name in ATTENTION_PARAMS.items():
        rows = [s for s in samples if s["shape"][5] == me]
        if not rows:
            continue
        g, x, m = [], [], []
        for s in rows:
            at = {**gemm, name: 1e-9}  # a negligible score time: the GEMM part alone
            base = cost.attention_seconds(s["shape"], backward, kernels_of(at), gemm["gemm_gflops_per_core"] * 1e9, s["threads"])
            one = cost.attention_seconds(s["shape"], backward, kernels_of({**gemm, name: 1.0}),
                                         gemm["gemm_gflops_per_core"] * 1e9, s["threads"])
            g.append(base), x.append(one - base), m.append(s["backward_s" if backward else "forward_s"])
        g, x, m = map(np.array, (g, x, m))
        ns = float(np.sum(x / m * (1 - g / m)) / np.sum((x / m) ** 2))
        out[name] = max(ns, 1e-3)
        errors[name] = (g + out[name] * x) / m - 1
    return out, errors


# bytes (as the plan counts them) of each benchmarked kernel, per element of its main tensor
def _bytes_per_element(kernel: str) -> float:
    from mfbench.spec.models import ELEMENTWISE, FLOAT
    per = {"layernorm_forward": ("layernorm", 2), "layernorm_backward": ("layernorm", 3),
           "rmsnorm_forward": ("rmsnorm", 2), "rmsnorm_backward": ("rmsnorm", 3), "gelu_forward": ("gelu", 2),
           "swiglu_forward": ("gated", 2), "swiglu_backward": ("gated", 3), "geglu_forward": ("gated", 2),
           "geglu_backward": ("gated", 3), "lora_dropout_forward": ("lora_dropout", 2),
           "lora_dropout_backward": ("lora_dropout", 3)}
    if kernel in per:
        kind, column = per[kernel]
        return FLOAT * ELEMENTWISE[kind][column]
    if kernel == "cross_entropy":  # forward and backward in one call
        return FLOAT * (ELEMENTWISE["cross_entropy"][2] + ELEMENTWISE["cross_entropy"][3])
    # AdamW: parameter, gradient, m and v read and written (mfbench.plan.compile._update_ops)
    return {"adamw": 8 * FLOAT, "grad_norm": FLOAT, "zero_grads": FLOAT, "triad": 3 * FLOAT}[kernel]


MEMORY_FIELDS = {"layernorm_forward": "layernorm_gbs", "layernorm_backward": "layernorm_backward_gbs",
                 "rmsnorm_forward": "rmsnorm_gbs", "rmsnorm_backward": "rmsnorm_backward_gbs",
                 "gelu_forward": "gelu_gbs", "swiglu_forward": "swiglu_gbs",
                 "swiglu_backward": "swiglu_backward_gbs", "geglu_forward": "geglu_gbs", "geglu_backward": "geglu_backward_gbs",
                 "cross_entropy": "softmax_gbs", "adamw": "update_gbs", "grad_norm": "grad_norm_gbs",
                 "zero_grads": "zero_gbs", "lora_dropout_forward": "lora_dropout_gbs",
                 "lora_dropout_backward": "lora_dropout_backward_gbs", "triad": "bandwidth_gbs"}


def memory_rates(samples: list[dict], cores: int) -> dict:
    """GB/s of each memory-bound class on all `cores` (bytes as the plan counts them)."""
    out = {}
    for s in samples:
        if s["threads"] == cores and s["kernel"] in MEMORY_FIELDS:
            out[MEMORY_FIELDS[s["kernel"]]] = s["elements"] * _bytes_per_element(s["kernel"]) / s["seconds"] / 1e9
    return out


# ------------------------------------------------------------------- power and heat

def battery_w(sample: dict) -> float | None:
    """A `sample` event's battery power (voltage x current); None without both sensors."""
    v, i = sample["voltage"], sample["current"]
    return None if v is None or i is None else v * i


def phase_medians(power: dict) -> list[dict]:
    """The power benchmark's phases (mfbench-bench's `power.phases`), each with the medians of
    its samples: `power_w` (battery voltage x current), `mhz` per cluster name, and whether the
    battery was charging in any of them."""
    out = []
    for p in power["phases"]:
        inside = [s for s in power["samples"] if p["t0"] <= s["t"] <= p["t1"]]
        watts = [w for w in map(battery_w, inside) if w is not None]
        mhz = defaultdict(list)
        for s in inside:
            for name, f in (s.get("frequencies") or {}).items():
                if f is not None:
                    mhz[name].append(f)
        temps = [s["temperature"] for s in inside if s.get("temperature") is not None]
        out.append({**p, "samples": len(watts), "power_w": statistics.median(watts) if watts else None,
                    "mhz": {k: statistics.median(v) for k, v in mhz.items()},
                    "temperature_c": statistics.median(temps) if temps else None,
                    "charging": any(s.get("charging") for s in inside)})
    return out


def fit_power(phases: list[dict], clusters: list[dict], found: list[dict], base_power: dict, stamp: str
              ) -> tuple[dict, list[dict], list[tuple[str, str]]]:
    """Idle power, and per cluster its static power and a busy core's power at each frequency
    step, from the load phases: a phase of n busy cores at step j draws
    P = idle + uncore + static + n (dyn_j + leakage_j), the simulator's power model
    (mfbench/sim/power.py), with uncore and leakage taken from the base profile (these runs do
    not tell them apart from static and dyn; leakage at the phase's sampled temperature, the
    battery's or the hottest zone's). Least squares over n and j per cluster; static is kept
    when a cluster has one core. Returns (power fields, cluster fields per cluster, report)."""
    idle = next((p for p in phases if p["what"] == "idle" and p["power_w"] is not None), None)
    if idle is None:
        raise InputError(None, "power", "the power benchmark's idle phase has no sample with current and voltage")
    idle_w = idle["power_w"]
    uncore = base_power["uncore_w"]["value"] if base_power.get("uncore_w") else 0.0
    power = {"idle_w": _measured(idle_w, f"battery voltage x current, median over the idle phase "
                                 f"({idle['t1'] - idle['t0']:.0f} s)", stamp)}
    report = [("power.idle_w", f"{idle_w:.3f} W")]
    fields = []
    for ci, (c, f) in enumerate(zip(clusters, found)):
        load = [p for p in phases if p["what"] == "load" and p["cluster"] == ci and p["power_w"] is not None]
        base_f = _values(c["freqs_mhz"])
        if f["frequency_control"]:
            steps = list(f["available_mhz"])
        else:  # the governor's pick, as sampled (the top step without cpufreq)
            steps = sorted({round(p["mhz"].get(f["name"], base_f[-1])) for p in load})
        step_of = [steps.index(p["set_mhz"] if p["set_mhz"] is not None else round(p["mhz"].get(f["name"], base_f[-1])))
                   for p in load]
        volts = _values(c["volts"]) if c.get("volts") else None
        v_ratio = np.interp(steps, base_f, np.array(volts) / volts[-1]) if volts else np.ones(len(steps))
        leak = c["leakage_w_per_core"]["value"] if c.get("leakage_w_per_core") else 0.0
        k = base_power["leakage_per_c"]["value"] if base_power.get("leakage_per_c") else 0.0
        ref = base_power["leakage_ref_c"]["value"] if base_power.get("leakage_ref_c") else 25.0
        n = np.array([p["threads"] for p in load], dtype=float)
        y = np.array([p["power_w"] - idle_w - uncore - p["threads"] * leak * v_ratio[j] * math.exp(
            k * ((p.get("temperature_c") or ref) - ref)) for p, j in zip(load, step_of)])
        fit_static = n.max() >= 2
        a = np.zeros((len(load), len(steps) + fit_static))
        for row, j in enumerate(step_of):
            a[row, j] = n[row]
        static = c["static_w"]["value"] if c.get("static_w") else 0.0
        if fit_static:
            a[:, -1] = 1.0
        else:  # the base's static power, taken off
            y = y - static
        x, *_ = np.linalg.lstsq(a, y, rcond=None)
        dyn = x[:len(steps)]
        err = a @ x - y
        what = (f"battery power on {f['name']}, 1 to {int(n.max())} cores busy, {len(load)} phases "
                f"(rms {np.sqrt(np.mean(err ** 2)):.3f} W)")
        out = {}
        if fit_static:
            static = float(x[-1])
            out["static_w"] = _measured(max(0.0, static), what + ": the intercept", stamp)
        if f["frequency_control"]:
            out["freqs_mhz"] = _measured([round(s) for s in steps], "the target's cpufreq table "
                                         "(scaling_available_frequencies)", stamp)
            out["power_w_per_core"] = _measured([round(float(d), 4) for d in dyn], what + ", every step set", stamp)
            if volts and steps != base_f:
                out["volts"] = {"value": [round(float(v * volts[-1]), 4) for v in v_ratio],
                                "estimated": "the base profile's volts, interpolated at the measured steps"}
        else:  # the base's shape over the steps, scaled to what the governor's steps drew
            scale = float(np.median(dyn / np.interp(steps, base_f, _values(c["power_w_per_core"]))))
            out["power_w_per_core"] = _measured([round(v * scale, 4) for v in _values(c["power_w_per_core"])],
                                                what + f" at {', '.join(map(str, steps))} MHz (the governor's; cpufreq "
                                                "not writable): the base profile's curve scaled by "
                                                f"{scale:.3f}", stamp)
        fields.append(out)
        report.append((f"clusters[{c['name']}] power", f"static {static:.3f} W, a busy core "
                       + ", ".join(f"{d:.3f} W at {s:g} MHz" for s, d in zip(steps, dyn))))
    return power, fields, report


def _values(q: dict) -> list[float]:
    v = q["value"]
    return [float(x) for x in v] if isinstance(v, list) else [float(v)]


# the thermal zones that show each node of the network: words in the zone's type (lower case)
NODE_ZONES = {"board": ("skin",), "junction": ("cpu", "soc", "tsens", "big", "little", "mid"), "battery": ("battery",)}


def thermal_series(heat: dict, points: int = 2000) -> dict:
    """From the heat benchmark's samples (about `points` of them, evenly): t, battery power, and
    the temperature of each node of the thermal network a sensor shows: the board by a zone
    whose type names the skin, the junction by the hottest CPU or SoC zone, the battery by its
    zone."""
    t, watts, temps = [], [], defaultdict(list)
    every_s = (heat["samples"][-1]["t"] - heat["samples"][0]["t"]) / points if heat["samples"] else 0
    for s in heat["samples"]:
        if battery_w(s) is None or (t and s["t"] - t[-1] < every_s):
            continue
        zones = [(z["type"].lower(), z["c"]) for z in (s.get("zones") or [])]
        t.append(s["t"])
        watts.append(battery_w(s))
        for node, words in NODE_ZONES.items():
            found = [c for z, c in zones if any(w in z for w in words)]
            temps[node].append(max(found) if found else None)
    series = {node: np.array(v, dtype=float) for node, v in temps.items() if all(x is not None for x in v)}
    return {"t": np.array(t), "power_w": np.array(watts), **series}


def simulate_heat(thermal: dict, series: dict, idle_w: float, start: dict) -> dict:
    """Each node's temperature at the series' times under its measured power (held constant
    from one sample to the next; the SoC's share, above idle, on the junction), starting from
    `start` (°C per node), by the simulator's thermal network."""
    from mfbench.sim.thermal import ThermalNetwork
    from mfbench.spec.profile import Thermal
    net = ThermalNetwork(Thermal.model_validate(thermal))
    net.set_temperatures([start[n] for n in net.nodes])
    out = {n: [start[n]] for n in net.nodes}
    for dt, p in zip(np.diff(series["t"]), series["power_w"][:-1]):
        net.advance(net.response(np.array([dt]), np.array([max(0.0, p - idle_w)]), np.array([min(p, idle_w)])), dt)
        for n, v in zip(net.nodes, net.temperatures):
            out[n].append(v)
    return {n: np.array(v) for n, v in out.items()}


def fit_thermal(series: dict, base_thermal: dict, idle_w: float) -> tuple[dict, dict]:
    """The R and C of every node of the base's thermal network that a sensor shows (the board's
    one is needed), and the ambient, by least squares of the network's temperatures (simulate_heat) against the
    sensors'. Nodes without a sensor keep the base's values and start at the board's first
    reading. Returns ({node: (R, C)}, {"rms_c", "ambient_c"})."""
    from scipy.optimize import least_squares
    nodes = [n for n in ("board", "junction", "battery") if n in series and (n == "board" or base_thermal.get(n))]

    def spec_of(x):
        th = {k: dict(v) for k, v in base_thermal.items() if k in ("resistance_c_per_w", "capacitance_j_per_c", "junction", "battery")}
        th["ambient_c"] = {"value": float(x[-1]), "measured": "fit"}
        for i, n in enumerate(nodes):
            node = th if n == "board" else th.setdefault(n, {})
            node["resistance_c_per_w"] = {"value": float(np.exp(x[2 * i])), "measured": "fit"}
            node["capacitance_j_per_c"] = {"value": float(np.exp(x[2 * i + 1])), "measured": "fit"}
        return th

    start = {n: float(series[n][0]) if n in series else float(series["board"][0]) for n in ("board", "junction", "battery")}

    def residual(x):
        sim = simulate_heat(spec_of(x), series, idle_w, start)
        return np.concatenate([sim[n] - series[n] for n in nodes])

    # a start from the data: the board's rise over the power's, and a time constant of a third
    # of the run (the base's values may be another device's); the other nodes from the base
    t, board, p = series["t"], series["board"], series["power_w"]
    r0 = max(np.ptp(board), 0.1) / max(np.ptp(p), 0.1)
    x0 = [math.log(r0), math.log((t[-1] - t[0]) / 3 / r0)]
    for n in nodes[1:]:
        x0 += [math.log(base_thermal[n]["resistance_c_per_w"]["value"]), math.log(base_thermal[n]["capacitance_j_per_c"]["value"])]
    x0.append(float(np.clip(board.min() - idle_w * r0, -39, 59)))
    lo = [math.log(1e-3)] * (len(x0) - 1) + [-40.0]
    hi = [math.log(1e5)] * (len(x0) - 1) + [60.0]
    r = least_squares(residual, np.array(x0), bounds=(lo, hi), loss="soft_l1", f_scale=0.5)
    return ({n: (float(np.exp(r.x[2 * i])), float(np.exp(r.x[2 * i + 1]))) for i, n in enumerate(nodes)},
            {"rms_c": float(np.sqrt(np.mean(residual(r.x) ** 2))), "ambient_c": float(r.x[-1])})


def fit_power_and_heat(data: dict, clusters: list[dict], power: dict | None, heat: dict | None, stamp: str
                       ) -> list[tuple[str, str]]:
    """Replace the power fields of `data` (and of its `clusters`, in the benchmark's order)
    that the power phases measured, and the thermal network's that the heat trace did; the
    report. A battery charging in either leaves that part as the base had it."""
    report = []
    charging = ("the battery was charging (a cable powers the phone): kept the base profile's values; run "
                "calibrate over adb over Wi-Fi (adb tcpip) with the cable out")
    idle_w = data["power"]["idle_w"]["value"]
    if power:
        phases = phase_medians(power)
        if any(p["charging"] for p in phases):
            report.append(("power", charging))
        else:
            fields, per_cluster, lines = fit_power(phases, clusters, power["clusters"], data["power"], stamp)
            data["power"].update(fields)
            for c, f in zip(clusters, per_cluster):
                c.update(f)
            report += lines
            idle_w = fields["idle_w"]["value"]
    if not heat:
        return report + [("thermal", "no heat-up run: kept the base profile's values")]
    if any(s.get("charging") for s in heat["samples"]):
        return report + [("thermal", charging)]
    series = thermal_series(heat)
    if "board" not in series:
        return report + [("thermal", "no skin sensor (a thermal zone whose type names the skin): kept the base "
                          "profile's values")]
    nodes, fit = fit_thermal(series, data["thermal"], idle_w)
    span = {p["what"]: p["t1"] - p["t0"] for p in heat["phases"]}
    what = (f"heat-up ({span['heat']:.0f} s, every core busy) and cool-down ({span.get('cool', 0):.0f} s) on the "
            f"{', '.join(nodes)} sensors: the thermal network fitted to them (rms {fit['rms_c']:.2f} C)")
    for node, (r, c) in nodes.items():
        where = data["thermal"] if node == "board" else data["thermal"][node]
        where["resistance_c_per_w"] = _measured(r, what, stamp)
        where["capacitance_j_per_c"] = _measured(c, what, stamp)
        report.append((f"thermal {node}", f"R {r:.3g} C/W, C {c:.3g} J/C (tau {r * c:.0f} s)"))
    report.append(("thermal fit", f"rms {fit['rms_c']:.2f} C; ambient during the run {fit['ambient_c']:.1f} C "
                   "(not stored: a property of the room)"))
    return report


# ---------------------------------------------------------------------------- profile

def _measured(value, what: str, stamp: str) -> dict:
    return {"value": round(float(value), 4) if not isinstance(value, list) else value, "measured": f"{stamp}: {what}"}


def fit_profile(base: dict, result: dict, stamp: str) -> tuple[dict, list[tuple[str, str]]]:
    """The base profile's data with every field the result measures replaced. Returns (data,
    a report: (field, how well it fits))."""
    import copy
    data = copy.deepcopy(base)
    report = []
    clusters = sorted(data["clusters"], key=lambda c: max(c["freqs_mhz"]["value"]) if isinstance(
        c["freqs_mhz"]["value"], list) else c["freqs_mhz"]["value"])
    found = result["clusters"]
    if len(found) != len(clusters) or any(len(f["cpus"]) != c["cores"] for f, c in zip(found, clusters)):
        raise InputError(None, "clusters", "the target's CPU clusters (" + ", ".join(f"{f['name']}: {len(f['cpus'])} cores" for f in found)
                         + ") do not match the base profile's (" + ", ".join(f"{c['name']}: {c['cores']}" for c in clusters)
                         + "); expected a base profile (--from) with the same clusters, slowest first by top frequency")
    fastest = None
    for c, f in zip(clusters, found):
        samples = [(*g["shape"][2:5], g["threads"], g.get("cold", False)) for g in f["gemm"]]
        gemm, err = fit_gemm(samples, [g["seconds"] for g in f["gemm"]])
        what = f"fit to {len(samples)} GEMM timings on {f['name']} (median error {np.median(np.abs(err)):.1%})"
        c["gemm_gflops_per_core"] = _measured(gemm["gemm_gflops_per_core"], what, stamp)
        skinny = [(M, N, K, s) for (M, N, K, p, _), s in zip(samples, (g["seconds"] for g in f["gemm"]))
                  if p == 1 and min(M, N, K) <= 16]
        if skinny:
            M, N, K, s = max(skinny, key=lambda x: x[0] * x[1] * x[2])
            c["skinny_gemm_gflops_per_core"] = _measured(2 * M * N * K / s / 1e9, f"GEMM {M}x{N}x{K}, 1 thread, on {f['name']}", stamp)
        attention, aerr = fit_attention(f["attention"], gemm)
        rates = memory_rates(f["memory"], c["cores"])
        stream = rates.pop("bandwidth_gbs", None)
        values = {**gemm, **attention, **rates}
        c["kernels"] = {k: _measured(values[k], _how(k, what, aerr, f["name"], c["cores"]), stamp)
                        for k in kernels_of({}).model_fields if k in values}
        missing = [k for k in kernels_of({}).model_fields if k not in values]
        if missing:
            raise InputError(None, f"clusters[{c['name']}].kernels", f"the benchmark measured no {', '.join(missing)}")
        report.append((f"clusters[{c['name']}] GEMM", f"{gemm['gemm_gflops_per_core']:.1f} GFLOP/s a core, "
                       f"{gemm['gemm_bandwidth_gbs']:.1f} GB/s from memory, "
                       f"{gemm['gemm_cached_bandwidth_gbs']:.1f} from the caches, {gemm['gemm_call_us']:.2f} us a call, "
                       f"thread efficiency {gemm['thread_efficiency']:.2f}, size exponent "
                       f"{gemm['gemm_size_exponent']:.3f}; median |error| {np.median(np.abs(err)):.1%}, "
                       f"max {np.max(np.abs(err)):.1%}"))
        for name, e in aerr.items():
            report.append((f"clusters[{c['name']}] {name}", f"{attention[name]:.2f} ns; median |error| {np.median(np.abs(e)):.1%}"))
        if stream is not None:
            fastest = (stream, f["name"], c["cores"])
    if fastest is not None:
        data["memory"]["bandwidth_gbs"] = _measured(fastest[0], f"streaming triad on {fastest[1]}, {fastest[2]} threads", stamp)
    st = result.get("storage")
    if st:
        size = f"{st['bytes'] / MB:.0f} MB file"
        data["storage"]["seq_write_gbs"] = _measured(st["bytes"] / st["write_s"] / 1e9, f"fwrite + fsync of a {size}", stamp)
        data["storage"]["seq_read_gbs"] = _measured(st["bytes"] / st["read_s"] / 1e9, f"fread of a {size}, pages dropped", stamp)
        data["storage"]["latency_us"] = _measured(st["latency_s"] * 1e6, f"median of {st['reads']} 4 KiB preads, pages dropped", stamp)
        data["storage"]["cached_map_gbs"] = _measured(st["bytes"] / st["map_s"] / 1e9, f"the {size} in the page cache, "
                                                      "mapped as the trainer loads a shard (madvise POPULATE_READ)", stamp)
        data["storage"]["cached_write_gbs"] = _measured(st["bytes"] / st["store_s"] / 1e9, f"the {size} in the page cache, "
                                                        "written as the trainer stores a shard (pwrite)", stamp)
        data["storage"]["unmap_gbs"] = _measured(st["bytes"] / st["unmap_s"] / 1e9, f"the {size} mapped, unmapped as the "
                                                 "trainer evicts a shard (the file mapped again over it)", stamp)
    start = result["startup"]
    overhead = (start["peak_rss_bytes"] - start["planned_peak_bytes"]) / MB
    data["ram"]["runtime_overhead_mb"] = _measured(max(0.0, overhead), "the trainer on a tiny GPT-2, 2 steps: peak RSS "
                                                   f"{start['peak_rss_bytes'] / MB:.1f} MB minus its planned peak", stamp)
    report.append(("ram.runtime_overhead_mb", f"{overhead:.1f} MB (peak RSS of the trainer's startup on a tiny model "
                   "minus its planned buffers)"))
    if result.get("power") or result.get("heat"):
        report += fit_power_and_heat(data, clusters, result.get("power"), result.get("heat"), stamp)
    else:
        report.append(("power, thermal", "no battery current sensor: kept the base profile's values"))
    return data, report


def _how(field: str, gemm_what: str, aerr: dict, cluster: str, cores: int) -> str:
    if field in GEMM_PARAMS:
        return gemm_what
    if field in aerr:
        return f"attention forward and backward on {cluster}, time beyond the GEMM model, per causal score"
    return f"the trainer's kernel on {cluster}, {cores} threads: plan bytes / median time"


def calibrate(target: str, out: str | Path, base: str | Path | None = None, workloads: list | None = None,
              min_time_s: float = 0.05, storage_bytes: int = 256 * MB, progress: bool = True,
              raw_out: str | Path | None = None, rounds: int = 3, heat_s: float = 300) -> tuple[Path, list]:
    """Run the microbenchmarks on `target` and write the fitted profile to `out` (and the raw
    benchmark results to `raw_out`). Returns (out, report rows)."""
    import yaml

    import mfbench
    from mfbench.device.native import BENCH_NAME
    from mfbench.errors import load_yaml, validate
    from mfbench.files import write_atomic
    from mfbench.spec.profile import DEVICES_DIR, DeviceProfile, load_device

    runner = check_target(target)
    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        raise InputError(None, "--out", f"expected a profile path ending in .yaml, got {out}")
    if base is None:
        base = out if out.is_file() else DEVICES_DIR / "host.yaml"
    try:
        load_device(base)  # a bad base profile is named before any work
    except InputError as e:
        raise InputError(e.file, "--from" if e.field in (None, "device") else e.field, e.message) from None
    base_path = Path(base) if Path(base).suffix in (".yaml", ".yml") else DEVICES_DIR / f"{base}.yaml"
    data = load_yaml(base_path)
    workloads = sorted(VALIDATION_DIR.glob("*.yaml")) if workloads is None else workloads
    out.resolve().parent.mkdir(parents=True, exist_ok=True)  # the storage benchmark writes its file there
    if rounds < 1:
        raise InputError(None, "--rounds", f"expected at least 1 round, got {rounds}")
    if not 0 <= heat_s <= 3600:
        raise InputError(None, "--heat-s", f"expected seconds from 0 (no heat-up run) to 3600, got {heat_s}")
    cores = runner.cpus()
    runner.binary(BENCH_NAME)  # built and shipped once; locally the storage benchmark's file goes beside the profile
    spec = bench_spec(programs(workloads, cores), min_time_s, runner.workdir(out.resolve().parent), storage_bytes, heat_s)
    result = measure(spec, runner, progress, cores, rounds)
    if raw_out is not None:
        write_atomic(raw_out, json.dumps({"spec": spec, "result": result}, indent=1) + "\n")
    stamp = f"mfbench calibrate {mfbench.__version__}, {datetime.date.today().isoformat()}, target {runner.target}"
    fitted, report = fit_profile(data, result, stamp)
    fitted["name"] = out.stem
    validate(DeviceProfile, fitted, out)
    header = (f"# {fitted.get('display_name', out.stem)}: calibrated by `mfbench calibrate --target {target}` "
              f"from {base_path.name}.\n# Fields marked `measured: mfbench calibrate ...` were fitted here; the "
              "rest keep the base profile's provenance. Schema: docs/devices.md.\n")
    write_atomic(out, header + yaml.safe_dump(fitted, sort_keys=False, width=120))
    return out, report
