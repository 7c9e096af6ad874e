"""The simulator: a StepProgram run on a device profile, step after step (SimPy inside a step).

One optimizer step is a SimPy simulation: a compute process walks the program's ops on one or
more core clusters (roofline time at each cluster's frequency and thread count, combined by
the load-balance model); the program's io ops (a sharded step's loads, stores and
evictions, planned by mfbench.plan.shards) go through one I/O queue in program order
(latency + bytes / bandwidth): at once for `lru`, overlapping the compute for `prefetch`, an
op waiting only for the parts it needs; memory records every allocation and free. The step yields a piecewise-constant power profile, split into heat on
the SoC and heat on the board.

Between steps, plain Python integrates the slow physics over that profile: leakage at the
junction temperature (power.py), the battery or the charger (battery.py), the RC thermal
network and the governor on the virtual skin sensor (thermal.py), and the low-memory killer
against the app limit of the moment (background memory pressure is drawn, seeded). The
scheduling policy decides before each step: sleep, pause, threads, cluster.

Fast-forward: a step's outcome depends only on (clusters, threads, frequencies): a sharded
step starts and ends with no shard resident, so a step with the same key reuses the earlier result; everything that
depends on the run's state (temperatures, charge, the memory limit of the moment) is applied
to the reused result by the same code as to a fresh one, so the run is identical to stepping
through every step in SimPy.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from mfbench import policies
from mfbench.contracts import policy
from mfbench.contracts.program import Op, StepProgram
from mfbench.contracts.trace import Durations, Summary
from mfbench.errors import InputError, warn
from mfbench.plan import compile_program
from mfbench.plan.shards import needs
from mfbench.sim.battery import Battery, BatteryEmpty
from mfbench.sim.cost import op_seconds, step_overhead_seconds
from mfbench.sim.power import leakage_w, operating_point, static_w
from mfbench.sim.thermal import Governor, ThermalNetwork
from mfbench.spec.profile import DeviceProfile
from mfbench.units import MB

PAUSE_POLL_S = 10.0     # a paused run asks the scheduler again after this long
MAX_PAUSE_S = 3600.0    # a pause longer than this ends the run (nothing is going to change)
INTERRUPTED = "interrupted (Ctrl-C)"  # the stop reason of a run that SIGINT ended


# ----------------------------------------------------------------------------- compute

def balanced_seconds(op: Op, parts, device, program, balance: str) -> float:
    """An op's time on several clusters at once. `parts` is [(cluster, threads, MHz)].
    static: every thread gets an equal share (an OpenMP static schedule), so the slowest
    core sets the time; dynamic: work goes to whichever core is free, so rates add up."""
    if len(parts) == 1:
        c, n, f = parts[0]
        return op_seconds(op, c, n, f, device, program)
    total = sum(n for _, n, _ in parts)
    each = [op_seconds(op, c, total, f, device, program) for c, n, f in parts]  # all threads at this cluster's speed
    if balance == "static" or min(each) == 0:
        return max(each)
    return 1.0 / sum(n / total / t for (_, n, _), t in zip(parts, each))


def cluster_names(name: str) -> list[str]:
    """`prime+mid` -> ['prime', 'mid']: several clusters working on one step."""
    return name.split("+")


def split_threads(clusters: list, threads: int) -> list[int]:
    """Threads over the listed clusters in order, each up to its cores (at least one each)."""
    out, left = [], threads
    for c in clusters:
        n = max(1, min(c.cores, left))
        out.append(n)
        left -= n
    return out


def start_cluster(device, threads: int | str, allowed=None) -> tuple[str, int]:
    """The cluster a run starts on, and its threads. `auto`: the cluster with the most GEMM
    throughput on all its cores, running all of them. A number: the most throughput at
    min(threads, cores), running that many, with a warning when that cluster has fewer cores
    than asked. Ties go to the faster core (fewer cores busy for the same work), then to the
    cluster listed first. `allowed`: the cluster names the placement permits (None: all)."""
    def throughput(c):
        return c.gemm_gflops_per_core.value * (c.cores if threads == "auto" else min(threads, c.cores))
    candidates = [c for c in device.clusters if allowed is None or c.name in allowed]
    best = max(candidates, key=lambda c: (throughput(c), c.gemm_gflops_per_core.value))
    if threads == "auto":
        return best.name, best.cores
    if threads > best.cores:
        warn(f"threads: {threads} asked, but the fastest choice on {device.name} is its {best.name} cluster with "
             f"{best.cores} core{'s' if best.cores > 1 else ''}; running {best.cores} (threads: auto picks this silently)")
    return best.name, min(threads, best.cores)


def power_profile(duration: float, intervals: list[tuple[float, float, float, float]], idle_w: float):
    """Piecewise-constant power (dt, SoC watts, board watts) from overlapping
    (start, end, SoC watts, board watts) intervals; the idle floor is on the board."""
    edges = np.unique(np.array([0.0, duration] + [x for s, e, _, _ in intervals for x in (s, e)]))
    delta = np.zeros((2, len(edges)))
    for s, e, soc, board in intervals:
        i, j = np.searchsorted(edges, s), np.searchsorted(edges, e)
        delta[0, i] += soc
        delta[0, j] -= soc
        delta[1, i] += board
        delta[1, j] -= board
    dt, level = np.diff(edges), np.cumsum(delta, axis=1)[:, :-1]
    keep = dt > 0
    return dt[keep], level[0][keep], idle_w + level[1][keep]


# ------------------------------------------------------------------------- one step

@dataclass(frozen=True)
class Setting:
    """What a step runs on: the whole fast-forward key."""
    cluster: str                # one cluster, or several joined by '+'
    threads: tuple[int, ...]    # per cluster
    freq_mhz: tuple[float, ...]  # per cluster


@dataclass
class Allocation:
    t: float
    rss: int                    # resident after it
    nbytes: int | None          # None: the model's static buffers at the start
    what: str | None
    memory_index: int           # its entry in StepResult.memory
    events: int                 # op and io events recorded before it


@dataclass
class StepResult:
    duration: float
    dt: np.ndarray                      # piecewise-constant power profile of the step
    soc_w: np.ndarray                   # heat on the SoC (cores, uncore, DRAM)
    board_w: np.ndarray                 # heat on the board (idle floor, storage)
    peak_bytes: int
    memory: list[tuple[float, int]]     # (t, resident bytes) at every allocation and free
    allocations: list[Allocation]       # where the resident size grows: where a low-memory kill can come
    events: list[dict]                  # op and io events, times from the step's start
    io_read: int
    io_write: int
    running: list = field(default_factory=list, repr=False)  # [(cluster, busy cores, V / V_top)]
    thermal_response: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self.power = self.soc_w + self.board_w
        self.energy_j = float(np.dot(self.dt, self.power))


class Step:
    """One optimizer step in SimPy: compute, the program's io through one I/O queue, memory."""

    def __init__(self, run: Run, setting: Setting):
        self.run, self.program, self.device = run, run.program, run.device
        self.env = simpy.Environment()
        self.storage = simpy.Resource(self.env, capacity=1)  # one I/O queue, first come first served
        self.setting = setting
        self.parts, self.core_w, self.running = [], 0.0, []
        for name, n, f in zip(cluster_names(setting.cluster), setting.threads, setting.freq_mhz):
            cluster = run.clusters[name]
            _, watts, volts = operating_point(cluster, f / cluster.freqs_mhz.values[-1])
            self.parts.append((cluster, n, f))
            self.core_w += n * watts
            self.running.append((cluster, n, volts))
        self.held_w = static_w([c for c, _, _ in self.parts], self.device.power.uncore_w)
        self.loading: dict[str, simpy.Process] = {}  # part -> its load or zero in the queue
        self.queued: list[simpy.Process] = []
        self.rss = run.static_bytes
        self.memory = [(0.0, self.rss)]
        self.allocations = [Allocation(0.0, self.rss, None, None, 0, 0)]
        self.peak = self.rss
        self.intervals: list[tuple[float, float, float, float]] = []
        self.events: list[dict] = []
        self.io_read = self.io_write = 0

    # memory: every allocation and free (the run decides whether an allocation is killed)
    def alloc(self, nbytes: int, what: str) -> None:
        if not nbytes:
            return
        self.rss += nbytes
        self.memory.append((self.env.now, self.rss))
        self.allocations.append(Allocation(self.env.now, self.rss, nbytes, what, len(self.memory) - 1,
                                           len(self.events)))
        self.peak = max(self.peak, self.rss)

    def free(self, nbytes: int) -> None:
        if nbytes:
            self.rss -= nbytes
            self.memory.append((self.env.now, self.rss))

    # storage: one queue; from flash latency + bytes / bandwidth, from the page cache a mapping
    def io(self, kind: str, shard: str, nbytes: int):
        st, cached = self.device.storage, self.run.page_cached
        if cached:  # a load maps cached pages; a store copies into them (the kernel writes them back later)
            duration, joules = nbytes / ((st.cached_map_gbs if kind == "load" else st.cached_write_gbs).value * 1e9), 0.0
        else:
            bandwidth = (st.seq_read_gbs if kind == "load" else st.seq_write_gbs).value * 1e9
            duration = st.latency_us.value * 1e-6 + nbytes / bandwidth
            joules = nbytes * st.energy_nj_per_byte.value * 1e-9
        start = self.env.now
        self.events.append({"type": "io", "kind": kind, "shard": shard, "start": start,
                            "duration": duration, "bytes": nbytes})
        self.intervals.append((start, start + duration, 0.0, joules / duration))  # storage energy on the board
        if kind == "load":
            self.io_read += nbytes
        else:
            self.io_write += nbytes
        yield self.env.timeout(duration)

    def io_op(self, op, allocated: int, freed: int):
        """One io op of the program in its turn: a load or zero takes its part's RAM, a load
        or store moves its bytes, an evict unmaps the part and gives the RAM back."""
        with self.storage.request() as turn:
            yield turn
            self.alloc(allocated, op.name)
            if op.io_bytes:
                yield from self.io("load" if op.kind == "load" else "store", op.shard, op.io_bytes)
            unmap = self.device.storage.unmap_gbs
            if op.kind == "evict" and unmap is not None and freed:
                yield self.env.timeout(freed / (unmap.value * 1e9))
            self.free(freed)

    def compute(self):
        dram_j = self.device.memory.energy_pj_per_byte.value * 1e-12
        balance = self.run.balance
        cluster, threads, _ = self.parts[0]
        overhead = step_overhead_seconds(self.program, cluster, threads)
        if overhead > 0:  # zeroing the gradients
            self.intervals.append((0.0, overhead, self.core_w, 0.0))
            yield self.env.timeout(overhead)
        # prefetch: the queue works while compute goes on (the update streams the moments itself),
        # unless the page cache serves it with every allowed core computing: its copies are then
        # CPU work with no core of their own, taken from compute
        busy = sum(n for _, n, _ in self.parts)
        cpu_bound = self.run.page_cached and busy >= sum(self.run.clusters[n].cores for n in self.run.allowed)
        overlap = self.run.sharding.ahead and not cpu_bound
        for op, (allocated, freed) in zip(self.program.ops, self.program.memory_deltas):
            if op.phase == "io":
                done = self.env.process(self.io_op(op, allocated, freed))
                if not overlap or ".optimizer." in op.name:
                    yield done
                self.queued.append(done)
                for part in op.alloc:
                    self.loading[part] = done
                continue
            for part in needs(op, self.run.grads_sharded):
                if part in self.loading:
                    yield self.loading.pop(part)
            self.alloc(allocated, op.name)
            start, duration = self.env.now, balanced_seconds(op, self.parts, self.device, self.program, balance)
            if duration > 0:  # static balance: threads that finish early spin at the barrier, busy
                self.intervals.append((start, start + duration, self.core_w + op.bytes_moved * dram_j / duration, 0.0))
            self.events.append({"type": "op", "name": f"{op.name}.{op.phase}", "start": start, "duration": duration,
                                "shard": op.shard, "bytes": int(op.bytes_moved)})
            yield self.env.timeout(duration)
            self.free(freed)
        yield self.env.all_of(self.queued)  # the step ends with its write-back done

    def simulate(self) -> StepResult:
        self.env.process(self.compute())
        self.env.run()
        duration = self.env.now
        if duration > 0 and self.held_w:  # cluster static power and uncore while the step runs
            self.intervals.append((0.0, duration, self.held_w, 0.0))
        dt, soc_w, board_w = power_profile(duration, self.intervals, self.device.power.idle_w.value)
        return StepResult(duration, dt, soc_w, board_w, self.peak, self.memory, self.allocations, self.events,
                          self.io_read, self.io_write, self.running)


