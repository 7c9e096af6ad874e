"""CPU power: DVFS operating points, the cluster's static power, uncore, and leakage that grows
with the junction temperature.

    P = idle + uncore + sum over clusters in use of [ static + n (P_dyn(f) + P_leak(V, T_j)) ]
    P_leak(V, T_j) = leakage_w_per_core (V / V_top) exp(k (T_j - T_ref))

P_dyn is the profile's per-core power at the operating point (C V^2 f). The leakage form is
the exponential fit of the subthreshold-leakage models fitted on big.LITTLE boards
(docs/devices.md, "Power"); it is linear in V as the leakage current times the supply.
"""
from __future__ import annotations

import math


def operating_point(cluster, cap: float) -> tuple[float, float, float]:
    """(MHz, dynamic W per busy core, V / V_top) at the highest DVFS point within `cap` x the
    top frequency (the lowest point if none is)."""
    freqs, watts = cluster.freqs_mhz.values, cluster.power_w_per_core.values
    i = 0
    for j, f in enumerate(freqs):
        if f <= cap * freqs[-1] + 1e-9:
            i = j
    volts = cluster.volts.values if cluster.volts is not None else None
    return freqs[i], watts[i], volts[i] / volts[-1] if volts else 1.0


def static_w(clusters, uncore) -> float:
    """Power held while a step runs on `clusters`: each cluster's static power and the uncore."""
    total = sum(c.static_w.value for c in clusters if c.static_w is not None)
    return total + (uncore.value if uncore is not None else 0.0)


def leakage_w(power, running: list[tuple[object, int, float]], junction_c: float) -> float:
    """Leakage of the running cores: `running` is [(cluster, busy cores, V / V_top)]."""
    per_volt = sum(c.leakage_w_per_core.value * n * v for c, n, v in running if c.leakage_w_per_core is not None)
    if not per_volt:
        return 0.0
    if power.leakage_per_c is None:
        return per_volt
    return per_volt * math.exp(power.leakage_per_c.value * (junction_c - power.leakage_ref_c.value))
