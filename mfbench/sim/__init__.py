"""The simulator: a StepProgram run on a device profile, step after step (SimPy inside a step).

One optimizer step is a SimPy simulation: a compute process walks the program's ops on one
core cluster (roofline time at the current frequency and thread count); the program's io ops
(a sharded step's loads, stores and evictions, planned by mfbench.plan.shards) go through one
I/O queue in program order (latency + bytes / bandwidth): at once for `lru`, overlapping the
compute for `prefetch`, an op waiting only for the parts it needs; memory records every allocation and free, and an allocation past the
device's per-app limit ends the run as a low-memory kill at that moment. The step yields a
piecewise-constant power profile.

Between steps, plain Python integrates the slow physics over that profile: the battery
(coulomb counting, open-circuit voltage vs charge, internal resistance) and the lumped RC
thermal model (exact exponential solution), whose governor caps the frequency of the next
step. The scheduling policy decides before each step: sleep, pause, threads, cluster.

Fast-forward: a step's outcome depends only on (cluster, threads, frequency): a sharded step
starts and ends with no shard resident, so a step with the same key reuses the earlier result; the physics is applied
to the reused power profile exactly as to a fresh one, so the run is identical to stepping
through every step in SimPy.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from mfbench import policies
from mfbench.contracts import policy
from mfbench.contracts.program import Op, StepProgram
from mfbench.contracts.trace import Summary
from mfbench.errors import InputError, warn
from mfbench.plan import compile_program
from mfbench.plan.shards import needs
from mfbench.spec.profile import DeviceProfile
from mfbench.units import MB

CHARGER_W = 10.0        # estimated: what a phone's charger delivers while it is in use
PAUSE_POLL_S = 10.0     # a paused run asks the scheduler again after this long
MAX_PAUSE_S = 3600.0    # a pause longer than this ends the run (nothing is going to change)


# ----------------------------------------------------------------------------- physics

class BatteryEmpty(Exception):
    pass


class Battery:
    """Coulomb counting with voltage sag: the load draws P = V_terminal * I where
    V_terminal = OCV(charge) - I * R, so I = (OCV - sqrt(OCV^2 - 4 R P)) / (2 R)."""

    def __init__(self, spec, soc_pct: float):
        self.capacity_c = spec.capacity_mah.value * 3.6  # mAh -> coulombs
        self.soc_points = np.array(spec.ocv_soc_pct.values, dtype=float)
        self.ocv_points = np.array(spec.ocv_v.values, dtype=float)
        self.resistance = float(spec.internal_resistance_ohm.value)
        self.soc_pct = float(soc_pct)
        self.current = 0.0
        self.voltage = self.ocv()

    def ocv(self) -> float:
        return float(np.interp(self.soc_pct, self.soc_points, self.ocv_points))

    def draw(self, dt: np.ndarray, power: np.ndarray) -> None:
        """Draw `power` watts over intervals `dt`; the open-circuit voltage is taken at the
        start (it moves by millivolts over one step). Negative power charges."""
        ocv, r = self.ocv(), self.resistance
        if r == 0:
            current = power / ocv
        else:
            disc = ocv * ocv - 4 * r * power
            if disc.min() < 0:
                raise BatteryEmpty(f"battery cannot supply {power.max():.1f} W at {ocv:.2f} V")
            current = (ocv - np.sqrt(disc)) / (2 * r)
        charge = float(np.dot(current, dt))
        self.soc_pct = min(100.0, self.soc_pct - 100.0 * charge / self.capacity_c)
        self.current = charge / float(dt.sum())
        self.voltage = ocv - self.current * r
        if self.soc_pct <= 0:
            self.soc_pct = 0.0
            raise BatteryEmpty("battery empty")


class Thermal:
    """Lumped RC: C dT/dt = P - (T - ambient) / R, solved exactly over each constant-power
    interval: T - ambient -> e (T - ambient) + (1 - e) P R with e = exp(-dt / RC)."""

    def __init__(self, spec, ambient_c: float | None = None):
        self.resistance = float(spec.resistance_c_per_w.value)
        self.capacitance = float(spec.capacitance_j_per_c.value)
        self.ambient_c = float(spec.ambient_c.value if ambient_c is None else ambient_c)
        self.temperature_c = self.ambient_c
        self.throttling = spec.throttling

    def response(self, dt: np.ndarray, power: np.ndarray) -> tuple[float, float]:
        """(a, b) with T_end - ambient = a (T_start - ambient) + b over the whole profile."""
        e = np.exp(-dt / (self.resistance * self.capacitance))
        after = np.append(np.cumprod(e[::-1])[::-1][1:], 1.0)  # decay of what comes later
        return float(np.prod(e)), float(np.sum((1 - e) * power * self.resistance * after))

    def advance(self, response: tuple[float, float]) -> None:
        a, b = response
        self.temperature_c = self.ambient_c + a * (self.temperature_c - self.ambient_c) + b

    def freq_cap(self) -> float:
        """The governor's cap (fraction of the top frequency) at the current temperature."""
        return min((s.freq_cap for s in self.throttling if self.temperature_c > s.above_c), default=1.0)


