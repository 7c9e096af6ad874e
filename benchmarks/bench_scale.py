"""Scale-out throughput and memory: sweeps (runs per second) and fleets (phones x rounds per
second), in this process and on a local Ray instance, with the peak memory of the whole
process tree (the driver, and for Ray its raylet, object store and workers).

    python benchmarks/bench_scale.py            # a 100-run sweep; the 10,000-phone x 100-round fleet
    python benchmarks/bench_scale.py --small    # a 16-run sweep; a 1,000-phone x 20-round fleet

Target (issue 15): the fleet of 10,000 phones x 100 rounds in under 10 minutes, with memory
that does not grow with the number of finished clients (the driver's memory at a quarter of
the run and at three quarters are printed side by side). Each measurement runs in its own process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLEET = ROOT / "workloads" / "fleets" / "gpt2-lora.yaml"


def sweep_file(folder: Path, small: bool) -> Path:
    import yaml
    ambient = [20, 30] if small else [15, 20, 25, 30, 35]
    data = {"name": "bench", "steps": 50, "devices": ["pixel8", "galaxy-a54"] if small else
            ["pixel8", "pixel8pro", "pixel7pro", "galaxy-s24-ultra", "galaxy-a54"],
            "workloads": [str(ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml")],
            "scheduling": [{"policy": p} for p in ("none", "paper", "thermal_pacer", "energy_probe")],
            "axes": {"ambient_c": ambient}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class PeakMemory:
    """Samples the RSS of this process and its descendants every 0.2 s."""

    def __init__(self):
        import psutil
        self.me, self.peak, self.samples, self.stop = psutil.Process(), 0, [], False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        import psutil
        while not self.stop:
            rss = self.me.memory_info().rss
            total = rss
            for child in self.me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.samples.append((time.monotonic(), rss))
            time.sleep(0.2)

    def close(self):
        self.stop = True
        self.thread.join()


def one(kind: str, engine_name: str, small: bool) -> dict:
    """A single measurement (run in a child process)."""
    from mfbench.scale.engine import Engine
    engine = Engine(inline=True) if engine_name == "inline" else Engine(cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        memory = PeakMemory()
        start = time.monotonic()
        if kind == "sweep":
            from mfbench.sim import sweep
            rows, _, ran = sweep.run_sweep(sweep_file(tmp, small), tmp / "out", engine, progress=False)
            work, unit = ran, "runs/s"
        else:
            from mfbench.scale import fleet
            sets = ("phones=1000", "rounds=20", "clients_per_round=100", "min_clients=20") if small else ()
            rounds, _, _, info = fleet.run_fleet(FLEET, tmp / "out", engine, sets=sets, progress=False)
            work, unit = info["phones"] * info["rounds"], "phones x rounds/s"
        seconds = time.monotonic() - start
        engine.shutdown()
        memory.close()
    quarter = next(rss for t, rss in memory.samples if t >= start + seconds / 4)
    three = next(rss for t, rss in memory.samples if t >= start + 3 * seconds / 4)
    return {"kind": kind, "engine": engine.name, "work": work, "seconds": seconds, "rate": work / seconds,
            "unit": unit, "peak_mb": memory.peak / 2**20, "driver_quarter_mb": quarter / 2**20,
            "driver_three_quarters_mb": three / 2**20}


def main() -> None:
    if "--one" in sys.argv:
        kind, engine = sys.argv[sys.argv.index("--one") + 1:][:2]
        print(json.dumps(one(kind, engine, "--small" in sys.argv)))
        return
    small = ["--small"] if "--small" in sys.argv else []
    print(f"{'what':<6} {'engine':<12} {'work':>9} {'seconds':>8} {'rate':>12} {'unit':<18} {'peak MB':>8} "
          f"{'driver MB at 1/4 -> 3/4':>24}")
    for kind in ("sweep", "fleet"):
        for engine in ("inline", "ray"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, engine, *small], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{kind:<6} {r['engine']:<12} {r['work']:>9,} {r['seconds']:>8.1f} {r['rate']:>12,.1f} "
                  f"{r['unit']:<18} {r['peak_mb']:>8,.0f} {r['driver_quarter_mb']:>12,.0f} -> {r['driver_three_quarters_mb']:,.0f}")
    if not small:
        print("target: the fleet (10,000 phones x 100 rounds) in under 600 s")


if __name__ == "__main__":
    main()
