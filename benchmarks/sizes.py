"""The benchmarks' size: full (the default) or small (MFBENCH_BENCH=small, a smoke check)."""
import os

SIZE = os.environ.get("MFBENCH_BENCH", "full")
if SIZE not in ("full", "small"):
    raise SystemExit(f"MFBENCH_BENCH={SIZE!r}: expected full or small")
SMALL = SIZE == "small"