def operating_point(cluster, cap: float) -> tuple[float, float]:
    """(MHz, W per busy core) at the highest DVFS step within `cap` x the top frequency."""
    freqs, watts = cluster.freqs_mhz.values, cluster.power_w_per_core.values
    allowed = [i for i, f in enumerate(freqs) if f <= cap * freqs[-1] + 1e-9] or [0]
    return freqs[allowed[-1]], watts[allowed[-1]]


def op_seconds(op: Op, cluster, threads: int, freq_mhz: float, bandwidth_gbs: float) -> float:
    """Roofline: max(FLOPs / achieved FLOP/s, bytes / bandwidth). Achieved FLOP/s is the
    calibrated per-core rate of the op's class x threads x (frequency / top frequency)."""
    per_core = (cluster.skinny_gemm_gflops_per_core if op.op_class == "skinny_gemm"
                else cluster.gemm_gflops_per_core).value
    achieved = per_core * 1e9 * threads * freq_mhz / cluster.freqs_mhz.values[-1]
    return max(op.flops / achieved, op.bytes_moved / (bandwidth_gbs * 1e9))


def start_cluster(device, threads: int | str) -> tuple[str, int]:
    """The cluster a run starts on, and its threads. `auto`: the cluster with the most GEMM
    throughput on all its cores, running all of them. A number: the most throughput at
    min(threads, cores), running that many, with a warning when that cluster has fewer cores
    than asked. Ties go to the faster core (fewer cores busy for the same work), then to the
    cluster listed first."""
    def throughput(c):
        return c.gemm_gflops_per_core.value * (c.cores if threads == "auto" else min(threads, c.cores))
    best = max(device.clusters, key=lambda c: (throughput(c), c.gemm_gflops_per_core.value))
    if threads == "auto":
        return best.name, best.cores
    if threads > best.cores:
        warn(f"threads: {threads} asked, but the fastest choice on {device.name} is its {best.name} cluster with "
             f"{best.cores} core{'s' if best.cores > 1 else ''}; running {best.cores} (threads: auto picks this silently)")
    return best.name, min(threads, best.cores)


def power_profile(duration: float, intervals: list[tuple[float, float, float]], idle_w: float):
    """Piecewise-constant power (dt, watts) from overlapping (start, end, watts) intervals."""
    edges = np.unique(np.array([0.0, duration] + [x for s, e, _ in intervals for x in (s, e)]))
    delta = np.zeros(len(edges))
    for s, e, w in intervals:
        delta[np.searchsorted(edges, s)] += w
        delta[np.searchsorted(edges, e)] -= w
    dt, power = np.diff(edges), idle_w + np.cumsum(delta)[:-1]
    keep = dt > 0
    return dt[keep], power[keep]


# ------------------------------------------------------------------------- one step

class LowMemoryKill(Exception):
    def __init__(self, t: float, reason: str):
        super().__init__(t, reason)  # SimPy re-raises it from args
        self.t, self.reason = t, reason


@dataclass(frozen=True)
class Setting:
    """What a step runs on: the whole fast-forward key."""
    cluster: str
    threads: int
    freq_mhz: float


@dataclass
class StepResult:
    duration: float
    dt: np.ndarray                      # piecewise-constant power profile of the step
    power: np.ndarray
    energy_j: float
    peak_bytes: int
    memory: list[tuple[float, int]]     # (t, resident bytes) at every allocation and free
    events: list[dict]                  # op and io events, times from the step's start
    io_read: int
    io_write: int
    kill: LowMemoryKill | None = None
    thermal_response: tuple[float, float] | None = field(default=None, repr=False)


