"""The step program: what one optimizer step does, op by op (the single source of truth).

A workload compiles to a StepProgram. The simulator executes it on a device profile; the
native trainer allocates the same buffers. Memory fields are bytes, work fields are FLOPs
and bytes of memory traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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

    def peak_activation_bytes(self) -> int:
        """Largest live activation + workspace over the program, replaying alloc/free in order."""
        live = peak = 0
        for op in self.ops:
            live += op.alloc
            peak = max(peak, live + op.workspace)
            live -= op.free
        return peak
