"""The paper's figures and tables: every `paper_figures/fig_*.py` draws one figure and writes
it as PDF and PNG, with the numbers it plots as a CSV beside them.

A figure script exposes `make(ctx: Context) -> list[Path]`; `run_all` discovers and runs them.
Figures are sized for a paper (`SINGLE` column 3.3 in, `DOUBLE` 7 in, fonts 7-9 pt), drawn on a
bare matplotlib Figure (Agg, no pyplot state) inside one style, and written deterministically
(no dates in the files), so the same inputs give the same bytes. The same policy, device or
side always has the same colour and marker (`look`), from the Okabe-Ito colour-blind-safe set.

Figures from measurement read stored runs (`ctx.stored`) and never start a runner; when a run
is missing they draw what they can and name the command that makes it (`ctx.missing`).
"""
from __future__ import annotations

import csv
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from mfbench import shipped
from mfbench.errors import InputError
from mfbench.files import atomic, folder, write_atomic

FIGURES_DIR = shipped.folder("paper_figures")
PAPER_WORKLOADS = shipped.folder("workloads") / "paper"

SINGLE, DOUBLE = 3.3, 7.0  # column widths in inches
STYLE = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 9, "lines.linewidth": 1.2,
         "lines.markersize": 4, "axes.linewidth": 0.6, "grid.linewidth": 0.4, "grid.alpha": 0.4,
         "axes.grid": True, "axes.axisbelow": True, "pdf.fonttype": 42, "svg.hashsalt": "mfbench",
         "path.simplify": False}
# Okabe & Ito (2008), "Color universal design": distinguishable with every common colour-vision deficiency
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
# one look per name across every figure (an index into OKABE_ITO and MARKERS); names shown
# together in one figure (sides, schedulers, sharding policies, devices) differ from each other
LOOKS = {"measured": 0, "predicted": 1, "paper (reported)": 6,
         "none": 0, "paper": 1, "battery_floor": 2, "charging_only": 3, "thermal_pacer": 4, "energy_probe": 5,
         "lru": 3, "prefetch": 2, "native": 0, "pytorch": 3,
         "pixel8": 0, "pixel8pro": 5, "pixel7pro": 2, "galaxy-s24-ultra": 3, "galaxy-a54": 4,
         "macbook-air-m2": 1, "host": 6}


def look(name: str) -> dict:
    """The colour and marker of a policy, device or side, the same in every figure."""
    i = LOOKS.get(name, sum(map(ord, name)))  # a user's own policy or device: stable by its name
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)]}


@dataclass
class Context:
    """What a figure script gets: where to write, how much to simulate, where stored runs are."""
    out: Path
    quick: bool = False
    runs: Path = Path("runs")
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # that would make the missing stored runs

    def stored(self, workload: str, side: str = "measured-local"):
        """(Summary, trace events) of the stored run runs/WORKLOAD/SIDE, or None when absent."""
        from mfbench.contracts.trace import read_summary, read_trace
        folder = self.runs / workload / side
        if not (folder / "summary.json").is_file():
            return None
        trace = folder / "trace.jsonl"
        return read_summary(folder / "summary.json"), (read_trace(trace) if trace.is_file() else [])

    def missing(self, what: str, command: str) -> None:
        """Note a stored run this figure would use and the command that makes it."""
        self.commands.append(f"# {what}\n{command}")

    def figure(self, width: float = DOUBLE, height: float = 2.4):
        from matplotlib.figure import Figure
        return Figure(figsize=(width, height), layout="constrained")

    def save(self, fig, name: str, rows: list[dict]) -> list[Path]:
        """`name`.pdf, .png and .csv in the output folder."""
        paths = []
        for suffix, options in ((".pdf", {"metadata": {"CreationDate": None, "Producer": None, "Creator": None}}),
                                (".png", {"dpi": 300, "metadata": {"Software": None}})):
            path = self.out / f"{name}{suffix}"
            with atomic(path) as tmp:
                fig.savefig(tmp, format=suffix[1:], **options)
            paths.append(path)
        return paths + [write_csv(self.out / f"{name}.csv", rows)]


def figure_names() -> list[str]:
    """`accumulation`, `devices`, ...: the figure scripts' names without `fig_`."""
    return sorted(p.stem.removeprefix("fig_") for p in FIGURES_DIR.glob("fig_*.py"))


