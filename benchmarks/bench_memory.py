"""Memory options of the native trainer: peak RSS and step time, GPT-2 small Full-FT and
Qwen2.5-0.5B LoRA.

    python benchmarks/bench_memory.py [--steps 3] [--warmup 1] [--rounds 1] [--threads 2] [--quick]

Random-init full-size models (configs from the mfbench registry), sequence length 128,
batch 8, fp32, AdamW, random tokens. For each model: no option; parameter sharding (`lru` and
`prefetch`) at budgets from 1200 MB down to the smallest that runs (what one op needs
resident), without and (Full-FT) with the optimizer and gradients offloaded; activation
checkpointing of every block; memory-efficient attention; and memory-efficient vs standard
attention at T = 1024 (batch 1). Every run is its own `mfbench-train` subprocess (peak RSS is
that child's maximum resident set, from wait4); the step time is the median of the timed
steps (with --rounds N, of every round's: the cases run in turn N times). The shard files
go to a temporary folder in this checkout's runs/ (the report names
its device and file system). Writes benchmarks/results/memory.json and prints a table.
`--quick`: a few rows only (to see it works).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mfbench.units import MB  # noqa: E402

SEQ, BATCH = 128, 8
BUDGETS_MB = (1200, 800, 600, 400, 300, 200)
MODELS = {  # name: (registry model, method)
    "gpt2-full": ("gpt2", "full"),
    "qwen2.5-0.5b-lora": ("qwen2.5-0.5b", "lora"),
}
LORA = {"gpt2": ["c_attn", "attn.c_proj"], "qwen2.5-0.5b": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def cases(name: str, smallest_mb: dict[bool, float], quick: bool) -> list[dict]:
    """(label, memory options, seq, batch) of each run of a model; smallest_mb[offloaded]
    is the least budget that runs."""
    method = MODELS[name][1]
    out = [{"label": "plain", "memory": {}}]
    if quick:
        offloads = [["optimizer", "gradients"]] if method == "full" else [[]]
        budgets = {tuple(o): [smallest_mb[bool(o)]] for o in offloads}
    else:
        out += [{"label": "checkpointing every block", "memory": {"checkpointing": {"policy": "every_block"}}},
                {"label": "memory-efficient attention", "memory": {"attention": "memory_efficient"}},
                {"label": "T 1024 standard attention", "memory": {}, "seq": 1024, "batch": 1},
                {"label": "T 1024 memory-efficient attention", "memory": {"attention": "memory_efficient"},
                 "seq": 1024, "batch": 1}]
        offloads = [[], ["optimizer", "gradients"]] if method == "full" else [[]]
        budgets = {tuple(o): [b for b in BUDGETS_MB if b > smallest_mb[bool(o)]] + [smallest_mb[bool(o)]]
                   for o in offloads}
    for offload in offloads:
        for budget in budgets[tuple(offload)]:
            for policy in ("lru", "prefetch"):
                memory = {"sharding": {"policy": policy, "budget_mb": budget}}
                if offload:
                    memory["offload"] = offload
                out.append({"label": f"{policy} {budget:g} MB" + (" + offload" if offload else ""), "memory": memory})
    return out


def smallest_budget_mb(model: str, method: str, offloaded: bool) -> float:
    """What one op needs resident (the planner's own rule, plan.shards.smallest_budget_of),
    rounded up to 0.1 MB."""
    from mfbench.plan import compile_program
    from mfbench.plan.shards import smallest_budget_of
    from mfbench.spec.workload import Workload
    kind = {"kind": "full"} if method == "full" else {"kind": "lora", "targets": LORA[model]}
    memory = {"sharding": {"policy": "lru", "budget_mb": 10**6}} | ({"offload": ["optimizer", "gradients"]}
                                                                   if offloaded else {})
    workload = Workload.model_validate({"name": "smallest", "model": model, "method": kind, "seq_len": SEQ,
                                        "batch": BATCH, "threads": 1, "memory": memory})
    return -(-smallest_budget_of(compile_program(workload, threads=1)) * 10 // MB) / 10


def run_child(cmd: list[str]) -> int:
    """Run cmd; the peak RSS in bytes of that child alone."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}\n{err}")
    return ru.ru_maxrss * 1024  # KiB on Linux


