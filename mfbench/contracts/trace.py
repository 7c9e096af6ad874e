"""Traces and summaries: one schema for predicted (simulated) and measured (native) runs.

This is contract 3 of docs/contracts.md. A trace is JSON Lines, one event a line, every key
of its type present (null where a side cannot know it):

    {"type": "op", "name", "start", "duration", "shard", "bytes"}
    {"type": "io", "kind": "load" | "store", "shard", "start", "duration", "bytes"}
    {"type": "sample", "t", "rss", "battery", "current", "voltage", "temperature", "frequency",
     "peak_rss", "pss", "charging", "zones", "frequencies", "cpus"}
    {"type": "step", "index", "t", "duration", "tokens", "loss", "lr", "grad_norm"}
    {"type": "decision", "t", "policy", "choice"}

Times are seconds from the start of the run; `rss` and `bytes` are bytes; `battery` is
percent, `current` amperes (positive = discharging), `voltage` volts, `temperature` °C,
`frequency` MHz (of the cluster in use); `peak_rss`, `pss` bytes, `charging` true/false,
`zones` [{"type", "c"}] per thermal zone, `frequencies` {cluster: MHz}, `cpus` the CPU each
worker thread last ran on. `op` events: the simulator's are ops of the step program, the
trainer's regions of them (an owner's ops in one phase; docs/contracts.md). The summary is one JSON object with every field of `Summary`.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mfbench.errors import InputError
from mfbench.files import atomic, folder, write_atomic
from mfbench.units import MB

SCHEMA = 1
EVENT_KEYS = {
    "op": ("name", "start", "duration", "shard", "bytes"),
    "io": ("kind", "shard", "start", "duration", "bytes"),
    "sample": ("t", "rss", "battery", "current", "voltage", "temperature", "frequency",
               "peak_rss", "pss", "charging", "zones", "frequencies", "cpus"),
    "step": ("index", "t", "duration", "tokens", "loss", "lr", "grad_norm"),
    "decision": ("t", "policy", "choice"),
}


class Durations:
    """Step durations as a count of each distinct value. A long simulation repeats a few
    (fast-forward reuses a step's result), so 10^7 steps take a few entries; the median is
    exactly that of the whole list (statistics.median)."""

    def __init__(self, values: Iterable[float] = ()):
        self.counts: Counter[float] = Counter()
        self.n, self.last = 0, None
        for v in values:
            self.append(v)

    def append(self, seconds: float) -> None:
        self.counts[seconds] += 1
        self.n += 1
        self.last = seconds

    def __len__(self) -> int:
        return self.n

    def median(self) -> float | None:
        if not self.n:
            return None
        ranks, seen = {self.n // 2, (self.n - 1) // 2}, 0  # the middle one, or the middle two
        middle = {}
        for v in sorted(self.counts):
            for k in ranks:
                if seen <= k < seen + self.counts[v]:
                    middle[k] = v
            seen += self.counts[v]
        return middle[self.n // 2] if self.n % 2 else (middle[self.n // 2 - 1] + middle[self.n // 2]) / 2


@dataclass
class Summary:
    source: str                  # "predicted" | "measured"
    workload: str
    device: str                  # a profile name, or the target that ran it (`local`)
    steps: int                   # optimizer steps completed
    tokens_per_step: int
    median_step_s: float | None  # one step's compute, without scheduler sleeps (null: no step done)
    step_tokens_per_s: float | None  # tokens_per_step / median_step_s
    wall_s: float                # the whole run, sleeps and pauses included
    wall_tokens_per_s: float | None  # steps x tokens_per_step / wall_s
    peak_memory_bytes: int       # predicted: planned peak + runtime overhead; measured: peak RSS
    energy_j: float | None       # null: no sensor measured it
    j_per_token: float | None
    battery_start_pct: float | None
    battery_end_pct: float | None
    battery_drop_pct: float | None
    max_temperature_c: float | None
    io_read_bytes: int
    io_write_bytes: int
    final_loss: float | None     # null when predicted
    killed: bool
    kill_reason: str | None
    stop_reason: str | None      # why a run ended early without a kill (a policy stopped it)
    provenance: dict = field(default_factory=dict)  # what produced it (docs/contracts.md)
    details: dict = field(default_factory=dict)     # side-specific extras
    schema: int = SCHEMA

    @classmethod
    def of_steps(cls, step_seconds: Iterable[float] | Durations, wall_s: float, tokens_per_step: int,
                 **rest) -> Summary:
        """The throughput fields computed one way for both sides, from the step durations."""
        steps = step_seconds if isinstance(step_seconds, Durations) else Durations(step_seconds)
        median = steps.median()  # null: no step completed
        return cls(steps=len(steps), tokens_per_step=tokens_per_step, median_step_s=median,
                   step_tokens_per_s=tokens_per_step / median if median else None, wall_s=wall_s,
                   wall_tokens_per_s=len(steps) * tokens_per_step / wall_s if len(steps) and wall_s > 0 else None,
                   **rest)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, path: str | Path | None = None) -> Summary:
        """Read a summary written by either side; a missing or unknown key is an InputError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, None, f"expected a summary.json (JSON): {e}") from None
        if not isinstance(data, dict):
            raise InputError(path, None, "expected a summary.json (a JSON object)")
        keys = [f.name for f in fields(cls)]
        missing = [k for k in keys if k not in data]
        unknown = [k for k in data if k not in keys]
        if missing or unknown:
            what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
            raise InputError(path, (missing or unknown)[0], f"{what} (expected every key of the summary schema "
                             f"{SCHEMA}, docs/contracts.md)")
        if data["schema"] != SCHEMA:
            raise InputError(path, "schema", f"expected {SCHEMA}, got {data['schema']!r}")
        return cls(**data)


