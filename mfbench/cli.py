"""The `mfbench` command: one subcommand per thing a user does.

Each subcommand is a thin shell over a module function; the modules are imported lazily so
that `mfbench devices` does not pay for SimPy or matplotlib. Bad input anywhere ends as one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from mfbench.errors import InputError


def cmd_models(args):
    from mfbench import models
    print(models.format_registry())


def cmd_devices(args):
    from mfbench import profile
    if args.action == "show":
        if not args.name:
            raise InputError(None, "NAME", "give a device name: mfbench devices show NAME")
        print(profile.format_device(profile.load_device(args.name)))
    else:
        print(profile.format_device_table([profile.load_device(n) for n in profile.device_names()]))


def cmd_plan(args):
    from mfbench import plan, sim
    from mfbench.workload import load_workload
    workload = load_workload(args.workload)
    # the program as simulated: at the micro-batch the accumulation policy chooses
    print(plan.format_plan(sim.compile_program(workload, base_dir=_dir(args.workload)), workload))


def cmd_tokenize(args):
    import json
    from mfbench import data
    print(json.dumps(data.tokenize(args.input, args.tokenizer, args.out, fmt=args.format, eos=not args.no_eos)))


def cmd_figures(args):
    from mfbench import figures
    figures.run_all(args.out, only=args.only)


def cmd_simulate(args):
    from mfbench import sim
    sim.run_cli(args)


def cmd_sweep(args):
    from mfbench import sweep
    sweep.run_cli(args)


def _dir(path):
    from pathlib import Path
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
    s.set_defaults(func=cmd_plan)

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

    s = sub.add_parser("simulate", help="simulate a workload on a device profile")
    s.add_argument("workload")
    s.add_argument("--device", default="pixel8", help="device profile name or YAML path (default pixel8)")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    s.add_argument("--battery-start", type=float, default=100.0, metavar="PCT")
    s.add_argument("--ambient", type=float, metavar="C", help="ambient temperature (default: the profile's)")
    s.add_argument("--charging", action="store_true", help="the device is on its charger")
    s.add_argument("--out", help="output folder (default runs/WORKLOAD-DEVICE)")
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
        from mfbench import native
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
