"""Device profiles (`devices/*.yaml`): what a phone or laptop can hold, compute, store and burn.

Every number carries its provenance, written as one of
    {value: 8192, spec: "https://..."}                     # datasheet / public benchmark URL
    {value: 3.3,  estimated: "assumption, stated briefly"}
    {value: 61.0, measured: "mfbench calibrate 0.1.0, 2026-11-25"}
The schema is documented in docs/devices.md.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from mfbench import shipped
from mfbench.errors import InputError, Int, Number, Strict, did_you_mean, load_schema

DEVICES_DIR = shipped.folder("devices")


class Quantity(Strict):
    value: Number | tuple[Number, ...]
    spec: str | None = None
    estimated: str | None = None
    measured: str | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _number_or_numbers(cls, v):
        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)
        if number(v):
            return float(v)
        if isinstance(v, (list, tuple)) and v and all(number(x) for x in v):
            return tuple(float(x) for x in v)
        raise ValueError(f"expected a number or a list of numbers, got {v!r}")

    @model_validator(mode="after")
    def _one_provenance(self):
        given = [k for k in ("spec", "estimated", "measured") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one provenance: spec (a URL), estimated (the assumption) "
                             f"or measured (tool and date); got {given or 'none'}")
        if self.spec is not None and not self.spec.startswith(("http://", "https://")):
            raise ValueError("spec provenance must be a URL")
        return self

    def check_positive(self):
        if any(x <= 0 for x in self.values):
            raise ValueError("must be greater than 0")
        return self

    def check_not_negative(self):
        if any(x < 0 for x in self.values):
            raise ValueError("must be 0 or more")
        return self

    @property
    def values(self) -> tuple[float, ...]:
        """The value as a tuple, whether one number or a list was given."""
        return self.value if isinstance(self.value, tuple) else (self.value,)

    @property
    def provenance(self) -> str:
        return next(k for k in ("spec", "estimated", "measured") if getattr(self, k))

    @property
    def source(self) -> str:
        return getattr(self, self.provenance)


# The conditions a run is simulated in. Phones are specified for use in about 0-35 °C air;
# this range refuses only the absurd (`--ambient 1000`, a typo of a unit), not a cold car.
AMBIENT_C = (-40.0, 60.0)


def check_ambient(celsius: float) -> float:
    lo, hi = AMBIENT_C
    if not lo <= celsius <= hi:
        raise ValueError(f"expected an ambient temperature from {lo:g} to {hi:g} °C, got {celsius:g}")
    return celsius


def check_battery_pct(pct: float) -> float:
    if not 0 < pct <= 100:
        raise ValueError(f"expected a state of charge above 0 and at most 100 %, got {pct:g}")
    return pct


AmbientC = Annotated[Number, AfterValidator(check_ambient)]
BatteryPct = Annotated[Number, AfterValidator(check_battery_pct)]


def check_conditions(ambient_c: float | None, battery_start_pct: float | None) -> None:
    """`--ambient` and `--battery-start` as the schemas check them (one check for simulate, sweep, figures)."""
    for flag, check, value in (("--ambient", check_ambient, ambient_c), ("--battery-start", check_battery_pct,
                                                                         battery_start_pct)):
        if value is not None:
            try:
                if not math.isfinite(value):
                    raise ValueError(f"expected a finite number, got {value}")
                check(value)
            except ValueError as e:
                raise InputError(None, flag, str(e)) from None


# A physical amount that can only be positive (a capacity, a rate, a resistance).
Positive = Annotated[Quantity, AfterValidator(Quantity.check_positive)]
NotNegative = Annotated[Quantity, AfterValidator(Quantity.check_not_negative)]  # an amount that may be none


class MemoryPressure(Strict):
    """Background apps come and go, so the limit one app gets varies: every `period_s` the
    limit is drawn anew, normal around `app_limit_mb` with this spread."""
    sd_mb: Positive                     # standard deviation of the app limit
    period_s: Positive                  # how long one draw holds


class Ram(Strict):
    total_mb: Positive
    os_reserved_mb: Positive   # what the OS and background apps keep
    app_limit_mb: Positive     # the low-memory killer ends one app above this (the mean when `pressure` is given)
    runtime_overhead_mb: NotNegative  # the trainer's own memory beyond its planned buffers (libraries, stacks, token file)
    pressure: MemoryPressure | None = None  # None: a fixed limit (a cliff)


class Kernels(Strict):
    """Rates of the trainer's own kernels on one cluster, at its top frequency and all its
    cores, as `mfbench calibrate` fits them from microbenchmarks (docs/validation.md). With
    them the simulator prices an op kernel by kernel (mfbench.sim.cost); without, by the
    roofline of gemm_gflops_per_core and memory.bandwidth_gbs."""
    gemm_call_us: NotNegative           # fixed time of one GEMM call
    gemm_bandwidth_gbs: Positive        # GEMM operands (A, B, C once each) streamed per second, one core, from memory
    gemm_cached_bandwidth_gbs: Positive  # ... from the caches (attention's inner products)
    gemm_size_exponent: NotNegative     # a GEMM's time a FLOP grows as (its FLOPs / 1 GFLOP) ** this
    thread_efficiency: Positive         # p threads run (1 + e (p - 1)) x one thread's rate
    attention_ns: Positive              # per causal attention score on one core beyond its GEMMs: standard forward
    attention_backward_ns: Positive     # ... standard backward
    attention_me_ns: Positive           # ... memory-efficient forward
    attention_me_backward_ns: Positive  # ... memory-efficient backward
    # bytes (as mfbench.spec.models.ELEMENTWISE counts them) per second of each memory-bound class
    layernorm_gbs: Positive
    layernorm_backward_gbs: Positive
    rmsnorm_gbs: Positive
    rmsnorm_backward_gbs: Positive
    gelu_gbs: Positive                  # GPT-2's MLP activation (tanh GELU and its derivative)
    swiglu_gbs: Positive                # Qwen's gated activation (SiLU), forward
    swiglu_backward_gbs: Positive
    geglu_gbs: Positive                 # Gemma's gated activation (tanh GELU), forward
    geglu_backward_gbs: Positive
    softmax_gbs: Positive               # the loss's softmax and cross-entropy, forward and backward
    update_gbs: Positive                # AdamW
    grad_norm_gbs: Positive             # the global gradient norm (clipping)
    zero_gbs: Positive                  # zeroing the gradients before a step
    lora_dropout_gbs: Positive | None = None           # LoRA dropout's mask (None: at memory.bandwidth_gbs)
    lora_dropout_backward_gbs: Positive | None = None

    @field_validator("thread_efficiency")
    @classmethod
    def _fraction(cls, q):
        if q.value > 1:
            raise ValueError("a thread cannot add more than one thread's rate (expected at most 1)")
        return q


class Cluster(Strict):
    name: str
    cores: Int = Field(gt=0)
    freqs_mhz: Positive                 # ascending DVFS steps
    power_w_per_core: Positive          # active power of one busy core at each step of freqs_mhz
    gemm_gflops_per_core: Positive      # achieved FP32 GEMM at the top frequency (large shapes)
    skinny_gemm_gflops_per_core: Positive  # achieved at LoRA-like skinny shapes (rank << hidden)
    volts: Positive | None = None       # supply voltage at each step of freqs_mhz (scales leakage)
    static_w: NotNegative | None = None  # the cluster's own static power while any of its cores runs
    leakage_w_per_core: NotNegative | None = None  # one running core's leakage at the top voltage and power.leakage_ref_c
    kernels: Kernels | None = None      # calibrated kernel rates (mfbench calibrate); None: the roofline

    @model_validator(mode="after")
    def _steps(self):
        if len(self.freqs_mhz.values) != len(self.power_w_per_core.values):
            raise ValueError("freqs_mhz and power_w_per_core need the same number of steps")
        if self.volts is not None and len(self.volts.values) != len(self.freqs_mhz.values):
            raise ValueError("freqs_mhz and volts need the same number of steps")
        return self


class Memory(Strict):
    bandwidth_gbs: Positive             # achieved DRAM bandwidth for streaming ops
    energy_pj_per_byte: Positive


class Storage(Strict):
    kind: str                           # e.g. "UFS 4.0"
    seq_read_gbs: Positive
    seq_write_gbs: Positive
    latency_us: Positive                # per request
    energy_nj_per_byte: Positive
    # The trainer maps its shard files (a load copies nothing) and writes them with pwrite.
    # While the page cache holds them (they fit beside the run in the RAM the OS leaves free),
    # a load maps cached pages and a store copies into the page cache, the kernel writing to
    # flash later; None: every load is read from flash and every store written to it.
    cached_map_gbs: Positive | None = None
    cached_write_gbs: Positive | None = None
    unmap_gbs: Positive | None = None   # an evict: a part's pages unmapped per second; None: free

    @model_validator(mode="after")
    def _cached_rates_together(self):
        if (self.cached_map_gbs is None) != (self.cached_write_gbs is None):
            raise ValueError("cached_map_gbs and cached_write_gbs go together (the page cache's load and store rates)")
        return self


class Charging(Strict):
    """The wall charger and the phone's charge controller: constant current, then constant
    voltage with a tapering current, cut when the cell is hot."""
    charger_w: Positive                 # the charger's rated output
    efficiency: Positive                # wall-to-phone efficiency; the rest is heat on the board
    cc_a: Positive                      # constant-current phase: charge current into the cell
    cv_v: Positive                      # constant-voltage phase: the cell's terminal voltage
    termination_a: Positive             # charging ends when the CV current has tapered below this
    hot_cut_c: Quantity                 # no charge current while the battery is hotter than this

    @model_validator(mode="after")
    def _sane(self):
        if self.efficiency.value > 1:
            raise ValueError("efficiency must be at most 1")
        if self.termination_a.value >= self.cc_a.value:
            raise ValueError("termination_a must be below cc_a")
        return self


class Battery(Strict):
    capacity_mah: Positive
    ocv_soc_pct: Quantity               # state-of-charge points for the open-circuit voltage curve
    ocv_v: Positive                     # open-circuit voltage at each of ocv_soc_pct
    internal_resistance_ohm: Positive   # at 25 C
    resistance_activation_k: Positive | None = None  # Arrhenius: R(T) = R_25 exp(B (1/T - 1/298.15 K)); None: constant
    cutoff_v: Positive | None = None    # the phone shuts down when the terminal voltage under load falls below this
    charging: Charging | None = None    # None: a flat charger of mfbench.sim.battery.FLAT_CHARGER_W, no heat

    @model_validator(mode="after")
    def _curve(self):
        if len(self.ocv_soc_pct.values) != len(self.ocv_v.values):
            raise ValueError("ocv_soc_pct and ocv_v must have the same number of points")
        return self


class ThrottleStep(Strict):
    above_c: Number                      # when the skin sensor is above this...
    freq_cap: Number = Field(gt=0, le=1)  # ...every cluster is capped at this fraction of its top frequency
    hysteresis_c: Number = Field(default=0.0, ge=0)  # ...until it falls below above_c - hysteresis_c
    severity: str | None = None         # the Thermal HAL's name for the level (LIGHT, MODERATE, ...)


class Node(Strict):
    """One more node of the thermal network, joined to the board by a thermal resistance."""
    resistance_c_per_w: Positive        # to the board node
    capacitance_j_per_c: Positive


class JunctionTrip(Strict):
    """The SoC's own fast trip on the junction temperature, checked at every step."""
    above_c: Number
    freq_cap: Number = Field(gt=0, le=1)
    hysteresis_c: Number = Field(default=0.0, ge=0)


