"""Federated fine-tuning over a fleet of simulated phones (`mfbench fleet FLEET.yaml`).

N phones are drawn from a device mix, each with its own ambient temperature, start charge,
daily screen-off availability window, daily charging window and network (Wi-Fi or cellular,
its bandwidths), from the stated distributions or a phones file (CSV, one row a phone). On a
global clock, FedAvg rounds run one after another: the server samples clients among the
phones available at the round's start; each downloads the global adapter (or model), trains
K local steps (the simulator: memory, power, battery, heat, the workload's policies) and
uploads its update; the round ends when every client has reported or dropped, or at the
deadline. A client drops when the low-memory killer ends it, its battery empties, its
scheduler stops it, its availability window closes, or it misses the deadline (a straggler).

Cost: a client's training depends only on its situation (device, program, start charge,
ambient, charging), taken at the stated resolution (1 % and 1 °C by default). Each distinct
situation is simulated once and reused; within it, steps are fast-forwarded, and the step
results of one device and program are shared by every situation (docs/simulator.md). New
situations of a round are simulated on the engine (Ray, or this process) in batches.

Assumptions (stated, not measured): a phone starts each round at ambient temperature (its
last round was long enough ago to cool, the thermal time constant being minutes); between
rounds a phone's charge changes only on its charger, at charger_w less idle power (the
owner's own use is not modelled);
a client on the charger uploads and downloads on charger power; the radio's power while
transferring is active_w plus energy per byte (Huang et al., MobiSys 2012, LTE and Wi-Fi
models); a dropped client spends energy up to the moment it stops, training pro rata.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from mfbench.errors import InputError, Int, Number, Strict, load_schema
from mfbench.files import atomic, folder

DAY_S = 24 * 3600.0
OUTCOMES = ("completed", "low_memory", "battery", "stopped", "left", "deadline")


class Uniform(Strict):
    uniform: tuple[Number, Number]


class Normal(Strict):
    normal: tuple[Number, Number] = Field(description="mean, standard deviation")
    min: Number | None = None
    max: Number | None = None


class Choice(Strict):
    values: tuple[Number, ...] = Field(min_length=1)
    weights: tuple[Number, ...] | None = None


Dist = Number | Uniform | Normal | Choice


def sample(dist: Dist, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(dist, (int, float)):
        return np.full(n, float(dist))
    if isinstance(dist, Uniform):
        return rng.uniform(*dist.uniform, n)
    if isinstance(dist, Normal):
        x = rng.normal(*dist.normal, n)
        return np.clip(x, dist.min if dist.min is not None else -np.inf, dist.max if dist.max is not None else np.inf)
    p = None if dist.weights is None else np.array(dist.weights) / sum(dist.weights)
    return rng.choice(np.array(dist.values, dtype=float), n, p=p)


class Window(Strict):
    """A daily window: from start_h (clock hour) for hours."""
    start_h: Dist = 0.0
    hours: Dist = 24.0


class Link(Strict):
    up_mbps: Dist
    down_mbps: Dist
    latency_ms: Number = Field(50.0, ge=0)
    active_w: Number = Field(ge=0)              # the radio's power while it transfers
    nj_per_byte_up: Number = Field(ge=0)
    nj_per_byte_down: Number = Field(ge=0)


# Huang et al., "A Close Examination of Performance and Power Characteristics of 4G LTE
# Networks", MobiSys 2012, Table 4: P = alpha_u * up + alpha_d * down + beta (mW, Mbps)
WIFI = Link(up_mbps=20.0, down_mbps=50.0, latency_ms=20.0, active_w=0.133, nj_per_byte_up=8 * 283.17,
            nj_per_byte_down=8 * 137.01)
CELLULAR = Link(up_mbps=5.0, down_mbps=20.0, latency_ms=70.0, active_w=1.288, nj_per_byte_up=8 * 438.39,
                nj_per_byte_down=8 * 51.97)


class Network(Strict):
    wifi_fraction: Number = Field(0.7, ge=0, le=1)
    wifi: Link = WIFI
    cellular: Link = CELLULAR


class DeviceClass(Strict):
    device: str                                   # a shipped profile name or a profile path
    weight: Number = Field(1.0, gt=0)
    sets: tuple[str, ...] = ()                    # field.path=value overrides of the profile
    label: str | None = None                      # the class's name in the tables (default: device)

    @property
    def name(self) -> str:
        return self.label or self.device


class Resolution(Strict):
    battery_pct: Number = Field(1.0, ge=0)         # 0: exact (no two phones share a situation)
    ambient_c: Number = Field(1.0, ge=0)


class Fleet(Strict):
    name: str
    workload: str                                  # relative to the fleet file
    sets: tuple[str, ...] = ()                     # field.path=value overrides of the workload
    phones: Int = Field(gt=0)
    rounds: Int = Field(gt=0)
    local_steps: Int = Field(gt=0)                 # K optimizer steps per client per round
    clients_per_round: Int | None = Field(None, gt=0)  # sampled among the available (null: all of them)
    min_clients: Int = Field(1, gt=0)              # fewer completed updates: the round is lost
    deadline_s: Number = Field(gt=0)
    upload: Literal["adapter", "model"] = "adapter"
    start_hour: Number = Field(22.0, ge=0, lt=24)   # clock time of the first round
    seed: Int = Field(0, ge=0)
    devices: tuple[DeviceClass, ...] = Field(min_length=1)
    ambient_c: Dist = 25.0
    battery_start_pct: Dist = 80.0
    available: Window = Window()
    charging: Window = Window(hours=0.0)
    network: Network = Network()
    phones_file: str | None = None                 # CSV, one row a phone; its columns replace the draws
    resolution: Resolution = Resolution()
    charger_w: Number = Field(10.0, gt=0)           # estimated: what a charger puts in between rounds



CLIENTS = pa.schema([("round", pa.int64()), ("phone", pa.int64()), ("device", pa.string()),
                     ("battery_pct", pa.float64()), ("sim_battery_pct", pa.float64()), ("sim_ambient_c", pa.float64()),
                     ("charging", pa.bool_()), ("wifi", pa.bool_()), ("download_s", pa.float64()),
                     ("train_s", pa.float64()), ("upload_s", pa.float64()), ("end_s", pa.float64()),
                     ("train_energy_j", pa.float64()), ("energy_j", pa.float64()), ("battery_drop_pct", pa.float64()),
                     ("battery_end_pct", pa.float64()), ("steps", pa.int64()), ("peak_memory_bytes", pa.int64()),
                     ("outcome", pa.string()), ("reason", pa.string())])  # clients.parquet: one row a client and round
PHONE_COLUMNS = ("device", "ambient_c", "battery_start_pct", "available_start_h", "available_hours",
                 "charging_start_h", "charging_hours", "network", "up_mbps", "down_mbps")


# ------------------------------------------------------------------ training a situation

_PREPARED: dict = {}   # in each worker: (device, workload) -> compiled program and shared step results


def prepare(workload, device, base_dir):
    """The program a device runs, its start cluster and threads (as sim.simulate picks them),
    and the step results every run of this device and program shares."""
    from mfbench import sim
    from mfbench.plan import compile_program
    from mfbench.units import MB

    key = (device.model_dump_json(), workload.model_dump_json(), str(base_dir))
    if key not in _PREPARED:
        cluster, threads = sim.start_cluster(device, workload.threads, sim.allowed_clusters(device, "foreground"))
        program = compile_program(workload, base_dir, threads=threads,
                                  overhead_bytes=int(device.ram.runtime_overhead_mb.value * MB))
        _PREPARED[key] = (program, cluster, threads, {})
    return _PREPARED[key]


def train(job: dict) -> list[tuple]:
    """Simulate K local steps for each situation of a batch (in a worker): per situation
    (wall_s, energy_j, battery_drop_pct, steps, peak_memory_bytes, outcome, reason)."""
    from mfbench import policies, sim

    workload, base_dir, steps = job["workload"], job["base_dir"], job["steps"]
    prepared = {name: prepare(workload, device, base_dir) for name, device in job["devices"].items()}
    out = []
    for device_name, soc, ambient, charging in job["situations"]:
        device = job["devices"][device_name]
        program, cluster, threads, step_cache = prepared[device_name]
        run = sim.Run(program, device, sharding=policies.make("sharding", workload.memory.sharding),
                      scheduling=policies.make("scheduling", workload.scheduling), cluster=cluster,
                      threads=threads, battery_start_pct=soc, ambient_c=ambient, charging=charging,
                      trace_ops_steps=0, seed=workload.seed)  # as sim.simulate runs it
        run.cache = step_cache  # a step's result depends on device, program and step key only
        try:
            s, _ = run.run(steps, progress=False)
        except InputError as e:  # e.g. a policy naming a cluster this device lacks
            out.append((0.0, 0.0, 0.0, 0, 0, "stopped", str(e)))
            continue
        reason = s.kill_reason or s.stop_reason
        outcome = ("low_memory" if s.killed and "low-memory" in s.kill_reason else "battery" if s.killed
                   else "stopped" if s.stop_reason or s.steps < steps else "completed")
        out.append((s.wall_s, s.energy_j, s.battery_drop_pct or 0.0, s.steps, s.peak_memory_bytes, outcome, reason))
    return out


# ------------------------------------------------------------------------ the fleet

def daily_seconds(start_h: np.ndarray, hours: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Seconds inside a daily window [start_h, start_h + hours) from clock time 0 to clock
    time t (seconds): the window integrated, wrapping past midnight."""
    start, length = (start_h % 24) * 3600.0, np.clip(hours, 0, 24) * 3600.0
    days, rest = np.floor(t / DAY_S), t % DAY_S
    first = np.clip(rest - start, 0, np.minimum(length, DAY_S - start))     # [start, min(start+len, day))
    wrap = np.clip(rest, 0, np.maximum(start + length - DAY_S, 0))          # [0, start+len-day)
    return days * length + first + wrap


