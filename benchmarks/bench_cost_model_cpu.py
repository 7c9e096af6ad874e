"""The cost model on one thread, by CPU time: a check that holds on a machine others load.

    python benchmarks/bench_cost_model_cpu.py [--steps 4] [--workloads workloads/validation/*.yaml]

Wall-clock step times mean nothing while other processes share the cores, but the CPU time a
one-thread process spends is close to the wall time it would take alone. So: calibrate this
machine's kernels on one thread with the benchmark's CPU clock (`"clock": "cpu"`), fit them
as `mfbench calibrate` does (a one-core copy of the host profile), run every workload with
`threads: 1` on the native trainer without the telemetry sampler (`--sample-ms 0`: its
thread's CPU would count), and compare the simulator's step time with the median CPU time
of a step (after the first). It checks the kernel-by-kernel cost model, not thread scaling.
Writes benchmarks/results/cost_model_cpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    import yaml

    from mfbench import calibrate, sim
    from mfbench.device.native import trainer_binary
    from mfbench.device.run import resolve
    from mfbench.errors import load_yaml, validate
    from mfbench.files import write_atomic
    from mfbench.spec.profile import DeviceProfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workloads", nargs="*", default=sorted(map(str, calibrate.VALIDATION_DIR.glob("*.yaml"))))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="mfbench-cpu-check-") as tmp:
        tmp = Path(tmp)
        spec = calibrate.bench_spec(calibrate.programs(args.workloads, 1), 0.05, str(tmp), 16 << 20)
        spec.update(threads=[1], clock="cpu")
        result = calibrate.measure(spec, "local", True, 1)
        result["clusters"] = result["clusters"][-1:]  # the fastest cluster, as one core
        result["clusters"][0]["cpus"] = result["clusters"][0]["cpus"][:1]
        base = load_yaml(calibrate.VALIDATION_DIR.parents[1] / "devices" / "host.yaml")
        base["clusters"] = base["clusters"][-1:]
        base["clusters"][0]["cores"] = 1
        data, _ = calibrate.fit_profile(base, result, "bench_cost_model_cpu.py (one thread, CPU clock)")
        device = validate(DeviceProfile, data)
        rows = []
        for w in map(Path, args.workloads):
            d = load_yaml(w)
            d.update(threads=1, steps=args.steps)
            if (w.parent / d["model"]).is_file():  # a config.json beside the workload
                d["model"] = str((w.parent / d["model"]).resolve())
            path = tmp / w.name
            path.write_text(yaml.safe_dump(d))
            out = tmp / w.stem
            resolve(path, out=out, progress=False)
            r = subprocess.run([str(trainer_binary()), "--workload", str(out / "run.json"), "--sample-ms", "0",
                                "--checkpoint-every", "0"], capture_output=True, text=True, check=True)
            cpu = [float(x) for x in re.findall(r"\(cpu ([0-9.]+)s\)", r.stderr)]
            predicted, _ = sim.simulate(path, device, steps=3, progress=False, trace_ops_steps=0)
            measured = statistics.median(cpu[1:])
            rows.append({"workload": w.stem, "predicted_s": predicted.median_step_s, "cpu_s": measured,
                         "cpu_steps": cpu, "error_pct": 100 * (predicted.median_step_s - measured) / measured})
            print(f"{w.stem:30s} predicted {predicted.median_step_s:7.3f} s  CPU {measured:7.3f} s  "
                  f"{rows[-1]['error_pct']:+6.1f} %", flush=True)
    mape = sum(abs(r["error_pct"]) for r in rows) / len(rows)
    print(f"MAPE {mape:.1f} % over {len(rows)} workloads (one thread, CPU time)")
    write_atomic(HERE / "results" / "cost_model_cpu.json", json.dumps(
        {"date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "mape_pct": mape,
         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
