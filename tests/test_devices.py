"""The shipped device profiles (`devices/*.yaml`): they load, they are physically sensible,
every number says where it comes from, and bad profiles fail with one clear InputError."""
import re

import pytest
import yaml
from pydantic import BaseModel

from mfbench.errors import InputError
from mfbench.spec.profile import (
    DEVICES_DIR,
    DeviceProfile,
    Quantity,
    device_names,
    load_device,
)

SHIPPED = device_names()
PAPER_DEVICES = {"pixel8", "pixel8pro", "pixel7pro", "macbook-air-m2"}


def seq(q: Quantity) -> tuple[float, ...]:
    return q.value if isinstance(q.value, tuple) else (q.value,)


def quantities(model, path=""):
    """Every (field path, Quantity) in a profile, walking nested models and tuples of them."""
    if isinstance(model, Quantity):
        yield path, model
    elif isinstance(model, tuple):
        for i, item in enumerate(model):
            yield from quantities(item, f"{path}[{i}]")
    elif isinstance(model, BaseModel):
        for name in type(model).model_fields:
            yield from quantities(getattr(model, name), f"{path}.{name}" if path else name)


def strictly_increasing(xs) -> bool:
    return all(a < b for a, b in zip(xs, xs[1:]))


@pytest.fixture(params=SHIPPED)
def profile(request) -> DeviceProfile:
    return load_device(request.param)


# --- what ships ---------------------------------------------------------------------------

def test_ships_the_papers_devices_and_more_phones():
    assert PAPER_DEVICES <= set(SHIPPED)
    phones = [n for n in SHIPPED if load_device(n).kind == "phone"]
    assert len(phones) >= 5  # the paper's three Pixels and at least two more
    assert "host" in SHIPPED


def test_name_is_the_file_name(profile):
    assert (DEVICES_DIR / f"{profile.name}.yaml").exists()
    assert profile.display_name and profile.soc


def test_loads_by_path_too(profile):
    assert load_device(DEVICES_DIR / f"{profile.name}.yaml") == profile


# --- provenance ---------------------------------------------------------------------------

def test_every_number_says_where_it_comes_from(profile):
    for path, q in quantities(profile):
        if q.provenance == "spec":
            assert re.match(r"https://\S+$", q.spec), f"{path}: spec is not a single https URL"
        elif q.provenance == "measured":
            assert re.search(r"\d{4}-\d{2}-\d{2}", q.measured), f"{path}: measured needs its date"
        else:
            assert len(q.estimated) >= 15, f"{path}: state the assumption, not just a word"


def test_published_figures_are_specs():
    """RAM size and battery capacity are published for every shipped phone."""
    for name in SHIPPED:
        p = load_device(name)
        if p.kind == "phone":
            assert p.ram.total_mb.provenance == "spec", name
            assert p.battery.capacity_mah.provenance == "spec", name


# --- physical sanity ----------------------------------------------------------------------

def test_ram_budget_adds_up(profile):
    ram = profile.ram
    assert 0 < ram.app_limit_mb.value
    assert 0 < ram.os_reserved_mb.value
    assert ram.app_limit_mb.value + ram.os_reserved_mb.value <= ram.total_mb.value


def test_pixel8_app_limit_matches_the_paper():
    # the paper: ~4 GB training processes ran on a Pixel 8, a 6,111 MB one was killed
    assert 4096 < load_device("pixel8").ram.app_limit_mb.value < 6111


def test_dvfs_tables(profile):
    for c in profile.clusters:
        freqs, power = seq(c.freqs_mhz), seq(c.power_w_per_core)
        assert freqs[0] > 0 and strictly_increasing(freqs), c.name
        assert power[0] > 0 and strictly_increasing(power), c.name
        # energy per cycle (P/f) cannot fall as frequency and voltage rise
        per_cycle = [p / f for p, f in zip(power, freqs)]
        assert all(a <= b * 1.0001 for a, b in zip(per_cycle, per_cycle[1:])), c.name


def test_gemm_rates_below_peak(profile):
    for c in profile.clusters:
        top_ghz = seq(c.freqs_mhz)[-1] / 1000
        # no shipped core issues more than 32 FP32 FLOP/cycle (4x128-bit or 2x256-bit FMA)
        assert 0 < c.gemm_gflops_per_core.value <= 32 * top_ghz, c.name
        assert 0 < c.skinny_gemm_gflops_per_core.value < c.gemm_gflops_per_core.value, c.name


