"""How long an op takes on a device: the simulator's compute cost model.

With a calibrated cluster (`clusters[].kernels`, written by `mfbench calibrate`) an op is
priced kernel by kernel, the way the native trainer runs it:

- a matmul is the GEMM calls the trainer makes (forward y = x W; backward dx = dy W^T and,
  when the weight learns, dW = x^T dy; the LM head a chunk of `ce_chunk_rows` rows at a
  time), each  t = call + F (F / 1 GFLOP)^g / peak + 4 (M K + K N + M N) / gemm bandwidth
  with F = 2 M N K (operands from memory: a weight was last used a step before, an
  activation long evicted; g lets the rate a FLOP fall slowly with the product's size, as
  GPT-2 small's layers run 6-10 % below the validation set's smaller products here), and a
  call big enough for gemm.cpp to split (M N K >= 2e6) runs on p threads at 1 + e (p - 1)
  times one thread's rate;
- attention is its tasks (a sequence and head each) spread over the threads, a task being its
  GEMM calls (serial inside a parallel region; operands from the caches, just written) plus a
  fitted time per causal score;
- a memory-bound kernel is its bytes (mfbench.spec.models.ELEMENTWISE) at the rate measured
  for its class; the small ones (bias, rope, embedding) at the DRAM bandwidth of a streaming
  triad; residual adds and the LoRA scale are fused into a GEMM or a norm by the trainer.

Each step also zeroes its gradients (the trainer's zero_grads) before the first micro-batch.
Without calibrated rates the op takes the roofline: max(FLOPs / achieved FLOP/s, bytes /
bandwidth). No constant here or in a profile depends on the workload.
"""
from __future__ import annotations

import math

from mfbench.contracts.program import Op, StepProgram
from mfbench.spec.models import FLOAT

SPLIT_WORK = 2e6       # gemm.cpp runs a product of M N K below this on one thread
GEMM_REF_FLOPS = 1e9   # the size whose rate a profile's gemm_gflops_per_core is (with gemm_size_exponent)
ATTN_BLOCK = 64        # memory-efficient attention's query and key block (layers.h kAttnBlock)
# the calibrated rate of each (ELEMENTWISE kind, backward); the rest (bias, rope, embedding,
# GELU's backward: a multiply by its kept derivative) streams at the DRAM bandwidth of a triad
# ... except what the trainer fuses: residual adds (a GEMM with beta = 1, a norm backward that
# accumulates) and the LoRA scale (the GEMM's alpha) cost nothing of their own
FUSED = ("residual", "lora_scale")
RATES = {("layernorm", False): "layernorm_gbs", ("layernorm", True): "layernorm_backward_gbs",
         ("rmsnorm", False): "rmsnorm_gbs", ("rmsnorm", True): "rmsnorm_backward_gbs",
         ("gelu", False): "gelu_gbs", ("swiglu", False): "swiglu_gbs", ("swiglu", True): "swiglu_backward_gbs",
         ("geglu", False): "geglu_gbs", ("geglu", True): "geglu_backward_gbs",
         ("cross_entropy", False): "softmax_gbs", ("cross_entropy", True): "softmax_gbs",
         ("update", False): "update_gbs", ("grad_norm", False): "grad_norm_gbs",
         ("lora_dropout", False): "lora_dropout_gbs", ("lora_dropout", True): "lora_dropout_backward_gbs"}


def speedup(kernels, threads: int) -> float:
    return 1 + kernels.thread_efficiency.value * (max(1, threads) - 1)


def gemm_seconds(M: int, N: int, K: int, kernels, peak_flops: float, threads: int = 1, cached: bool = False) -> float:
    """One sgemm call of op(A) M x K by op(B) K x N on `threads` threads; `peak_flops` is one
    core's FLOP/s at the current frequency. Its operands come from memory (a layer's weight was
    last used a step before), or, `cached`, from the caches (attention's q, k, v, just written)."""
    call = kernels.gemm_call_us.value * 1e-6
    bandwidth = (kernels.gemm_cached_bandwidth_gbs if cached else kernels.gemm_bandwidth_gbs).value * 1e9
    flops = 2.0 * M * N * K
    work = flops * (flops / GEMM_REF_FLOPS) ** kernels.gemm_size_exponent.value / peak_flops
    work += FLOAT * (M * K + K * N + M * N) / bandwidth
    if threads > 1 and M * N * K >= SPLIT_WORK:
        work /= speedup(kernels, threads)
    return call + work


