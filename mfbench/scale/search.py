"""Multi-objective policy search (`mfbench search SEARCH.yaml`): Optuna's NSGA-II over any
field paths (a policy's parameters, the micro-batch, ...), per device, under constraints.

    name: pacer
    workload: ../paper/gpt2-full-seq128.yaml      # relative to the search file
    sets: ["scheduling={policy: thermal_pacer}"]  # field.path=value, applied before the parameters
    devices: [pixel8, galaxy-a54]
    steps: 300                                    # run settings as in a sweep
    params:                                       # a list of values, or {uniform|log_uniform|int: [lo, hi]}
      scheduling.limit_c: {uniform: [36, 48]}
      micro_batch: [2, 4, 8]
    objectives: [wall_s, energy_j]                # summary fields, all minimised
    constraints: {killed: false, battery_end_pct: {min: 20}}
    trials: 60                                    # per device, evaluated a generation at a time
    population: 12

Each generation's trials run on the engine (Ray, or this process); a point already simulated
is not run again. Writes `trials.parquet`/`.csv` (every trial with its parameters, objectives
and feasibility), `pareto.csv` (the feasible non-dominated trials of each device) and
`pareto.png` (the first two objectives, one front per device).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mfbench.errors import InputError, Int, Number, Strict, load_schema
from mfbench.files import atomic, folder
from mfbench.scale.plot import pareto_front
from mfbench.sim.sweep import DISTRIBUTIONS, Loader, Point, resolve, run_point, show
from mfbench.spec.profile import AmbientC, BatteryPct

OBJECTIVES = ("wall_s", "energy_j", "j_per_token", "peak_memory_bytes", "battery_drop_pct", "median_step_s",
              "max_temperature_c")


class Bound(Strict):
    min: Number | None = None
    max: Number | None = None


class Search(Strict):
    name: str
    workload: str
    sets: tuple[str, ...] = ()
    devices: tuple[str, ...] = Field(min_length=1)
    steps: Int | None = Field(None, gt=0)
    battery_start_pct: BatteryPct = 100.0
    ambient_c: AmbientC | None = None
    charging: bool = False
    params: dict[str, list | dict] = Field(min_length=1)
    objectives: tuple[str, ...] = Field(("wall_s", "energy_j"), min_length=1)
    constraints: dict[str, bool | Bound] = {}
    trials: Int = Field(40, gt=0)
    population: Int = Field(10, ge=2)
    seed: Int = Field(0, ge=0)


def load_search(path: str | Path) -> tuple[Search, Path]:
    path = Path(path)
    search = load_schema(Search, path)
    for i, o in enumerate(search.objectives):
        if o not in OBJECTIVES:
            raise InputError(path, f"objectives[{i}]", f"expected one of {', '.join(OBJECTIVES)}, got {o!r}")
    for name, c in search.constraints.items():
        if name == "killed" and c is not False or name != "killed" and (
                name not in OBJECTIVES + ("battery_end_pct",) or not isinstance(c, Bound)):
            raise InputError(path, f"constraints.{name}", "expected killed: false, or a summary field "
                             f"({', '.join(OBJECTIVES + ('battery_end_pct',))}) with {{min: X}} and/or {{max: Y}}")
    for name, values in search.params.items():
        if isinstance(values, dict) and (len(values) != 1 or next(iter(values)) not in DISTRIBUTIONS or not (
                isinstance(v := next(iter(values.values())), list) and len(v) == 2 and v[0] < v[1])):
            raise InputError(path, f"params.{name}", "expected a list of values, or one of "
                             f"{', '.join(f'{{{d}: [low, high]}}' for d in DISTRIBUTIONS)} (low < high)")
        if isinstance(values, list) and not values:
            raise InputError(path, f"params.{name}", "expected at least one value")
    workload = (path.parent / search.workload).resolve()
    if not workload.exists():
        raise InputError(path, "workload", f"expected a workload file (relative to the search file); "
                         f"{workload} does not exist")
    return search, workload


def suggest(trial, name: str, values):
    """A trial's value of one parameter (categorical lists by index: values may be mappings)."""
    if isinstance(values, list):
        return values[trial.suggest_categorical(name, list(range(len(values))))]
    (kind, (low, high)), = values.items()
    if kind == "int":
        return trial.suggest_int(name, int(low), int(high))
    return trial.suggest_float(name, low, high, log=kind == "log_uniform")


