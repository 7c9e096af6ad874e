"""A workload compiled into its step program: the buffers and ops of docs/contracts.md,
section 2, as the native trainer runs them, with each op's work from mfbench.spec.models.

The op lists below are the trainer's kernels in the order `block_forward` and
`block_backward` call them (kernels_native/src/model.cpp). Memory-efficient attention keeps
`attn.lse` [B, H, T] instead of the probabilities (its per-thread scratch is two tiles of
ATTN_BLOCK x ATTN_BLOCK); activation checkpointing makes a checkpointed block's buffers
`recomputed`: freed after its forward and written again by recompute ops (the block's
forward again) before its backward.
"""
from __future__ import annotations

import dataclasses

from mfbench import policies
from mfbench.contracts.program import Buffer, Op, StepProgram
from mfbench.errors import InputError
from mfbench.plan.shards import plan_io
from mfbench.spec import models

FLOAT = models.FLOAT
NEXT = "->next"        # stands for the next block's input (or head.x) in the tables below
ADAMW_FLOPS = 10       # per trainable parameter: two moments, bias correction, decay, step
GRAD_NORM_FLOPS = 2    # per trainable parameter: square and sum (gradient clipping)
CE_CHUNK_BYTES = 8 << 20  # `ce_chunk_rows: auto`: about 32 MB of logits (8 Mi floats) ...
CE_CHUNK_MIN_ROWS = 128   # ... but at least 128 rows: every chunk streams the whole LM head twice
ATTN_BLOCK = 64           # memory-efficient attention: query and key block (layers.h kAttnBlock)
MOMENT_CHUNK = 1 << 20    # scratch.moments: 2 x this many values, the update's working set for offloaded moments

