"""Traces and summaries: one schema for predicted (simulated) and measured (native) runs.

A trace is JSON Lines, one event a line:

    {"type": "op", "name", "start", "duration", "shard", "bytes"}
    {"type": "io", "kind": "load" | "store", "shard", "start", "duration", "bytes"}
    {"type": "sample", "t", "rss", "battery", "current", "voltage", "temperature", "frequency"}
    {"type": "step", "index", "t", "loss", "tokens", "duration"}
    {"type": "decision", "t", "policy", "choice"}

Times are seconds from the start of the run; `rss` and `bytes` are bytes; `battery` is
percent, `current` amperes (positive = discharging), `voltage` volts, `temperature` °C,
`frequency` MHz. A sensor that does not exist is null. The summary is one JSON object.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mfbench.files import write_atomic


@dataclass
class Summary:
    source: str                  # "predicted" | "measured"
    device: str
    workload: str
    steps: int                   # optimizer steps completed
    median_step_s: float         # compute time of one step, without scheduler sleeps
    tokens_per_s: float          # tokens over the whole run time, sleeps included
    peak_memory_bytes: int
    energy_j: float
    j_per_token: float
    battery_start_pct: float | None
    battery_end_pct: float | None
    battery_drop_pct: float | None
    max_temperature_c: float | None
    io_read_bytes: int
    io_write_bytes: int
    wall_s: float                # the whole run, sleeps and pauses included
    killed: bool
    kill_reason: str | None
    stop_reason: str | None = None  # why a run ended early without a kill (a policy stopped it)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Summary:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_trace(path: str | Path, events: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))


def read_trace(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_summary(path: str | Path, summary: Summary) -> None:
    write_atomic(path, summary.to_json() + "\n")


def read_summary(path: str | Path) -> Summary:
    return Summary.from_json(Path(path).read_text())


# Perfetto draws one track per (pid, tid); counters get their own tracks by name.
_TRACKS = {"step": (0, "steps"), "op": (1, "compute"), "io": (2, "storage"), "decision": (3, "policy")}
_COUNTERS = {"rss": ("memory", 1 / 2**20, "MB"), "battery": ("battery", 1, "%"),
             "current": ("current", 1, "A"), "voltage": ("voltage", 1, "V"),
             "temperature": ("temperature", 1, "C"), "frequency": ("frequency", 1, "MHz")}


def to_chrome(trace: list[dict]) -> dict:
    """The trace in Chrome's Trace Event format (load it at ui.perfetto.dev or chrome://tracing)."""
    us = 1e6
    out = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}
           for tid, name in _TRACKS.values()]
    for e in trace:
        kind = e["type"]
        if kind == "op":
            out.append({"ph": "X", "pid": 1, "tid": 1, "name": e["name"], "ts": e["start"] * us,
                        "dur": e["duration"] * us, "args": {"shard": e["shard"], "bytes": e["bytes"]}})
        elif kind == "io":
            out.append({"ph": "X", "pid": 1, "tid": 2, "name": f"{e['kind']} {e['shard']}",
                        "ts": e["start"] * us, "dur": e["duration"] * us, "args": {"bytes": e["bytes"]}})
        elif kind == "step":
            out.append({"ph": "X", "pid": 1, "tid": 0, "name": f"step {e['index']}",
                        "ts": (e["t"] - e["duration"]) * us, "dur": e["duration"] * us,
                        "args": {"tokens": e["tokens"], "loss": e["loss"]}})
        elif kind == "decision":
            out.append({"ph": "i", "s": "t", "pid": 1, "tid": 3, "name": e["policy"], "ts": e["t"] * us,
                        "args": {"choice": e["choice"]}})
        elif kind == "sample":
            for key, (name, scale, unit) in _COUNTERS.items():
                if e.get(key) is not None:
                    out.append({"ph": "C", "pid": 1, "name": name, "ts": e["t"] * us,
                                "args": {unit: e[key] * scale}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome(path: str | Path, trace: list[dict]) -> None:
    write_atomic(path, json.dumps(to_chrome(trace), separators=(",", ":")))


def format_summary(s: Summary) -> str:
    """A readable two-column table for the terminal."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    battery = ("n/a (mains powered)" if s.battery_start_pct is None else
               f"{s.battery_start_pct:.1f} % -> {s.battery_end_pct:.1f} % (drop {s.battery_drop_pct:.2f} %)")
    ended = (f"killed: {s.kill_reason}" if s.killed else
             f"stopped: {s.stop_reason}" if s.stop_reason else "completed")
    rows = [
        ("run", f"{s.workload} on {s.device} ({s.source})"),
        ("steps", f"{s.steps:,}  [{ended}]"),
        ("median step", f"{s.median_step_s:.3f} s"),
        ("throughput", f"{s.tokens_per_s:,.1f} tokens/s (sleeps included)"),
        ("wall time", f"{s.wall_s:,.1f} s ({s.wall_s / 3600:.2f} h)"),
        ("peak memory", f"{s.peak_memory_bytes / 2**20:,.1f} MB"),
        ("energy", f"{s.energy_j:,.1f} J  ({s.j_per_token:.4f} J/token)"),
        ("battery", battery),
        ("max temperature", f"{num(s.max_temperature_c, '.1f')} °C"),
        ("storage I/O", f"read {s.io_read_bytes / 2**20:,.1f} MB, write {s.io_write_bytes / 2**20:,.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
