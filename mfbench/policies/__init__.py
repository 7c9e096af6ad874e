"""Policies: small objects with documented hooks that steer memory and scheduling.

A workload names one policy of each kind, a built-in by name or a user class as
`module:Class` (see docs/policies.md):

    sharding       which parameter shards stay in RAM under a byte budget, what loads ahead
    checkpointing  which transformer blocks keep only their input and recompute the rest
    accumulation   the micro-batch size
    scheduling     after each optimizer step: sleep, pause, thread count, core cluster

Hooks take plain observations (numbers, names, lists) and return plain decisions, so the
same object can drive the simulator and, over a JSON-line channel, the native trainer. The
scheduling protocol is mfbench.contracts.policy.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

from mfbench.errors import InputError
from mfbench.units import MB

# ---------------------------------------------------------------------------- sharding

class Sharding:
    """Parameter sharding: mfbench.plan.shards asks it, op by op, what to evict, and writes
    the step's loads and evictions into the step program (the simulator and the native
    trainer run them as written).

    budget_bytes  bytes of shard parts that may be in RAM at once (None: all resident)
    ahead         how many upcoming parts to load while computing (0: load on demand)
    victim(resident, keep) -> the part to evict; parts are `params.<shard>` (and
                  `grads.<shard>` when gradients are offloaded); `resident` is least recently
                  used first, parts in `keep` are needed soon and must stay; None if nothing can go
    """
    budget_bytes: int | None = None
    ahead: int = 0

    def victim(self, resident: list[str], keep: set[str]) -> str | None:
        return next((s for s in resident if s not in keep), None)


class NoSharding(Sharding):
    """Every parameter stays in RAM."""


class LRU(Sharding):
    """The paper's offload: load on demand, evict the least recently used under a byte budget.
    `dir`: the backing folder on flash the native trainer keeps the shards in (default: the
    run's `<out>/shards`)."""

    def __init__(self, budget_mb: float, dir: str | None = None):
        self.budget_bytes = int(_positive("budget_mb", budget_mb) * MB)
        self.dir = dir


class Prefetch(LRU):
    """LRU under a budget, plus loading the next `ahead` shards (in program order: forward,
    then backward) while the current op computes, so I/O overlaps compute."""

    def __init__(self, budget_mb: float, ahead: int = 1, dir: str | None = None):
        super().__init__(budget_mb, dir)
        self.ahead = _positive_int("ahead", ahead)


# ----------------------------------------------------------------------- checkpointing

class Checkpointing:
    """Activation checkpointing: layers(n_layers) -> the block indices that keep only their
    input in forward and recompute their activations just before their backward."""

    def layers(self, n_layers: int) -> set[int]:
        return set()


class NoCheckpointing(Checkpointing):
    """Keep every activation."""


class EveryBlock(Checkpointing):
    """Checkpoint every transformer block (least memory, one extra forward)."""

    def layers(self, n_layers: int) -> set[int]:
        return set(range(n_layers))


class EveryK(Checkpointing):
    """Checkpoint blocks 0, k, 2k, ... (a memory/compute trade-off between none and all)."""

    def __init__(self, k: int):
        self.k = _positive_int("k", k)

    def layers(self, n_layers: int) -> set[int]:
        return set(range(0, n_layers, self.k))


# ------------------------------------------------------------------------ accumulation

class Accumulation:
    """Gradient accumulation: micro_batch(batch, current, peak_bytes) -> micro-batch size.

    `current` is the workload's micro-batch; `peak_bytes(m)` is the predicted peak resident
    bytes of a step with micro-batch m (it compiles a program, so call it sparingly).
    The result must divide `batch`.
    """

    def micro_batch(self, batch: int, current: int, peak_bytes: Callable[[int], int]) -> int:
        return current


class Fixed(Accumulation):
    """The workload's micro_batch, as written."""


class MaxFit(Accumulation):
    """The largest micro-batch (a divisor of the batch) whose step peak fits the budget;
    1 if none does."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(_positive("budget_mb", budget_mb) * MB)

    def micro_batch(self, batch: int, current: int, peak_bytes: Callable[[int], int]) -> int:
        for m in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
            if peak_bytes(m) <= self.budget_bytes:
                return m
        return 1


# -------------------------------------------------------------------------- scheduling

class Scheduling:
    """Energy-aware scheduling: decide(obs) -> decision, called before every optimizer step.

    The observation's keys and the decision's (every key optional; {} changes nothing) are
    defined once, with types and units, in mfbench.contracts.policy (OBSERVATION, DECISION).
    """

    def decide(self, obs: dict) -> dict:
        return {}


class NoScheduling(Scheduling):
    """Train flat out."""


class PaperRule(Scheduling):
    """The paper's rule, as its authors' code implements it: every K steps pick a rate,
    0.5 Hz if battery < 20 % else 2 Hz, 0.5 Hz if temperature > 42 °C else 2 Hz, the lower
    of the two; after each optimizer step sleep 1000/rate ms, at most 5 s."""

    def __init__(self, every_k_steps: int = 1):
        self.every_k_steps = _positive_int("every_k_steps", every_k_steps)
        self.rate_hz = None

    def decide(self, obs: dict) -> dict:
        if obs["step"] == 0:
            return {}  # the sleep follows an optimizer step
        if self.rate_hz is None or obs["step"] % self.every_k_steps == 0:
            battery = obs["battery_pct"]
            by_battery = 0.5 if battery is not None and battery < 20 else 2.0
            temperature = obs["temperature_c"]  # None: no sensor, nothing to cool
            by_heat = 0.5 if temperature is not None and temperature > 42 else 2.0
            self.rate_hz = min(by_battery, by_heat)
        return {"sleep_s": min(1.0 / self.rate_hz, 5.0)}


class BatteryFloor(Scheduling):
    """Pause while the battery is below floor_pct and the device is not charging."""

    def __init__(self, floor_pct: float = 20.0):
        self.floor_pct = _in_range("floor_pct", floor_pct, 0, 100)

    def decide(self, obs: dict) -> dict:
        low = obs["battery_pct"] is not None and obs["battery_pct"] < self.floor_pct
        return {"pause": low and not obs["charging"]}


class ChargingOnly(Scheduling):
    """Train only while the device is on its charger (or mains powered)."""

    def decide(self, obs: dict) -> dict:
        return {"pause": obs["battery_pct"] is not None and not obs["charging"]}


class Cores(Scheduling):
    """Run on a chosen core cluster with a chosen thread count (e.g. the efficient mid cores)."""

    def __init__(self, cluster: str | None = None, threads: int | None = None):
        self.cluster = None if cluster is None else str(cluster)
        self.threads = None if threads is None else _positive_int("threads", threads)

    def decide(self, obs: dict) -> dict:
        if self.cluster is not None and self.cluster not in obs["clusters"]:
            raise InputError(None, "cluster", f"unknown cluster {self.cluster!r}; "
                             f"this device has: {', '.join(obs['clusters'])}")
        return {k: v for k, v in (("cluster", self.cluster), ("threads", self.threads)) if v is not None}


class ThermalPacer(Scheduling):
    """Use the thermal headroom: train flat out while cooler than limit_c; above it, sleep in
    proportion to the excess (gain_s_per_c seconds per °C, at most max_sleep_s). Unlike the
    paper's rule it never idles a cool device, so it finishes sooner and spends less idle
    energy per token, while still holding the temperature near the limit."""

    def __init__(self, limit_c: float = 42.0, gain_s_per_c: float = 2.0, max_sleep_s: float = 5.0):
        self.limit_c = _number("limit_c", limit_c)
        self.gain_s_per_c = _positive("gain_s_per_c", gain_s_per_c)
        self.max_sleep_s = _positive("max_sleep_s", max_sleep_s)

    def decide(self, obs: dict) -> dict:
        if obs["temperature_c"] is None:  # no sensor: nothing to pace by
            return {}
        excess = obs["temperature_c"] - self.limit_c
        return {"sleep_s": min(self.max_sleep_s, self.gain_s_per_c * excess)} if excess > 0 else {}


class ThermalBudget(Scheduling):
    """Pace to a thermal budget: hold the skin sensor at `limit_c` (below the governor's first
    level) with a PI controller whose output is the sleep before each step. Unlike
    thermal_pacer, the integral term removes the steady offset, so the phone settles at the
    limit instead of above it; it never sleeps while cooler than the limit and its
    integral is empty. The bet: a phone that never throttles keeps every step at the top
    frequency and a cooler junction (less leakage); the price is the idle floor while it sleeps."""

    def __init__(self, limit_c: float = 38.5, kp_s_per_c: float = 4.0, ki_s_per_c_s: float = 0.005,
                 max_sleep_s: float = 30.0):
        self.limit_c = _number("limit_c", limit_c)
        self.kp = _positive("kp_s_per_c", kp_s_per_c)
        self.ki = _positive("ki_s_per_c_s", ki_s_per_c_s)
        self.max_sleep_s = _positive("max_sleep_s", max_sleep_s)
        self.integral = 0.0  # °C s above the limit (never negative: no credit for being cool)
        self.last_t = None

    def decide(self, obs: dict) -> dict:
        if obs["temperature_c"] is None:
            return {}
        error = obs["temperature_c"] - self.limit_c
        if self.last_t is not None:  # anti-windup: the integral alone never asks more than the longest sleep
            self.integral = min(max(0.0, self.integral + error * (obs["t"] - self.last_t)), self.max_sleep_s / self.ki)
        self.last_t = obs["t"]
        sleep = min(self.max_sleep_s, self.kp * error + self.ki * self.integral)
        return {"sleep_s": sleep} if sleep > 0 else {}


class EnergyProbe(Scheduling):
    """Measure, then commit: run a step on each core cluster with all of its cores, observing
    the device's power (a phone reports it as battery current x voltage), then train on the
    cluster that spends the least energy per step. The cluster in use is re-measured every
    step (throttling changes it) and the others every `every_steps` steps. Energy per step
    includes the idle floor, so a frugal but slow cluster does not win by accident."""

    def __init__(self, every_steps: int = 100):
        self.every_steps = _positive_int("every_steps", every_steps)
        self.energy_j: dict[str, float] = {}
        self.to_measure: list[str] = []

    def decide(self, obs: dict) -> dict:
        if obs["step"] > 0:  # the step just done ran on obs["cluster"]
            self.energy_j[obs["cluster"]] = obs["power_w"] * obs["last_step_s"]
        if obs["step"] % self.every_steps == 0:
            self.to_measure = [c for c in obs["clusters"] if c != obs["cluster"] or c not in self.energy_j]
        cluster = self.to_measure.pop(0) if self.to_measure else min(self.energy_j, key=self.energy_j.get)
        return {"cluster": cluster, "threads": obs["clusters"][cluster]}


# ------------------------------------------------------------------------------ make()

BUILTINS: dict[str, dict[str, type]] = {
    "sharding": {"none": NoSharding, "lru": LRU, "prefetch": Prefetch},
    "checkpointing": {"none": NoCheckpointing, "every_block": EveryBlock, "every_k": EveryK},
    "accumulation": {"fixed": Fixed, "max_fit": MaxFit},
    "scheduling": {"none": NoScheduling, "paper": PaperRule, "battery_floor": BatteryFloor,
                   "charging_only": ChargingOnly, "thermal_pacer": ThermalPacer, "cores": Cores,
                   "energy_probe": EnergyProbe, "thermal_budget": ThermalBudget},
}
BASES = {"sharding": Sharding, "checkpointing": Checkpointing, "accumulation": Accumulation,
         "scheduling": Scheduling}


def make(kind: str, spec):
    """A policy object from a workload's PolicySpec (`spec.policy`, `spec.params`)."""
    name, params = spec.policy, spec.params
    cls = _user_class(kind, name) if ":" in name else BUILTINS[kind].get(name)
    if cls is None:
        raise InputError(None, "policy", f"expected a built-in {kind} policy or module:Class, got "
                         f"{name!r}; known: {', '.join(BUILTINS[kind])}")
    accepted = {p.name: p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in params:
        if key not in accepted:
            raise InputError(None, key, f"unknown parameter of {kind} policy {name!r}; "
                             f"known: {', '.join(accepted) or 'none'}")
    for key, p in accepted.items():
        if p.default is p.empty and key not in params:
            raise InputError(None, key, f"missing required parameter of {kind} policy {name!r}")
    try:
        return cls(**params)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- a user's constructor may raise anything: one line, no traceback
        raise InputError(None, "policy", f"{name}: {type(e).__name__}: {e}") from None


def _user_class(kind: str, name: str) -> type:
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- importing a user's module runs its code, which may raise anything
        raise InputError(None, "policy", f"expected an importable module:Class; cannot import "
                         f"{module_name!r}: {type(e).__name__}: {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise InputError(None, "policy", f"expected module:Class; module {module_name!r} has no {class_name!r}")
    base = BASES[kind]
    hook = {"sharding": "victim", "checkpointing": "layers", "accumulation": "micro_batch",
            "scheduling": "decide"}[kind]
    if not (isinstance(cls, type) and hasattr(cls, hook)):
        raise InputError(None, "policy", f"expected a class with a {hook}() hook "
                         f"(subclass mfbench.policies.{base.__name__}), got {name!r}")
    return cls


def _number(name: str, v, expected: str = "a number", ok=lambda x: True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise InputError(None, name, f"expected {expected}, got {v!r}")
    return float(v)


def _positive(name: str, v) -> float:
    return _number(name, v, "a positive number", lambda x: x > 0)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(None, name, f"expected a positive integer, got {v!r}")
    return v


def _in_range(name: str, v, lo: float, hi: float) -> float:
    return _number(name, v, f"a number from {lo} to {hi}", lambda x: lo <= x <= hi)
