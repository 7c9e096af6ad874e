"""Native trainer vs PyTorch (+transformers, +peft) on GPT-2 124M: tokens/s and peak RSS.

    python benchmarks/bench_native_gpt2.py [--steps 6] [--warmup 2] [--threads 2] [--repeat 1]

GPT-2 small, random init, sequence length 128, batch 8 (1,024 tokens a step), fp32, AdamW,
Full-FT and LoRA (r 8, alpha 16 on attn.c_attn and attn.c_proj). Every run is its own
subprocess (peak RSS is that child's maximum resident set, from wait4); native and PyTorch
runs alternate so that machine noise hits both alike. Step time is the median over the timed
steps (after the warm-up steps) and includes data, forward, backward, clipping and the update.
Dropout is off on both sides (the native trainer has none), so both do the same math.
Writes benchmarks/results/native_gpt2.json and prints a table.
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

SEQ, BATCH = 128, 8
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ["c_attn", "attn.c_proj"]
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

TORCH_CHILD = r'''
import json, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
method, steps, threads, data_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = GPT2Config(**json.loads(sys.argv[5]))
model = GPT2LMHeadModel(cfg)
if method == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=%(r)d, lora_alpha=%(alpha)d, target_modules=%(targets)r,
                                             fan_in_fan_out=True, lora_dropout=0.0))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
ids = torch.tensor(json.load(open(data_path)), dtype=torch.long)
B, T = %(batch)d, %(seq)d
times, losses, pos = [], [], 0
for s in range(steps):
    t0 = time.perf_counter()
    if pos + B * T + 1 > len(ids):
        pos = 0
    chunk = ids[pos:pos + B * T + 1]
    x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
    pos += B * T
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    del logits
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    times.append(time.perf_counter() - t0)
    losses.append(loss.item())
    print(f"torch {method} step {s + 1}/{steps} {times[-1]:.2f}s loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
print(json.dumps({"step_s": times, "loss": losses, "trainable": sum(p.numel() for p in params)}))
''' % dict(r=LORA_R, alpha=LORA_ALPHA, targets=LORA_TARGETS, batch=BATCH, seq=SEQ)


def run_child(cmd: list[str], env: dict | None = None) -> tuple[str, int]:
    """Run cmd; return (stdout, peak RSS bytes of that child alone)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed ({p.returncode}): {' '.join(cmd)}")
    return out, ru.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def run_torch(method, steps, threads, work: Path, tokens_json: Path):
    out, rss = run_child([sys.executable, "-c", TORCH_CHILD, method, str(steps), str(threads), str(tokens_json),
                          json.dumps(NO_DROPOUT)], env={"OMP_NUM_THREADS": str(threads)})
    res = json.loads(out.strip().splitlines()[-1])
    return res["step_s"], rss, res["trainable"], res["loss"]


def run_native(method, steps, threads, work: Path, config: Path, tokens: Path):
    from mfbench.device.native import trainer_binary

    out_dir = work / f"native-{method}"
    cmd = [str(trainer_binary()), "--config", str(config), "--data", str(tokens), "--seq-len", str(SEQ),
           "--batch", str(BATCH), "--steps", str(steps), "--threads", str(threads), "--method", method,
           "--lr", "3e-4", "--schedule", "constant", "--out", str(out_dir), "--no-save"]
    if method == "lora":
        cmd += ["--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--lora-targets", ",".join(LORA_TARGETS)]
    _, rss = run_child(cmd)
    steps_ev = [json.loads(s) for s in (out_dir / "trace.jsonl").read_text().splitlines()]
    steps_ev = [e for e in steps_ev if e["type"] == "step"]
    summary = json.loads((out_dir / "summary.json").read_text())
    return [e["duration"] for e in steps_ev], rss, summary["details"]["trainable_params"], [e["loss"] for e in steps_ev]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per run (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="alternate native/PyTorch runs this many times")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "native_gpt2.json")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import GPT2Config

    from mfbench.device.data import write_token_file
    from mfbench.device.native import trainer_binary

    trainer_binary()  # build before timing anything
    total = args.warmup + args.steps
    results = {}
    with tempfile.TemporaryDirectory(prefix="mfbench-bench-") as tmp:
        work = Path(tmp)
        config = work / "config.json"
        GPT2Config(**NO_DROPOUT).to_json_file(config)
        rng = random.Random(0)
        ids = [rng.randrange(50257) for _ in range(total * BATCH * SEQ + 1)]
        write_token_file(work / "tokens.bin", ids, 50257)
        (work / "tokens.json").write_text(json.dumps(ids))
        for method in args.methods.split(","):
            runs = {"native": [], "pytorch": []}
            for _ in range(args.repeat):
                for system in ("native", "pytorch"):
                    print(f"== {system} {method}", file=sys.stderr, flush=True)
                    if system == "native":
                        times, rss, trainable, losses = run_native(method, total, args.threads, work, config, work / "tokens.bin")
                    else:
                        times, rss, trainable, losses = run_torch(method, total, args.threads, work, work / "tokens.json")
                    runs[system].append({"step_s": times[args.warmup:], "peak_rss_bytes": rss,
                                         "trainable_params": trainable, "first_loss": losses[0]})
            results[method] = {}
            for system, rs in runs.items():
                med = statistics.median([t for r in rs for t in r["step_s"]])
                results[method][system] = {
                    "median_step_s": med, "tokens_per_s": BATCH * SEQ / med,
                    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                    "trainable_params": rs[0]["trainable_params"], "first_loss": rs[0]["first_loss"], "runs": rs}
            n, p = results[method]["native"], results[method]["pytorch"]
            results[method]["ratio"] = {"tokens_per_s": n["tokens_per_s"] / p["tokens_per_s"],
                                        "peak_rss": n["peak_rss_bytes"] / p["peak_rss_bytes"]}

    report = {
        "benchmark": "native_gpt2", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "setup": {"model": "gpt2 (124M), random init", "seq_len": SEQ, "batch": BATCH, "threads": args.threads,
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "repeat": args.repeat,
                  "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS}, "dropout": 0.0},
        "results": results,
    }
    try:
        import peft
        report["versions"]["peft"] = peft.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(args.out)

    print(f"\nGPT-2 124M, seq {SEQ}, batch {BATCH}, {args.threads} threads, {cpu_name()}, {report['date']}")
    print(f"{'method':<6} {'system':<8} {'s/step':>8} {'tokens/s':>9} {'peak RSS MB':>12}")
    for method, r in results.items():
        for system in ("native", "pytorch"):
            x = r[system]
            print(f"{method:<6} {system:<8} {x['median_step_s']:>8.2f} {x['tokens_per_s']:>9.1f} {x['peak_rss_bytes'] / 2**20:>12.0f}")
        print(f"{method:<6} {'ratio':<8} {'':>8} {r['ratio']['tokens_per_s']:>8.2f}x {r['ratio']['peak_rss']:>11.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