class Step:
    """One optimizer step in SimPy: compute, the program's io through one I/O queue, memory."""

    def __init__(self, run: Run, setting: Setting):
        self.run, self.program, self.device = run, run.program, run.device
        self.env = simpy.Environment()
        self.storage = simpy.Resource(self.env, capacity=1)  # one I/O queue, first come first served
        self.cluster = run.clusters[setting.cluster]
        self.setting = setting
        _, self.core_w = operating_point(self.cluster, setting.freq_mhz / self.cluster.freqs_mhz.values[-1])
        self.loading: dict[str, simpy.Process] = {}  # part -> its load or zero in the queue
        self.queued: list[simpy.Process] = []
        self.rss = run.static_bytes
        self.memory = [(0.0, self.rss)]
        self.peak = self.rss
        self.intervals: list[tuple[float, float, float]] = []
        self.events: list[dict] = []
        self.io_read = self.io_write = 0

    # memory: every allocation and free
    def alloc(self, nbytes: int, what: str) -> None:
        if not nbytes:
            return
        self.rss += nbytes
        self.memory.append((self.env.now, self.rss))
        self.peak = max(self.peak, self.rss)
        if self.rss > self.run.limit_bytes:
            raise LowMemoryKill(self.env.now, f"low-memory kill: {what} needs {nbytes / MB:.1f} MB, "
                                f"resident {self.rss / MB:.1f} MB > app limit {self.run.limit_bytes / MB:.0f} MB")

    def free(self, nbytes: int) -> None:
        if nbytes:
            self.rss -= nbytes
            self.memory.append((self.env.now, self.rss))

    # storage: one queue, latency + bytes / bandwidth
    def io(self, kind: str, shard: str, nbytes: int):
        st = self.device.storage
        bandwidth = (st.seq_read_gbs if kind == "load" else st.seq_write_gbs).value * 1e9
        duration = st.latency_us.value * 1e-6 + nbytes / bandwidth
        start = self.env.now
        self.events.append({"type": "io", "kind": kind, "shard": shard, "start": start,
                            "duration": duration, "bytes": nbytes})
        self.intervals.append((start, start + duration, nbytes * st.energy_nj_per_byte.value * 1e-9 / duration))
        if kind == "load":
            self.io_read += nbytes
        else:
            self.io_write += nbytes
        yield self.env.timeout(duration)

    def io_op(self, op, allocated: int, freed: int):
        """One io op of the program in its turn: a load or zero takes its part's RAM, a load
        or store moves its bytes, an evict gives the RAM back."""
        with self.storage.request() as turn:
            yield turn
            self.alloc(allocated, op.name)
            if op.io_bytes:
                yield from self.io("load" if op.kind == "load" else "store", op.shard, op.io_bytes)
            self.free(freed)

    def compute(self):
        if self.rss > self.run.limit_bytes:  # weights, gradients and optimizer state alone do not fit
            raise LowMemoryKill(0.0, f"low-memory kill: loading the model needs {self.rss / MB:.1f} MB "
                                f"> app limit {self.run.limit_bytes / MB:.0f} MB")
        threads, freq = self.setting.threads, self.setting.freq_mhz
        bandwidth, dram_j = self.device.memory.bandwidth_gbs.value, self.device.memory.energy_pj_per_byte.value * 1e-12
        for op, (allocated, freed) in zip(self.program.ops, self.program.memory_deltas):
            if op.phase == "io":
                done = self.env.process(self.io_op(op, allocated, freed))
                # prefetch: the queue works while compute goes on (the update streams the moments itself)
                if not self.run.sharding.ahead or ".optimizer." in op.name:
                    yield done
                self.queued.append(done)
                for part in op.alloc:
                    self.loading[part] = done
                continue
            for part in needs(op, self.run.grads_sharded):
                if part in self.loading:
                    yield self.loading.pop(part)
            self.alloc(allocated, op.name)
            start, duration = self.env.now, op_seconds(op, self.cluster, threads, freq, bandwidth)
            if duration > 0:
                self.intervals.append((start, start + duration, threads * self.core_w + op.bytes_moved * dram_j / duration))
            self.events.append({"type": "op", "name": f"{op.name}.{op.phase}", "start": start, "duration": duration,
                                "shard": op.shard, "bytes": int(op.bytes_moved)})
            yield self.env.timeout(duration)
            self.free(freed)
        yield self.env.all_of(self.queued)  # the step ends with its write-back done

    def simulate(self) -> StepResult:
        kill = None
        self.env.process(self.compute())
        try:
            self.env.run()
        except LowMemoryKill as e:
            kill = e
        duration = self.env.now
        dt, power = power_profile(duration, self.intervals, self.device.power.idle_w.value)
        return StepResult(duration, dt, power, float(np.dot(dt, power)), self.peak, self.memory, self.events,
                          self.io_read, self.io_write, kill)