class Thermal(Strict):
    resistance_c_per_w: Positive        # board (skin) to ambient: C dT/dt = P - (T - ambient)/R
    capacitance_j_per_c: Positive       # the board and body
    ambient_c: Annotated[Quantity, AfterValidator(lambda q: [check_ambient(v) for v in q.values] and q)]
    throttling: tuple[ThrottleStep, ...] = ()  # on the skin sensor (the board node)
    junction: Node | None = None        # the SoC die and package; None: SoC heat goes straight to the board
    battery: Node | None = None         # the cell; None: battery heat goes to the board
    junction_trip: JunctionTrip | None = None
    shutdown_c: Quantity | None = None  # the skin sensor above this shuts the phone down (Thermal HAL SHUTDOWN)
    polling_s: Positive | None = None   # the skin governor re-evaluates at most this often; None: every step


class Power(Strict):
    idle_w: Positive                    # awake, nothing running: board, radios, SoC idle
    uncore_w: NotNegative | None = None  # interconnect, shared cache and memory controller while the CPU computes
    leakage_ref_c: Quantity | None = None  # junction temperature at which leakage_w_per_core is given
    leakage_per_c: NotNegative | None = None  # leakage grows as exp(leakage_per_c (T_junction - leakage_ref_c))

    @model_validator(mode="after")
    def _leakage(self):
        if (self.leakage_per_c is None) != (self.leakage_ref_c is None):
            raise ValueError("leakage_per_c and leakage_ref_c go together")
        return self