# Block forward: (kernel, kind, kept buffers it allocates). mlp.act also allocates
# mlp.act_out when the down projection learns (added in _block_ops).
FORWARD = {
    "gpt2": [("ln_1", "norm", ["ln_1.mean", "ln_1.rstd"]), ("attn.c_attn", "linear", ["attn.qkv"]),
             ("attn.sdpa", "attention", ["attn.probs", "attn.out"]), ("attn.c_proj", "linear", ["residual"]),
             ("ln_2", "norm", ["ln_2.mean", "ln_2.rstd"]), ("mlp.c_fc", "linear", []),
             ("mlp.act", "elementwise", ["mlp.act_d"]), ("mlp.c_proj", "linear", [NEXT])],
    "qwen2": [("input_layernorm", "norm", ["input_layernorm.rstd"]), ("self_attn.q_proj", "linear", ["attn.q"]),
              ("self_attn.k_proj", "linear", ["attn.k"]), ("self_attn.v_proj", "linear", ["attn.v"]),
              ("rope", "elementwise", []), ("attn.sdpa", "attention", ["attn.probs", "attn.out"]),
              ("self_attn.o_proj", "linear", ["residual"]),
              ("post_attention_layernorm", "norm", ["post_attention_layernorm.rstd"]),
              ("mlp.gate_proj", "linear", ["mlp.gate"]), ("mlp.up_proj", "linear", ["mlp.up"]),
              ("mlp.act", "elementwise", []), ("mlp.down_proj", "linear", [NEXT])],
    "gemma3_text": [
        ("input_layernorm", "norm", ["input_layernorm.rstd"]), ("self_attn.q_proj", "linear", ["attn.q_raw"]),
        ("self_attn.k_proj", "linear", ["attn.k_raw"]), ("self_attn.v_proj", "linear", ["attn.v"]),
        ("self_attn.q_norm", "norm", ["self_attn.q_norm.rstd", "attn.q"]),
        ("self_attn.k_norm", "norm", ["self_attn.k_norm.rstd", "attn.k"]), ("rope", "elementwise", []),
        ("attn.sdpa", "attention", ["attn.probs", "attn.out"]), ("self_attn.o_proj", "linear", ["attn.proj"]),
        ("post_attention_layernorm", "norm", ["post_attention_layernorm.rstd", "residual"]),
        ("pre_feedforward_layernorm", "norm", ["pre_feedforward_layernorm.rstd"]),
        ("mlp.gate_proj", "linear", ["mlp.gate"]), ("mlp.up_proj", "linear", ["mlp.up"]),
        ("mlp.act", "elementwise", []), ("mlp.down_proj", "linear", ["mlp.down"]),
        ("post_feedforward_layernorm", "norm", ["post_feedforward_layernorm.rstd", NEXT])],
}
# Block backward: (kernel, kind, phase). Norm outputs are not kept: the trainer applies the
# norm again from its statistics (a recompute op) right before the linear that reads it.
_R = "recompute"
BACKWARD = {
    "gpt2": [("ln_2", "norm", _R), ("mlp.c_proj", "linear"), ("mlp.act", "elementwise"), ("mlp.c_fc", "linear"),
             ("ln_2", "norm"), ("attn.c_proj", "linear"), ("attn.sdpa", "attention"), ("ln_1", "norm", _R),
             ("attn.c_attn", "linear"), ("ln_1", "norm")],
    "qwen2": [("post_attention_layernorm", "norm", _R), ("mlp.down_proj", "linear"), ("mlp.act", "elementwise"),
              ("mlp.gate_proj", "linear"), ("mlp.up_proj", "linear"), ("post_attention_layernorm", "norm"),
              ("self_attn.o_proj", "linear"), ("attn.sdpa", "attention"), ("rope", "elementwise"),
              ("input_layernorm", "norm", _R), ("self_attn.q_proj", "linear"), ("self_attn.k_proj", "linear"),
              ("self_attn.v_proj", "linear"), ("input_layernorm", "norm")],
    "gemma3_text": [
        ("post_feedforward_layernorm", "norm"), ("pre_feedforward_layernorm", "norm", _R),
        ("mlp.down_proj", "linear"), ("mlp.act", "elementwise"), ("mlp.gate_proj", "linear"),
        ("mlp.up_proj", "linear"), ("pre_feedforward_layernorm", "norm"), ("post_attention_layernorm", "norm"),
        ("self_attn.o_proj", "linear"), ("attn.sdpa", "attention"), ("rope", "elementwise"),
        ("self_attn.q_norm", "norm"), ("self_attn.k_norm", "norm"), ("input_layernorm", "norm", _R),
        ("self_attn.q_proj", "linear"), ("self_attn.k_proj", "linear"), ("self_attn.v_proj", "linear"),
        ("input_layernorm", "norm")],
}
DOWN = {"gpt2": "mlp.c_proj", "qwen2": "mlp.down_proj", "gemma3_text": "mlp.down_proj"}
FINAL_NORM = {"gpt2": "ln_f", "qwen2": "norm", "gemma3_text": "norm"}
# which kernels of mfbench.spec.models make up an op (besides the kernel of the op's own
# name, its bias, and its LoRA's lora_dropout, lora_A, lora_B and lora_scale); the residual adds are fused
# into the op that writes the residual stream
FUSED = {"attn.sdpa": ["attn.scores", "attn.softmax", "attn.values"],
         ("gpt2", "attn.c_proj"): ["residual_1"], ("gpt2", "mlp.c_proj"): ["residual_2"],
         ("gpt2", "mlp.act"): ["mlp.gelu"],
         ("qwen2", "self_attn.o_proj"): ["residual_1"], ("qwen2", "mlp.down_proj"): ["residual_2"],
         ("gemma3_text", "post_attention_layernorm"): ["residual_1"],
         ("gemma3_text", "post_feedforward_layernorm"): ["residual_2"]}


