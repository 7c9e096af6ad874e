"""pytest-benchmark for mfbench: `pytest benchmarks/` (the default `pytest` runs tests/ only).

    pytest benchmarks/                                  # full size (minutes to an hour on 2 cores)
    MFBENCH_BENCH=small pytest benchmarks/              # tiny models and few steps: a smoke check
    pytest benchmarks/ --benchmark-save=NAME            # keep the results (.benchmarks/)
    pytest benchmarks/ --benchmark-compare              # against the last saved results

A benchmark of the native trainer and its PyTorch peer run in the same session; the native
one records its ratios to the peer (`ratio_*`) in extra_info, next to the numbers a
comparison is about (median step, tokens/s, peak RSS). pytest-benchmark's own time is one
whole run (start-up and warm-up steps included), comparable from commit to commit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sizes import SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # native_fixtures


@pytest.fixture(scope="session")
def _session_results() -> dict:
    return {}


@pytest.fixture
def record(benchmark, _session_results):
    """record(case, system, numbers): put `numbers` in the benchmark's extra_info; for the
    native system, also its ratios to the PyTorch run of `case` measured earlier in this session."""
    def record(case: str, system: str, numbers: dict) -> None:
        benchmark.extra_info.update(numbers, size=SIZE, system=system)
        _session_results[case, system] = numbers
        peer = _session_results.get((case, "pytorch"))
        if system == "native" and peer:
            benchmark.extra_info["ratio_tokens_per_s"] = numbers["tokens_per_s"] / peer["tokens_per_s"]
            benchmark.extra_info["ratio_peak_rss"] = numbers["peak_rss_bytes"] / peer["peak_rss_bytes"]
    return record