def violations(search: Search, row: dict) -> dict[str, float]:
    """Optuna's constraint values by name: <= 0 is satisfied."""
    out = {}
    for name, c in search.constraints.items():
        if name == "killed":
            out[name] = 1.0 if row["killed"] else 0.0
            continue
        v = row[name]
        if c.min is not None:
            out[f"{name}.min"] = 1.0 if v is None else c.min - v
        if c.max is not None:
            out[f"{name}.max"] = 1.0 if v is None else v - c.max
    return out


def run_search(path: str | Path, out_dir: str | Path | None = None, engine=None, progress: bool = True):
    """Search each device; write trials.parquet/csv, pareto.csv and pareto.png. Returns
    (every trial as a row, the Pareto rows, OUT)."""
    import optuna
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from mfbench.scale.engine import Engine
    from mfbench.scale.plot import plot_fronts

    search, workload_path = load_search(path)
    loader = Loader()
    try:
        for i, device in enumerate(search.devices):
            loader.device(device)
    except InputError as e:
        raise InputError(path, f"devices[{i}]", e.message) from None
    try:
        loader.workload(workload_path, search.sets)
    except InputError as e:
        raise InputError(path, "sets", str(e)) from None
    out = folder(out_dir or f"runs/search-{search.name}")  # checked before any trial runs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    own = engine is None
    engine = engine or Engine()
    rows, done = [], {}  # done: key -> row (a point proposed again is not simulated again)
    interrupted = False
    try:
        with tqdm(total=search.trials * len(search.devices), unit="trial", desc=f"search {search.name} "
                  f"({engine.name})", disable=not progress, mininterval=0.5) as bar:
            for device in search.devices:
                sampler = optuna.samplers.NSGAIISampler(population_size=search.population, seed=search.seed)
                study = optuna.create_study(directions=["minimize"] * len(search.objectives), sampler=sampler)
                for start in range(0, search.trials, search.population):
                    trials, jobs = [], []
                    for _ in range(min(search.population, search.trials - start)):
                        trial = study.ask()
                        values = {n: suggest(trial, n, v) for n, v in search.params.items()}
                        point = Point(workload_path, device, values, search, base_sets=search.sets)
                        try:
                            job = resolve(point, loader)
                        except InputError as e:  # a combination the schema refuses
                            job = {"key": None, "error": str(e)}
                        trials.append((trial, values, job))
                        if job["key"] is not None and job["key"] not in done and job["key"] not in {
                                j["key"] for j in jobs}:
                            jobs.append(job)
                    for _, row in engine.map(run_point, jobs):
                        done[row["key"]] = row
                    for trial, values, job in trials:
                        row = done.get(job["key"]) or {"error": job.get("error"), "killed": None}
                        row = {**row, "trial": trial.number, "device": device,
                               **{f"param.{n}": show(v) for n, v in values.items()}}
                        if row["error"]:
                            study.tell(trial, state=optuna.trial.TrialState.FAIL)
                            row["feasible"] = False
                        else:
                            cons = violations(search, row).values()
                            for name, value in violations(search, row).items():
                                trial.set_constraint(name, value)
                            study.tell(trial, [float("inf") if row[o] is None else row[o] for o in search.objectives])
                            row["feasible"] = all(c <= 0 for c in cons)
                        rows.append(row)
                        bar.update()
    except KeyboardInterrupt:  # keep the trials done: write them, then stop
        interrupted = True
        if not rows:
            raise
    finally:
        if own:
            engine.shutdown()
    front = []
    for device in search.devices:
        ok = [r for r in rows if r["device"] == device and r["feasible"]]
        unique = list({r["key"]: r for r in ok}.values())  # a configuration proposed twice counts once
        front += [unique[i] for i in pareto_front([tuple(r[o] for o in search.objectives) for r in unique])]
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "config")) + ["config"]
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    with atomic(out / "trials.parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic(out / "trials.csv") as tmp:
        pcsv.write_csv(table, tmp)
    with atomic(out / "pareto.csv") as tmp:
        pcsv.write_csv(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in front], schema=table.schema), tmp)
    x, y = (search.objectives * 2)[:2]
    plot_fronts([r for r in rows if r["feasible"]], out / "pareto.png", f"search {search.name}: the feasible Pareto front of each device "
                f"({search.trials} trials each)", x=x, y=y)
    if interrupted:
        raise KeyboardInterrupt
    return rows, front, out
