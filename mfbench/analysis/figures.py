"""The paper's figures: every `paper_figures/fig_*.py` draws one PNG and writes the numbers it
plots to a CSV beside it.

A figure script exposes `make(out_dir: Path) -> list[Path]`; `run_all` discovers and runs them.
Figures are drawn on a bare matplotlib Figure (the Agg renderer, no pyplot state), so they run
headless and in any order.
"""
from __future__ import annotations

import csv
import importlib.util
import time
from pathlib import Path

from mfbench.errors import InputError
from mfbench.files import atomic, folder

ROOT = Path(__file__).resolve().parents[2]
FIGURES_DIR = ROOT / "paper_figures"
PAPER_WORKLOADS = ROOT / "workloads" / "paper"


def figure_names() -> list[str]:
    """`accumulation`, `energy`, ...: the figure scripts' names without `fig_`."""
    return sorted(p.stem.removeprefix("fig_") for p in FIGURES_DIR.glob("fig_*.py"))


def load_figure(name: str):
    """The module of paper_figures/fig_NAME.py, loaded from its file (the repo need not be on sys.path)."""
    path = FIGURES_DIR / f"fig_{name}.py"
    spec = importlib.util.spec_from_file_location(f"paper_figures.fig_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_all(out_dir, only=None, progress=True) -> list[Path]:
    """Draw every figure (or only the one named `only`, with or without `fig_`) into `out_dir`;
    print one line per figure; return the files written."""
    names = figure_names()
    if only is not None:
        name = only.removeprefix("fig_").removesuffix(".py")
        if name not in names:
            raise InputError(None, "--only", f"expected one of {', '.join(names)}; got {only!r}")
        names = [name]
    out_dir = folder(out_dir)
    written = []
    for name in names:
        start = time.perf_counter()
        paths = load_figure(name).make(out_dir)
        written += paths
        if progress:
            print(f"{name:<18} {time.perf_counter() - start:5.1f} s  " + ", ".join(str(p) for p in paths))
    return written


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows of one figure's numbers, columns in the first row's order."""
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_png(figure, path: Path) -> Path:
    with atomic(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
    return path
