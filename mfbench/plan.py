"""The step program: what one optimizer step does, op by op (the single source of truth).

A workload compiles to a StepProgram. The simulator executes it on a device profile; the
native trainer allocates the same buffers. Memory fields are bytes, work fields are FLOPs
and bytes of memory traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from mfbench import models, policies

Phase = Literal["forward", "recompute", "backward", "update"]
OpClass = Literal["gemm", "skinny_gemm", "attention", "memory"]  # roofline class on a device


@dataclass(frozen=True)
class Op:
    name: str              # e.g. "mb0.block3.forward"
    phase: Phase
    micro_batch: int       # index within the step; -1 for the update
    layer: int | None      # block index; None for embedding, head/loss, update
    flops: float
    bytes_moved: float     # memory traffic, for the bandwidth side of the roofline
    op_class: OpClass
    shard: str | None      # parameter shard this op needs resident, or None
    alloc: int             # activation bytes allocated by this op and kept after it
    free: int              # activation bytes released when this op ends
    workspace: int = 0     # transient bytes held only while the op runs
    recompute: bool = False


@dataclass(frozen=True)
class StepProgram:
    workload_name: str
    ops: tuple[Op, ...]
    shards: dict[str, int]         # shard name -> bytes of parameters (stored dtype)
    param_bytes: int               # all parameters, resident when not sharded
    trainable_params: int
    grad_bytes: int                # gradients of trainable parameters
    optimizer_bytes: int           # AdamW m and v of trainable parameters
    tokens_per_step: int
    micro_batches: int
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    def activation_peak(self) -> tuple[int, Op | None]:
        """Largest live activation + workspace over the program, replaying alloc/free in
        order, and the op where it occurs."""
        live = peak = 0
        at = None
        for op in self.ops:
            live += op.alloc
            if live + op.workspace > peak:
                peak, at = live + op.workspace, op
            live -= op.free
        return peak, at

    def peak_activation_bytes(self) -> int:
        return self.activation_peak()[0]


# ----------------------------------------------------------------------------- compiler

FORWARD_ORDER = ("attn", "sdpa", "mlp", "lora", "elementwise")  # a block's ops, by roofline class
ADAMW_FLOPS = 10       # per trainable parameter: two moments, bias correction, decay, step
GRAD_NORM_FLOPS = 2    # per trainable parameter: square and sum (gradient clipping)


def compile_workload(workload, base_dir=None) -> StepProgram:
    """The ordered ops of one optimizer step of `workload` (a mfbench.workload.Workload).

    Per micro-batch: embed forward; each block forward (ops attn, sdpa, mlp, lora,
    elementwise); head_loss forward and backward; each block backward in reverse, preceded
    by its recompute ops when checkpointed; embed backward. Then the update: a gradient
    norm op (when clipping) and AdamW, one op per shard for Full-FT (a sharded run must
    bring each shard in to update it), one op for LoRA adapters (always resident).
    docs/models.md says which buffers each op allocates and frees."""
    config = models.get_config(workload.model, base=base_dir)
    a = models.arch(config)
    method = workload.method
    adapters = models.lora(config, method.rank, method.targets) if method.kind == "lora" else None
    checkpointed = policies.make("checkpointing", workload.memory.checkpointing).layers(a.layers)
    B, T = workload.micro_batch_size, workload.seq_len
    x_bytes = B * T * a.hidden * models.FLOAT  # one residual-stream tensor
    attention, chunk = workload.memory.attention, workload.memory.ce_chunk_rows
    blocks = [_block_work(a, i, B, T, attention, adapters, x_bytes, i in checkpointed)
              for i in range(a.layers)]
    head = _head_work(a, config, B, T, chunk, adapters, x_bytes)
    embed = models.embed_kernels(a, B, T, adapters)
    tokens = 2 * B * T * 4  # int32 token ids and targets of the micro-batch

    ops: list[Op] = []
    for mb in range(workload.accumulation_steps):
        ops.append(_op(f"mb{mb}.embed.forward", "forward", mb, None, embed, "embed", "embed",
                       alloc=x_bytes + tokens))
        for block in blocks:
            ops += [replace(op, name=f"mb{mb}.{op.name}", micro_batch=mb) for op in block["forward"]]
        ops += [replace(op, name=f"mb{mb}.{op.name}", micro_batch=mb) for op in head]
        for block in reversed(blocks):
            ops += [replace(op, name=f"mb{mb}.{op.name}", micro_batch=mb) for op in block["backward"]]
        ops.append(_op(f"mb{mb}.embed.backward", "backward", mb, None, embed, "embed", "embed",
                       free=x_bytes + tokens))  # x_bytes: the residual-stream gradient
    ops += _update_ops(config, adapters, workload.optimizer.grad_clip is not None)

    shards = models.shard_bytes(config)
    trainable = models.trainable_params(config, adapters)
    adapter_bytes = trainable * models.FLOAT if adapters else 0
    return StepProgram(
        workload_name=workload.name, ops=tuple(ops), shards=shards,
        param_bytes=sum(shards.values()) + adapter_bytes, trainable_params=trainable,
        grad_bytes=models.grad_bytes(config, adapters), optimizer_bytes=models.optimizer_bytes(config, adapters),
        tokens_per_step=workload.tokens_per_step, micro_batches=workload.accumulation_steps,
        extras={"micro_batch": B, "logits_bytes": models.logits_bytes(config, B, T, chunk),
                "checkpointed_blocks": len(checkpointed), "params": models.param_count(config)})


def _op(name, phase, mb, layer, kernels, group, shard, alloc=0, free=0, workspace=0, recompute=False) -> Op:
    """One op doing the forward (phases forward, recompute) or backward work of `kernels`."""
    backward = phase == "backward"
    return Op(name=name, phase=phase, micro_batch=mb, layer=layer,
              flops=float(sum(k.backward_flops if backward else k.forward_flops for k in kernels)),
              bytes_moved=float(sum(k.backward_bytes if backward else k.forward_bytes for k in kernels)),
              op_class=models.OP_CLASS[group], shard=shard, alloc=alloc, free=free, workspace=workspace,
              recompute=recompute)


def _block_work(a, i, B, T, attention, adapters, x_bytes, checkpointed) -> dict[str, list[Op]]:
    """Block i's forward ops and backward ops (with recompute ops first when checkpointed).

    Forward: each op allocates the activations it produces that are kept; the elementwise op
    (the last residual add) allocates the block's output, the next block's input. A forward
    scratch holds what is not kept. Backward: each op frees what its forward kept (the
    elementwise op also the block's input) and uses one gradient scratch sized for the block."""
    kernels = models.block_kernels(a, i, B, T, attention, adapters)
    acts = models.block_activations(a, i, B, T, attention, adapters)
    groups = [g for g in FORWARD_ORDER if any(k.op == g for k in kernels)]
    kept = {g: sum(x.nbytes for x in acts if x.op == g and x.kept) for g in groups}
    transient = sum(x.nbytes for x in acts if not x.kept)
    grad_scratch = sum(x.nbytes for x in acts if x.grad)
    shard = f"block{i}"
    output = {g: x_bytes if g == "elementwise" else 0 for g in groups}

    def part(g):
        return [k for k in kernels if k.op == g]

    if checkpointed:
        forward = [_op(f"{shard}.{g}.forward", "forward", 0, i, part(g), g, shard, alloc=output[g],
                       workspace=transient + sum(kept.values())) for g in groups]
        recompute = [_op(f"{shard}.{g}.recompute", "recompute", 0, i, part(g), g, shard, alloc=kept[g],
                         workspace=transient, recompute=True) for g in groups]
    else:
        forward = [_op(f"{shard}.{g}.forward", "forward", 0, i, part(g), g, shard, alloc=kept[g] + output[g],
                       workspace=transient) for g in groups]
        recompute = []
    backward = [_op(f"{shard}.{g}.backward", "backward", 0, i, part(g), g, shard,
                    free=kept[g] + (x_bytes if g == "elementwise" else 0), workspace=grad_scratch)
                for g in reversed(groups)]
    return {"forward": forward, "backward": recompute + backward}


def _head_work(a, config, B, T, chunk, adapters, x_bytes) -> list[Op]:
    """head_loss forward and backward. Unchunked, the logits are kept from forward to backward
    and their gradient written over them; with ce_chunk_rows R each R-row chunk runs forward
    and backward back to back in one R x vocab buffer. The final norm's output is kept when
    the LM head is trained or the loss is chunked, else it is scratch. The backward allocates
    the residual-stream gradient that flows down the blocks to the embedding."""
    kernels = models.head_kernels(a, B, T, adapters)
    logits = models.logits_bytes(config, B, T, chunk)
    chunked = 0 < chunk < B * T
    norm_out = x_bytes
    stats = B * T * (2 if a.family == "gpt2" else 1) * models.FLOAT
    keep_norm_out = adapters is None or chunked
    kept = stats + (norm_out if keep_norm_out else 0) + (0 if chunked else logits)
    forward = _op("head_loss.forward", "forward", 0, None, kernels, "head_loss", "embed", alloc=kept,
                  workspace=(0 if keep_norm_out else norm_out) + (logits if chunked else 0))
    backward = _op("head_loss.backward", "backward", 0, None, kernels, "head_loss", "embed",
                   alloc=x_bytes, free=kept + x_bytes,  # frees the last block's output
                   workspace=norm_out + (logits if chunked else 0))  # d(norm output)
    return [forward, backward]


def _update_ops(config, adapters, clip: bool) -> list[Op]:
    """Gradient norm (clipping), then AdamW: params, grads, m and v each read and written."""
    if adapters is None:
        parts = {shard: nbytes // models.FLOAT for shard, nbytes in models.shard_bytes(config).items()}
    else:
        parts = {None: models.trainable_params(config, adapters)}
    total = sum(parts.values())
    ops = []
    if clip:
        ops.append(Op("update.grad_norm", "update", -1, None, float(GRAD_NORM_FLOPS * total),
                      float(total * models.FLOAT), "memory", None, 0, 0))
    for shard, n in parts.items():
        ops.append(Op(f"update.{shard}" if shard else "update", "update", -1, None, float(ADAMW_FLOPS * n),
                      float(8 * n * models.FLOAT), "memory", shard, 0, 0))
    return ops


# ------------------------------------------------------------------------------ display

def format_plan(program: StepProgram, workload) -> str:
    """`mfbench plan WORKLOAD`: memory, work and tokens of one optimizer step, as tables."""
    mb = 2**20
    method = workload.method
    trained = ("full fine-tuning" if method.kind == "full" else
               f"LoRA r {method.rank}, alpha {method.alpha:g} on {', '.join(method.targets)}")
    ckpt = int(program.extras.get("checkpointed_blocks", 0))
    n_blocks = len(program.shards) - 1
    chunk = workload.memory.ce_chunk_rows
    peak_act, peak_op = program.activation_peak()
    logits = int(program.extras["logits_bytes"]) if peak_op and ".head_loss." in peak_op.name else 0
    static = program.param_bytes + program.grad_bytes + program.optimizer_bytes

    lines = [f"plan of {workload.name}: {workload.model}, {trained}", ""]
    lines += _table([
        ("parameters", f"{int(program.extras['params']):,}"),
        ("trainable parameters", f"{program.trainable_params:,}"),
        ("batch", f"{workload.batch} = {program.micro_batches} micro-batch"
                  f"{'es' if program.micro_batches > 1 else ''} of "
                  f"{int(program.extras['micro_batch'])} x {workload.seq_len} tokens"),
        ("attention", workload.memory.attention.replace("_", "-")),
        ("checkpointing", f"{ckpt} of {n_blocks} blocks"),
        ("cross-entropy", f"chunks of {chunk:,} rows" if 0 < chunk else "all rows at once"),
        ("sharding", workload.memory.sharding.policy + "".join(
            f", {k} {v}" for k, v in workload.memory.sharding.params.items())),
    ], numbers=False)
    lines += ["", "memory"] + _table([
        ("parameters", _mb(program.param_bytes), "MB"),
        ("gradients", _mb(program.grad_bytes), "MB"),
        ("optimizer state (AdamW m, v)", _mb(program.optimizer_bytes), "MB"),
        ("activations (at peak)", _mb(peak_act - logits), "MB"),
        ("logits (at peak)", _mb(logits), "MB"),
        ("peak estimate", _mb(static + peak_act), "MB"),
    ], indent=2)
    block_bytes = [v for k, v in program.shards.items() if k != "embed"]
    lines += [f"  peak during {peak_op.name}" if peak_op else "  no activations",
              f"  shards: embed {_mb(program.shards['embed'])} MB, {len(block_bytes)} blocks of "
              f"{_mb(max(block_bytes, default=0))} MB at most"]

    by_group: dict[str, list[float]] = {}
    for op in program.ops:
        group = "update" if op.phase == "update" else op.name.split(".")[-2]
        row = by_group.setdefault(group, [0.0, 0.0, 0.0, 0.0])
        row[{"forward": 0, "recompute": 1, "backward": 2, "update": 2}[op.phase]] += op.flops
        row[3] += op.bytes_moved
    rows = [(g, *(f"{v / 1e9:,.2f}" for v in r[:3]), f"{r[3] / mb:,.1f}") for g, r in by_group.items()]
    totals = [sum(r[i] for r in by_group.values()) for i in range(4)]
    rows.append(("total", *(f"{v / 1e9:,.2f}" for v in totals[:3]), f"{totals[3] / mb:,.1f}"))
    lines += ["", "work per optimizer step (GFLOP; update in the backward column)"] + _table(
        [("op", "forward", "recompute", "backward", "MB moved")] + rows, indent=2, header=True)
    lines += ["", *_table([
        ("FLOPs per step", f"{program.flops / 1e9:,.1f} GFLOP"),
        ("tokens per step", f"{program.tokens_per_step:,}"),
        ("FLOPs per token", f"{program.flops / program.tokens_per_step / 1e6:,.1f} MFLOP"),
        ("ops per step", f"{len(program.ops):,}"),
    ])]
    return "\n".join(lines)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def _table(rows, indent: int = 0, header: bool = False, numbers: bool = True) -> list[str]:
    """Rows of cells: the first column left-aligned, the others right-aligned (numbers)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = [" " * indent + "  ".join(str(c).ljust(w) if i == 0 or not numbers else str(c).rjust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    if header:
        out.insert(1, " " * indent + "  ".join("-" * w for w in widths))
    return out