def test_memory_and_storage(profile):
    s = profile.storage
    assert 0 < s.seq_write_gbs.value and 0 < s.seq_read_gbs.value
    if profile.kind == "phone":  # UFS flash writes slower than it reads (a virtual disk's write cache need not)
        assert s.seq_write_gbs.value <= s.seq_read_gbs.value
    assert profile.memory.bandwidth_gbs.value > s.seq_read_gbs.value
    assert 1 < s.latency_us.value < 1000
    # moving a byte to or from flash costs more than a DRAM access
    assert s.energy_nj_per_byte.value * 1000 > profile.memory.energy_pj_per_byte.value > 0


def test_battery(profile):
    b = profile.battery
    if profile.kind == "host":
        assert b is None
        return
    soc, ocv = seq(b.ocv_soc_pct), seq(b.ocv_v)
    assert soc[0] == 0 and soc[-1] == 100 and strictly_increasing(soc)
    assert strictly_increasing(ocv)
    assert b.capacity_mah.value > 0 and 0.03 < b.internal_resistance_ohm.value < 0.3
    if profile.kind == "phone":  # one Li-ion cell
        assert 2.9 <= ocv[0] and ocv[-1] <= 4.45
        mean = sum((v0 + v1) / 2 * (s1 - s0) for s0, s1, v0, v1 in zip(soc, soc[1:], ocv, ocv[1:])) / 100
        assert 3.80 < mean < 3.92  # phone cells are rated 3.85-3.89 V nominal


def test_macbook_battery_holds_apples_rated_energy():
    b = load_device("macbook-air-m2").battery
    soc, ocv = seq(b.ocv_soc_pct), seq(b.ocv_v)
    mean_v = sum((v0 + v1) / 2 * (s1 - s0) for s0, s1, v0, v1 in zip(soc, soc[1:], ocv, ocv[1:])) / 100
    assert b.capacity_mah.value / 1000 * mean_v == pytest.approx(52.6, rel=0.01)  # Apple: 52.6 Wh


def test_thermal(profile):
    t = profile.thermal
    r, c = t.resistance_c_per_w.value, t.capacitance_j_per_c.value
    assert r > 0 and c > 0
    assert strictly_increasing([s.above_c for s in t.throttling])
    caps = [s.freq_cap for s in t.throttling]
    assert all(a > b for a, b in zip(caps, caps[1:]))
    if profile.kind == "phone":
        assert 8 <= r <= 15 and 40 <= c <= 120
        assert 5 * 60 < r * c < 30 * 60  # a phone warms up over minutes, not seconds or hours
        # all cores flat out is a 4-15 W burst, far more than the phone sheds at its first throttle step
        burst = profile.power.idle_w.value + sum(c.cores * seq(c.power_w_per_core)[-1] for c in profile.clusters)
        assert 4 < burst < 15
        assert t.ambient_c.value + r * burst > t.throttling[0].above_c


# --- bad profiles -------------------------------------------------------------------------

def write(tmp_path, data):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def pixel8():
    return yaml.safe_load((DEVICES_DIR / "pixel8.yaml").read_text())


def rejected(tmp_path, data) -> InputError:
    with pytest.raises(InputError) as e:
        load_device(write(tmp_path, data))
    assert str(tmp_path / "bad.yaml") in str(e.value)
    return e.value


def test_spec_must_be_a_url(tmp_path, pixel8):
    pixel8["ram"]["total_mb"] = {"value": 8192, "spec": "not a url"}
    e = rejected(tmp_path, pixel8)
    assert e.field == "ram.total_mb" and "URL" in e.message


def test_number_without_provenance(tmp_path, pixel8):
    pixel8["battery"]["capacity_mah"] = {"value": 4575}
    e = rejected(tmp_path, pixel8)
    assert e.field == "battery.capacity_mah" and "provenance" in e.message


def test_number_with_two_provenances(tmp_path, pixel8):
    pixel8["memory"]["bandwidth_gbs"]["measured"] = "stream, 2026-11-25"
    e = rejected(tmp_path, pixel8)
    assert e.field == "memory.bandwidth_gbs" and "exactly one" in e.message


def test_missing_field(tmp_path, pixel8):
    del pixel8["ram"]["app_limit_mb"]
    e = rejected(tmp_path, pixel8)
    assert e.field == "ram.app_limit_mb" and "missing" in e.message


def test_misspelt_field(tmp_path, pixel8):
    pixel8["thermal"]["ambiant_c"] = pixel8["thermal"].pop("ambient_c")
    assert rejected(tmp_path, pixel8).field == "thermal.ambient_c"  # reported as the missing one


def test_unknown_field(tmp_path, pixel8):
    pixel8["storage"]["random_read_gbs"] = {"value": 0.2, "estimated": "a field the schema lacks"}
    e = rejected(tmp_path, pixel8)
    assert e.field == "storage.random_read_gbs" and "unknown field" in e.message