def chunk_rows(value: int | str, rows: int, vocab: int) -> int:
    """Rows of logits alive at once: `auto` about 32 MB worth (at least 128), 0 all rows."""
    if value == "auto":
        return min(rows, max(CE_CHUNK_MIN_ROWS, CE_CHUNK_BYTES // vocab))
    return rows if value == 0 else min(int(value), rows)


def compile_workload(workload, base_dir=None, threads: int | None = None) -> StepProgram:
    """The step program of `workload` (a mfbench.spec.workload.Workload) at its micro-batch.
    `threads` sizes the per-thread scratch (default: the workload's, 1 when `auto`)."""
    config = models.get_config(workload.model, base=base_dir)
    a = models.arch(config)
    method = workload.method
    adapters = models.lora(config, method.rank, method.targets, method.dropout) if method.kind == "lora" else None
    checkpointed = policies.make("checkpointing", workload.memory.checkpointing).layers(a.layers)
    threads = threads or (workload.threads if isinstance(workload.threads, int) else 1)
    B, T, K = workload.micro_batch_size, workload.seq_len, workload.accumulation_steps
    N = B * T
    R = chunk_rows(workload.memory.ce_chunk_rows, N, a.vocab)
    sizes = _kept_sizes(a, B, T, adapters, workload.memory.attention)

    work = _work(a, B, T, adapters, workload.memory.attention)  # the same for every micro-batch
    ops: list[Op] = []
    for m in range(K):
        ops += _micro_batch_ops(a, m, adapters, checkpointed, workload.memory.attention, work)
    trainable = models.trainable_params(config, adapters)
    ops += _update_ops(config, adapters, trainable, workload.optimizer.grad_clip is not None)

    kept = list(dict.fromkeys(n for op in ops if op.micro_batch == 0 for n in op.alloc))
    recomputed = {n for op in ops if op.phase == "recompute" for n in op.alloc}
    frozen = workload.memory.frozen_dtype if adapters is not None else "float32"
    sharding = policies.make("sharding", workload.memory.sharding)
    offload = set(workload.memory.offload)
    sharded = sharding.budget_bytes is not None
    buffers = (_static_buffers(config, a, adapters, trainable, K * N, T, frozen, sharded, offload)
               + [Buffer(n, sizes[_kind(n)] * FLOAT, "recomputed" if n in recomputed else "kept") for n in kept]
               + _scratch_buffers(a, N, T, R, adapters, threads, workload.memory.attention, frozen))
    if "optimizer" in offload:
        buffers.append(Buffer("scratch.moments", 2 * min(MOMENT_CHUNK, trainable) * FLOAT, "scratch"))
    if sharded or offload:
        moments = ({s: 2 * n for s, n in models.shard_bytes(config).items()} if "optimizer" in offload else None)
        ops = plan_io(ops, {b.name: b.bytes for b in buffers if b.lifetime == "sharded"}, sharding,
                      "gradients" in offload, adapters is None, moments)
    return StepProgram(workload_name=workload.name, family=a.family, method=method.kind, micro_batch=B,
                       micro_batches=K, seq_len=T, threads=threads, ce_chunk_rows=R, trainable_params=trainable,
                       buffers=tuple(buffers), ops=tuple(ops), params=models.param_count(config))


def compile_program(workload, base_dir=None, threads: int | None = None, overhead_bytes: int = 0) -> StepProgram:
    """The workload's step program at the micro-batch its accumulation policy chooses.
    `max_fit` prices a micro-batch by its planned peak as it would run: with sharding, only
    the shards its io ops hold are resident; plus the runtime's `overhead_bytes`."""
    def compiled(micro_batch: int) -> StepProgram:
        return compile_workload(workload.model_copy(update={"micro_batch": micro_batch}), base_dir, threads)

    def peak(micro_batch: int) -> int:
        return compiled(micro_batch).peak_bytes() + overhead_bytes

    accumulation = policies.make("accumulation", workload.accumulation)
    micro_batch = accumulation.micro_batch(workload.batch, workload.micro_batch_size, peak)
    if workload.batch % micro_batch:
        raise InputError(None, "accumulation", f"expected a micro-batch dividing the batch {workload.batch}, "
                         f"got {micro_batch}")
    return compiled(micro_batch)


# --------------------------------------------------------------------------- buffers

def _kind(name: str) -> str:
    """`block3.attn.q` -> `attn.q`; `head.x` -> `x`: the size class of a kept buffer."""
    return name.split(".", 1)[1] if name.startswith(("block", "head.")) else name


def _kept_sizes(a, B, T, adapters, attention) -> dict[str, int]:
    """Elements of each kind of kept buffer."""
    N, C, F, H = B * T, a.hidden, a.intermediate, a.heads
    sizes = {"x": N * C, "residual": N * C, "attn.proj": N * C, "mlp.down": N * C,
             "attn.qkv": 3 * N * C, "attn.q": N * a.q_dim, "attn.q_raw": N * a.q_dim, "attn.k": N * a.kv_dim,
             "attn.k_raw": N * a.kv_dim, "attn.v": N * a.kv_dim, "attn.out": N * a.q_dim,
             "attn.probs": B * H * T * T, "attn.lse": B * H * T,
             "mlp.act_d": N * F, "mlp.act_out": N * F, "mlp.gate": N * F, "mlp.up": N * F}
    for norm in ("ln_1", "ln_2", "ln_f", "norm", "input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        sizes[f"{norm}.mean"] = sizes[f"{norm}.rstd"] = N
    sizes["self_attn.q_norm.rstd"], sizes["self_attn.k_norm.rstd"] = N * H, N * a.kv_heads
    if adapters is not None:
        for m in models.modules(a):
            if m.layer is not None and m.name in adapters.modules:
                sizes[f"{m.suffix}.lora_u"] = N * adapters.rank
    return sizes


def _static_buffers(config, a, adapters, trainable, token_rows, T, frozen="float32", sharded=False,
                    offload=frozenset()) -> list[Buffer]:
    shards = models.shard_bytes(config, frozen)
    out = [Buffer(f"params.{s}", n, "sharded" if sharded else "static", s) for s, n in shards.items()]
    if adapters is None:
        grads = "gradients" in offload
        out += [Buffer(f"grads.{s}", n, "sharded" if grads else "static", s if grads else None) for s, n in shards.items()]
    else:
        out += [Buffer("lora.params", trainable * FLOAT, "static"), Buffer("lora.grads", trainable * FLOAT, "static")]
    if "optimizer" not in offload:  # else on flash, streamed through scratch.moments
        out += [Buffer("optimizer.m", trainable * FLOAT, "static"), Buffer("optimizer.v", trainable * FLOAT, "static")]
    out += [Buffer("tokens.inputs", token_rows * 4, "static"), Buffer("tokens.targets", token_rows * 4, "static")]
    if a.family != "gpt2":  # rotary tables, per layer
        rope = a.layers * T * (a.head_dim // 2) * FLOAT
        out += [Buffer("rope.cos", rope, "static"), Buffer("rope.sin", rope, "static")]
    return out


def attention_scratch(T: int, attention: str) -> int:
    """Per-thread attention scratch (elements): the standard backward's T x T dS; the
    memory-efficient kernels' two block x block tiles and two block-long row vectors."""
    if attention == "standard":
        return T * T
    b = min(ATTN_BLOCK, T)
    return 2 * b * b + 2 * b


def _scratch_buffers(a, N, T, R, adapters, threads, attention, frozen="float32") -> list[Buffer]:
    C, F, V = a.hidden, a.intermediate, a.vocab
    r = adapters.rank if adapters is not None else 0
    dqkv = 3 * C if a.family == "gpt2" else a.q_dim + 2 * a.kv_dim
    elements = [("scratch.ln", N * C), ("scratch.act", N * F), ("scratch.dres", N * C), ("scratch.dln", N * C),
                ("scratch.dqkv", N * dqkv), ("scratch.datty", N * a.q_dim), ("scratch.dh", N * F)]
    if a.family != "gpt2":
        elements.append(("scratch.dup", N * F))
    elements += [("head.logits", R * V), ("head.ln_chunk", R * C), ("head.dln_chunk", R * C),
                 ("scratch.du", N * max(1, r)), ("scratch.ones", N), ("scratch.datt", threads * attention_scratch(T, attention)),
                 ("scratch.normpart", threads * 2 * max(C, a.head_dim))]
    if adapters is not None and adapters.dropout > 0:  # an adapter's dropped input [N, in]
        elements.append(("scratch.lora_x", N * max(m.fan_in for m in models.modules(a) if m.name in adapters.modules)))
    if frozen != "float32":  # 16-bit frozen weights are widened here for each use
        elements.append(("scratch.weight", weight_scratch_elements(a)))
    return [Buffer(name, n * FLOAT, "scratch") for name, n in elements]


def weight_scratch_elements(a) -> int:
    """`scratch.weight`: the largest block weight matrix (a norm's weight and bias side by side
    at least); the LM head and embeddings are widened in row chunks of this size."""
    linears = [m.fan_in * m.fan_out for m in models.modules(a) if m.layer == 0 and m.kind in ("linear", "conv1d")]
    return max([2 * max(a.hidden, a.head_dim), *linears])


# ------------------------------------------------------------------------------- ops

def _micro_batch_ops(a, m, adapters, checkpointed, attention, work) -> list[Op]:
    family, L = a.family, a.layers
    prefix = f"mb{m}."
    full = adapters is None
    block_prefix = "transformer.h." if family == "gpt2" else "model.layers."

    def op(owner, kernel, kind, phase, layer, alloc=(), free=()):
        flops, moved, kernels = work(owner, kernel, kind, phase)
        return Op(prefix + f"{owner}.{kernel}", kind, phase, m, layer, "embed" if layer is None else f"block{layer}",
                  tuple(alloc), tuple(free), flops, moved, kernels)

    def adapted(layer, kernel):
        return adapters is not None and f"{block_prefix}{layer}.{kernel}" in adapters.modules

    def block_forward(l, phase):
        """Block l's forward ops (phase forward or recompute)."""
        out = []
        for kernel, kind, alloc in FORWARD[family]:
            alloc = [f"block{l}.{n}" if n != NEXT else (f"block{l + 1}.x" if l + 1 < L else "head.x") for n in alloc]
            if attention != "standard" and kernel == "attn.sdpa":
                alloc[0] = f"block{l}.attn.lse"
            if kernel == "mlp.act" and (full or adapted(l, DOWN[family])):
                alloc.append(f"block{l}.mlp.act_out")
            if phase == "recompute":  # the block's output is still alive: only its own buffers again
                alloc = [n for n in alloc if n.startswith(f"block{l}.")]
            out.append(op(f"block{l}", kernel, kind, phase, l, alloc))
            if kind == "linear" and adapted(l, kernel):
                out.append(op(f"block{l}", f"{kernel}.lora", "lora", phase, l, [f"block{l}.{kernel}.lora_u"]))
        return out

    def with_free(ops_, names):
        ops_[-1] = dataclasses.replace(ops_[-1], free=tuple(names))
        return ops_

    ops = [op("embed", "embed", "embedding", "forward", None, ["block0.x"])]
    own: dict[int, list[str]] = {}
    for l in range(L):
        forward = block_forward(l, "forward")
        written = [n for o in forward for n in o.alloc if n.startswith(f"block{l}.")]
        if l in checkpointed:  # keep the input; the rest is written again before backward
            forward = with_free(forward, written)
        ops += forward
        own[l] = [f"block{l}.x", *written]  # block{l}.x was written by the op before the block
    norm = FINAL_NORM[family]
    stats = ["head." + s for s in ([f"{norm}.mean", f"{norm}.rstd"] if family == "gpt2" else [f"{norm}.rstd"])]
    ops += [op("head", norm, "norm", "forward", None, stats), op("head", "lm_head", "head", "forward", None),
            op("head", "lm_head", "head", "backward", None), op("head", norm, "norm", "backward", None, (),
                                                                  ["head.x", *stats])]
    for l in reversed(range(L)):
        backward = []
        if l in checkpointed:
            backward += block_forward(l, "recompute")
        for kernel, kind, *phase in BACKWARD[family]:
            phase = phase[0] if phase else "backward"
            backward.append(op(f"block{l}", kernel, kind, phase, l))
            if kind == "linear" and adapted(l, kernel):
                backward.append(op(f"block{l}", f"{kernel}.lora", "lora", phase, l))
        if l == 0 and not full:  # frozen embeddings: nothing below block 0 needs its input gradient
            backward.pop()
        ops += with_free(backward, own[l])
    if full:
        ops.append(op("embed", "embed", "embedding", "backward", None))
    return ops


def _update_ops(config, adapters, trainable, clip: bool) -> list[Op]:
    """Gradient norm (clipping), then AdamW (params, grads, m and v each read and written):
    one op per shard for Full-FT (a sharded run brings each shard in), one for LoRA."""
    parts = ({s: n // FLOAT for s, n in models.shard_bytes(config).items()} if adapters is None
             else {None: trainable})
    ops = []
    if clip:
        norm = models.Kernel("grad_norm", GRAD_NORM_FLOPS * trainable, 0, trainable * FLOAT, 0, "grad_norm", (trainable,))
        ops.append(Op("update.grad_norm", "update", "update", -1, None, None, flops=float(norm.forward_flops),
                      bytes_moved=float(norm.forward_bytes), kernels=(norm,)))
    for shard, n in parts.items():
        adamw = models.Kernel("adamw", ADAMW_FLOPS * n, 0, 8 * n * FLOAT, 0, "update", (n,))
        ops.append(Op(f"update.{shard or 'lora'}", "update", "update", -1, None, shard,
                      flops=float(adamw.forward_flops), bytes_moved=float(adamw.forward_bytes), kernels=(adamw,)))
    return ops


def _work(a, B, T, adapters, attention):
    """work(owner, kernel, kind, phase) -> (FLOPs, bytes moved, kernels) of an op, summed over
    the kernels of mfbench.spec.models it runs (forward work for forward and recompute phases)."""
    per_block = {}
    for l in range(a.layers):
        per_block[l] = {k.name: k for k in models.block_kernels(a, l, B, T, attention, adapters)}
    embed = {k.name: k for k in models.embed_kernels(a, B, T, adapters)}
    head = {k.name: k for k in models.head_kernels(a, B, T, adapters)}

    def work(owner, kernel, kind, phase):
        if owner == "embed":
            ks = [embed["embedding"]]
        elif owner == "head":
            ks = [head["final_norm"]] if kind == "norm" else [head["lm_head"], head["cross_entropy"]]
        else:
            table = per_block[int(owner[5:])]
            if kind == "lora":
                base = kernel.removesuffix(".lora")
                names = [f"{base}.lora_dropout", f"{base}.lora_A", f"{base}.lora_B", f"{base}.lora_scale"]
            else:
                names = [kernel, f"{kernel}.bias", *FUSED.get(kernel, []), *FUSED.get((a.family, kernel), [])]
            ks = [table[n] for n in names if n in table]
        backward = phase == "backward"
        return (float(sum(k.backward_flops if backward else k.forward_flops for k in ks)),
                float(sum(k.backward_bytes if backward else k.forward_bytes for k in ks)), tuple(ks))
    return work
