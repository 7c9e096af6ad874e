"""Native trainer vs PyTorch (+transformers, +peft) on GPT-2 124M: tokens/s and peak RSS.

    pytest benchmarks/bench_native_gpt2.py                      # full size
    MFBENCH_BENCH=small pytest benchmarks/bench_native_gpt2.py  # a 2-layer GPT-2, 1 + 2 steps

GPT-2 small, random init, sequence length 128, batch 8 (1,024 tokens a step), fp32, AdamW,
Full-FT and LoRA (r 8, alpha 16 on attn.c_attn and attn.c_proj). Every run is its own
subprocess (peak RSS is that child's maximum resident set, from wait4); the PyTorch run of a
method comes first and the native run records its ratios to it (extra_info). Step time is the
median over the timed steps (after the warm-up steps) and includes data, forward, backward,
clipping and the update. Dropout is off on both sides (the native trainer has none), so both
do the same math. See benchmarks/conftest.py for saving and comparing results.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from sizes import SMALL

SEQ, BATCH = (32, 4) if SMALL else (128, 8)
WARMUP, STEPS = (1, 2) if SMALL else (2, 6)
THREADS = 2
# GPT-2 124M, or a 2-layer GPT-2 of the same shape family for a smoke check
CONFIG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64) if SMALL else {}
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
        raise RuntimeError(f"benchmark child failed ({p.returncode}): {' '.join(cmd)}")
    return out, ru.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def run_torch(method, steps, threads, work: Path, tokens_json: Path):
    out, rss = run_child([sys.executable, "-c", TORCH_CHILD, method, str(steps), str(threads), str(tokens_json),
                          json.dumps({**CONFIG, **NO_DROPOUT})], env={"OMP_NUM_THREADS": str(threads)})
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


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """config.json and the same random tokens for both sides (a token file and JSON)."""
    from transformers import GPT2Config

    from mfbench.device.data import write_token_file
    from mfbench.device.native import trainer_binary

    trainer_binary()  # build before timing anything
    work = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(**CONFIG, **NO_DROPOUT)
    config.to_json_file(work / "config.json")
    rng = random.Random(0)
    ids = [rng.randrange(config.vocab_size) for _ in range((WARMUP + STEPS) * BATCH * SEQ + 1)]
    write_token_file(work / "tokens.bin", ids, config.vocab_size)
    (work / "tokens.json").write_text(json.dumps(ids))
    return work


@pytest.mark.parametrize("method, system", [("full", "pytorch"), ("full", "native"),
                                            ("lora", "pytorch"), ("lora", "native")])
def test_gpt2(benchmark, record, inputs, method, system):
    benchmark.group = f"gpt2 {method}"
    total = WARMUP + STEPS
    if system == "native":
        def one_run():
            return run_native(method, total, THREADS, inputs, inputs / "config.json", inputs / "tokens.bin")
    else:
        def one_run():
            return run_torch(method, total, THREADS, inputs, inputs / "tokens.json")
    times, rss, trainable, losses = benchmark.pedantic(one_run, rounds=1, iterations=1)
    median = statistics.median(times[WARMUP:])
    record(f"gpt2 {method}", system, {
        "median_step_s": median, "tokens_per_s": BATCH * SEQ / median, "peak_rss_bytes": rss,
        "trainable_params": trainable, "first_loss": losses[0], "seq_len": SEQ, "batch": BATCH, "threads": THREADS,
        "warmup_steps": WARMUP, "timed_steps": STEPS})