def allowed_clusters(device, placement: str) -> list[str]:
    """The clusters an app may use: Android's foreground or background cpuset."""
    if placement not in ("foreground", "background"):
        raise InputError(None, "placement", f"expected foreground or background, got {placement!r}")
    if device.cpusets is None:
        return [c.name for c in device.clusters]
    return list(getattr(device.cpusets, placement))


# ------------------------------------------------------------------------------ a run

class Run:
    """A whole simulated run: steps, scheduler sleeps and pauses, battery, heat, governor."""

    def __init__(self, program: StepProgram, device: DeviceProfile, *, sharding=None, scheduling=None,
                 threads: int | str = "auto", battery_start_pct: float = 100.0, ambient_c: float | None = None,
                 charging: bool = False, trace_ops_steps: int = 3, fast_forward: bool = True,
                 cluster: str | None = None, placement: str = "foreground", balance: str = "static",
                 seed: int = 0, trace=None, interruptible: bool = False):
        self.program, self.device = program, device
        self.sharding = sharding or policies.NoSharding()
        self.scheduling = scheduling or policies.NoScheduling()
        self.grads_sharded = any(b.lifetime == "sharded" and b.name.startswith("grads.") for b in program.buffers)
        if balance not in ("static", "dynamic"):
            raise InputError(None, "balance", f"expected static or dynamic, got {balance!r}")
        self.balance = balance
        # held all run: static buffers and scratch (not the sharded ones: the io ops hold those), the runtime's own
        self.static_bytes = program.static_bytes + int(device.ram.runtime_overhead_mb.value * MB)
        # the shard files stay in the page cache when they fit beside the run in what the OS leaves
        ram = device.ram
        files = sum(b.bytes for b in program.buffers if b.lifetime == "sharded") + \
            sum(op.io_bytes for op in program.ops if op.kind == "load" and ".optimizer." in op.name)  # moments
        self.page_cached = device.storage.cached_map_gbs is not None and files > 0 and \
            files + program.peak_bytes() + ram.runtime_overhead_mb.value * MB <= (ram.total_mb.value - ram.os_reserved_mb.value) * MB
        self.mean_limit = int(device.ram.app_limit_mb.value * MB)
        self.limit_bytes = self.mean_limit
        self.pressure = device.ram.pressure
        self.rng = np.random.default_rng(seed)  # background memory pressure
        self.next_draw = 0.0
        self.clusters = {c.name: c for c in device.clusters}
        self.allowed = allowed_clusters(device, placement)
        self.observed_clusters = {n: self.clusters[n].cores for n in self.allowed}
        if cluster is None:
            cluster, threads = start_cluster(device, threads, self.allowed)
        elif threads == "auto":  # every core of the named clusters
            threads = sum(self.clusters[n].cores for n in cluster_names(cluster) if n in self.clusters)
        self.cluster, self.threads = cluster, threads
        for name in cluster_names(self.cluster):
            if name not in self.allowed:
                raise InputError(None, "cluster", f"expected a cluster the {placement} placement allows on "
                                 f"{device.name} ({', '.join(self.allowed)}), got {name!r}")
        self.battery = None if device.battery is None else Battery(device.battery, battery_start_pct)
        self.thermal = ThermalNetwork(device.thermal, ambient_c)
        self.governor = Governor(device.thermal)
        self.charging = charging or device.battery is None
        self.trace_ops_steps, self.fast_forward = trace_ops_steps, fast_forward
        self.cache: dict[tuple, StepResult] = {}
        self.idle_profiles: dict[float, tuple] = {}
        self.settings: dict[tuple, Setting] = {}
        self.t = self.energy_j = 0.0
        self.events = [] if trace is None else trace  # a list, or a trace.RunWriter streaming to disk
        self.step_seconds = Durations()
        self.interruptible = interruptible
        self.peak = self.static_bytes
        self.io_read = self.io_write = 0
        self.max_temperature = self.max_junction = self.max_battery = self.thermal.skin_c
        self.charged_full_t = None
        self.frequency = operating_point(self.clusters[cluster_names(self.cluster)[0]], self.governor.cap())[0]
        self.kill_reason = self.stop_reason = None
        self.last_decision = None
        self.last_power_w = None

    # physics over a power profile
    def spend(self, dt: np.ndarray, soc_w: np.ndarray, board_w: np.ndarray, response=None, leak_w: float = 0.0,
              power: np.ndarray | None = None) -> None:
        """Draw the profile (plus leakage, constant over it) from the battery or charger, heat the
        network with it and with the battery's and charger's losses, count time and energy.
        `response` and `power` (soc_w + board_w) may come precomputed with a cached step."""
        duration = float(dt.sum())
        power = (soc_w + board_w if power is None else power) + leak_w
        energy = float(np.dot(dt, power))
        cell_w = charger_w = 0.0
        if self.battery is not None:
            cell_c = self.thermal.battery_c
            if self.charging:
                cell_w, charger_w = self.battery.charge(duration, energy / duration, cell_c)
                if self.battery.full_after_s is not None and self.charged_full_t is None:
                    self.charged_full_t = self.t + self.battery.full_after_s
            else:
                cell_w = self.battery.draw(dt, power, cell_c)
        extra = self.thermal.heat(leak_w, charger_w, cell_w) if (leak_w or cell_w or charger_w) else None
        self.thermal.advance(response or self.thermal.response(dt, soc_w, board_w), duration, extra)
        self.energy_j += energy
        self.t += duration

    def sample(self, rss: int) -> None:
        skin = self.thermal.skin_c
        self.max_temperature = max(self.max_temperature, skin)
        self.max_junction = max(self.max_junction, self.thermal.junction_c)
        self.max_battery = max(self.max_battery, self.thermal.battery_c)
        b = self.battery
        self.last_sample = {"type": "sample", "t": self.t, "rss": rss, "battery": b and b.soc_pct,
                            "current": b and b.current, "voltage": b and b.voltage,
                            "temperature": skin, "frequency": self.frequency,
                            # what only a measured run knows
                            "peak_rss": None, "pss": None, "charging": b and self.charging, "zones": None,
                            "frequencies": None, "cpus": None}
        self.events.append(self.last_sample)

    def idle(self, seconds: float) -> None:
        profile = self.idle_profiles.get(seconds)
        if profile is None:  # sleeps repeat: their thermal response is computed once
            dt, soc_w, board_w = np.array([seconds]), np.zeros(1), np.array([self.device.power.idle_w.value])
            profile = self.idle_profiles[seconds] = (dt, soc_w, board_w, self.thermal.response(dt, soc_w, board_w))
        self.spend(*profile)
        self.sample(self.static_bytes)

    def observe(self, step: int) -> dict:
        return policy.observation(
            step=step, t=self.t, battery_pct=self.battery and self.battery.soc_pct,
            temperature_c=self.thermal.skin_c, charging=self.charging,
            last_step_s=self.step_seconds.last, power_w=self.last_power_w,
            threads=self.threads, cluster=self.cluster, clusters=dict(self.observed_clusters))

    def decide(self, step: int) -> dict:
        decision = policy.decide(self.scheduling, self.observe(step))
        if decision != self.last_decision and decision:  # record changes, not every repeat
            self.events.append({"type": "decision", "t": self.t, "policy": type(self.scheduling).__name__,
                                "choice": decision})
        self.last_decision = decision
        return decision

    def setting(self) -> Setting:
        """The step's clusters, threads and frequencies under the governor's cap of the moment."""
        key = (self.cluster, self.threads, self.governor.cap())
        setting = self.settings.get(key)
        if setting is None:
            clusters = [self.clusters[n] for n in cluster_names(self.cluster)]
            freqs = tuple(operating_point(c, key[2])[0] for c in clusters)
            setting = self.settings[key] = Setting(self.cluster, tuple(split_threads(clusters, self.threads)), freqs)
        self.frequency = setting.freq_mhz[0]
        return setting

    def memory_kill(self, result: StepResult) -> Allocation | None:
        """The first allocation of the step past the app limit of the moment, if any."""
        if self.pressure is not None and self.t >= self.next_draw:  # background apps changed
            self.limit_bytes = int(self.mean_limit + self.pressure.sd_mb.value * MB * self.rng.standard_normal())
            self.next_draw = self.t + self.pressure.period_s.value
        if result.peak_bytes <= self.limit_bytes:
            return None
        return next(a for a in result.allocations if a.rss > self.limit_bytes)

    def kill_message(self, a: Allocation) -> str:
        limit = f"app limit {self.limit_bytes / MB:.0f} MB"
        if a.nbytes is None:  # weights, gradients and optimizer state alone do not fit
            return f"low-memory kill: loading the model needs {a.rss / MB:.1f} MB > {limit}"
        return f"low-memory kill: {a.what} needs {a.nbytes / MB:.1f} MB, resident {a.rss / MB:.1f} MB > {limit}"

    def step(self, index: int) -> bool:
        """Decide, sleep or pause, run one optimizer step. False when the run has ended."""
        decision, paused = self.decide(index), 0.0
        while decision.get("pause"):
            if paused >= MAX_PAUSE_S:
                self.stop_reason = f"paused by the scheduler for {paused / 60:.0f} min"
                return False
            self.idle(PAUSE_POLL_S)
            paused += PAUSE_POLL_S
            decision = self.decide(index)
        if decision.get("sleep_s", 0) > 0:
            self.idle(decision["sleep_s"])
        self.cluster = decision.get("cluster", self.cluster)
        self.threads = decision.get("threads", self.threads)
        skin, junction = self.thermal.skin_c, self.thermal.junction_c
        if self.governor.shutdown(skin):
            self.kill_reason = f"thermal shutdown: skin {skin:.1f} C > {self.governor.shutdown_c:g} C at t = {self.t:.1f} s"
            return False
        self.governor.poll(self.t, skin, junction)
        setting = self.setting()

        key = setting
        result = self.cache.get(key) if self.fast_forward else None
        if result is None:
            result = Step(self, setting).simulate()
            result.thermal_response = self.thermal.response(result.dt, result.soc_w, result.board_w)
            if self.fast_forward:
                self.cache[key] = result
        leak = leakage_w(self.device.power, result.running, junction)

        start, sensors = self.t, self.last_sample  # memory samples carry the step-start sensors
        kill = self.memory_kill(result)
        memory, events = result.memory, result.events
        if kill is not None:  # the physics up to the moment of the kill
            n = int(np.searchsorted(np.cumsum(result.dt), kill.t))
            dt = result.dt[:n + 1].copy()
            if len(dt):  # empty when the kill comes before the first segment (weights alone too big)
                dt[-1] = kill.t - float(result.dt[:n].sum())
            if dt.sum() > 0:
                self.spend(dt, result.soc_w[:n + 1], result.board_w[:n + 1], leak_w=leak)
            memory, events = memory[:kill.memory_index + 1], events[:kill.events]
        else:
            self.spend(result.dt, result.soc_w, result.board_w, result.thermal_response, leak, result.power)
        if index < self.trace_ops_steps:  # op, io and memory detail of the first steps
            self.events += [{**e, "start": start + e["start"]} for e in events]
            self.events += [{**sensors, "t": start + t, "rss": rss} for t, rss in memory]
        if kill is not None:
            self.peak = max(self.peak, max(rss for _, rss in memory))
            self.kill_reason = f"{self.kill_message(kill)} at t = {self.t:.3f} s in step {index}"
            return False
        self.peak = max(self.peak, result.peak_bytes)
        self.io_read += result.io_read
        self.io_write += result.io_write
        self.step_seconds.append(result.duration)
        self.last_power_w = result.energy_j / result.duration + leak
        self.events.append({"type": "step", "index": index, "t": self.t, "duration": result.duration,
                            "tokens": self.program.tokens_per_step, "loss": None, "lr": None, "grad_norm": None})
        self.sample(result.memory[-1][1])
        return True

    def details(self) -> dict:
        """What only the simulator knows, for the summary's details."""
        p = self.pressure
        risk = None
        if p is not None:  # chance that one draw of the app limit falls below this run's peak
            risk = 0.5 * math.erfc((self.mean_limit - self.peak) / (p.sd_mb.value * MB) / math.sqrt(2))
        return {"cluster": self.cluster, "threads": self.threads, "max_junction_c": self.max_junction,
                "max_battery_c": self.max_battery, "max_severity": self.governor.max_level,
                "charged_full_s": self.charged_full_t, "lmk_risk_per_draw": risk}

    def run(self, steps: int, progress: bool = True) -> tuple[Summary, list[dict]]:
        from tqdm import tqdm
        battery_start = self.battery and self.battery.soc_pct
        self.sample(self.static_bytes)
        with tqdm(total=steps, file=sys.stderr, unit="step", desc="simulating",
                  disable=not progress or steps < 500, mininterval=0.5) as bar, \
                stop_on_sigint(self.interruptible) as stop:
            for index in range(steps):
                if stop:
                    self.stop_reason = INTERRUPTED
                    break
                try:
                    if not self.step(index):
                        break
                except BatteryEmpty as e:
                    self.kill_reason = f"{e} at t = {self.t:.1f} s"
                    self.sample(self.static_bytes)
                    break
                bar.update()
        done = len(self.step_seconds)
        tokens = done * self.program.tokens_per_step
        b_end = self.battery and self.battery.soc_pct
        summary = Summary.of_steps(
            self.step_seconds, self.t, self.program.tokens_per_step,
            source="predicted", device=self.device.name, workload=self.program.workload_name,
            peak_memory_bytes=int(self.peak), energy_j=self.energy_j,
            j_per_token=self.energy_j / tokens if tokens else None,
            battery_start_pct=battery_start, battery_end_pct=b_end,
            battery_drop_pct=None if self.battery is None else battery_start - b_end,
            max_temperature_c=self.max_temperature, io_read_bytes=self.io_read, io_write_bytes=self.io_write,
            final_loss=None, killed=self.kill_reason is not None, kill_reason=self.kill_reason,
            stop_reason=self.stop_reason, details=self.details())
        return summary, self.events


