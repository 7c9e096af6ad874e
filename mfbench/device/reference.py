"""PyTorch as the reference trainer: a workload trained with transformers on the same token
file, initial weights and hyperparameters as the native trainer, written in the same summary
and trace schema, so a measured run has a peer measured beside it (`mfbench compare`).

The math is the trainer's (docs/native.md): rows are windows of seq_len + 1 tokens with
stride seq_len, wrapping at the end; the loss is the mean over the step's counted targets
(across its micro-batches); AdamW decays matrices only; gradients are clipped by their global
norm; the learning rate warms up linearly, then stays, or decays (cosine, linear) to min_lr.
Full fine-tuning only: LoRA's adapter init and the 16-bit frozen weights have no peer here.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mfbench.errors import InputError


def batches(ids, mask, B: int, T: int, count: int):
    """The trainer's batching: yields (inputs [B, T], targets [B, T] with -100 where the mask
    is 0) for `count` batches."""
    import torch

    ids = torch.tensor(list(ids), dtype=torch.long)
    m = None if mask is None else torch.tensor(list(mask), dtype=torch.bool)
    pos = 0
    for _ in range(count):
        xs, ys = [], []
        for _ in range(B):
            if pos + T + 1 > len(ids):
                pos = 0
            w = ids[pos:pos + T + 1]
            y = w[1:].clone()
            if m is not None:
                y[~m[pos + 1:pos + T + 1]] = -100
            xs.append(w[:T])
            ys.append(y)
            pos += T
        yield torch.stack(xs), torch.stack(ys)


def loss_sum_count(logits, targets):
    """Summed cross-entropy over counted targets, and their number."""
    import torch

    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100,
                                             reduction="sum")
    return loss, int((targets != -100).sum())


def lr_at(step: int, steps: int, warmup: int, lr: float, min_lr: float, schedule: str) -> float:
    """The trainer's schedule: linear warmup, then cosine / linear decay to min_lr, or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def init_weights(spec: dict, folder: Path) -> Path:
    """A random-init model of the spec's config, made by transformers from the spec's seed and
    saved as an HF folder, so that both trainers start from the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(Path(spec["model"]["config"]).read_text()))
    torch.manual_seed(spec["seed"])
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder / "model.safetensors"


def train(spec_path: Path, out: Path) -> None:
    """Train the run spec's workload with PyTorch; write out/trace.jsonl and out/summary.json."""
    import platform
    import resource
    import time

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from mfbench.contracts import trace
    from mfbench.device.data import read_token_file

    start = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(Path(spec["model"]["weights"]).parent, dtype=torch.float32)
    model.eval()  # no model dropout: the native trainer applies none (gradients flow in eval mode all the same)
    o = spec["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    tokens = read_token_file(spec["data"]["tokens"])
    B, M, T, steps = spec["batch"], spec["micro_batch"], spec["seq_len"], spec["steps"]
    events, durations = [], []
    for step, (x, y) in enumerate(batches(tokens.ids, tokens.mask, B, T, steps)):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, o["warmup_steps"], o["lr"], o["min_lr"], o["schedule"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        count = max(1, int((y != -100).sum()))  # the step's mean runs over all its micro-batches
        total = 0.0
        for i in range(0, B, M):
            loss, _ = loss_sum_count(model(x[i:i + M]).logits, y[i:i + M])
            (loss / count).backward()
            total += loss.item()
        clip = o["grad_clip"]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")).item()
        opt.step()
        durations.append(time.perf_counter() - t0)
        events.append({"type": "step", "index": step, "t": time.perf_counter() - start, "duration": durations[-1],
                       "tokens": B * T, "loss": total / count, "lr": lr, "grad_norm": norm})
        print(f"pytorch step {step + 1}/{steps} loss {total / count:.4f} {durations[-1]:.2f} s", file=sys.stderr)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    summary = trace.Summary.of_steps(
        durations, wall, B * T, source="measured", workload=spec["name"], device="local", peak_memory_bytes=peak,
        energy_j=None, j_per_token=None, battery_start_pct=None, battery_end_pct=None, battery_drop_pct=None,
        max_temperature_c=None, io_read_bytes=0, io_write_bytes=0, final_loss=events[-1]["loss"] if events else None,
        killed=False, kill_reason=None, stop_reason=None, provenance=spec["provenance"],
        details={"engine": "pytorch", "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "method": spec["method"]["kind"], "threads": spec["threads"]})
    with trace.RunWriter(out) as writer:  # the trace and summary committed together
        writer += events
        writer.commit(summary)


def compare(workload_path, *, steps: int | None = None, out=None, command: str = "", sets=()):
    """Run the workload on the native trainer and on PyTorch from one transformers-made init:
    out/native and out/pytorch (default runs/WORKLOAD/compare). Returns their summaries."""
    import subprocess

    from mfbench.contracts import trace
    from mfbench.device import run
    from mfbench.files import write_atomic

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise InputError(None, "compare", "needs PyTorch and transformers (expected `pip install -e '.[test]'`)") from None
    out = Path(out or Path("runs") / Path(workload_path).stem / "compare").resolve()
    spec = run.resolve(workload_path, steps=steps, out=out / "native", command=command, sets=sets)
    if spec["method"]["kind"] != "full":
        raise InputError(workload_path, "method.kind", "the PyTorch reference trains Full-FT only (expected full)")
    if spec["memory"]["frozen_dtype"] != "float32":
        raise InputError(workload_path, "memory.frozen_dtype", "expected float32 for the PyTorch reference")
    if spec["model"]["weights"] is None:  # random init: made once, by transformers, for both sides
        spec["model"]["weights"] = str(init_weights(spec, out / "init"))
        write_atomic(out / "native" / "run.json", json.dumps(spec, indent=2) + "\n")
    print(f"native trainer: {out / 'native'}", file=sys.stderr)
    run._run_trainer(run.runners.Local(), str(out / "native" / "run.json"))
    print(f"PyTorch: {out / 'pytorch'}", file=sys.stderr)
    (out / "pytorch").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "mfbench.device.reference", str(out / "native" / "run.json"),
                           str(out / "pytorch")])  # its own process, so its peak RSS is its own
    if done.returncode:
        raise InputError(None, "compare", f"the PyTorch run failed with exit code {done.returncode} (see above)")
    return trace.read_summary(out / "native" / "summary.json"), trace.read_summary(out / "pytorch" / "summary.json"), out


if __name__ == "__main__":
    train(Path(sys.argv[1]), Path(sys.argv[2]))
