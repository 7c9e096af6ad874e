"""The `mfbench` command: one subcommand per thing a user does.

Each subcommand is a thin shell over a module function; the modules are imported lazily so
that `mfbench devices` does not pay for SimPy or matplotlib. Bad input anywhere ends as one
line on stderr and exit code 2.

Conventions every subcommand keeps: `--json` prints what the table shows as JSON on stdout
(anything else goes to stderr); `--set field.path=value` changes a field of the workload
(sweep) file as if written in it, `--set-device` one of the device profile (docs/workloads.md);
a run's output folder is never replaced silently (`--force` replaces it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mfbench.errors import InputError, did_you_mean


def cmd_models(args):
    from mfbench.spec import models
    _print(args, models.format_registry, models.registry_rows)


def cmd_devices(args):
    from mfbench.spec import profile
    if args.action == "show":
        if not args.name:
            raise InputError(None, "NAME", "give a device name: mfbench devices show NAME")
        device = _device(args.name, args.set_device)
        _print(args, lambda: profile.format_device(device), lambda: device.model_dump(mode="json"))
    else:
        if args.set_device:
            raise InputError(None, "--set-device", "changes the profile `devices show NAME` shows (expected show)")
        devices = [profile.load_device(n) for n in profile.device_names()]
        _print(args, lambda: profile.format_device_table(devices), lambda: [d.model_dump(mode="json") for d in devices])


def cmd_workloads(args):
    from mfbench import shipped
    from mfbench.spec.workload import load_workload
    from mfbench.table import table

    rows = []
    for name, path in shipped.workload_names().items():
        w = load_workload(path)
        rows.append({"name": name, "model": w.model, "method": w.method.kind, "seq_len": w.seq_len,
                     "batch": w.batch, "description": " ".join(w.description.split()), "path": str(path)})
    _print(args, lambda: table([(r["name"], r["model"], r["method"], r["seq_len"], r["batch"], _shorten(
        r["description"])) for r in rows], header=("workload", "model", "method", "seq_len", "batch", "description"),
        right={3, 4}) + "\n\nrun one by its name (`mfbench simulate gpt2-full-seq128`) or any workload file by its path",
        lambda: rows)


def cmd_plan(args):
    from mfbench import plan
    from mfbench.device.run import local_threads
    from mfbench.spec.workload import load_workload

    if args.threads is not None and args.threads <= 0:
        raise InputError(None, "--threads", f"expected a positive number of threads, got {args.threads}")
    if (args.workload is None) == (args.model is None):
        raise InputError(None, "WORKLOAD", "give a workload (a name or a YAML path) or --model for the quick form, "
                         "not both")
    if args.model is None:
        for option, field in QUICK.items():
            if getattr(args, option) is not None:
                raise InputError(None, "--" + option.replace("_", "-"), "belongs to the quick form (--model ...); "
                                 f"with a workload file, change its fields with --set, e.g. --set {field}=...")
        path = _workload(args)
        workload = load_workload(path, args.set)
    else:  # the quick form: a workload built from the options, as `accelerate estimate-memory` takes a model
        path = Path("command line")
        workload = load_workload(path, args.set, data=_quick_workload(args))
    threads = args.threads or local_threads(workload)
    # the program as it runs: at the micro-batch the accumulation policy chooses
    program = plan.compile_program(workload, base_dir=path.resolve().parent, threads=threads)
    if args.json:
        sys.stdout.write(program.to_json())
    else:
        print(plan.format_plan(program, workload))


def cmd_run(args):
    from mfbench.contracts import trace
    from mfbench.device import run
    from mfbench.device.native import TrainerError

    if args.steps is not None and args.steps <= 0:
        raise InputError(None, "--steps", f"expected a positive number of steps, got {args.steps}")
    if args.checkpoint_every < 0:
        raise InputError(None, "--checkpoint-every", f"expected steps >= 0 (0: only on a signal), got {args.checkpoint_every}")
    path = _workload(args)
    out = Path(args.out or run.default_out(path, args.target))
    if not args.resume:
        _fresh(out, args.force, "run.json", "summary.json")
    try:
        summary, out = run.run(path, target=args.target, steps=args.steps, seed=args.seed, out=out,
                               command=_command(), resume=args.resume, checkpoint_every=args.checkpoint_every,
                               sets=args.set)
    except TrainerError as e:  # the trainer crashed or was killed: one line, not a traceback
        print(f"mfbench: error: {e.line}", file=sys.stderr)
        raise SystemExit(1)
    _print(args, lambda: trace.format_summary(summary), lambda: json.loads(summary.to_json()))
    print(f"\nwrote {out}/summary.json, trace.jsonl, trace.chrome.json and the trained "
          f"{'adapter' if summary.details.get('method') == 'lora' else 'model'}", file=_notes(args))
    if summary.killed:
        raise SystemExit(1)


def cmd_tokenize(args):
    from mfbench.device import data
    print(json.dumps(data.tokenize(args.input, args.tokenizer, args.out, fmt=args.format, eos=not args.no_eos)))


def cmd_figures(args):
    from mfbench.analysis import figures
    figures.run_all(args.out, only=args.only, quick=args.quick, runs=args.runs)


def cmd_compare(args):
    from mfbench.contracts import trace
    from mfbench.device import reference
    if args.steps is not None and args.steps <= 0:
        raise InputError(None, "--steps", f"expected a positive number of steps, got {args.steps}")
    native, pytorch, out = reference.compare(_workload(args), steps=args.steps, out=args.out, command=_command(),
                                             sets=args.set)
    for name, summary in (("native", native), ("PyTorch", pytorch)):
        print(f"{name}:\n{trace.format_summary(summary)}\n")
    print(f"speed {pytorch.median_step_s / native.median_step_s:.2f}x PyTorch's, peak memory "
          f"{native.peak_memory_bytes / pytorch.peak_memory_bytes:.2f}x; wrote {out}/native and {out}/pytorch")


def cmd_simulate(args):
    from mfbench import sim
    from mfbench.contracts import trace
    from mfbench.spec.workload import load_workload

    if args.steps is not None and args.steps <= 0:
        raise InputError(None, "--steps", f"expected a positive number of steps, got {args.steps}")
    path = _workload(args)
    workload = load_workload(path, args.set)
    device = _device(args.device, args.set_device)
    out = Path(args.out or f"runs/{path.stem}/predicted-{device.name}")
    _fresh(out, args.force, "summary.json")
    with trace.RunWriter(out) as writer:  # the trace streams to disk; Ctrl-C keeps the steps done
        summary, _ = sim.simulate(workload, device, steps=args.steps, battery_start_pct=args.battery_start,
                                  ambient_c=args.ambient, charging=args.charging, command=_command(),
                                  trace_ops_steps=sys.maxsize if args.trace_all_ops else 3,
                                  base_dir=path.resolve().parent, placement=args.placement, cluster=args.cluster,
                                  trace=writer, interruptible=True)
        writer.commit(summary)
    _print(args, lambda: trace.format_summary(summary), lambda: json.loads(summary.to_json()))
    print(f"\nwrote {out}/summary.json, trace.jsonl, trace.chrome.json (open the last at ui.perfetto.dev)",
          file=_notes(args))
    if summary.stop_reason == sim.INTERRUPTED:
        raise SystemExit(130)


def cmd_sweep(args):
    from mfbench.sim import sweep
    rows, out, ran = sweep.run_sweep(args.sweep, args.out, _engine(args), sets=args.set)
    killed, failed = sum(1 for r in rows if r["killed"]), sum(1 for r in rows if r["error"])
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"{len(rows)} runs ({ran} run now, {len(rows) - ran} from before; {killed} killed, {failed} failed: "
          f"see the error column); wrote {out}/results.parquet, results.csv and pareto.png", file=_notes(args))


def cmd_fleet(args):
    from mfbench.scale import fleet
    rounds, classes, out, info = fleet.run_fleet(args.fleet, args.out, _engine(args), sets=tuple(args.set or ()))
    lost = sum(not r["success"] for r in rounds)
    print(fleet.format_classes(classes))
    print(f"\n{info['rounds']} rounds of {info['phones']:,} phones ({lost} lost), {sum(r['round_s'] for r in rounds) / 3600:.2f} h; "
          f"{info['situations']:,} distinct situations simulated, {info['seconds']:.1f} s on {info['engine']}\n"
          f"wrote {out}/rounds.csv, devices.csv, clients.parquet and fleet.png")


def cmd_search(args):
    from mfbench.scale import search
    rows, front, out = search.run_search(args.search, args.out, _engine(args))
    feasible = sum(1 for r in rows if r["feasible"])
    print(f"{len(rows)} trials ({feasible} feasible); Pareto front: {len(front)} trials; "
          f"wrote {out}/trials.parquet, trials.csv, pareto.csv and pareto.png")


def _engine(args):
    from mfbench.scale.engine import Engine
    return Engine(address=args.address, cpus=args.cpus, inline=args.inline)


def _engine_flags(s):
    s.add_argument("--address", help="a Ray cluster to run on (auto, HOST:6379 or ray://HOST:10001); "
                   "default: a local Ray instance")
    s.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    s.add_argument("--inline", action="store_true", help="run in this process, without Ray")


# ------------------------------------------------------------------------------ helpers

def _print(args, text, data) -> None:
    """The table (`text()`) for a person, or with --json the same as JSON (`data()`) for a script."""
    print(json.dumps(data(), indent=2) if args.json else text())


def _notes(args):
    """Where lines beside the result go: stdout, or stderr when stdout is JSON."""
    return sys.stderr if args.json else sys.stdout


def _shorten(text: str, width: int = 64) -> str:
    """The first sentence, cut to `width` characters."""
    import textwrap
    return textwrap.shorten(text.split(". ")[0].removesuffix("."), width, placeholder=" ...")


def _workload(args) -> Path:
    from mfbench.spec.workload import workload_path
    return workload_path(args.workload)


def _device(name: str, sets: list[str]):
    """The device profile after `--set-device` overrides (apply_sets names its option --set)."""
    from mfbench.spec.profile import load_device
    try:
        return load_device(name, sets)
    except InputError as e:
        if e.field and e.field.startswith("--set"):
            raise InputError(e.file, "--set-device" + e.field.removeprefix("--set"), e.message) from None
        raise


def _fresh(out: Path, force: bool, *outputs: str) -> None:
    """Refuse to replace an earlier run's outputs in `out` unless --force."""
    if not force and any((out / name).exists() for name in outputs):
        raise InputError(out, None, "holds an earlier run (expected a new folder: give --out DIR, "
                         "or --force to replace it)")