# ------------------------------------------------------------------------------ a run

class Run:
    """A whole simulated run: steps, scheduler sleeps and pauses, battery and thermal state."""

    def __init__(self, program: StepProgram, device: DeviceProfile, *, sharding=None, scheduling=None,
                 threads: int | str = "auto", battery_start_pct: float = 100.0, ambient_c: float | None = None,
                 charging: bool = False, trace_ops_steps: int = 3, fast_forward: bool = True,
                 cluster: str | None = None):
        self.program, self.device = program, device
        self.sharding = sharding or policies.NoSharding()
        self.scheduling = scheduling or policies.NoScheduling()
        self.grads_sharded = any(b.lifetime == "sharded" and b.name.startswith("grads.") for b in program.buffers)
        # held all run: static buffers and scratch (not the sharded ones: the io ops hold those), the runtime's own
        self.static_bytes = program.static_bytes + int(device.ram.runtime_overhead_mb.value * MB)
        self.limit_bytes = int(device.ram.app_limit_mb.value * MB)
        self.clusters = {c.name: c for c in device.clusters}
        self.cluster, self.threads = (cluster, threads) if cluster else start_cluster(device, threads)
        self.battery = None if device.battery is None else Battery(device.battery, battery_start_pct)
        self.thermal = Thermal(device.thermal, ambient_c)
        self.charging = charging or device.battery is None
        self.trace_ops_steps, self.fast_forward = trace_ops_steps, fast_forward
        self.cache: dict[tuple, StepResult] = {}
        self.t = self.energy_j = 0.0
        self.events: list[dict] = []
        self.step_seconds: list[float] = []
        self.peak = self.static_bytes
        self.io_read = self.io_write = 0
        self.max_temperature = self.thermal.temperature_c
        self.frequency, _ = operating_point(self.clusters[self.cluster], self.thermal.freq_cap())
        self.kill_reason = self.stop_reason = None
        self.last_decision = None
        self.last_power_w = None

    # physics over a power profile
    def spend(self, dt: np.ndarray, power: np.ndarray, response: tuple[float, float] | None = None) -> None:
        self.thermal.advance(response or self.thermal.response(dt, power))
        self.energy_j += float(np.dot(dt, power))
        self.t += float(dt.sum())
        if self.battery is not None:
            self.battery.draw(dt, power - CHARGER_W if self.charging else power)

    def sample(self, rss: int) -> None:
        self.max_temperature = max(self.max_temperature, self.thermal.temperature_c)
        b = self.battery
        self.last_sample = {"type": "sample", "t": self.t, "rss": rss, "battery": b and b.soc_pct,
                            "current": b and b.current, "voltage": b and b.voltage,
                            "temperature": self.thermal.temperature_c, "frequency": self.frequency,
                            # what only a measured run knows
                            "peak_rss": None, "pss": None, "charging": b and self.charging, "zones": None,
                            "frequencies": None, "cpus": None}
        self.events.append(self.last_sample)

    def idle(self, seconds: float) -> None:
        self.spend(np.array([seconds]), np.array([self.device.power.idle_w.value]))
        self.sample(self.static_bytes)

    def observe(self, step: int) -> dict:
        return policy.observation(
            step=step, t=self.t, battery_pct=self.battery and self.battery.soc_pct,
            temperature_c=self.thermal.temperature_c, charging=self.charging,
            last_step_s=self.step_seconds[-1] if self.step_seconds else None, power_w=self.last_power_w,
            threads=self.threads, cluster=self.cluster, clusters={c.name: c.cores for c in self.device.clusters})

    def decide(self, step: int) -> dict:
        decision = policy.decide(self.scheduling, self.observe(step))
        if decision != self.last_decision and decision:  # record changes, not every repeat
            self.events.append({"type": "decision", "t": self.t, "policy": type(self.scheduling).__name__,
                                "choice": decision})
        self.last_decision = decision
        return decision

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
        cluster = self.clusters[self.cluster]
        self.frequency, _ = operating_point(cluster, self.thermal.freq_cap())
        setting = Setting(self.cluster, min(self.threads, cluster.cores), self.frequency)

        key = setting
        result = self.cache.get(key) if self.fast_forward else None
        if result is None:
            result = Step(self, setting).simulate()
            result.thermal_response = self.thermal.response(result.dt, result.power)
            if self.fast_forward:
                self.cache[key] = result

        start, sensors = self.t, self.last_sample  # memory samples carry the step-start sensors
        if result.kill is not None:  # the physics up to the moment of the kill
            n = int(np.searchsorted(np.cumsum(result.dt), result.kill.t))
            dt = result.dt[:n + 1].copy()
            if len(dt):  # empty when the kill comes before the first segment (weights alone too big)
                dt[-1] = result.kill.t - float(result.dt[:n].sum())
            if dt.sum() > 0:
                self.spend(dt, result.power[:n + 1])
        else:
            self.spend(result.dt, result.power, result.thermal_response)
        if index < self.trace_ops_steps:  # op, io and memory detail of the first steps
            self.events += [{**e, "start": start + e["start"]} for e in result.events]
            self.events += [{**sensors, "t": start + t, "rss": rss} for t, rss in result.memory]
        self.peak = max(self.peak, result.peak_bytes)
        if result.kill is not None:
            self.kill_reason = f"{result.kill.reason} at t = {self.t:.3f} s in step {index}"
            return False
        self.io_read += result.io_read
        self.io_write += result.io_write
        self.step_seconds.append(result.duration)
        self.last_power_w = result.energy_j / result.duration
        self.events.append({"type": "step", "index": index, "t": self.t, "duration": result.duration,
                            "tokens": self.program.tokens_per_step, "loss": None, "lr": None, "grad_norm": None})
        self.sample(result.memory[-1][1])
        return True

    def run(self, steps: int, progress: bool = True) -> tuple[Summary, list[dict]]:
        from tqdm import tqdm
        battery_start = self.battery and self.battery.soc_pct
        self.sample(self.static_bytes)
        with tqdm(total=steps, file=sys.stderr, unit="step", desc="simulating",
                  disable=not progress or steps < 500, mininterval=0.5) as bar:
            for index in range(steps):
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
            stop_reason=self.stop_reason, details={"cluster": self.cluster, "threads": self.threads})
        return summary, self.events