def provenance(*, command: str, workload: dict, device: dict, target: str | None, ambient_c: float | None,
               charging: bool | None, seed: int | None) -> dict:
    """What produced a run: mfbench's version and git commit, the command, the workload as
    resolved (every policy with its parameters), the device as resolved (a whole profile, or
    the machine that ran it), target, ambient, charging, seed."""
    import subprocess

    import mfbench
    from mfbench.shipped import PACKAGE
    commit = None
    if (PACKAGE.parent / ".git").exists():  # a source checkout (an installed package has no commit of its own)
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE.parent, text=True,
                                    capture_output=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"mfbench_version": mfbench.__version__, "git_commit": commit, "command": command, "workload": workload,
            "device": device, "target": target, "ambient_c": ambient_c, "charging": charging, "seed": seed}


def _line(event: dict) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


def write_trace(path: str | Path, events: Iterable[dict]) -> None:
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(map(_line, events))


def iter_trace(path: str | Path) -> Iterator[dict]:
    """The events of a trace file one at a time (a long run's trace need not fit in memory)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_trace(path: str | Path) -> list[dict]:
    return list(iter_trace(path))


def write_summary(path: str | Path, summary: Summary) -> None:
    write_atomic(path, summary.to_json() + "\n")


def read_summary(path: str | Path) -> Summary:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, None, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    return Summary.from_json(text, path)


# Perfetto draws one track per (pid, tid); counters get their own tracks by name.
_TRACKS = {"step": (0, "steps"), "op": (1, "compute"), "io": (2, "storage"), "decision": (3, "policy")}
_COUNTERS = {"rss": ("memory", 1 / MB, "MB"), "battery": ("battery", 1, "%"),
             "current": ("current", 1, "A"), "voltage": ("voltage", 1, "V"),
             "temperature": ("temperature", 1, "C"), "frequency": ("frequency", 1, "MHz")}


def chrome_events(trace: Iterable[dict]) -> Iterator[dict]:
    """The trace as Chrome Trace Event format events: the tracks' names, then one or more
    events per trace event."""
    for tid, name in _TRACKS.values():
        yield {"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}
    for e in trace:
        yield from _chrome_of(e)


def _chrome_of(e: dict) -> Iterator[dict]:
    us = 1e6
    kind = e["type"]
    if kind == "op":
        yield {"ph": "X", "pid": 1, "tid": 1, "name": e["name"], "ts": e["start"] * us,
               "dur": e["duration"] * us, "args": {"shard": e["shard"], "bytes": e["bytes"]}}
    elif kind == "io":
        yield {"ph": "X", "pid": 1, "tid": 2, "name": f"{e['kind']} {e['shard']}",
               "ts": e["start"] * us, "dur": e["duration"] * us, "args": {"bytes": e["bytes"]}}
    elif kind == "step":
        yield {"ph": "X", "pid": 1, "tid": 0, "name": f"step {e['index']}",
               "ts": (e["t"] - e["duration"]) * us, "dur": e["duration"] * us,
               "args": {"tokens": e["tokens"], "loss": e["loss"]}}
    elif kind == "decision":
        yield {"ph": "i", "s": "t", "pid": 1, "tid": 3, "name": e["policy"], "ts": e["t"] * us,
               "args": {"choice": e["choice"]}}
    elif kind == "sample":
        for key, (name, scale, unit) in _COUNTERS.items():
            if e.get(key) is not None:
                yield {"ph": "C", "pid": 1, "name": name, "ts": e["t"] * us, "args": {unit: e[key] * scale}}


def to_chrome(trace: Iterable[dict]) -> dict:
    """The trace in Chrome's Trace Event format (load it at ui.perfetto.dev or chrome://tracing)."""
    return {"traceEvents": list(chrome_events(trace)), "displayTimeUnit": "ms"}


