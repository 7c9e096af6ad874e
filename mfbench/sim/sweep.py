"""Sweeps: simulate every point of a grid (or a random sample) over any field, on Ray.

A sweep file (`workloads/sweeps/*.yaml`):

    name: budget
    steps: 50                  # optimizer steps of every run (default: each workload's)
    battery_start_pct: 100     # run settings: battery_start_pct, ambient_c, charging
    devices: [pixel8, galaxy-a54]
    workloads: [../paper/gpt2-lora-seq128.yaml]     # relative to the sweep file
    scheduling:                # each replaces the workload's own scheduling policy
      - {policy: paper}
      - {policy: thermal_pacer, limit_c: 42}
    axes:                      # any field path: of the workload, of the device (`device.`), a run setting
      memory.sharding: [{policy: lru, budget_mb: 200}, {policy: lru, budget_mb: 650}]
      micro_batch: [2, 4, 8]
      device.ram.app_limit_mb.value: [3000, 6000]
      ambient_c: [20, 35]
    random: 20                 # optional: 20 random points instead of the whole grid; then an axis
    seed: 0                    #   may also be {uniform: [lo, hi]}, {log_uniform: [lo, hi]} or {int: [lo, hi]}

Every run's summary streams back as it finishes into `OUT/results.parquet` and
`OUT/results.csv`, one row a run with its axis values, its resolved configuration (`config`)
and a `key` hashing it; rerunning the same command (or one with more axis values, or a larger
`random`) skips every point already in the table. A run that fails on bad input is a row with
its `error`. `OUT/pareto.png` draws each device's Pareto front per workload.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from pydantic import Field

from mfbench.errors import InputError, Int, Strict, load_schema
from mfbench.spec.profile import AmbientC, BatteryPct
from mfbench.spec.workload import PolicySpec

COLUMNS = ["workload", "device", "scheduling", "steps", "median_step_s", "wall_s", "wall_tokens_per_s", "energy_j",
           "j_per_token", "peak_memory_bytes", "battery_start_pct", "battery_end_pct", "battery_drop_pct",
           "max_temperature_c", "io_read_bytes", "killed", "kill_reason", "stop_reason"]
SUMMARY_TYPES = {"workload": pa.string(), "device": pa.string(), "scheduling": pa.string(), "steps": pa.int64(),
                 "peak_memory_bytes": pa.int64(), "io_read_bytes": pa.int64(), "killed": pa.bool_(),
                 "kill_reason": pa.string(), "stop_reason": pa.string()}  # the rest: float64
RUN_SETTINGS = ("battery_start_pct", "ambient_c", "charging", "steps")
DISTRIBUTIONS = ("uniform", "log_uniform", "int")


class Sweep(Strict):
    name: str
    steps: Int | None = Field(None, gt=0)
    battery_start_pct: BatteryPct = 100.0
    ambient_c: AmbientC | None = None
    charging: bool = False
    devices: tuple[str, ...] = Field(min_length=1)
    workloads: tuple[str, ...] = Field(min_length=1)
    scheduling: tuple[PolicySpec, ...] | None = None
    axes: dict[str, list | dict] = {}
    random: int | None = Field(None, gt=0)
    seed: int = Field(0, ge=0)


def label(spec) -> str:
    """`thermal_pacer(limit_c=40)`, or just `paper` without parameters (a PolicySpec or its dict)."""
    if isinstance(spec, dict):
        spec = PolicySpec(**spec)
    params = ",".join(f"{k}={v}" for k, v in spec.params.items())
    return f"{spec.policy}({params})" if params else spec.policy


def as_set(path: str, value) -> str:
    """`path=value` for errors.apply_sets; PyYAML reads back exactly what it wrote."""
    return f"{path}={yaml.safe_dump(value, default_flow_style=True, width=2**30).removesuffix(chr(10) + '...' + chr(10)).strip()}"


def show(value) -> str | float | int | bool | None:
    """An axis value as a table cell: a policy by its label, a list or mapping as JSON."""
    if isinstance(value, dict) and "policy" in value:
        return label(value)
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def column_type(values: list) -> pa.DataType:
    values = [show(v) for v in values]
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pa.float64()
    return pa.string()


class Point:
    """One run of a sweep: a workload file with `--set`s, a device with `--set`s, run settings."""

    def __init__(self, workload_path: Path, device: str, values: dict, sweep: Sweep, base_sets: tuple = ()):
        self.workload_path, self.device, self.values = workload_path, device, values  # values: axis -> value
        self.workload_sets = tuple(base_sets) + tuple(as_set(k, v) for k, v in values.items()
                                                      if k not in RUN_SETTINGS and not k.startswith("device."))
        self.device_sets = tuple(as_set(k.removeprefix("device."), v) for k, v in values.items()
                                 if k.startswith("device."))
        self.run = {"steps": sweep.steps, "battery_start_pct": sweep.battery_start_pct,
                    "ambient_c": sweep.ambient_c, "charging": sweep.charging,
                    **{k: v for k, v in values.items() if k in RUN_SETTINGS}}


class Loader:
    """Workloads and devices loaded once per distinct set of overrides."""

    def __init__(self):
        self.workloads, self.devices, self.digests = {}, {}, {}

    def workload(self, path: Path, sets: tuple = ()):
        from mfbench.spec.workload import load_workload
        if (path, sets) not in self.workloads:
            self.workloads[path, sets] = load_workload(path, sets)
        return self.workloads[path, sets]

    def device(self, name: str, sets: tuple = ()):
        from mfbench.spec.profile import load_device
        if (name, sets) not in self.devices:
            self.devices[name, sets] = load_device(name, sets)
        return self.devices[name, sets]

    def config(self, point: Point) -> dict:
        """The point's resolved configuration: the workload after its sets, the device and its
        sets, the run settings."""
        workload = self.workload(point.workload_path, point.workload_sets)
        return {"workload": workload.model_dump(mode="json"), "workload_file": str(point.workload_path),
                "device": point.device, "device_sets": list(point.device_sets), **point.run}

    def key(self, point: Point) -> str:
        """A hash of the resolved configuration, the device profile as resolved included (so an
        edited workload or profile file is a new point); of the point as written when the
        schema refuses the combination."""
        try:
            if (point.device, point.device_sets) not in self.digests:
                device = self.device(point.device, point.device_sets).model_dump(mode="json")
                self.digests[point.device, point.device_sets] = json.dumps(device, sort_keys=True)
            text = json.dumps(self.config(point), sort_keys=True) + self.digests[point.device, point.device_sets]
        except InputError:
            text = "refused: " + json.dumps(raw(point), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def raw(point: Point) -> dict:
    """A point as written: files, sets and run settings."""
    return {"workload_file": str(point.workload_path), "workload_sets": list(point.workload_sets),
            "device": point.device, "device_sets": list(point.device_sets), **point.run}


def load_sweep(path: str | Path, sets=()) -> tuple[Sweep, list[Point], dict[str, list]]:
    """Validate the sweep file (after `--set` overrides `sets`), every file it names and every
    axis value; return it with its points and its axes (name -> values or distribution)."""
    path = Path(path)
    sweep = load_schema(Sweep, path, sets)
    loader = Loader()
    devices = [str((path.parent / d).resolve()) if d.endswith((".yaml", ".yml")) else d for d in sweep.devices]
    for i, device in enumerate(devices):
        try:
            loader.device(device)
        except InputError as e:
            raise InputError(path, f"devices[{i}]", e.message if e.file is None else str(e)) from None
    workloads = [(path.parent / w).resolve() for w in sweep.workloads]
    for i, w in enumerate(workloads):
        if not w.exists():
            raise InputError(path, f"workloads[{i}]", f"expected a workload file (relative to the sweep file); "
                             f"{w} does not exist")
        loader.workload(w)
    axes = dict(sweep.axes)
    if sweep.scheduling is not None:
        axes = {"scheduling": [s.model_dump() for s in sweep.scheduling], **axes}
    firsts = {}
    for name, values in axes.items():
        where = "scheduling" if name == "scheduling" and sweep.scheduling is not None else f"axes.{name}"
        if isinstance(values, dict):  # a distribution
            kind = next(iter(values), None)
            if sweep.random is None or len(values) != 1 or kind not in DISTRIBUTIONS or not (
                    isinstance(values[kind], list) and len(values[kind]) == 2 and values[kind][0] < values[kind][1]):
                raise InputError(path, where, "expected a list of values, or with `random:` one of "
                                 f"{', '.join(f'{{{d}: [low, high]}}' for d in DISTRIBUTIONS)} (low < high)")
            continue
        if not values:
            raise InputError(path, where, "expected at least one value")
        # each value on the first workload and device, alone or with the first value of every
        # axis before it (an axis may need an earlier one: scheduling.limit_c a policy that has
        # it); a combination the schema refuses later is a row with its error
        for i, value in enumerate(values):
            error = None
            for others in ({}, firsts):
                point = Point(workloads[0], devices[0], {**others, name: value}, sweep)
                try:
                    loader.workload(workloads[0], point.workload_sets)
                    loader.device(devices[0], point.device_sets)
                    if name in RUN_SETTINGS:
                        _check_run_setting(name, value)
                    break
                except InputError as e:
                    error = e  # with the earlier axes: the more telling one
            else:
                if where == "scheduling":  # the policy's own parameter, as in a workload
                    raise InputError(path, f"{where}[{i}]{(error.field or '').removeprefix('scheduling')}",
                                     error.message) from None
                raise InputError(path, f"{where}[{i}]", str(error)) from None
        firsts[name] = values[0]
    base = {"workload": workloads, "device": devices}
    names = list(axes)
    if sweep.random is None:
        combos = itertools.product(*base.values(), *axes.values())
        points = [Point(c[0], c[1], dict(zip(names, c[2:])), sweep) for c in combos]
    else:  # point i depends on (seed, i) only: a larger `random` keeps the points drawn before
        points = []
        for i in range(sweep.random):
            rng = np.random.default_rng([sweep.seed, i])
            pick = [v[rng.integers(len(v))] for v in base.values()]
            points.append(Point(*pick, {n: draw(v, rng) for n, v in axes.items()}, sweep))
    return sweep, points, axes


def _check_run_setting(name: str, value) -> None:
    ok = {"battery_start_pct": lambda v: isinstance(v, (int, float)) and 0 < v <= 100,
          "ambient_c": lambda v: v is None or isinstance(v, (int, float)) and -40 <= v <= 60,
          "charging": lambda v: isinstance(v, bool),
          "steps": lambda v: isinstance(v, int) and v > 0}[name]
    if isinstance(value, bool) and name != "charging" or not ok(value):
        expected = {"battery_start_pct": "a percentage in (0, 100]", "ambient_c": "°C in [-40, 60]",
                    "charging": "true or false", "steps": "a positive whole number"}[name]
        raise InputError(None, None, f"expected {expected}, got {value!r}")


def draw(values, rng):
    """A value of an axis: one of its list, or a draw from its distribution."""
    if isinstance(values, list):
        return values[rng.integers(len(values))]
    (kind, (low, high)), = values.items()
    if kind == "int":
        return int(rng.integers(low, high + 1))
    if kind == "log_uniform":
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))
    return float(rng.uniform(low, high))


def resolve(point: Point, loader: Loader) -> dict:
    """What a worker needs for one run, with the point's resolved configuration and its key; a
    combination the schema refuses (micro_batch 3 of a batch of 8) carries its error instead."""
    try:
        workload = loader.workload(point.workload_path, point.workload_sets)
        device = loader.device(point.device, point.device_sets)
    except InputError as e:
        return {"key": loader.key(point), "config": json.dumps(raw(point), sort_keys=True), "error": str(e),
                "names": (point.workload_path.stem, point.device,
                          label(point.values.get("scheduling", {"policy": "(the workload's)"})))}
    return {"key": loader.key(point), "config": json.dumps(loader.config(point), sort_keys=True),
            "workload": workload, "device": device, "base_dir": point.workload_path.parent, "run": point.run}


def run_point(job: dict) -> dict:
    """Simulate one point (in a worker): its summary as a row. Bad input is a row with the
    error, not an exception, so one bad point never stops the others."""
    from dataclasses import asdict

    from mfbench import sim

    row = {"key": job["key"], "config": job["config"], "error": None, **job.get("columns", {})}
    if "error" in job:
        return {**row, **dict(zip(("workload", "device", "scheduling"), job["names"])), "error": job["error"]}
    try:
        summary, _ = sim.simulate(job["workload"], job["device"], **job["run"], trace_ops_steps=0, progress=False,
                                  base_dir=job["base_dir"], command="mfbench sweep")
    except InputError as e:
        return {**row, "workload": job["workload"].name, "device": job["device"].name,
                "scheduling": label(job["workload"].scheduling), "error": str(e)}
    s = asdict(summary)
    made = summary.provenance  # the workload as it ran (the micro-batch its policy chose, threads) and the code
    config = {**json.loads(job["config"]), "workload": made["workload"],
              **{k: made[k] for k in ("mfbench_version", "git_commit")}}
    return {**row, **{k: s[k] for k in COLUMNS if k in s}, "scheduling": label(job["workload"].scheduling),
            "config": json.dumps(config, sort_keys=True)}


def schema(axes: dict[str, list | dict]) -> tuple[pa.Schema, dict[str, str]]:
    """The table's schema, and each axis's column (an axis named like a summary field is `set.NAME`)."""
    columns = {n: (f"set.{n}" if n in COLUMNS else n) for n in axes if n != "scheduling"}
    fields = [pa.field(c, SUMMARY_TYPES.get(c, pa.float64())) for c in COLUMNS]
    for name, column in columns.items():
        values = axes[name]
        kind = (column_type(values) if isinstance(values, list) else
                pa.int64() if "int" in values else pa.float64())
        fields.append(pa.field(column, kind))
    fields += [pa.field("error", pa.string()), pa.field("key", pa.string()), pa.field("config", pa.string())]
    return pa.schema(fields), columns


def default_out(sweep: Sweep) -> Path:
    return Path(f"runs/sweep-{sweep.name}")


def run_sweep(path: str | Path, out_dir: str | Path | None = None, engine=None, progress: bool = True, sets=()):
    """Run every point of the sweep (after `--set` overrides `sets`) not already in OUT's table;
    write results.parquet, results.csv and pareto.png. Returns (the whole table as rows, OUT,
    runs done now)."""
    from tqdm import tqdm

    from mfbench.scale.engine import Engine
    from mfbench.scale.plot import plot_fronts
    from mfbench.scale.table import ResultsTable

    sweep, points, axes = load_sweep(path, sets)
    out = Path(out_dir or default_out(sweep))
    table_schema, columns = schema(axes)
    table = ResultsTable(out, table_schema)
    done, loader = table.done_keys(), Loader()

    keys = [loader.key(p) for p in points]
    todo = list(dict.fromkeys(k for k in keys if k not in done))  # a point drawn twice runs once
    first = {k: p for p, k in reversed(list(zip(points, keys)))}

    def jobs():  # built as the engine takes them: only the tasks in flight are held
        for k in todo:
            point = first[k]
            yield {**resolve(point, loader), "columns": {c: show(point.values[n]) for n, c in columns.items()}}

    own = engine is None
    engine = engine or Engine()
    try:
        with tqdm(total=len(todo), unit="run", desc=f"sweep {sweep.name} ({engine.name})", disable=not progress,
                  mininterval=0.5) as bar:
            for _, row in (engine.map(run_point, jobs()) if todo else ()):
                table.add(row)
                bar.update()
    finally:  # a stop keeps every finished run; the next call resumes from them
        table.flush()
        if own:
            engine.shutdown()
    rows = table.finish().to_pylist()
    plot_fronts(rows, out / "pareto.png", f"sweep {sweep.name}: {sweep.steps or 'workload'} steps "
                f"from {sweep.battery_start_pct:g} % battery", x="wall_s", y="j_per_token")
    return rows, out, len(todo)