@contextmanager
def stop_on_sigint(active: bool = True):
    """While the block runs, a first Ctrl-C (SIGINT) only makes the yielded list true, so a
    long run ends at a step boundary with what it did; a second one interrupts at once."""
    stop: list[bool] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def run_program(program: StepProgram, device: DeviceProfile, steps: int, *, progress: bool = True, **options):
    """Simulate `steps` optimizer steps of a (compiled or hand-built) program; see Run."""
    return Run(program, device, **options).run(steps, progress)


# ------------------------------------------------------------------ from a workload

def simulate(workload, device, steps=None, battery_start_pct=100.0, ambient_c=None, charging=False,
             trace_ops_steps=3, progress=True, fast_forward=True, base_dir=None, command=None,
             placement="foreground", cluster=None, balance="static", trace=None, interruptible=False):
    """Simulate a workload (a Workload or a path to its YAML) on a device (a profile, a name
    or a path). Returns (Summary, trace events); `trace` (a trace.RunWriter) takes the events
    as they happen instead of a list. `placement`: the cpuset the app runs in (foreground or
    background); `cluster`: run on this cluster (or `a+b` for several at once) instead of the
    default one; `balance`: how threads on several clusters share work. `interruptible`:
    Ctrl-C ends the run after the step in progress, with stop_reason INTERRUPTED."""
    from mfbench.contracts.trace import provenance
    from mfbench.spec.profile import check_conditions, load_device
    from mfbench.spec.workload import load_workload

    if isinstance(workload, (str, Path)):
        base_dir = base_dir or Path(workload).resolve().parent
        workload = load_workload(workload)
    if not isinstance(device, DeviceProfile):
        device = load_device(device)
    check_conditions(ambient_c, battery_start_pct)
    if cluster is None:
        cluster, threads = start_cluster(device, workload.threads, allowed_clusters(device, placement))
    else:
        cores = sum(c.cores for c in device.clusters if c.name in cluster_names(cluster))
        threads = cores if workload.threads == "auto" else workload.threads
    program = compile_program(workload, base_dir, threads=threads,
                              overhead_bytes=int(device.ram.runtime_overhead_mb.value * MB))
    summary, events = run_program(
        program, device, steps or workload.steps, progress=progress,
        sharding=policies.make("sharding", workload.memory.sharding),
        scheduling=policies.make("scheduling", workload.scheduling),
        cluster=cluster, threads=threads, battery_start_pct=battery_start_pct, ambient_c=ambient_c,
        charging=charging, trace_ops_steps=trace_ops_steps, fast_forward=fast_forward,
        placement=placement, balance=balance, seed=workload.seed, trace=trace, interruptible=interruptible)
    summary.provenance = provenance(
        command=command or "mfbench.sim.simulate", workload=workload.resolved(program),
        device=device.model_dump(mode="json"),
        target=None, ambient_c=ambient_c if ambient_c is not None else device.thermal.ambient_c.value,
        charging=charging, seed=workload.seed)
    return summary, events