def in_window(start_h: np.ndarray, hours: np.ndarray, t) -> tuple[np.ndarray, np.ndarray]:
    """(inside, seconds left in it) at clock time t (seconds)."""
    since = ((t / 3600.0 - start_h) % 24) * 3600.0
    length = np.clip(hours, 0, 24) * 3600.0
    inside = since < length
    return inside, np.where(inside, np.where(length >= DAY_S, np.inf, length - since), 0.0)


def quantize(x: np.ndarray, step: float) -> np.ndarray:
    return x if step == 0 else np.round(x / step) * step


class FleetRun:
    """The fleet's state (arrays over phones: nothing grows with rounds) and its rounds."""

    def __init__(self, path: str | Path, sets: tuple[str, ...] = ()):
        from mfbench.spec.profile import load_device
        from mfbench.spec.workload import load_workload

        self.path = path = Path(path)
        self.fleet = fleet = load_schema(Fleet, path, sets)
        wpath = (path.parent / fleet.workload).resolve()
        if not wpath.exists():
            raise InputError(path, "workload", f"expected a workload file (relative to the fleet file); "
                             f"{wpath} does not exist")
        for field, sets in (("workload", ()), ("sets", fleet.sets)):
            try:
                self.workload = load_workload(wpath, sets)
            except InputError as e:
                raise InputError(path, field, str(e)) from None
        names = [d.name for d in fleet.devices]
        if len(set(names)) != len(names):
            raise InputError(path, "devices", f"expected distinct device classes (give one a label), got {names}")
        self.base_dir = wpath.parent
        self.devices = {}
        for i, d in enumerate(fleet.devices):
            device = str((path.parent / d.device).resolve()) if d.device.endswith((".yaml", ".yml")) else d.device
            try:
                self.devices[d.name] = load_device(device, d.sets)
            except InputError as e:
                raise InputError(path, f"devices[{i}]", str(e) if e.file else e.message) from None
        self.classes = [d.name for d in fleet.devices]
        self.draw_phones()
        program, *_ = prepare(self.workload, next(iter(self.devices.values())), self.base_dir)
        self.model_bytes = 4 * (program.trainable_params if fleet.upload == "adapter" else program.params)
        self.cache: dict[tuple, tuple] = {}
        self.rng = np.random.default_rng([fleet.seed, 1])
        self.t = 0.0   # seconds since the first round's start (clock: start_hour)

    def draw_phones(self) -> None:
        f, rng = self.fleet, np.random.default_rng([self.fleet.seed, 0])
        rows = self.read_phones() if f.phones_file else {}
        n = len(rows["device"]) if "device" in rows else f.phones
        self.n = n

        def col(name, dist):
            return np.asarray(rows[name], dtype=float) if name in rows else sample(dist, n, rng)

        weights = np.array([d.weight for d in f.devices]) / sum(d.weight for d in f.devices)
        self.device = (np.array([self.classes.index(x) for x in rows["device"]]) if "device" in rows
                       else rng.choice(len(self.classes), n, p=weights))
        self.ambient = col("ambient_c", f.ambient_c)
        self.soc = np.clip(col("battery_start_pct", f.battery_start_pct), 0, 100)
        self.avail_start, self.avail_hours = col("available_start_h", f.available.start_h), col(
            "available_hours", f.available.hours)
        self.charge_start, self.charge_hours = col("charging_start_h", f.charging.start_h), col(
            "charging_hours", f.charging.hours)
        self.wifi = (np.array([x == "wifi" for x in rows["network"]]) if "network" in rows
                     else rng.random(n) < f.network.wifi_fraction)
        link = {True: f.network.wifi, False: f.network.cellular}
        self.up_mbps, self.down_mbps = (
            np.where(self.wifi, sample(link[True].up_mbps, n, rng), sample(link[False].up_mbps, n, rng)),
            np.where(self.wifi, sample(link[True].down_mbps, n, rng), sample(link[False].down_mbps, n, rng)))
        if "up_mbps" in rows:
            self.up_mbps = np.asarray(rows["up_mbps"], dtype=float)
        if "down_mbps" in rows:
            self.down_mbps = np.asarray(rows["down_mbps"], dtype=float)
        if (self.up_mbps <= 0).any() or (self.down_mbps <= 0).any():
            raise InputError(self.path, "network", "expected positive bandwidths (check the distributions)")
        for name, link_ in (("latency_ms", "latency_ms"), ("active_w", "active_w"),
                            ("nj_up", "nj_per_byte_up"), ("nj_down", "nj_per_byte_down")):
            setattr(self, name, np.where(self.wifi, getattr(f.network.wifi, link_), getattr(f.network.cellular, link_)))

    def read_phones(self) -> dict[str, list]:
        path = (self.path.parent / self.fleet.phones_file).resolve()
        try:
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                columns = reader.fieldnames or []
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(path, None, f"cannot read the phones file: {getattr(e, 'strerror', None) or e}") from None
        unknown = [c for c in columns if c not in PHONE_COLUMNS]
        if unknown or not rows:
            raise InputError(path, unknown[0] if unknown else None,
                             f"expected a CSV with a header of some of {', '.join(PHONE_COLUMNS)} and a row per phone")
        out = {c: [r[c] for r in rows] for c in columns}
        for i, r in enumerate(rows):
            for c in columns:
                v = r[c]
                if c == "device" and v not in self.classes:
                    raise InputError(path, f"row {i + 2}: device", f"expected one of {', '.join(self.classes)}, got {v!r}")
                if c == "network" and v not in ("wifi", "cellular"):
                    raise InputError(path, f"row {i + 2}: network", f"expected wifi or cellular, got {v!r}")
                if c not in ("device", "network"):
                    try:
                        x = float(v)
                    except ValueError:
                        x = float("nan")
                    if not np.isfinite(x):
                        raise InputError(path, f"row {i + 2}: {c}", f"expected a number, got {v!r}")
        return out

    # one round
    def situations(self, phones: np.ndarray, clock_s: float) -> tuple[list[tuple], np.ndarray]:
        res = self.fleet.resolution
        soc = np.clip(quantize(self.soc[phones], res.battery_pct), max(res.battery_pct, 1e-6), 100)
        ambient = quantize(self.ambient[phones], res.ambient_c)
        charging, _ = in_window(self.charge_start[phones], self.charge_hours[phones], clock_s)
        keys = [(self.classes[d], float(s), float(a), bool(c))
                for d, s, a, c in zip(self.device[phones], soc, ambient, charging)]
        return keys, charging

    def simulate_missing(self, keys: list[tuple], engine, batch: int = 32) -> int:
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        # one device per batch, so a worker's shared step results serve the whole batch
        missing.sort(key=lambda k: k[0])
        batches = [missing[i:i + batch] for i in range(0, len(missing), batch)]
        jobs = [{"workload": self.workload, "base_dir": self.base_dir, "steps": self.fleet.local_steps,
                 "devices": {k[0]: self.devices[k[0]] for k in b}, "situations": b} for b in batches]
        for i, results in engine.map(train, jobs):
            self.cache.update(zip(batches[i], results))
        return len(missing)

    def round(self, r: int, engine) -> tuple[dict, dict]:
        f = self.fleet
        clock_s = f.start_hour * 3600 + self.t
        available, left_s = in_window(self.avail_start, self.avail_hours, clock_s)
        available &= self.soc > 0
        candidates = np.flatnonzero(available)
        k = len(candidates) if f.clients_per_round is None else min(f.clients_per_round, len(candidates))
        phones = np.sort(self.rng.choice(candidates, k, replace=False)) if k else candidates[:0]
        keys, charging = self.situations(phones, clock_s)
        new = self.simulate_missing(keys, engine)
        res = [self.cache[key] for key in keys]
        train_s = np.array([x[0] for x in res])
        train_j = np.array([x[1] for x in res])
        train_drop = np.array([x[2] for x in res])
        outcome = np.array([x[5] for x in res], dtype=object)
        nbytes = self.model_bytes
        down_s = self.latency_ms[phones] / 1e3 + nbytes * 8 / (self.down_mbps[phones] * 1e6)
        up_s = self.latency_ms[phones] / 1e3 + nbytes * 8 / (self.up_mbps[phones] * 1e6)
        down_j = self.active_w[phones] * down_s + nbytes * self.nj_down[phones] * 1e-9
        up_j = self.active_w[phones] * up_s + nbytes * self.nj_up[phones] * 1e-9
        finish = down_s + train_s + up_s
        # a client stops at the first of: its own end (done, or training ended early), its
        # availability window closing, the deadline
        natural = np.where(outcome == "completed", finish, down_s + train_s)
        left, limit = left_s[phones], np.minimum(left_s[phones], f.deadline_s)
        cut = natural > limit
        stop = np.where(cut, limit, natural)
        outcome = np.where(cut, np.where(left < f.deadline_s, "left", "deadline"), outcome)
        # energy and charge up to the stop: download, training pro rata, upload if reached
        in_train = np.clip((stop - down_s) / np.maximum(train_s, 1e-12), 0, 1)
        uploaded = np.clip((stop - down_s - train_s) / np.maximum(up_s, 1e-12), 0, 1)
        downloaded = np.clip(stop / np.maximum(down_s, 1e-12), 0, 1)
        net_j = downloaded * down_j + uploaded * up_j
        energy = train_j * in_train + net_j
        drop = train_drop * in_train + np.where(charging, 0.0, self.net_drop_pct(phones, net_j))
        before = self.soc[phones].copy()
        self.soc[phones] = np.clip(before - drop, 0, 100)
        outcome = np.where((outcome == "completed") & (self.soc[phones] <= 0), "battery", outcome)
        round_s = float(min(f.deadline_s, stop.max())) if k else 0.0
        self.charge_between(phones, stop, round_s)
        completed = int((outcome == "completed").sum())
        row = {"round": r, "start_s": self.t, "clock_h": (clock_s / 3600) % 24, "available": int(available.sum()),
               "selected": k, "completed": completed, "success": completed >= f.min_clients,
               **{f"drop_{o}": int((outcome == o).sum()) for o in OUTCOMES[1:]},
               "round_s": round_s, "energy_j": float(energy.sum()),
               "energy_per_client_j": float(energy.mean()) if k else 0.0,
               "battery_drop_mean_pct": float(drop.mean()) if k else 0.0,
               "battery_min_pct": float(self.soc[phones].min()) if k else None,
               "fleet_battery_mean_pct": float(self.soc.mean()), "new_situations": new}
        clients = {"round": np.full(k, r), "phone": phones, "device": [self.classes[d] for d in self.device[phones]],
                   "battery_pct": before, "sim_battery_pct": [key[1] for key in keys],
                   "sim_ambient_c": [key[2] for key in keys], "charging": charging, "wifi": self.wifi[phones],
                   "download_s": down_s, "train_s": train_s, "upload_s": up_s, "end_s": stop,
                   "train_energy_j": train_j, "energy_j": energy, "battery_drop_pct": drop,
                   "battery_end_pct": self.soc[phones], "steps": [x[3] for x in res],
                   "peak_memory_bytes": [x[4] for x in res], "outcome": outcome.astype(str),
                   "reason": [x[6] for x in res]}
        self.t += round_s
        return row, clients

    def net_drop_pct(self, phones: np.ndarray, joules: np.ndarray) -> np.ndarray:
        """Charge spent on the radio: joules / (open-circuit voltage x capacity)."""
        out = np.zeros(len(phones))
        for d, name in enumerate(self.classes):
            b = self.devices[name].battery
            mine = self.device[phones] == d
            if b is not None and mine.any():
                ocv = np.interp(self.soc[phones][mine], b.ocv_soc_pct.values, b.ocv_v.values)
                out[mine] = 100 * joules[mine] / (ocv * b.capacity_mah.value * 3.6)
        return out

    def charge_between(self, phones: np.ndarray, busy_s: np.ndarray, round_s: float) -> None:
        """Phones on their charger over the round gain charge, (charger_w - idle) W into the
        cell; a client only after it stopped (the simulator charged it while it trained)."""
        start = np.full(self.n, self.t)
        start[phones] += np.minimum(busy_s, round_s)
        clock0 = self.fleet.start_hour * 3600
        seconds = (daily_seconds(self.charge_start, self.charge_hours, clock0 + self.t + round_s)
                   - daily_seconds(self.charge_start, self.charge_hours, clock0 + start))
        for d, name in enumerate(self.classes):
            dev = self.devices[name]
            mine = (self.device == d) & (seconds > 0)
            if dev.battery is None or not mine.any():
                continue
            b = dev.battery
            ocv = np.interp(self.soc[mine], b.ocv_soc_pct.values, b.ocv_v.values)
            watts = self.fleet.charger_w - dev.power.idle_w.value
            self.soc[mine] = np.minimum(100, self.soc[mine] + 100 * watts * seconds[mine] / (ocv * b.capacity_mah.value * 3.6))


