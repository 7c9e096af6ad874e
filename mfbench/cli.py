"""The `mfbench` command: one subcommand per thing a user does.

Each subcommand is a thin shell over a module function; the modules are imported lazily so
that `mfbench devices` does not pay for SimPy or matplotlib. Bad input anywhere ends as one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mfbench.errors import InputError


def cmd_models(args):
    from mfbench.spec import models
    print(models.format_registry())


def cmd_devices(args):
    from mfbench.spec import profile
    if args.action == "show":
        if not args.name:
            raise InputError(None, "NAME", "give a device name: mfbench devices show NAME")
        print(profile.format_device(profile.load_device(args.name)))
    else:
        print(profile.format_device_table([profile.load_device(n) for n in profile.device_names()]))


def cmd_plan(args):
    from mfbench import plan
    from mfbench.spec.workload import load_workload
    workload = load_workload(args.workload)
    if args.threads is not None and args.threads <= 0:
        raise InputError(None, "--threads", f"expected a positive number of threads, got {args.threads}")
    from mfbench.device.run import local_threads
    threads = args.threads or local_threads(workload)
    # the program as it runs: at the micro-batch the accumulation policy chooses
    program = plan.compile_program(workload, base_dir=_dir(args.workload), threads=threads)
    if args.json:
        sys.stdout.write(program.to_json())
    else:
        print(plan.format_plan(program, workload))


def cmd_run(args):
    from mfbench.device import run
    if args.steps is not None and args.steps <= 0:
        raise InputError(None, "--steps", f"expected a positive number of steps, got {args.steps}")
    if args.checkpoint_every < 0:
        raise InputError(None, "--checkpoint-every", f"expected steps >= 0 (0: only on a signal), got {args.checkpoint_every}")
    from mfbench.device.native import TrainerError
    try:
        summary, out = run.run(args.workload, target=args.target, steps=args.steps, seed=args.seed, out=args.out,
                               command=_command(), resume=args.resume, checkpoint_every=args.checkpoint_every)
    except TrainerError as e:  # the trainer crashed or was killed: one line, not a traceback
        print(f"mfbench: error: {e.line}", file=sys.stderr)
        raise SystemExit(1)
    from mfbench.contracts import trace
    print(trace.format_summary(summary))
    print(f"\nwrote {out}/summary.json, trace.jsonl, trace.chrome.json and the trained "
          f"{'adapter' if summary.details.get('method') == 'lora' else 'model'}")
    if summary.killed:
        raise SystemExit(1)


def cmd_tokenize(args):
    import json

    from mfbench.device import data
    print(json.dumps(data.tokenize(args.input, args.tokenizer, args.out, fmt=args.format, eos=not args.no_eos)))


def cmd_figures(args):
    from mfbench.analysis import figures
    figures.run_all(args.out, only=args.only)


def cmd_simulate(args):
    from mfbench import sim
    from mfbench.contracts import trace
    from mfbench.spec.profile import load_device

    if args.steps is not None and args.steps <= 0:
        raise InputError(None, "--steps", f"expected a positive number of steps, got {args.steps}")
    device = load_device(args.device)
    summary, events = sim.simulate(args.workload, device, steps=args.steps, battery_start_pct=args.battery_start,
                                   ambient_c=args.ambient, charging=args.charging, command=_command(),
                                   trace_ops_steps=sys.maxsize if args.trace_all_ops else 3)
    out = Path(args.out or f"runs/{Path(args.workload).stem}/predicted-{summary.device}")
    trace.write_run(out, summary, events)
    print(trace.format_summary(summary))
    print(f"\nwrote {out}/summary.json, trace.jsonl, trace.chrome.json (open the last at ui.perfetto.dev)")


def cmd_sweep(args):
    from mfbench.sim import sweep
    if args.processes <= 0:
        raise InputError(None, "--processes", f"expected a positive number, got {args.processes}")
    rows, out = sweep.run_sweep(args.sweep, args.out, args.processes)
    killed = sum(1 for r in rows if r["killed"])
    print(f"{len(rows)} runs ({killed} killed); wrote {out}/results.csv and {out}/pareto.png")


def cmd_calibrate(args):
    from mfbench import calibrate
    from mfbench.device.native import TrainerError
    if args.min_time <= 0:
        raise InputError(None, "--min-time", f"expected seconds > 0, got {args.min_time}")
    if args.storage_mb <= 0:
        raise InputError(None, "--storage-mb", f"expected MB > 0, got {args.storage_mb}")
    raw = Path("runs") / f"calibrate-{Path(args.out).stem}" / "bench.json"
    try:
        out, report = calibrate.calibrate(args.target, args.out, args.base, args.workloads or None, args.min_time,
                                          int(args.storage_mb * 2**20), raw_out=raw)
    except TrainerError as e:
        print(f"mfbench: error: {e.line}", file=sys.stderr)
        raise SystemExit(1)
    width = max(len(k) for k, _ in report)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in report))
    print(f"\nwrote {out} (raw benchmark results: {raw})")


def cmd_validate(args):
    from mfbench import validate
    if args.steps is not None and args.steps <= 0:
        raise InputError(None, "--steps", f"expected a positive number of steps, got {args.steps}")
    table = validate.validate(args.workloads, args.device, target=args.target, runs=args.runs, fresh=args.fresh,
                              steps=args.steps, out=args.out, repeat=args.repeat, command=_command())
    print(table)


def _command() -> str:
    import shlex
    return "mfbench " + " ".join(map(shlex.quote, sys.argv[1:]))


def _dir(path):
    return Path(path).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    import mfbench
    p = argparse.ArgumentParser(prog="mfbench", description=mfbench.__doc__.strip())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("models", help="list the model registry")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("devices", help="list device profiles, or show one")
    s.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    s.add_argument("name", nargs="?")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("plan", help="print the step program of a workload: memory and FLOPs breakdown")
    s.add_argument("workload")
    s.add_argument("--json", action="store_true",
                   help="the buffer table and ops as JSON, byte for byte what `mfbench-train --plan` prints")
    s.add_argument("--threads", type=int, help="threads the per-thread scratch is sized for "
                   "(default: the workload's; for auto, this machine's cores)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run", help="run a workload on the native trainer: measured trace and summary")
    s.add_argument("workload")
    s.add_argument("--target", default="local", help="where to run it (default local: this machine)")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    s.add_argument("--seed", type=int, help="random init and LoRA init (default: the workload's)")
    s.add_argument("--out", help="output folder (default runs/WORKLOAD/measured-TARGET)")
    s.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="a checkpoint in OUT/checkpoints every N steps (default 10; 0: only when stopped by SIGTERM or SIGINT)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its newest good checkpoint (its run.json as written)")
    s.set_defaults(func=cmd_run)

    # `mfbench train ...` passes every option to the native trainer (see main); listed here for --help
    sub.add_parser("train", help="run the native trainer mfbench-train (options: mfbench train --help)",
                   add_help=False)

    s = sub.add_parser("tokenize", help="tokenize text or JSONL into a token file for the native trainer")
    s.add_argument("input")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json or a model folder holding one")
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto")
    s.add_argument("--no-eos", action="store_true", help="do not append the end-of-text token")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("calibrate", help="microbenchmark a target and fit a device profile to it")
    s.add_argument("--target", default="local", help="where to measure (default local: this machine)")
    s.add_argument("--out", required=True, help="the profile to write, devices/NAME.yaml")
    s.add_argument("--from", dest="base", help="the profile whose unmeasured fields are kept (default: --out if it "
                   "exists, else host)")
    s.add_argument("--workloads", nargs="*", metavar="WORKLOAD",
                   help="whose GEMM and attention shapes to time (default workloads/validation/*.yaml)")
    s.add_argument("--min-time", type=float, default=0.05, metavar="S", help="seconds of repeats per timing (default 0.05)")
    s.add_argument("--storage-mb", type=float, default=256, help="file size of the storage benchmark (default 256)")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("validate", help="predicted vs measured step time, peak memory, I/O and energy, with % error")
    s.add_argument("workloads", nargs="+", metavar="WORKLOAD")
    s.add_argument("--device", required=True, help="the profile to predict with (name or YAML path)")
    s.add_argument("--target", default="local", help="where the measured runs ran or run (default local)")
    s.add_argument("--runs", help="a folder of stored runs: RUNS/WORKLOAD/measured-TARGET* (default runs/validation)")
    s.add_argument("--fresh", action="store_true", help="run every workload again (else reuse a stored run)")
    s.add_argument("--repeat", type=int, default=2, help="measured runs per workload, for the spread (default 2)")
    s.add_argument("--steps", type=int, help="steps of a fresh run (default: the workload's)")
    s.add_argument("--out", help="where the table, CSV, JSON and plot go (default RUNS/report-DEVICE)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("simulate", help="simulate a workload on a device profile")
    s.add_argument("workload")
    s.add_argument("--device", default="pixel8", help="device profile name or YAML path (default pixel8)")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    s.add_argument("--battery-start", type=float, default=100.0, metavar="PCT")
    s.add_argument("--ambient", type=float, metavar="C", help="ambient temperature (default: the profile's)")
    s.add_argument("--charging", action="store_true", help="the device is on its charger")
    s.add_argument("--out", help="output folder (default runs/WORKLOAD/predicted-DEVICE)")
    s.add_argument("--trace-all-ops", action="store_true", help="record op and io events of every step")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("sweep", help="simulate devices x workloads x policies; CSV and Pareto plot")
    s.add_argument("sweep")
    s.add_argument("--out", help="output folder (default runs/sweep-NAME)")
    s.add_argument("--processes", type=int, default=2)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("figures", help="draw the paper's figures (a PNG and a CSV each) from simulations")
    s.add_argument("--out", default="runs/figures", help="output folder (default runs/figures)")
    s.add_argument("--only", metavar="NAME", help="one figure: accumulation, energy, memory_breakdown or sharding")
    s.set_defaults(func=cmd_figures)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # argparse cannot pass options like --model through a subparser
        from mfbench.device import native
        return native.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"mfbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mfbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mfbench models | head`
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
