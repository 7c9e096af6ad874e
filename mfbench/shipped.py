"""Where the shipped data is: device profiles, workloads, figure scripts, the trainer's sources.

In the source tree they are its top-level folders (`devices/`, `workloads/`, `paper_figures/`,
`kernels_native/`); a wheel carries each inside the package as `mfbench/_shipped/NAME`
(pyproject.toml maps them), so an installed mfbench needs no source tree.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
NOT_WORKLOADS = ("sweeps", "searches", "fleets")  # folders of workloads/ that hold other files


def folder(name: str) -> Path:
    """The shipped folder NAME: the installed copy if there is one, else the source tree's."""
    installed = PACKAGE / "_shipped" / name
    return installed if installed.is_dir() else PACKAGE.parent / name


def workload_names() -> dict[str, Path]:
    """Every shipped workload by name (its file's stem): `gpt2-full-seq128` -> its path.
    Sweep, search and fleet files are not workloads."""
    root = folder("workloads")
    return {p.stem: p for p in sorted(root.rglob("*.yaml")) if p.parent.name not in NOT_WORKLOADS}
