"""Device profiles (`devices/*.yaml`): what a phone or laptop can hold, compute, store and burn.

Every number carries its provenance, written as one of
    {value: 8192, spec: "https://..."}                     # datasheet / public benchmark URL
    {value: 3.3,  estimated: "assumption, stated briefly"}
    {value: 61.0, measured: "mfbench calibrate 0.1.0, 2026-11-25"}
The schema is documented in docs/devices.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from mfbench.errors import InputError, load_schema

DEVICES_DIR = Path(__file__).resolve().parents[2] / "devices"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantity(Strict):
    value: float | tuple[float, ...]
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


# A physical amount that can only be positive (a capacity, a rate, a resistance).
Positive = Annotated[Quantity, AfterValidator(Quantity.check_positive)]
NotNegative = Annotated[Quantity, AfterValidator(Quantity.check_not_negative)]  # an amount that may be none


class Ram(Strict):
    total_mb: Positive
    os_reserved_mb: Positive   # what the OS and background apps keep
    app_limit_mb: Positive     # the low-memory killer ends one app above this
    runtime_overhead_mb: NotNegative  # the trainer's own memory beyond its planned buffers (libraries, stacks, token file)


class Kernels(Strict):
    """Rates of the trainer's own kernels on one cluster, at its top frequency and all its
    cores, as `mfbench calibrate` fits them from microbenchmarks (docs/validation.md). With
    them the simulator prices an op kernel by kernel (mfbench.sim.cost); without, by the
    roofline of gemm_gflops_per_core and memory.bandwidth_gbs."""
    gemm_call_us: NotNegative           # fixed time of one GEMM call
    gemm_bandwidth_gbs: Positive        # GEMM operands (A, B, C once each) streamed per second, one core
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

    @field_validator("thread_efficiency")
    @classmethod
    def _fraction(cls, q):
        if q.value > 1:
            raise ValueError("a thread cannot add more than one thread's rate (expected at most 1)")
        return q


class Cluster(Strict):
    name: str
    cores: int = Field(gt=0)
    freqs_mhz: Positive                 # ascending DVFS steps
    power_w_per_core: Positive          # active power of one busy core at each step of freqs_mhz
    gemm_gflops_per_core: Positive      # achieved FP32 GEMM at the top frequency (large shapes)
    skinny_gemm_gflops_per_core: Positive  # achieved at LoRA-like skinny shapes (rank << hidden)
    kernels: Kernels | None = None      # calibrated kernel rates (mfbench calibrate); None: the roofline

    @model_validator(mode="after")
    def _steps(self):
        if len(self.freqs_mhz.values) != len(self.power_w_per_core.values):
            raise ValueError("freqs_mhz and power_w_per_core need the same number of steps")
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


class Battery(Strict):
    capacity_mah: Positive
    ocv_soc_pct: Quantity               # state-of-charge points for the open-circuit voltage curve
    ocv_v: Positive                     # open-circuit voltage at each of ocv_soc_pct
    internal_resistance_ohm: Positive

    @model_validator(mode="after")
    def _curve(self):
        if len(self.ocv_soc_pct.values) != len(self.ocv_v.values):
            raise ValueError("ocv_soc_pct and ocv_v must have the same number of points")
        return self


class ThrottleStep(Strict):
    above_c: float                      # when the skin/SoC temperature is above this...
    freq_cap: float = Field(gt=0, le=1)  # ...every cluster is capped at this fraction of its top frequency


class Thermal(Strict):
    resistance_c_per_w: Positive        # lumped RC: dT/dt = (P - (T - ambient)/R) / C
    capacitance_j_per_c: Positive
    ambient_c: Quantity
    throttling: tuple[ThrottleStep, ...] = ()


class Power(Strict):
    idle_w: Positive


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


def device_names() -> list[str]:
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def load_device(name_or_path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> DeviceProfile:
    """A shipped profile by name (`pixel8`), or any profile file by path, after `--set` overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = DEVICES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise InputError(None, "device", f"unknown device {str(name_or_path)!r}; "
                             f"shipped: {', '.join(device_names())}")
    return load_schema(DeviceProfile, path, sets)


def format_device_table(devices: list[DeviceProfile]) -> str:
    """One line a device: the numbers a user picks a device by."""
    head = ("name", "device", "SoC", "RAM MB", "app limit MB", "cores", "storage", "battery mAh")
    rows = [head]
    for d in devices:
        cores = "+".join(str(c.cores) for c in d.clusters)
        battery = f"{d.battery.capacity_mah.value:,.0f}" if d.battery else "mains"
        rows.append((d.name, d.display_name, d.soc, f"{d.ram.total_mb.value:,.0f}",
                     f"{d.ram.app_limit_mb.value:,.0f}", cores, d.storage.kind, battery))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_device(device: DeviceProfile) -> str:
    """Every number of a profile with its provenance, one per line."""
    lines = [f"{device.display_name} ({device.name}, {device.kind}, {device.soc})"]

    def walk(obj: BaseModel, prefix: str):
        for key in type(obj).model_fields:
            value = getattr(obj, key)
            path = f"{prefix}{key}"
            if isinstance(value, Quantity):
                v = value.value
                shown = ", ".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"
                lines.append(f"  {path:<42} {shown:<28} [{value.provenance}: {value.source}]")
            elif isinstance(value, BaseModel):
                walk(value, path + ".")
            elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
                for i, item in enumerate(value):
                    label = getattr(item, "name", str(i))
                    if isinstance(item, ThrottleStep):
                        lines.append(f"  {path}[{i}]{'':<30} above {item.above_c:g} C: cap {item.freq_cap:.0%}")
                    else:
                        walk(item, f"{path}[{label}].")
            elif prefix and value is not None and key != "name":
                lines.append(f"  {path:<42} {value}")
    for section in ("ram", "clusters", "memory", "storage", "power", "battery", "thermal"):
        value = getattr(device, section)
        if value is None:
            lines.append(f"  {section:<42} none (mains powered)")
        elif isinstance(value, tuple):
            for c in value:
                walk(c, f"clusters[{c.name}].")
        else:
            walk(value, section + ".")
    return "\n".join(lines)
