"""The battery: coulomb counting with voltage sag, a cutoff voltage, internal resistance that
rises in the cold, I^2 R heat, and a CC/CV charger whose loss is heat.

Discharging, the load draws P = V I with V = OCV(charge) - I R(T), so
I = (OCV - sqrt(OCV^2 - 4 R P)) / (2 R) for every constant-power interval, the OCV taken at
the step's start. R(T) = R_25 exp(B (1/T - 1/298.15 K)) (Arrhenius). The cell's own loss,
I^2 R, heats the battery node. The phone shuts down when the terminal voltage under load
falls below the cutoff.

Charging (per step, on the step's mean load): the charger delivers charger_w x efficiency
(the rest is heat on the board). The load is served first; what is left charges the cell at
min(cc_a, what that power drives) until OCV + I R reaches cv_v, then at constant voltage:
I = (cv_v - OCV) / R decays as exp(-t s / R), s = dOCV/dq, exactly on each linear piece of
the OCV curve, until it tapers below termination_a (charge complete). No charge current
while the cell is hotter than hot_cut_c.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

FLAT_CHARGER_W = 10.0   # estimated: a profile without a charging block charges at a flat 10 W, no heat
KELVIN = 273.15


class BatteryEmpty(Exception):
    pass


class Battery:
    def __init__(self, spec, soc_pct: float):
        self.spec = spec
        self.capacity_c = spec.capacity_mah.value * 3.6  # mAh -> coulombs
        self.soc_list, self.ocv_list = list(spec.ocv_soc_pct.values), list(spec.ocv_v.values)
        self.r25 = float(spec.internal_resistance_ohm.value)
        self.activation_k = None if spec.resistance_activation_k is None else spec.resistance_activation_k.value
        self.cutoff_v = None if spec.cutoff_v is None else spec.cutoff_v.value
        self.soc_pct = float(soc_pct)
        self.current = 0.0
        self.voltage = self.ocv()
        self.full = False                 # the charger has terminated
        self.full_after_s: float | None = None  # set when charging terminates inside a step: seconds into it

    def ocv(self) -> float:
        """Linear interpolation of the OCV curve (plain floats: called twice a step)."""
        soc, xs, ys = self.soc_pct, self.soc_list, self.ocv_list
        if soc <= xs[0]:
            return ys[0]
        if soc >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, soc)
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (soc - xs[i - 1]) / (xs[i] - xs[i - 1])

    def resistance(self, cell_c: float) -> float:
        if self.activation_k is None:
            return self.r25
        return self.r25 * math.exp(self.activation_k * (1 / (cell_c + KELVIN) - 1 / (25 + KELVIN)))

    def slope_v_per_c(self) -> float:
        """dOCV/dq on the piece of the OCV curve the charge is on (upward)."""
        xs, ys = self.soc_list, self.ocv_list
        i = min(max(bisect.bisect_right(xs, self.soc_pct), 1), len(xs) - 1)
        return (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]) * 100 / self.capacity_c

    def _take(self, charge_c: float, duration: float) -> None:
        self.soc_pct = min(100.0, self.soc_pct - 100.0 * charge_c / self.capacity_c)
        self.current = charge_c / duration

    def draw(self, dt: np.ndarray, power: np.ndarray, cell_c: float = 25.0) -> float:
        """Draw `power` watts over intervals `dt`; returns the cell's mean I^2 R heat (W).
        Negative power charges (the flat charger)."""
        ocv, r = self.ocv(), self.resistance(cell_c)
        disc = ocv * ocv - 4 * r * power
        if disc.min() < 0:
            raise BatteryEmpty(f"battery cannot supply {power.max():.1f} W at {ocv:.2f} V")
        current = (ocv - np.sqrt(disc)) / (2 * r)
        if self.cutoff_v is not None:
            low = ocv - current.max() * r
            if low < self.cutoff_v:
                self.voltage = low
                raise BatteryEmpty(f"battery cutoff: {low:.2f} V under load < {self.cutoff_v:g} V at "
                                   f"{self.soc_pct:.1f} % charge")
        duration = float(dt.sum())
        self._take(float(np.dot(current, dt)), duration)
        self.voltage = ocv - self.current * r
        if self.soc_pct <= 0:
            self.soc_pct = 0.0
            raise BatteryEmpty("battery empty")
        return float(np.dot(current * current, dt)) * r / duration

    def charge(self, duration: float, load_w: float, cell_c: float) -> tuple[float, float]:
        """A step of `duration` s on the charger with a mean load of `load_w`. Returns the heat
        (W, mean over the step) into the cell (I^2 R) and onto the board (charger loss)."""
        ch = self.spec.charging
        if ch is None:  # the old flat charger: no heat, no taper
            return self.draw(np.array([duration]), np.array([load_w - FLAT_CHARGER_W]), cell_c), 0.0
        eta = ch.efficiency.value
        supply = ch.charger_w.value * eta
        surplus = supply - load_w
        self.full_after_s = None
        if surplus <= 0 or self.full or cell_c > ch.hot_cut_c.value:
            if surplus < 0:  # the load outruns the charger: the cell makes up the rest
                cell_w, self.full = self.draw(np.array([duration]), np.array([-surplus]), cell_c), False
            else:
                cell_w, self.current, self.voltage = 0.0, 0.0, self.ocv()
            return cell_w, min(load_w, supply) / eta * (1 - eta)
        ocv, r, s = self.ocv(), self.resistance(cell_c), self.slope_v_per_c()
        cv, term = ch.cv_v.value, ch.termination_a.value
        i0 = min(ch.cc_a.value, (math.sqrt(ocv * ocv + 4 * r * surplus) - ocv) / (2 * r))
        charge = i2r = t = 0.0
        if ocv + i0 * r < cv:  # constant current until the terminal voltage reaches cv
            t = duration if s <= 0 else min(duration, (cv - i0 * r - ocv) / (s * i0))
            charge, i2r = i0 * t, i0 * i0 * r * t
        if t < duration:  # constant voltage: the current decays with tau = R / s
            start, left = (cv - (ocv + s * charge)) / r, duration - t
            if start <= term:
                self.full, self.full_after_s = True, t
            elif s <= 0:  # a flat piece of the OCV curve: the CV current does not taper
                charge, i2r = charge + start * left, i2r + start * start * r * left
            else:
                tau = r / s
                cv_s = tau * math.log(start / term)
                if cv_s <= left:
                    self.full, self.full_after_s, left = True, t + cv_s, cv_s
                charge += start * tau * (1 - math.exp(-left / tau))
                i2r += start * start * r * tau / 2 * (1 - math.exp(-2 * left / tau))
        self._take(-charge, duration)
        self.voltage = ocv - self.current * r
        wall = (load_w + ocv * charge / duration + i2r / duration) / eta
        return i2r / duration, wall * (1 - eta)