def write_chrome(path: str | Path, trace: Iterable[dict]) -> None:
    """to_chrome(trace) as compact JSON, written event by event."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(_CHROME_HEAD)
        f.write(",".join(json.dumps(e, separators=(",", ":")) for e in chrome_events(trace)))
        f.write(_CHROME_TAIL)


_CHROME_HEAD, _CHROME_TAIL = '{"traceEvents":[', '],"displayTimeUnit":"ms"}'


class RunWriter:
    """A run's folder (summary.json, trace.jsonl, trace.chrome.json for ui.perfetto.dev)
    written as one set, in bounded memory.

    Events are appended (`writer.append(e)`, `writer += events`) to a staged trace.jsonl and
    a staged Chrome trace as they happen; `commit(summary)` renames the three into place,
    summary last, so a summary is never beside an older trace. Leaving the `with` block
    without a commit (an error) deletes what was staged and keeps the folder as it was.
    """

    def __init__(self, out: str | Path):
        self.out = folder(out)
        self._committed = False
        self._files = ExitStack()
        self._summary = self._files.enter_context(atomic(self.out / "summary.json"))  # renamed last
        self._chrome = self._files.enter_context(atomic(self.out / "trace.chrome.json"))
        self._trace = self._files.enter_context(atomic(self.out / "trace.jsonl"))
        self._file = self._files.enter_context(open(self._trace, "w"))
        self._chrome_file = self._files.enter_context(open(self._chrome, "w"))
        self._chrome_file.write(_CHROME_HEAD + ",".join(json.dumps(e, separators=(",", ":"))
                                                        for e in chrome_events(())))

    def append(self, event: dict) -> None:
        self._file.write(_line(event))
        for e in _chrome_of(event):
            self._chrome_file.write("," + json.dumps(e, separators=(",", ":")))

    def __iadd__(self, events: Iterable[dict]) -> RunWriter:
        for e in events:
            self.append(e)
        return self

    def commit(self, summary: Summary) -> None:
        self._chrome_file.write(_CHROME_TAIL)
        self._file.close()
        self._chrome_file.close()
        self._summary.write_text(summary.to_json() + "\n")
        self._committed = True
        self._files.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None and not self._committed:  # left without a summary: keep nothing
            exc = (RuntimeError, RuntimeError("RunWriter closed without commit"), None)
        return self._files.__exit__(*exc)


def format_summary(s: Summary) -> str:
    """A readable two-column table for the terminal."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    battery = ("n/a" if s.battery_start_pct is None else
               f"{s.battery_start_pct:.1f} % -> {s.battery_end_pct:.1f} % (drop {s.battery_drop_pct:.2f} %)")
    ended = (f"killed: {s.kill_reason}" if s.killed else
             f"stopped: {s.stop_reason}" if s.stop_reason else "completed")
    rows = [
        ("run", f"{s.workload} on {s.device} ({s.source})"),
        ("steps", f"{s.steps:,}  [{ended}]"),
        ("median step", "n/a" if s.median_step_s is None else
         f"{s.median_step_s:.3f} s ({s.step_tokens_per_s:,.1f} tokens/s)"),
        ("throughput", f"{num(s.wall_tokens_per_s, ',.1f')} tokens/s over the whole run (sleeps included)"),
        ("wall time", f"{s.wall_s:,.1f} s ({s.wall_s / 3600:.2f} h)"),
        ("peak memory", f"{s.peak_memory_bytes / MB:,.1f} MB"),
        ("energy", "n/a (no sensor)" if s.energy_j is None else f"{s.energy_j:,.1f} J  ({num(s.j_per_token, '.4f')} J/token)"),
        ("battery", battery),
        ("max temperature", f"{num(s.max_temperature_c, '.1f')} °C"),
        ("storage I/O", f"read {s.io_read_bytes / MB:,.1f} MB, write {s.io_write_bytes / MB:,.1f} MB"),
    ] + ([("final loss", f"{s.final_loss:.4f}")] if s.final_loss is not None else [])
    from mfbench.table import table
    return table(rows)