def matmul_calls(k, backward: bool, chunk_rows: int | None = None) -> list[tuple[int, int, int]]:
    """The (M, N, K) of each GEMM call the trainer makes for matmul kernel `k`."""
    rows, fan_in, fan_out, trained = k.shape
    chunks = [rows]
    if chunk_rows and chunk_rows < rows:  # the LM head, a chunk of rows at a time
        chunks = [chunk_rows] * (rows // chunk_rows) + ([rows % chunk_rows] if rows % chunk_rows else [])
    calls = []
    for r in chunks:
        if not backward:
            calls.append((r, fan_out, fan_in))
        else:
            calls.append((r, fan_in, fan_out))
            if trained:
                calls.append((fan_in, fan_out, r))
    return calls


def attention_seconds(shape, backward: bool, kernels, peak_flops: float, threads: int, ratio: float = 1.0) -> float:
    """Causal attention (layers.cpp), tasks over threads, each task's GEMMs serial; the time
    per score scales with the frequency `ratio` like the GEMMs."""
    B, T, H, KV, hd, me = shape
    ns = 1e-9 / ratio
    # serial inside the team, on operands the op has just written
    gemm = lambda M, N, K: gemm_seconds(M, N, K, kernels, peak_flops, cached=True)  # noqa: E731
    if not me:
        scores = T * (T + 1) / 2
        if not backward:  # per (sequence, head): S = q k^T, softmax, y = P v
            task = gemm(T, T, hd) + gemm(T, hd, T) + scores * kernels.attention_ns.value * ns
            tasks, per_task = B * H, 1
        else:  # per (sequence, kv head), each query head: dP, dV, softmax backward, dQ, dK
            task = gemm(T, T, hd) + 3 * gemm(T, hd, T) + scores * kernels.attention_backward_ns.value * ns
            tasks, per_task = B * KV, H // KV
    else:
        blocks = [(min(ATTN_BLOCK, T - i0), min(ATTN_BLOCK, T - j0))
                  for i0 in range(0, T, ATTN_BLOCK) for j0 in range(0, i0 + 1, ATTN_BLOCK)]
        tiles = sum(nq * nk for nq, nk in blocks)
        if not backward:  # per (sequence, head): each query block against the key blocks up to it
            task = (sum(gemm(nq, nk, hd) + gemm(nq, hd, nk) for nq, nk in blocks)
                    + tiles * kernels.attention_me_ns.value * ns)
            tasks, per_task = B * H, 1
        else:  # scores again, dP, dV, dQ, dK per tile
            task = (sum(2 * gemm(nq, nk, hd) + gemm(nk, hd, nq) + gemm(nq, hd, nk) + gemm(nk, hd, nq)
                        for nq, nk in blocks) + tiles * kernels.attention_me_backward_ns.value * ns)
            tasks, per_task = B * KV, H // KV
    busy = min(threads, tasks)
    waves = math.ceil(tasks / busy)  # the slowest thread does this many tasks
    return waves * per_task * task * busy / speedup(kernels, busy)


def elementwise_seconds(k, backward: bool, kernels, stream_gbs: float, threads: int, cores: int) -> float:
    """A memory-bound kernel: its modelled bytes at its class's measured rate."""
    nbytes = k.backward_bytes if backward else k.forward_bytes
    if not nbytes or k.cls in FUSED:
        return 0.0
    rate = getattr(kernels, RATES.get((k.cls, backward), ""), None)  # None: not calibrated (an older profile)
    gbs = rate.value if rate is not None else stream_gbs
    # rates are measured on all the cluster's cores
    return nbytes / (gbs * 1e9) * speedup(kernels, cores) / speedup(kernels, min(threads, cores))


def op_seconds(op: Op, cluster, threads: int, freq_mhz: float, device, program: StepProgram | None = None) -> float:
    """The duration of `op` on `threads` cores of `cluster` at `freq_mhz`."""
    ratio = freq_mhz / cluster.freqs_mhz.values[-1]
    bandwidth = device.memory.bandwidth_gbs.value
    kernels = cluster.kernels
    if kernels is None or not op.kernels:
        return roofline_seconds(op, cluster, threads, ratio, bandwidth)
    peak = cluster.gemm_gflops_per_core.value * 1e9 * ratio
    backward = op.phase == "backward"
    total = 0.0
    for k in op.kernels:
        if k.cls == "matmul":
            chunk = program.ce_chunk_rows if program is not None and k.name == "lm_head" else None
            total += sum(gemm_seconds(M, N, K, kernels, peak, threads) for M, N, K in matmul_calls(k, backward, chunk))
        elif k.cls == "attention":
            if k.shape:  # attn.scores stands for the whole attention
                total += attention_seconds(k.shape, backward, kernels, peak, threads, ratio)
        else:
            total += elementwise_seconds(k, backward, kernels, bandwidth, threads, cluster.cores)
    return total


def step_overhead_seconds(program: StepProgram, cluster, threads: int) -> float:
    """Work of a step outside its ops: zeroing the gradients before the first micro-batch."""
    kernels = cluster.kernels
    if kernels is None:
        return 0.0
    grads = program.grad_bytes
    return grads / (kernels.zero_gbs.value * 1e9) * speedup(kernels, cluster.cores) / speedup(kernels, min(threads, cluster.cores))


def roofline_seconds(op: Op, cluster, threads: int, ratio: float, bandwidth_gbs: float) -> float:
    """max(FLOPs / achieved FLOP/s, bytes / bandwidth). Achieved FLOP/s is the per-core rate
    of the op's class x threads x (frequency / top frequency)."""
    per_core = (cluster.skinny_gemm_gflops_per_core if op.op_class == "skinny_gemm"
                else cluster.gemm_gflops_per_core).value
    achieved = per_core * 1e9 * threads * ratio
    return max(op.flops / achieved, op.bytes_moved / (bandwidth_gbs * 1e9))