# the quick form's options (default None: given or not) and the workload fields they set
QUICK = {"method": "method.kind", "seq_len": "seq_len", "batch": "batch", "targets": "method.targets"}


def _quick_workload(args) -> dict:
    """`plan --model M --method lora --seq-len T --batch B` as a workload document."""
    from mfbench.spec import models

    method, seq_len, batch = (default if given is None else given for given, default in
                              ((args.method, "full"), (args.seq_len, 128), (args.batch, 8)))
    data = {"name": f"{args.model}-{method}-seq{seq_len}", "model": args.model,
            "method": {"kind": method}, "seq_len": seq_len, "batch": batch}
    if method == "lora":
        if args.targets:
            targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        else:  # attention, as the paper's workloads adapt it
            try:
                family = models.arch(models.get_config(args.model, base=Path.cwd())).family
            except InputError as e:
                raise InputError(None, "--model", e.message) from None
            targets = ["attn.c_attn", "attn.c_proj"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        data["method"]["targets"] = targets
    return data


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
                                          int(args.storage_mb * 2**20), raw_out=raw, rounds=args.rounds,
                                          heat_s=args.heat_s)
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


def build_parser() -> argparse.ArgumentParser:
    import mfbench
    p = argparse.ArgumentParser(prog="mfbench", description=mfbench.__doc__.strip())
    p.add_argument("--version", action="version", version=f"mfbench {mfbench.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.commands = sub.choices  # for "did you mean" on a misspelt command

    def json_option(s, help="the result as JSON on stdout (for scripts)"):
        s.add_argument("--json", action="store_true", help=help)

    def set_options(s, device: bool = False, what: str = "workload"):
        s.add_argument("--set", action="append", default=[], metavar="FIELD.PATH=VALUE",
                       help=f"change a field of the {what} as if written in its file, e.g. optimizer.lr=3e-4 "
                       "(the value is YAML; repeatable)")
        if device:
            s.add_argument("--set-device", action="append", default=[], metavar="FIELD.PATH=VALUE",
                           help="change a field of the device profile, e.g. ram.app_limit_mb.value=4000 (repeatable)")

    def force_option(s):
        s.add_argument("--force", action="store_true", help="replace an earlier run in the output folder")

    workload_help = "a shipped workload's name (mfbench workloads) or a workload YAML file"

    s = sub.add_parser("models", help="list the model registry")
    json_option(s)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("devices", help="list device profiles, or show one")
    s.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    s.add_argument("name", nargs="?")
    s.add_argument("--set-device", action="append", default=[], metavar="FIELD.PATH=VALUE",
                   help="show: change a field of the profile first (repeatable)")
    json_option(s)
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("workloads", help="list the shipped workloads")
    json_option(s)
    s.set_defaults(func=cmd_workloads)

    s = sub.add_parser("plan", help="print the step program of a workload: memory and FLOPs breakdown")
    s.add_argument("workload", nargs="?", help=workload_help + " (or the quick form: --model ...)")
    s.add_argument("--json", action="store_true",
                   help="the buffer table and ops as JSON, byte for byte what `mfbench-train --plan` prints")
    s.add_argument("--threads", type=int, help="threads the per-thread scratch is sized for "
                   "(default: the workload's; for auto, this machine's cores)")
    set_options(s)
    quick = s.add_argument_group("quick form, without a workload file")
    quick.add_argument("--model", help="a registry name (mfbench models) or an HF config.json or model folder")
    quick.add_argument("--method", choices=["full", "lora"], help="default full")
    quick.add_argument("--seq-len", type=int, help="default 128")
    quick.add_argument("--batch", type=int, help="default 8")
    quick.add_argument("--targets", help="LoRA: modules to adapt, comma-separated (default: attention; GPT-2 "
                       "attn.c_attn,attn.c_proj; Qwen and Gemma q_proj,k_proj,v_proj,o_proj)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run", help="run a workload on the native trainer: measured trace and summary")
    s.add_argument("workload", help=workload_help)
    s.add_argument("--target", default="local",
                   help="where to run it: local (this machine, the default), qemu-arm64 (the static arm64 build "
                        "under qemu-aarch64: correctness, not timing), adb or adb:SERIAL (a phone over adb)")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    s.add_argument("--seed", type=int, help="random init and LoRA init (default: the workload's)")
    s.add_argument("--out", help="output folder (default runs/WORKLOAD/measured-TARGET)")
    s.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="a checkpoint in OUT/checkpoints every N steps (default 10; 0: only when stopped by SIGTERM or SIGINT)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its newest good checkpoint (its run.json as written)")
    set_options(s)
    force_option(s)
    json_option(s, "the summary as JSON on stdout")
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
    s.add_argument("--rounds", type=int, default=3, help="run every benchmark this many times, in turn; each timing "
                   "the median of its rounds (default 3)")
    s.add_argument("--heat-s", type=float, default=300, metavar="S", help="where a battery reports its current: "
                   "seconds of the heat-up run, and as many of cool-down, for the thermal fit (default 300; 0: none)")
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
    s.add_argument("workload", help=workload_help)
    s.add_argument("--device", default="pixel8", help="device profile name or YAML path (default pixel8)")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    s.add_argument("--battery-start", type=float, default=100.0, metavar="PCT")
    s.add_argument("--ambient", type=float, metavar="C", help="ambient temperature (default: the profile's)")
    s.add_argument("--charging", action="store_true", help="the device is on its charger")
    s.add_argument("--placement", choices=("foreground", "background"), default="foreground",
                   help="the cpuset the app runs in (background: the little cores)")
    s.add_argument("--cluster", help="run on this cluster, or several at once as a+b (default: the fastest allowed)")
    s.add_argument("--out", help="output folder (default runs/WORKLOAD/predicted-DEVICE)")
    s.add_argument("--trace-all-ops", action="store_true", help="record op and io events of every step")
    set_options(s, device=True)
    force_option(s)
    json_option(s, "the summary as JSON on stdout")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("sweep", help="simulate a grid or random sample over any fields, on Ray; Parquet, CSV, Pareto plot")
    s.add_argument("sweep")
    s.add_argument("--out", help="output folder (default runs/sweep-NAME); a rerun skips the points it holds")
    _engine_flags(s)
    set_options(s, what="sweep")
    json_option(s, "the result rows as JSON on stdout")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("search", help="multi-objective search (NSGA-II) over policy parameters, per device")
    s.add_argument("search")
    s.add_argument("--out", help="output folder (default runs/search-NAME)")
    _engine_flags(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("fleet", help="federated fine-tuning over a fleet of simulated phones, round by round")
    s.add_argument("fleet")
    s.add_argument("--out", help="output folder (default runs/fleet-NAME)")
    set_options(s, what="fleet")
    _engine_flags(s)
    s.set_defaults(func=cmd_fleet)

    s = sub.add_parser("compare", help="train a Full-FT workload on the native trainer and on PyTorch from one init")
    s.add_argument("workload")
    s.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    s.add_argument("--out", help="output folder (default runs/WORKLOAD/compare): native/ and pytorch/ inside")
    set_options(s)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("figures", help="draw the paper's figures and tables (PDF, PNG and CSV each)")
    s.add_argument("--out", default="runs/figures", help="output folder (default runs/figures)")
    s.add_argument("--only", metavar="NAMES", help="comma-separated figures (paper_figures/fig_NAME.py), e.g. sharding,lora")
    s.add_argument("--quick", action="store_true", help="fewer simulated steps, budgets and phones (for CI)")
    s.add_argument("--runs", default="runs", help="where the stored measured runs are (default runs)")
    s.set_defaults(func=cmd_figures)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":  # argparse cannot pass options like --model through a subparser
        from mfbench.device import native
        return native.main(argv[1:])
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in parser.commands:
        print(f"mfbench: error: unknown command {argv[0]!r}{did_you_mean(argv[0], parser.commands)}; "
              f"expected one of {', '.join(parser.commands)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
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
