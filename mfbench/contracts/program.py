"""The step program: every buffer one optimizer step holds and every op it runs, in order.

This is contract 2 of docs/contracts.md. `mfbench.plan` compiles a workload into a
StepProgram; the native trainer builds the same buffers and ops from the same run spec and
prints them with `mfbench-train --plan`; `to_json()` is the byte-for-byte form both print.
The simulator replays the ops on a device and derives its memory timeline from the buffer
table: static and scratch buffers are held from the start, a kept buffer from the op that
allocates it to the op that frees it.

Work (FLOPs, bytes moved) is not part of the contract: it is mfbench's model of each op,
filled in by `mfbench.plan` from `mfbench.spec.models`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Lifetime = Literal["static", "scratch", "kept", "recomputed", "sharded"]
Phase = Literal["forward", "recompute", "backward", "update", "io"]
Kind = Literal["embedding", "norm", "linear", "lora", "attention", "elementwise", "head", "update",
               "load", "zero", "store", "evict"]
IO_KINDS = ("load", "zero", "store", "evict")  # phase io: a shard part moved between flash and RAM
OpClass = Literal["gemm", "skinny_gemm", "attention", "memory"]  # roofline class on a device

OP_CLASS: dict[str, OpClass] = {"linear": "gemm", "head": "gemm", "lora": "skinny_gemm", "attention": "attention",
                                "norm": "memory", "elementwise": "memory", "embedding": "memory", "update": "memory",
                                **{k: "memory" for k in IO_KINDS}}  # io ops do no compute; the simulator queues their io_bytes
VERSION = 1


@dataclass(frozen=True)
class Buffer:
    name: str
    bytes: int
    lifetime: Lifetime
    shard: str | None = None   # the parameter shard it holds (params.* only)


@dataclass(frozen=True)
class Op:
    name: str                  # mb{m}.{owner}.{kernel}, or update.{x}
    kind: Kind
    phase: Phase
    micro_batch: int           # -1 for the update
    layer: int | None
    shard: str | None          # the parameter shard it needs resident
    alloc: tuple[str, ...] = ()  # kept buffers it writes first
    free: tuple[str, ...] = ()   # kept buffers whose use ends with it
    flops: float = 0.0         # work (mfbench's model; not part of the contract)
    bytes_moved: float = 0.0
    kernels: tuple = ()        # the mfbench.spec.models Kernels it runs (priced by mfbench.sim.cost)
    io_bytes: int = 0          # bytes read from or written to flash (io ops)

    @property
    def op_class(self) -> OpClass:
        return OP_CLASS[self.kind]

    def to_dict(self) -> dict:
        return {"alloc": list(self.alloc), "free": list(self.free), "kind": self.kind, "layer": self.layer,
                "io_bytes": self.io_bytes, "micro_batch": self.micro_batch, "name": self.name, "phase": self.phase,
                "shard": self.shard}


@dataclass(frozen=True)
class StepProgram:
    workload_name: str
    family: str
    method: str                # full | lora
    micro_batch: int
    micro_batches: int
    seq_len: int
    threads: int               # sizes the per-thread scratch
    ce_chunk_rows: int
    trainable_params: int
    buffers: tuple[Buffer, ...]
    ops: tuple[Op, ...]
    params: int = 0            # parameters of the model (for display)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.micro_batches * self.seq_len

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @cached_property
    def sizes(self) -> dict[str, int]:
        return {b.name: b.bytes for b in self.buffers}

    def _sum(self, *prefixes: str) -> int:
        return sum(b.bytes for b in self.buffers if b.name.startswith(prefixes))

    @cached_property
    def shards(self) -> dict[str, int]:
        """Parameter bytes of each shard (`embed`, `block{i}`)."""
        return {b.shard: b.bytes for b in self.buffers if b.name.startswith("params.")}

    @property
    def param_bytes(self) -> int:
        return self._sum("params.", "lora.params")

    @property
    def grad_bytes(self) -> int:
        return self._sum("grads.", "lora.grads")

    @property
    def optimizer_bytes(self) -> int:
        return self._sum("optimizer.")

    @property
    def static_bytes(self) -> int:
        """Everything held for the whole run: static buffers and scratch."""
        return sum(b.bytes for b in self.buffers if b.lifetime in ("static", "scratch"))

    @cached_property
    def memory_deltas(self) -> tuple[tuple[int, int], ...]:
        """(bytes allocated, bytes freed) by each op, from the buffer table. The trainer's arena
        keeps a kept buffer's pages once written (model.cpp, Arena), so a kept buffer is resident
        from its first write to the step's last op, where all of them are freed; a later micro-
        batch writing it again adds nothing. With checkpointing the recompute region is laid
        over kept buffers the program has freed, so there the ops' own frees stand."""
        size = self.sizes
        recomputes = any(b.lifetime == "recomputed" for b in self.buffers)
        kept = set() if recomputes else {b.name for b in self.buffers if b.lifetime == "kept"}
        written: set[str] = set()
        deltas = []
        for op in self.ops:
            fresh = [n for n in op.alloc if n not in written]
            written.update(n for n in fresh if n in kept)
            deltas.append([sum(size[n] for n in fresh), sum(size[n] for n in op.free if n not in kept)])
        if deltas:
            deltas[-1][1] += sum(size[n] for n in written)
        return tuple(map(tuple, deltas))

    def activation_peak(self) -> tuple[int, Op | None]:
        """The most kept, recomputed and sharded bytes resident at once over the step (memory_deltas
        replayed), and the op where it is reached."""
        live = peak = 0
        at = None
        for op, (alloc, free) in zip(self.ops, self.memory_deltas):
            live += alloc
            if live > peak:
                peak, at = live, op
            live -= free
        return peak, at

    def peak_bytes(self) -> int:
        """The planned peak: static buffers, scratch and the kept peak."""
        return self.static_bytes + self.activation_peak()[0]

    def to_json(self) -> str:
        """The plan as both sides print it: one line, keys sorted, no spaces."""
        plan = {"buffers": [{"bytes": b.bytes, "lifetime": b.lifetime, "name": b.name, "shard": b.shard}
                            for b in self.buffers],
                "ce_chunk_rows": self.ce_chunk_rows, "family": self.family, "method": self.method,
                "micro_batch": self.micro_batch, "micro_batches": self.micro_batches,
                "ops": [op.to_dict() for op in self.ops], "seq_len": self.seq_len, "threads": self.threads,
                "trainable_params": self.trainable_params, "version": VERSION}
        return json.dumps(plan, sort_keys=True, separators=(",", ":")) + "\n"
