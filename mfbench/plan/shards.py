"""Shard I/O, planned: where a sharded step loads, zeroes, stores and evicts each shard part.

A part is a `sharded` buffer: `params.<shard>` and, with `memory.offload: [gradients]`,
`grads.<shard>`. An op of shard s needs `params.<s>`; with offloaded gradients, the ops
that write s's gradient (backward ops, the head's ops: its forward and backward run fused,
chunk by chunk) and `update.<s>` need `grads.<s>` too. Before each op the planner makes what
it needs resident (evicting what the sharding policy picks, least recently used first, until
it fits the budget), then, for `prefetch`, starts loading the next `ahead` parts in program
order (forward, then backward's reverse order) while the op computes. Evicting a dirty part
(parameters after their update, gradients written since their last store) stores it first.
A step starts with nothing resident and ends by storing and evicting every part, so every
step runs the same program and the files on flash hold the whole state between steps.

The native trainer (kernels_native/src/shard.cpp) executes these ops as written: `lru` at
once, `prefetch` on its I/O thread, in order; so both sides plan the same bytes.
With `memory.offload: [optimizer]`, AdamW's moments pass through `scratch.moments` (read
from their file into it, updated there, written back from it) during each `update.<shard>`: `io.load.optimizer.<s>` and `io.store.optimizer.<s>` around
it carry their bytes.
"""
from __future__ import annotations

from collections import OrderedDict

from mfbench.contracts.program import Op
from mfbench.errors import InputError
from mfbench.units import MB


def needs(op: Op, grads: bool) -> list[str]:
    """The parts `op` needs resident (grads: gradients are offloaded)."""
    if op.shard is None:
        return []
    writes_grad = op.phase in ("backward", "update") or op.name.split(".")[1:2] == ["head"]
    return [f"params.{op.shard}"] + ([f"grads.{op.shard}"] if grads and writes_grad else [])


def smallest_budget(ops: list[Op], sizes: dict[str, int], grads: bool) -> int:
    """The smallest budget a sharded step runs in: what the most demanding op needs resident."""
    return max((sum(sizes[p] for p in needs(op, grads)) for op in ops), default=0)


def smallest_budget_of(program) -> int:
    """smallest_budget of a compiled sharded program (its `sharded` buffers are the parts)."""
    sizes = {b.name: b.bytes for b in program.buffers if b.lifetime == "sharded"}
    grads = any(name.startswith("grads.") for name in sizes)
    return smallest_budget([op for op in program.ops if op.phase != "io"], sizes, grads)


def plan_io(ops: list[Op], sizes: dict[str, int], sharding, grads: bool, full: bool,
            moments: dict[str, int] | None) -> list[Op]:
    """`ops` with the io ops of a sharded step inserted. `sizes`: bytes of each part;
    `moments`: bytes of AdamW's m and v of each shard when the optimizer is offloaded."""
    budget = sharding.budget_bytes
    wants = [needs(op, grads) if budget is not None else [] for op in ops]
    largest = smallest_budget(ops, sizes, grads) if budget is not None else 0
    if budget is not None and largest > budget:
        raise InputError(None, "memory.sharding.budget_mb", f"{budget / MB:g} MB is below the largest shard: expected at least "
                         f"{largest / MB:{'.1f' if largest >= MB else '.3g'}} MB (what one op needs resident)")
    out: list[Op] = []
    if budget is None:  # no sharding: only the offloaded moments move
        for op in ops:
            out += _moments(op, moments, "load") + [op] + _moments(op, moments, "store")
        return out
    resident: OrderedDict[str, bool] = OrderedDict()  # part -> dirty, least recently used first
    stored: set[str] = set()  # gradients on flash that hold this step's sums so far
    held = 0

    def io(kind, part, m, nbytes=0):
        alloc, free = ((part,), ()) if kind in ("load", "zero") else ((), (part,) if kind == "evict" else ())
        out.append(Op(f"io.{kind}.{part}", kind, "io", m, None, part.split(".", 1)[1], alloc, free, io_bytes=nbytes))

    def make_room(part, keep, m) -> bool:
        nonlocal held
        chosen, room = [], held
        while room + sizes[part] > budget:
            left = [p for p in resident if p not in chosen]
            victim = sharding.victim(left, keep)
            if victim is None or victim not in left or victim in keep:
                return False
            chosen.append(victim)
            room -= sizes[victim]
        for v in chosen:
            evict(v, m)
        return True

    def evict(part, m):
        nonlocal held
        if resident.pop(part):
            io("store", part, m, sizes[part])
            stored.add(part)
        io("evict", part, m)
        held -= sizes[part]

    def bring(part, m):
        nonlocal held
        fresh = part.startswith("grads.") and part not in stored  # first use this step: zeros
        io("zero" if fresh else "load", part, m, 0 if fresh else sizes[part])
        resident[part] = False
        held += sizes[part]

    upcoming = _upcoming(wants, sharding.ahead)
    for i, (op, want) in enumerate(zip(ops, wants)):
        m = op.micro_batch
        for part in want:
            if part in resident:
                resident.move_to_end(part)
            elif make_room(part, set(want), m):
                bring(part, m)
            else:
                raise InputError(None, "memory.sharding.policy", f"the sharding policy evicted nothing to make room for {part}")
        for k, part in enumerate(upcoming[i]):
            if part not in resident:
                if not make_room(part, set(want) | set(upcoming[i][:k + 1]), m):
                    break
                bring(part, m)
        out += _moments(op, moments, "load") + [op] + _moments(op, moments, "store")
        for part in want:  # what the op wrote: updated parameters, accumulated gradients
            if part.startswith("grads."):
                resident[part] = op.phase != "update"  # the update consumes them: nothing to keep
                if op.phase == "update":
                    stored.discard(part)
            elif op.phase == "update" and full:
                resident[part] = True
    for part in list(resident):
        evict(part, -1)
    return out


def _moments(op: Op, moments, kind) -> list[Op]:
    if not moments or op.phase != "update" or op.shard is None:
        return []
    part = f"optimizer.{op.shard}"
    return [Op(f"io.{kind}.{part}", kind, "io", op.micro_batch, None, op.shard, io_bytes=moments[op.shard])]


def _upcoming(wants: list[list[str]], ahead: int) -> list[list[str]]:
    """After op i, the next `ahead` parts later ops need that op i does not."""
    out = []
    for i, want in enumerate(wants):
        nxt: list[str] = []
        for later in wants[i + 1:]:
            if len(nxt) == ahead:
                break
            nxt += [p for p in later if p not in want and p not in nxt][:ahead - len(nxt)]
        out.append(nxt)
    return out