@pytest.mark.parametrize("cores", ["four", 0, -1])
def test_bad_core_count(tmp_path, pixel8, cores):
    pixel8["clusters"][1]["cores"] = cores
    assert rejected(tmp_path, pixel8).field == "clusters[1].cores"


def test_freq_cap_is_a_fraction(tmp_path, pixel8):
    pixel8["thermal"]["throttling"][0]["freq_cap"] = 1.5
    assert rejected(tmp_path, pixel8).field == "thermal.throttling[0].freq_cap"


def test_unknown_kind(tmp_path, pixel8):
    pixel8["kind"] = "tablet"
    assert rejected(tmp_path, pixel8).field == "kind"


def test_dvfs_table_lengths_must_match(tmp_path, pixel8):
    pixel8["clusters"][0]["power_w_per_core"]["value"] = [1.0, 2.0]
    assert "same number of steps" in rejected(tmp_path, pixel8).message


def test_ocv_curve_lengths_must_match(tmp_path, pixel8):
    pixel8["battery"]["ocv_v"]["value"] = [3.0, 4.4]
    e = rejected(tmp_path, pixel8)
    assert e.field == "battery" and "same number of points" in e.message


def test_not_a_mapping(tmp_path):
    assert "mapping" in rejected(tmp_path, ["pixel8"]).message


def test_unknown_device_name_lists_the_shipped_ones():
    with pytest.raises(InputError) as e:
        load_device("pixel99")
    assert e.value.field == "device" and "pixel8pro" in e.value.message


# Proposed to the lead (mfbench/errors.py, mfbench/profile.py); strict, so a fix shows up as XPASS.


def test_non_number_value_names_the_field(tmp_path, pixel8):
    pixel8["ram"]["total_mb"]["value"] = "lots"
    assert rejected(tmp_path, pixel8).field == "ram.total_mb.value"



def test_dvfs_length_error_is_short_and_names_the_cluster(tmp_path, pixel8):
    pixel8["clusters"][0]["power_w_per_core"]["value"] = [1.0, 2.0]
    e = rejected(tmp_path, pixel8)
    assert e.field == "clusters[0]" and len(str(e)) < 300



def test_negative_capacity_is_rejected(tmp_path, pixel8):
    pixel8["battery"]["capacity_mah"]["value"] = -4575
    assert rejected(tmp_path, pixel8).field.startswith("battery.capacity_mah")


def test_leakage_static_and_voltage_tables(profile):
    if profile.kind == "host":
        return
    for c in profile.clusters:
        volts, power = seq(c.volts), seq(c.power_w_per_core)
        assert strictly_increasing(volts) and 0.4 < volts[0] and volts[-1] <= 1.2, c.name
        # dynamic power is C V^2 f: the same capacitance at every point
        cap = [p / (v * v * f) for p, v, f in zip(power, volts, seq(c.freqs_mhz))]
        assert max(cap) / min(cap) < 1.05, c.name  # (powers are rounded to mW)
        assert 0 < c.leakage_w_per_core.value < 0.1 * power[-1], c.name   # a few % of the top dynamic power when cool
        assert 0 < c.static_w.value < 0.1 * c.cores * power[-1], c.name
    assert 0.01 <= profile.power.leakage_per_c.value <= 0.05   # leakage doubles every 14-70 C


def test_thermal_network_and_governor(profile):
    t = profile.thermal
    if profile.kind == "host":
        return
    j, b = t.junction, t.battery
    assert 3 < j.resistance_c_per_w.value * j.capacitance_j_per_c.value < 60       # the die reacts in seconds
    assert 30 < b.resistance_c_per_w.value * b.capacitance_j_per_c.value < 30 * 60  # the cell in minutes
    levels = [s.above_c for s in t.throttling]
    # each level is left below the next lower level's threshold never: hysteresis stays inside the gap
    assert all(s.hysteresis_c < hi - lo for s, lo, hi in zip(t.throttling[1:], levels, levels[1:]))
    assert t.shutdown_c.value > levels[-1] and t.junction_trip.above_c > 80 and t.polling_s.value <= 10


def test_battery_limits_and_charger(profile):
    b = profile.battery
    if b is None:
        return
    ocv = seq(b.ocv_v)
    assert ocv[0] < b.cutoff_v.value < ocv[2]                  # the system shuts down before the cell is empty
    ch = b.charging
    assert ch.cv_v.value > ocv[-1]                             # the CV phase can fill the cell
    assert 0.7 < ch.efficiency.value < 1 and 40 <= ch.hot_cut_c.value <= 50
    assert ch.charger_w.value * ch.efficiency.value > ch.cc_a.value * ocv[len(ocv) // 2]  # the charger can drive CC
    if profile.cpusets is not None:
        assert set(profile.cpusets.background) <= set(profile.cpusets.foreground)