def run_fleet(path: str | Path, out_dir: str | Path | None = None, engine=None, sets: tuple[str, ...] = (),
              progress: bool = True):
    """Run every round; write rounds.csv, devices.csv, clients.parquet (one row a client and
    round, written round by round) and fleet.png. Returns (rounds, per-class rows, OUT, run
    info). A Ctrl-C writes the rounds done so far, then stops."""
    from tqdm import tqdm

    from mfbench.scale.engine import Engine

    fleet = FleetRun(path, sets)
    f = fleet.fleet
    out = Path(out_dir or f"runs/fleet-{f.name}")
    out = folder(out)  # a file in the way or no permission: one line
    own = engine is None
    engine = engine or Engine()
    rounds, per_class = [], {c: {"class": c, "phones": int((fleet.device == i).sum()), "selected": 0, "completed": 0,
                                 **{f"drop_{o}": 0 for o in OUTCOMES[1:]}, "energy_j": 0.0, "battery_drop_pct": 0.0,
                                 "end_s_completed": 0.0} for i, c in enumerate(fleet.classes)}
    writer, started, interrupted = None, time.monotonic(), False
    tmp_clients = out / ".clients.parquet.partial"
    try:
        for r in tqdm(range(f.rounds), unit="round", desc=f"fleet {f.name} ({engine.name})", disable=not progress,
                      mininterval=0.5):
            try:
                row, clients = fleet.round(r, engine)
            except KeyboardInterrupt:  # keep the rounds done: write them, then stop
                interrupted = True
                break
            rounds.append(row)
            for c, stats in per_class.items():
                mine = np.array([d == c for d in clients["device"]], dtype=bool)
                outcome = clients["outcome"][mine]
                stats["selected"] += int(mine.sum())
                stats["completed"] += int((outcome == "completed").sum())
                for o in OUTCOMES[1:]:
                    stats[f"drop_{o}"] += int((outcome == o).sum())
                stats["energy_j"] += float(clients["energy_j"][mine].sum())
                stats["battery_drop_pct"] += float(clients["battery_drop_pct"][mine].sum())
                stats["end_s_completed"] += float(clients["end_s"][mine][outcome == "completed"].sum())
            table = pa.table(clients, schema=CLIENTS)
            if writer is None:
                writer = pq.ParquetWriter(tmp_clients, CLIENTS)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
        if own:
            engine.shutdown()
    if writer is not None:
        with atomic(out / "clients.parquet") as tmp:
            tmp_clients.replace(tmp)
    classes = []
    for stats in per_class.values():
        n, done = stats["selected"], stats["completed"]
        classes.append({"class": stats["class"], "phones": stats["phones"], "selected": n, "completed": done,
                        "participation": done / n if n else None,
                        **{k: stats[k] for k in stats if k.startswith("drop_")},
                        "energy_per_client_j": stats["energy_j"] / n if n else None,
                        "battery_drop_per_client_pct": stats["battery_drop_pct"] / n if n else None,
                        "mean_client_time_s": stats["end_s_completed"] / done if done else None})
    write_csv(out / "rounds.csv", rounds)
    write_csv(out / "devices.csv", classes)
    plot_rounds(rounds, out / "fleet.png", f"fleet {f.name}: {fleet.n:,} phones, {f.local_steps} local steps, "
                f"deadline {f.deadline_s:g} s")
    if interrupted:
        raise KeyboardInterrupt
    summary = {"phones": fleet.n, "rounds": f.rounds, "situations": len(fleet.cache),
               "seconds": time.monotonic() - started, "engine": engine.name}
    return rounds, classes, out, summary


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def plot_rounds(rounds: list[dict], path: Path, title: str) -> None:
    """Per round: participation and drops, round time, and the fleet's battery."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [x["round"] for x in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.3))
    bottom = np.zeros(len(r))
    for o, color in zip(OUTCOMES, ("#009E73", "#D55E00", "#E69F00", "#CC79A7", "#56B4E9", "#0072B2")):
        key = "completed" if o == "completed" else f"drop_{o}"
        v = np.array([x[key] for x in rounds], dtype=float)
        if v.any():
            axes[0].bar(r, v, bottom=bottom, color=color, width=1.0, label=o.replace("_", " "))
            bottom += v
    axes[0].set_ylabel("clients", fontsize=7)
    axes[0].legend(fontsize=5.5, frameon=False, loc="lower left")
    axes[1].plot(r, [x["round_s"] / 60 for x in rounds], color="#0072B2", lw=0.9)
    axes[1].set_ylabel("round time (min)", fontsize=7)
    axes[2].plot(r, [x["fleet_battery_mean_pct"] for x in rounds], color="#0072B2", lw=0.9, label="fleet mean")
    axes[2].plot(r, [x["battery_min_pct"] for x in rounds], color="#D55E00", lw=0.9, label="lowest client")
    axes[2].set_ylabel("battery (%)", fontsize=7)
    axes[2].legend(fontsize=5.5, frameon=False)
    for ax in axes:
        ax.set_xlabel("round", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=7.5)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=200, bbox_inches="tight")
    plt.close(fig)



def format_classes(classes: list[dict]) -> str:
    """Per device class: participation, drops by reason, energy and battery per client."""
    head = ("class", "phones", "selected", "completed", *(o.replace("_", " ") for o in OUTCOMES[1:]),
            "J/client", "battery %/client", "client s")
    from mfbench.table import table
    rows = [(c["class"], f"{c['phones']:,}", f"{c['selected']:,}", f"{c['completed']:,}",
             *(f"{c['drop_' + o]:,}" for o in OUTCOMES[1:]),
             *("n/a" if c[k] is None else f"{c[k]:,.1f}" for k in
               ("energy_per_client_j", "battery_drop_per_client_pct", "mean_client_time_s")))
            for c in classes]
    return table(rows, head, right=range(1, len(head)))
