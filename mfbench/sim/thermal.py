"""Heat: a small RC network (junction, board/skin, battery) solved exactly, and the governor.

Nodes are the board (always: the phone's body, whose temperature the virtual skin sensor
reads, joined to ambient), and when the profile gives them the SoC junction and the battery,
each joined to the board. With x = T - ambient, C dx/dt = -G x + p, where G is the
conductance matrix and p the heat put into each node. G is symmetric and C diagonal, so
S = C^-1/2 G C^-1/2 has real eigenvalues lam and orthonormal eigenvectors U; in modal
coordinates z = U^T C^1/2 x every mode is a first-order RC of its own:
z -> e z + (1 - e) q / lam, e = exp(-lam dt), q = U^T C^-1/2 p, exact over any interval of
constant power. A step composes to z_end = exp(-lam D) z_start + r, r computed once per
distinct step; heat that is constant over a step (leakage, I^2 R, charger loss) adds
(1 - exp(-lam D)) q / lam.
"""
from __future__ import annotations

import numpy as np

BOARD, JUNCTION, BATTERY = "board", "junction", "battery"


class ThermalNetwork:
    def __init__(self, spec, ambient_c: float | None = None):
        self.ambient_c = float(spec.ambient_c.value if ambient_c is None else ambient_c)
        self.nodes = [BOARD] + [n for n in (JUNCTION, BATTERY) if getattr(spec, n) is not None]
        self.index = {n: i for i, n in enumerate(self.nodes)}
        # SoC and battery heat go to their own node when the network has it, else to the board
        self.soc = self.index.get(JUNCTION, 0)
        self.cell = self.index.get(BATTERY, 0)
        n = len(self.nodes)
        g, c = np.zeros((n, n)), np.zeros(n)
        g[0, 0], c[0] = 1 / spec.resistance_c_per_w.value, spec.capacitance_j_per_c.value
        for name in self.nodes[1:]:
            i, node = self.index[name], getattr(spec, name)
            k = 1 / node.resistance_c_per_w.value
            g[i, i] += k
            g[0, 0] += k
            g[0, i] = g[i, 0] = -k
            c[i] = node.capacitance_j_per_c.value
        root = np.sqrt(c)
        self.lam, u = np.linalg.eigh(g / np.outer(root, root))
        self.to_modes = u.T / root             # q = to_modes @ p (heat into each node, W)
        self.to_nodes = u / root[:, None]      # x = to_nodes @ z
        self.from_nodes = u.T * root           # z = from_nodes @ x
        self.columns = (self.to_modes[:, self.soc].copy(), self.to_modes[:, 0].copy(), self.to_modes[:, self.cell].copy())
        self.set_temperatures([self.ambient_c] * n)

    # state: node temperatures, kept as floats (read several times a step)
    def set_temperatures(self, temperatures) -> None:
        self.z = self.from_nodes @ (np.asarray(temperatures, dtype=float) - self.ambient_c)
        self._update()

    def _update(self) -> None:
        self.temperatures = (self.ambient_c + self.to_nodes @ self.z).tolist()
        self.skin_c = self.temperatures[0]                # the virtual skin sensor reads the board
        self.junction_c = self.temperatures[self.soc]     # the board when there is no junction node
        self.battery_c = self.temperatures[self.cell]     # likewise

    # dynamics
    def heat(self, soc_w: float, board_w: float, cell_w: float = 0.0) -> np.ndarray:
        """Modal input q of heat (W) held constant into the SoC, the board and the battery."""
        s, b, c = self.columns
        return s * soc_w + b * board_w + c * cell_w

    def response(self, dt: np.ndarray, soc_w: np.ndarray, board_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(decay, r) over a piecewise-constant profile: z_end = decay * z_start + r."""
        e = np.exp(-np.multiply.outer(self.lam, dt))                   # modes x intervals
        after = np.concatenate([np.cumprod(e[:, ::-1], axis=1)[:, ::-1][:, 1:], np.ones((len(self.lam), 1))], axis=1)
        s, b, _ = self.columns
        q = np.multiply.outer(s, soc_w) + np.multiply.outer(b, board_w)
        return e.prod(axis=1), ((1 - e) * q / self.lam[:, None] * after).sum(axis=1)

    def advance(self, response: tuple[np.ndarray, np.ndarray], duration: float, constant_q=None) -> None:
        """Apply a step's response; `constant_q` (modal) is heat held constant over `duration`."""
        decay, r = response
        self.z = decay * self.z + r
        if constant_q is not None:
            self.z += (1 - decay) * constant_q / self.lam
        self._update()


class Governor:
    """The thermal governor on the virtual skin sensor (the board node): severity levels,
    each entered above its `above_c` and left below `above_c - hysteresis_c`, evaluated at
    most every `polling_s`; a fast trip on the junction, checked every step; shutdown above
    `shutdown_c`. The cap is the lowest freq_cap engaged."""

    def __init__(self, spec):
        self.steps = spec.throttling
        self.trip = spec.junction_trip
        self.shutdown_c = None if spec.shutdown_c is None else float(spec.shutdown_c.value)
        self.polling_s = None if spec.polling_s is None else float(spec.polling_s.value)
        self.level = 0             # severity levels engaged (0: none)
        self.tripped = False
        self.next_poll = 0.0
        self.max_level = 0

    def poll(self, t: float, skin_c: float, junction_c: float) -> None:
        if self.polling_s is None or t >= self.next_poll:
            while self.level < len(self.steps) and skin_c > self.steps[self.level].above_c:
                self.level += 1
            while self.level > 0 and skin_c < self.steps[self.level - 1].above_c - self.steps[self.level - 1].hysteresis_c:
                self.level -= 1
            self.max_level = max(self.max_level, self.level)
            if self.polling_s is not None:
                self.next_poll = t + self.polling_s
        if self.trip is not None:
            if junction_c > self.trip.above_c:
                self.tripped = True
            elif junction_c < self.trip.above_c - self.trip.hysteresis_c:
                self.tripped = False

    def cap(self) -> float:
        cap = self.steps[self.level - 1].freq_cap if self.level else 1.0
        return min(cap, self.trip.freq_cap) if self.tripped else cap

    def shutdown(self, skin_c: float) -> bool:
        return self.shutdown_c is not None and skin_c > self.shutdown_c

    @property
    def severity(self) -> str | None:
        return (self.steps[self.level - 1].severity or f"level {self.level}") if self.level else None

