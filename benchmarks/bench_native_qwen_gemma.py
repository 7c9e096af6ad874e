"""Native trainer vs PyTorch on Qwen2.5-0.5B and Gemma-3-270M: LoRA, random init at full size.

    python benchmarks/bench_native_qwen_gemma.py [--steps 4] [--models qwen2.5-0.5b,gemma-3-270m]

Both sides train the same model (the registry's config.json, float32, random init), LoRA
rank 8 (alpha 16) on q, k, v and o projections, batch 4 x sequence 128, AdamW, 2 threads,
on the same random tokens. Each side runs in its own process, so its peak RSS (VmHWM) is its
own. tokens/s is from the median step. Targets (issue 4): native >= 1.0x PyTorch's tokens/s
and <= 0.7x its peak RSS. Prints a markdown table (docs/native-families.md keeps one).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mfbench.device.data import read_token_file, write_token_file  # noqa: E402
from mfbench.device.native import run_trainer  # noqa: E402
from mfbench.spec.models import REGISTRY  # noqa: E402

B, T, THREADS = 4, 128, 2
RANK, ALPHA, TARGETS = 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def torch_worker(config_path: str, tokens_path: str, steps: int) -> None:
    """One PyTorch run (in a process of its own); prints its result as JSON."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from native_fixtures import batches

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(Path(config_path).parent)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    td = read_token_file(tokens_path)
    durations, losses = [], []
    for x, y in batches(td.ids, td.mask, B, T, steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        durations.append(time.perf_counter() - t0)
        losses.append(loss.item())
    med = statistics.median(durations)
    print(json.dumps({"tokens_per_s": B * T / med, "peak_rss": peak_rss(), "median_step_s": med, "losses": losses}))


def run_pytorch(config: Path, tokens: Path, steps: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--torch-worker", str(config), str(tokens), str(steps)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_native(config: Path, tokens: Path, steps: int, out: Path) -> dict:
    run_trainer(["--config", config, "--data", tokens, "--method", "lora", "--lora-r", RANK, "--lora-alpha", ALPHA,
                 "--lora-targets", ",".join(TARGETS), "--seq-len", T, "--batch", B, "--steps", steps, "--lr", 1e-4,
                 "--threads", THREADS, "--out", out, "--no-save", "--quiet"])
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": s["step_tokens_per_s"], "peak_rss": s["peak_memory_bytes"], "median_step_s": s["median_step_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--models", default="qwen2.5-0.5b,gemma-3-270m")
    ap.add_argument("--torch-worker", nargs=3, metavar=("CONFIG", "TOKENS", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        torch_worker(a.torch_worker[0], a.torch_worker[1], int(a.torch_worker[2]))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            config = folder / "config.json"
            config.write_text(json.dumps(REGISTRY[name]))
            vocab = REGISTRY[name]["vocab_size"]
            rng = random.Random(0)
            tokens = write_token_file(folder / "data.tok", [rng.randrange(vocab) for _ in range(a.steps * B * T + 1)], vocab)
            native = run_native(config, tokens, a.steps, folder / "native")
            torch_ = run_pytorch(config, tokens, a.steps)
            rows.append((name, native, torch_))
            print(f"{name}: native {native}, pytorch {torch_}", file=sys.stderr, flush=True)

    print(f"\nLoRA r{RANK} on {','.join(TARGETS)}, batch {B} x seq {T}, {THREADS} threads, {a.steps} steps, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| model | native tok/s | PyTorch tok/s | ratio (target >= 1.0) | native peak RSS | PyTorch peak RSS "
          "| ratio (target <= 0.7) |")
    print("|---|---|---|---|---|---|---|")
    for name, n, t in rows:
        print(f"| {name} | {n['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | {n['tokens_per_s'] / t['tokens_per_s']:.2f}x "
              f"| {n['peak_rss'] / 2**30:.2f} GiB | {t['peak_rss'] / 2**30:.2f} GiB | {n['peak_rss'] / t['peak_rss']:.2f}x |")


if __name__ == "__main__":
    main()
