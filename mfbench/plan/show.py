"""`mfbench plan WORKLOAD`: a step program as tables a person reads."""
from __future__ import annotations

from mfbench.contracts.program import StepProgram
from mfbench.table import table
from mfbench.units import MB


def format_plan(program: StepProgram, workload) -> str:
    """Memory (the buffer table by group, and the planned peak), work and tokens of one step."""
    method = workload.method
    trained = ("full fine-tuning" if method.kind == "full" else
               f"LoRA r {method.rank}, alpha {method.alpha:g} on {', '.join(method.targets)}")
    n_blocks = len(program.shards) - 1
    recomputed = len({op.layer for op in program.ops if op.phase == "recompute" and op.kind != "norm"})
    peak_kept, peak_op = program.activation_peak()
    logits = program.sizes.get("head.logits", 0)

    lines = [f"plan of {workload.name}: {workload.model}, {trained}", ""]
    lines += [table([
        ("parameters", f"{program.params:,}"),
        ("trainable parameters", f"{program.trainable_params:,}"),
        ("batch", f"{workload.batch} = {program.micro_batches} micro-batch"
                  f"{'es' if program.micro_batches > 1 else ''} of {program.micro_batch} x {program.seq_len} tokens"),
        ("attention", workload.memory.attention.replace("_", "-")),
        ("checkpointing", f"{recomputed} of {n_blocks} blocks"),
        ("cross-entropy", f"chunks of {program.ce_chunk_rows:,} rows"),
        ("threads (per-thread scratch)", f"{program.threads}"),
        ("sharding", workload.memory.sharding.policy + "".join(
            f", {k} {v}" for k, v in workload.memory.sharding.params.items())),
        ("offload", ", ".join(workload.memory.offload) or "none"),
    ])]
    other_static = sum(b.bytes for b in program.buffers if b.lifetime == "static" and not b.name.startswith(
        ("params.", "grads.", "lora.", "optimizer.")))
    sharded = sum(b.bytes for b in program.buffers if b.lifetime == "sharded")
    io = [op for op in program.ops if op.phase == "io"]
    scratch = sum(b.bytes for b in program.buffers if b.lifetime == "scratch")
    lines += ["", "memory (the trainer allocates exactly these buffers)", table([
        ("parameters", _mb(program.param_bytes), "MB"),
        ("gradients", _mb(program.grad_bytes), "MB"),
        ("optimizer state (AdamW m, v)", _mb(program.optimizer_bytes), "MB"),
        ("token ids, rotary tables", _mb(other_static), "MB"),
        ("scratch (logits chunk included)", _mb(scratch), "MB"),
        ("  of which logits chunk", _mb(logits), "MB"),
        ("kept for backward, resident shards (at peak)", _mb(peak_kept), "MB"),
        ("planned peak", _mb(program.peak_bytes()), "MB"),
    ], right={1}, indent=2)]
    block_bytes = [v for k, v in program.shards.items() if k != "embed"]
    lines += [f"  kept peak after {peak_op.name} ({peak_op.phase})" if peak_op else "  nothing kept",
              f"  shards: embed {_mb(program.shards['embed'])} MB, {len(block_bytes)} blocks of "
              f"{_mb(max(block_bytes, default=0))} MB at most",
              *([f"  sharded: {_mb(sharded)} MB on flash, loaded under the budget; per step it reads "
                 f"{_mb(sum(op.io_bytes for op in io if op.kind == 'load'))} MB and writes "
                 f"{_mb(sum(op.io_bytes for op in io if op.kind == 'store'))} MB ({len(io)} io ops)"] if io else []),
              "  a run adds the runtime's own memory (libraries, thread stacks, the token file): "
              "the device profile's ram.runtime_overhead_mb"]

    by_kind: dict[str, list[float]] = {}
    for op in program.ops:
        if op.phase == "io":
            continue
        row = by_kind.setdefault(op.kind, [0.0, 0.0, 0.0, 0.0])
        row[{"forward": 0, "recompute": 1, "backward": 2, "update": 2}[op.phase]] += op.flops
        row[3] += op.bytes_moved
    rows = [(g, *(f"{v / 1e9:,.2f}" for v in r[:3]), f"{r[3] / MB:,.1f}") for g, r in by_kind.items()]
    totals = [sum(r[i] for r in by_kind.values()) for i in range(4)]
    rows.append(("total", *(f"{v / 1e9:,.2f}" for v in totals[:3]), f"{totals[3] / MB:,.1f}"))
    lines += ["", "work per optimizer step (GFLOP; update in the backward column)", table(
        rows, header=("op kind", "forward", "recompute", "backward", "MB moved"), right={1, 2, 3, 4}, indent=2)]
    lines += ["", table([
        ("FLOPs per step", f"{program.flops / 1e9:,.1f} GFLOP"),
        ("tokens per step", f"{program.tokens_per_step:,}"),
        ("FLOPs per token", f"{program.flops / program.tokens_per_step / 1e6:,.1f} MFLOP"),
        ("ops per step", f"{len(program.ops):,}"),
    ], right={1})]
    return "\n".join(lines)


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f}"

