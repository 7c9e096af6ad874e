"""The policy protocol (contract 3 of docs/contracts.md): what a scheduling policy's
`decide(observation)` receives before every optimizer step, and the decision it may return.

Defined once here for every side that drives a policy: the simulator (mfbench.sim) and the
native trainer's JSON-line control channel. docs/policies.md shows these tables (a test holds
them equal).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from mfbench.errors import InputError


class Key(NamedTuple):
    name: str
    type: str
    unit: str
    meaning: str


OBSERVATION = (
    Key("step", "int", "", "optimizer steps done so far (0 before the first)"),
    Key("t", "float", "s", "time since the run started"),
    Key("battery_pct", "float or None", "%", "state of charge; None when mains powered"),
    Key("temperature_c", "float or None", "°C", "device temperature; None when no sensor reports one"),
    Key("charging", "bool", "", "True when on the charger (or mains powered)"),
    Key("last_step_s", "float or None", "s", "compute time of the previous step; None before the first"),
    Key("power_w", "float or None", "W", "mean device power over the previous step; None before the first"),
    Key("threads", "int", "", "worker threads in use (those of the previous step)"),
    Key("cluster", "str", "", "core cluster in use (that of the previous step)"),
    Key("clusters", "{str: int}", "", "the device's core clusters: {name: cores}"),
)

DECISION = (  # every key optional; {} (or None) changes nothing
    Key("sleep_s", "float >= 0", "s", "idle this long before the step"),
    Key("pause", "bool", "", "True: do not train now; the observation comes again after a poll interval"),
    Key("threads", "int > 0", "", "worker threads from this step on"),
    Key("cluster", "str", "", "core cluster from this step on: a key of `clusters`"),
)
DECISION_KEYS = tuple(k.name for k in DECISION)


def observation(**values) -> dict:
    """The observation dict, in the documented order; exactly the OBSERVATION keys."""
    names = [k.name for k in OBSERVATION]
    if set(values) != set(names):
        raise TypeError(f"observation: missing {sorted(set(names) - set(values))}, "
                        f"unknown {sorted(set(values) - set(names))}")
    return {n: values[n] for n in names}


def check_decision(decision, clusters) -> dict:
    """`decision` checked against DECISION (None counts as {}); `clusters` holds the known
    cluster names. A bad decision is an InputError on `scheduling` naming the key."""
    if decision is None:
        return {}
    if not isinstance(decision, dict):
        raise InputError(None, "scheduling", f"decide() must return a dict with keys {', '.join(DECISION_KEYS)}; "
                         f"got {decision!r}")

    def bad(key, expected):
        return InputError(None, "scheduling", f"decide() returned {key} = {decision[key]!r}; expected {expected}")

    unknown = [k for k in decision if k not in DECISION_KEYS]
    if unknown:
        raise InputError(None, "scheduling", f"decide() returned unknown key {unknown[0]!r}; "
                         f"expected keys: {', '.join(DECISION_KEYS)}")
    out = {}
    if "sleep_s" in decision:
        v = decision["sleep_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise bad("sleep_s", "seconds, a finite number >= 0")
        out["sleep_s"] = float(v)
    if "pause" in decision:
        if not isinstance(decision["pause"], bool):
            raise bad("pause", "True or False")
        out["pause"] = decision["pause"]
    if "threads" in decision:
        v = decision["threads"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise bad("threads", "a positive integer")
        out["threads"] = v
    if "cluster" in decision:
        if not isinstance(decision["cluster"], str) or decision["cluster"] not in clusters:
            raise bad("cluster", f"a cluster of this device: {', '.join(clusters)}")
        out["cluster"] = decision["cluster"]
    return out


def decide(scheduling, observation: dict) -> dict:
    """Ask a scheduling policy for its decision on `observation`, checked; a policy's own
    InputError is named under `scheduling`. The simulator and the control channel both call it."""
    try:
        decision = scheduling.decide(observation)
    except InputError as e:
        raise InputError(None, "scheduling" + (f".{e.field}" if e.field else ""), e.message) from None
    except Exception as e:  # a user policy's own bug: one line naming it, not a traceback
        raise InputError(None, "scheduling", f"{type(scheduling).__name__}.decide raised "
                         f"{type(e).__name__}: {e} (expected a decision dict)") from None
    return check_decision(decision, observation["clusters"])