class Cpusets(Strict):
    """Android's cpusets: which clusters an app may run on in the foreground and background."""
    foreground: tuple[str, ...]
    background: tuple[str, ...]


class DeviceProfile(Strict):
    name: str
    display_name: str
    kind: Literal["phone", "laptop", "host"]
    soc: str
    ram: Ram
    clusters: tuple[Cluster, ...] = Field(min_length=1)
    memory: Memory
    storage: Storage
    power: Power
    battery: Battery | None = None      # None: mains powered (a laptop on its charger, this host)
    thermal: Thermal
    cpusets: Cpusets | None = None      # None: every cluster in either placement

    @model_validator(mode="after")
    def _cpusets(self):
        names = {c.name for c in self.clusters}
        for placement in ("foreground", "background"):
            listed = getattr(self.cpusets, placement) if self.cpusets else ()
            unknown = [n for n in listed if n not in names]
            if unknown or (self.cpusets and not listed):
                raise ValueError(f"cpusets.{placement}: expected cluster names of this device "
                                 f"({', '.join(sorted(names))}), got {list(listed)}")
        return self


def device_names() -> list[str]:
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def load_device(name_or_path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> DeviceProfile:
    """A shipped profile by name (`pixel8`), or any profile file by path, after `--set` overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = DEVICES_DIR / f"{name_or_path}.yaml"
        if str(name_or_path) not in device_names():  # not path.exists(): a 5000-character name raises
            raise InputError(None, "device", f"unknown device {str(name_or_path)!r}"
                             f"{did_you_mean(name_or_path, device_names())}; shipped: {', '.join(device_names())} "
                             "(or a profile's YAML path)")
    return load_schema(DeviceProfile, path, sets)


def format_device_table(devices: list[DeviceProfile]) -> str:
    """One line a device: the numbers a user picks a device by."""
    from mfbench.table import table
    rows = []
    for d in devices:
        cores = "+".join(str(c.cores) for c in d.clusters)
        battery = f"{d.battery.capacity_mah.value:,.0f}" if d.battery else "mains"
        rows.append((d.name, d.display_name, d.soc, f"{d.ram.total_mb.value:,.0f}",
                     f"{d.ram.app_limit_mb.value:,.0f}", cores, d.storage.kind, battery))
    return table(rows, header=("name", "device", "SoC", "RAM MB", "app limit MB", "cores", "storage", "battery mAh"))


def format_device(device: DeviceProfile) -> str:
    """Every number of a profile with its provenance, one per line."""
    from mfbench.table import table
    rows = []  # (field path, value, provenance)

    def walk(obj: BaseModel, prefix: str):
        for key in type(obj).model_fields:
            value = getattr(obj, key)
            path = f"{prefix}{key}"
            if isinstance(value, Quantity):
                v = value.value
                shown = ", ".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"
                rows.append((path, shown, f"[{value.provenance}: {value.source}]"))
            elif isinstance(value, BaseModel):
                walk(value, path + ".")
            elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
                for i, item in enumerate(value):
                    label = getattr(item, "name", str(i))
                    if isinstance(item, ThrottleStep):
                        rows.append((f"{path}[{i}]", f"above {item.above_c:g} C: cap {item.freq_cap:.0%}", ""))
                    else:
                        walk(item, f"{path}[{label}].")
            elif prefix and value is not None and key != "name":
                rows.append((path, value, ""))
    for section in ("ram", "clusters", "memory", "storage", "power", "battery", "thermal", "cpusets"):
        value = getattr(device, section)
        if value is None:
            rows.append((section, "none (mains powered)" if section == "battery" else "none", ""))
        elif isinstance(value, tuple):
            for c in value:
                walk(c, f"clusters[{c.name}].")
        else:
            walk(value, section + ".")
    return f"{device.display_name} ({device.name}, {device.kind}, {device.soc})\n" + table(rows, indent=2)