def load_figure(name: str):
    """The module of paper_figures/fig_NAME.py, loaded from its file (the repo need not be on sys.path)."""
    path = FIGURES_DIR / f"fig_{name}.py"
    spec = importlib.util.spec_from_file_location(f"paper_figures.fig_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_all(out_dir, only=None, quick=False, runs="runs", progress=True) -> list[Path]:
    """Draw every figure (or only those named in `only`, comma-separated, with or without `fig_`)
    into `out_dir`; print one line per figure and what stored runs were missing; return the
    files written."""
    names = figure_names()
    if only is not None:
        wanted = [n.strip().removeprefix("fig_").removesuffix(".py") for n in only.split(",")]
        for name in wanted:
            if name not in names:
                import difflib
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise InputError(None, "--only", f"expected one of {', '.join(names)}; got {name!r}{hint}")
        names = wanted
    out_dir = folder(out_dir)
    written, commands = [], []
    for name in names:
        start = time.perf_counter()
        ctx = Context(out=out_dir, quick=quick, runs=Path(runs))
        with matplotlib.rc_context(STYLE):
            paths = load_figure(name).make(ctx)
        written += paths
        if progress:
            print(f"{name:<18} {time.perf_counter() - start:5.1f} s  " + ", ".join(p.name for p in paths))
            for note in ctx.notes:
                print(f"{'':<18}         {note}")
            if ctx.commands:
                print(f"{'':<18}         {len(ctx.commands)} measured runs not in {ctx.runs}: drawn without them "
                      f"(their commands: {out_dir / 'missing-runs.sh'})")
        commands += [f"# {name}: " + c.removeprefix("# ") for c in ctx.commands]
    if commands:  # the commands that would complete the measured figures, as one script
        write_atomic(out_dir / "missing-runs.sh", "#!/bin/sh\n# stored runs the figures would use\nset -e\n"
                     + "\n".join(commands) + "\n")
    return written


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows of one figure's numbers, columns in the first row's order."""
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def draw_table(fig, header: list[str], cells: list[list[str]]) -> None:
    """A paper table drawn on `fig`, booktabs style (rules above and below the header and at
    the end): each column as wide as its longest cell, headers wrapped to that width ("\n" in a
    header or cell breaks a line)."""
    import textwrap
    longest = [max(len(line) for row in cells for line in row[i].split("\n")) for i in range(len(header))]
    widths = [max(w, 11) for w in longest]  # narrow numbers get room for a two-line header
    header = ["\n".join(textwrap.wrap(h, max(w, max(map(len, h.split())))) ) for h, w in zip(header, widths)]
    widths = [max(w, *(len(x) for x in h.split("\n"))) for w, h in zip(widths, header)]
    lines = [max(c.count("\n") + 1 for c in row) for row in [header] + cells]
    ax = fig.add_subplot()
    ax.set_axis_off()
    table = ax.table(cellText=cells, colLabels=header, colWidths=[w / sum(widths) for w in widths],
                     bbox=[0, 0, 1, 1], cellLoc="left", colLoc="left", edges="")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for (row, _), cell in table.get_celld().items():
        cell.set_height(lines[row] / sum(lines))
        cell.set_text_props(verticalalignment="center")
        cell.PAD = 0.01
        if row == 0:
            cell.set_text_props(fontweight="bold")
    rule = 1 - lines[0] / sum(lines)
    for y, width in ((1, 0.8), (rule, 0.5), (0, 0.8)):
        ax.axhline(y, color="black", linewidth=width)


def table_height(header_lines: int, cells: list[list[str]]) -> float:
    """Inches for a table of these cells at 7 pt."""
    lines = header_lines + sum(max(c.count("\n") + 1 for c in row) for row in cells)
    return 0.08 + 0.17 * lines


def short_name(device: str) -> str:
    """A device's name short enough for a tick label: `Pixel 8`, `S24 Ultra`, `this machine`."""
    from mfbench.spec.profile import load_device
    if device == "host":
        return "this machine"
    name = load_device(device).display_name
    for prefix, short in (("Samsung Galaxy ", ""), ("Google ", ""), ("Apple MacBook Air", "MacBook Air")):
        name = name.replace(prefix, short)
    return name.split(" (")[0]


def loss_panel(ax, curves: dict[str, tuple[list, dict]], title: str, command: str, **legend) -> None:
    """Training loss against the optimizer step, one line per curve (label -> (points, line
    style)); without curves, the command that would make them. `legend`: matplotlib's legend
    options (default upper right)."""
    for label, (points, style) in curves.items():
        ax.plot(*zip(*points), label=label, **style)
    if curves:
        ax.legend(**{"loc": "upper right", **legend})
    else:
        ax.text(0.5, 0.5, f"no stored runs:\n{command}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