def run_case(case: dict, model: str, method: str, config: Path, tokens: Path, work: Path, steps: int, warmup: int,
             threads: int) -> dict:
    from mfbench.device.native import run_trainer, trainer_binary
    seq, batch = case.get("seq", SEQ), case.get("batch", BATCH)
    out = work / "run"
    kind = {"kind": "full"} if method == "full" else {"kind": "lora", "rank": 8, "alpha": 16.0, "targets": LORA[model],
                                                       "dropout": 0.0}
    spec = {"version": 1, "name": case["label"], "model": {"config": str(config), "weights": None}, "method": kind,
            "data": {"tokens": str(tokens)}, "seq_len": seq, "batch": batch, "steps": warmup + steps, "seed": 1,
            "threads": threads, "optimizer": {"name": "adamw", "lr": 3e-4, "grad_clip": 1.0},
            "memory": case["memory"], "out": str(out), "provenance": {}}
    path = work / "run.json"
    path.write_text(json.dumps(spec))
    planned = json.loads(run_trainer(["--workload", str(path), "--plan"]).stdout)
    rss = run_child([str(trainer_binary()), "--workload", str(path), "--quiet"])
    events = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    times = [e["duration"] for e in events if e["type"] == "step"][warmup:]
    return {"label": case["label"], "memory": case["memory"], "seq_len": seq, "batch": batch,
            "peak_rss_bytes": rss, "planned_peak_bytes": summary["details"]["plan"]["peak_bytes"],
            "median_step_s": statistics.median(times), "step_s": times,
            "io_read_bytes_per_step": summary["io_read_bytes"] / (warmup + steps),
            "io_write_bytes_per_step": summary["io_write_bytes"] / (warmup + steps),
            "io_ops": sum(op["phase"] == "io" for op in planned["ops"])}


def pooled(runs: list[dict]) -> dict:
    """One case's runs (one a round) as one row: every timed step, their median; the largest peak."""
    times = [t for r in runs for t in r["step_s"]]
    return {**runs[0], "step_s": times, "median_step_s": statistics.median(times),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "rounds": len(runs)}


def storage_of(path: Path) -> str:
    """The device and file system under path (df)."""
    r = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True)
    return " ".join(r.stdout.split()[2:]) if r.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per run (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="run every case this many times, interleaved (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="plain and the smallest budget only")
    ap.add_argument("--only", help="comma-separated labels of the runs to make (as the table prints them, "
                    "e.g. 'plain,prefetch 1200 MB'); 'smallest' stands for the smallest budget")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    args = ap.parse_args(argv)

    from mfbench.device.data import write_token_file
    from mfbench.device.native import trainer_binary
    from mfbench.spec import models

    trainer_binary()  # built before anything is timed
    results = {}
    (HERE.parent / "runs").mkdir(exist_ok=True)  # ignored by git; on this checkout's disk
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=HERE.parent / "runs") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model, method = MODELS[name]
            config = models.get_config(model)
            (work / "config.json").write_text(json.dumps(config))
            rng = random.Random(0)
            n = (args.warmup + args.steps) * BATCH * 1024 + 1  # enough for every shape
            write_token_file(work / "tokens.bin", [rng.randrange(config["vocab_size"]) for _ in range(n)],
                             config["vocab_size"])
            smallest = {o: smallest_budget_mb(model, method, o) for o in ((False, True) if method == "full" else (False,))}
            wanted = args.only and {label.strip() for label in args.only.split(",")}
            chosen = [case for case in cases(name, smallest, args.quick)
                      if not wanted or case["label"] in wanted or
                      case["label"].replace(f"{smallest[bool(case['memory'].get('offload'))]:g} MB", "smallest") in wanted]
            # rounds: every case once a round, so that the machine's drift over minutes (a shared VM's
            # step time wanders by 10-20 %) falls on all of them alike; a case's steps pooled
            runs: list[list[dict]] = [[] for _ in chosen]
            for r in range(args.rounds):
                for case, done in zip(chosen, runs):
                    print(f"== {name} (round {r + 1}/{args.rounds}): {case['label']}", file=sys.stderr, flush=True)
                    done.append(run_case(case, model, method, work / "config.json", work / "tokens.bin", work,
                                         args.steps, args.warmup, args.threads))
            results[name] = [pooled(done) for done in runs]
        storage = storage_of(work)

    report = {"benchmark": "memory", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "platform": platform.platform(), "storage": storage},
              "setup": {"seq_len": SEQ, "batch": BATCH, "threads": args.threads, "warmup_steps": args.warmup,
                        "timed_steps": args.steps, "rounds": args.rounds, "quick": args.quick, "random_init": True},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(args.out)

    print(f"\nseq {SEQ}, batch {BATCH} unless said, {args.threads} threads, shard files on {storage}, {report['date']}")
    print(f"{'model':<18} {'option':<36} {'peak RSS MB':>11} {'planned MB':>10} {'s/step':>7} {'vs plain':>8} "
          f"{'read MB/step':>12}")
    for name, rows in results.items():
        plain = rows[0]["median_step_s"]
        for r in rows:
            print(f"{name:<18} {r['label']:<36} {r['peak_rss_bytes'] / MB:>11.0f} {r['planned_peak_bytes'] / MB:>10.0f} "
                  f"{r['median_step_s']:>7.2f} {r['median_step_s'] / plain:>7.2f}x {r['io_read_bytes_per_step'] / MB:>12.0f}")
    print(f"wrote {args.out}")
    return report


def test_bench_memory_runs(tmp_path):
    """The benchmark runs end to end (quick, one timed step): not a timing test."""
    report = main(["--quick", "--steps", "1", "--warmup", "0", "--models", "gpt2-full", "--out", str(tmp_path / "m.json")])
    rows = report["results"]["gpt2-full"]
    assert rows[0]["label"] == "plain" and all(r["peak_rss_bytes"] > 0 for r in rows)


if __name__ == "__main__":
    main()