def run_program(program: StepProgram, device: DeviceProfile, steps: int, *, progress: bool = True, **options):
    """Simulate `steps` optimizer steps of a (compiled or hand-built) program; see Run."""
    return Run(program, device, **options).run(steps, progress)


# ------------------------------------------------------------------ from a workload

def simulate(workload, device, steps=None, battery_start_pct=100.0, ambient_c=None, charging=False,
             trace_ops_steps=3, progress=True, fast_forward=True, base_dir=None, command=None):
    """Simulate a workload (a Workload or a path to its YAML) on a device (a profile, a name
    or a path). Returns (Summary, trace events)."""
    from mfbench.contracts.trace import provenance
    from mfbench.spec.profile import load_device
    from mfbench.spec.workload import load_workload

    if isinstance(workload, (str, Path)):
        base_dir = base_dir or Path(workload).resolve().parent
        workload = load_workload(workload)
    if not isinstance(device, DeviceProfile):
        device = load_device(device)
    if battery_start_pct is not None and not 0 < battery_start_pct <= 100:
        raise InputError(None, "battery-start", f"expected a percentage in (0, 100], got {battery_start_pct}")
    cluster, threads = start_cluster(device, workload.threads)
    program = compile_program(workload, base_dir, threads=threads,
                              overhead_bytes=int(device.ram.runtime_overhead_mb.value * MB))
    summary, events = run_program(
        program, device, steps or workload.steps, progress=progress,
        sharding=policies.make("sharding", workload.memory.sharding),
        scheduling=policies.make("scheduling", workload.scheduling),
        cluster=cluster, threads=threads, battery_start_pct=battery_start_pct, ambient_c=ambient_c,
        charging=charging, trace_ops_steps=trace_ops_steps, fast_forward=fast_forward)
    summary.provenance = provenance(
        command=command or "mfbench.sim.simulate", workload=workload.resolved(program),
        device=device.model_dump(mode="json"),
        target=None, ambient_c=ambient_c if ambient_c is not None else device.thermal.ambient_c.value,
        charging=charging, seed=workload.seed)
    return summary, events
