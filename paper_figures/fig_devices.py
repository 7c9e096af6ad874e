"""Table: the device profiles the figures use, as the simulator sees them, with where each
profile's numbers come from (published spec, estimate, or measured by mfbench)."""
from __future__ import annotations

from pydantic import BaseModel

from mfbench.analysis.figures import DOUBLE, Context, draw_table, table_height
from mfbench.spec.profile import Quantity, device_names, load_device


def provenance_counts(node) -> dict[str, int]:
    """How many of a profile's numbers are spec, estimated or measured (walking every field)."""
    counts = {"spec": 0, "estimated": 0, "measured": 0}
    if isinstance(node, Quantity):
        counts[node.provenance] += 1
    elif isinstance(node, (list, tuple)):
        for item in node:
            for k, v in provenance_counts(item).items():
                counts[k] += v
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            for k, v in provenance_counts(getattr(node, name)).items():
                counts[k] += v
    return counts


def make(ctx: Context):
    rows = []
    for name in device_names():
        d = load_device(name)
        top = [f"{c.cores}x{max(c.freqs_mhz.values) / 1000:.2f}" for c in d.clusters]
        counts = provenance_counts(d)
        rows.append({"device": name, "name": d.display_name, "kind": d.kind, "soc": d.soc,
                     "ram_mb": round(d.ram.total_mb.value), "app_limit_mb": round(d.ram.app_limit_mb.value),
                     "cores_ghz": " + ".join(top), "storage": d.storage.kind,
                     "battery_mah": round(d.battery.capacity_mah.value) if d.battery else "",
                     **{f"n_{k}": v for k, v in counts.items()}})
    header = ["device", "SoC", "RAM / app limit (GB)", "cores x GHz", "storage", "battery (mAh)",
              "numbers: spec / est. / meas."]
    cells = [[r["device"], r["soc"].replace(" for Galaxy", ""), f"{r['ram_mb'] / 1024:.0f} / {r['app_limit_mb'] / 1024:.1f}",
              r["cores_ghz"], r["storage"], f"{r['battery_mah']:,}" if r["battery_mah"] != "" else "mains",
              f"{r['n_spec']} / {r['n_estimated']} / {r['n_measured']}"] for r in rows]
    fig = ctx.figure(DOUBLE, table_height(2, cells))
    draw_table(fig, header, cells)
    return ctx.save(fig, "devices", rows)
