"""Helpers for tests of the native trainer: tiny random-init HF models saved as folders,
tokenizers trained locally, token files, and PyTorch references on the same inputs.

Nothing is downloaded: models come from transformers configs with random weights, and
tokenizers are trained on the stdlib's pydoc topics text.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from mfbench.device.data import read_token_file, write_token_file
from mfbench.device.reference import batches, loss_sum_count, lr_at  # noqa: F401 (tests import them from here)

TINY_GPT2 = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def corpus_text(max_chars: int = 200_000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


def make_tokenizer(folder: str | Path, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE on pydoc text with <|endoftext|>; save tokenizer.json into folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus_text()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = {**TINY_GPT2, **overrides}
    kw.setdefault("bos_token_id", kw["vocab_size"] - 1)
    kw.setdefault("eos_token_id", kw["vocab_size"] - 1)
    return GPT2Config(**kw)


def make_gpt2(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random-init GPT2LMHeadModel saved as an HF folder (config.json + model.safetensors).

    Biases and LayerNorm parameters are randomised too, so that a layout mistake shows.
    """
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    model.to(dtype).save_pretrained(folder)
    return folder


def load_model(folder: str | Path):
    """Any saved family in fp32, eager attention, eval mode (gradients still on)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def load_gpt2(folder: str | Path):
    """The saved model in fp32 with dropout off (eval numerics, gradients still on)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def random_token_file(path: str | Path, n: int, vocab: int, seed: int = 0, mask_prob: float | None = None) -> Path:
    rng = random.Random(seed)
    ids = [rng.randrange(vocab) for _ in range(n)]
    mask = None if mask_prob is None else [int(rng.random() >= mask_prob) for _ in range(n)]
    return write_token_file(path, ids, vocab, mask)


def pattern_token_file(path: str | Path, vocab: int) -> Path:
    """A learnable stream: a fixed random motif of 37 tokens repeated, with a loss mask."""
    rng = random.Random(7)
    motif = [rng.randrange(vocab) for _ in range(37)]
    ids = (motif * 60)[:2000]
    mask = [int(rng.random() > 0.2) for _ in ids]
    return write_token_file(path, ids, vocab, mask)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (a tensor-wide relative error that tolerates zeros)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------
# the trainer and its PyTorch references, shared by the GPT-2, Qwen/Gemma and arm64 tests


def trainer(*args, threads: int = 1, **kw):
    """Run the binary; one thread unless asked (tiny models gain nothing from more, and a
    busy machine makes thread barriers slow). The numerics tests also run with two."""
    from mfbench.device.native import run_trainer
    return run_trainer([*map(str, args), "--threads", str(threads), "--quiet"], **kw)


def expect_error(*args, match: str) -> str:
    """The trainer rejects its input with one line, `mfbench-train: error: ...`, and exit 2."""
    r = trainer(*args, check=False, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mfbench-train: error: "), r.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def torch_loss(model, data_path: str | Path, batch: int, seq: int, skip: int = 0):
    """Logits and mean masked loss of PyTorch `model` on the trainer's batch number `skip`."""
    td = read_token_file(data_path)
    it = batches(td.ids, td.mask, batch, seq, skip + 1)
    for _ in range(skip):
        next(it)
    x, y = next(it)
    logits = model(x).logits
    s, c = loss_sum_count(logits, y)
    return logits, s / c


def peft_model(model, targets, r: int = 4, alpha: float = 8, seed: int = 5, fan_in_fan_out: bool = False):
    """`model` with peft LoRA adapters, B drawn at random: peft starts B at zero, which
    would hide A's gradient. GPT-2's Conv1D layers need fan_in_fan_out."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                          fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.eval()
    return pm


def assert_grads_match(got: dict, params: dict) -> None:
    """The trainer's dumped gradients name exactly `params` (name -> tensor with .grad), each
    within 1e-3 relative of autograd's."""
    assert set(got) - {"loss"} == set(params)
    for name, p in params.items():
        assert rel_err(got[name], p.grad) < 1e-3, name


def check_adapter_loads_in_peft(tiny: Path, tokens: Path, tmp_path: Path, batch: int, seq: int,
                                threads: int = 1) -> dict:
    """Train a GPT-2 LoRA adapter for a few steps; peft loads it and reproduces the trainer's
    logits, which differ from the base model's. Returns the adapter_config.json."""
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    trainer("--model", tiny, "--data", tokens, "--seq-len", seq, "--batch", batch, "--steps", 4, "--lr", 2e-2,
            "--method", "lora", "--lora-r", 8, "--lora-alpha", 16, "--lora-targets", "c_attn,c_proj",
            "--out", out, "--dump-logits", tmp_path / "l.st", threads=threads)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    pm = PeftModel.from_pretrained(load_gpt2(tiny), out)
    pm.eval()
    with torch.no_grad():
        logits, _ = torch_loss(pm, tokens, batch, seq)
        base, _ = torch_loss(load_gpt2(tiny), tokens, batch, seq)
    got = load_file(tmp_path / "l.st")["logits"]
    assert rel_err(got, logits) < 1e-4
    assert rel_err(got, base) > 1e-3  # the adapter is not a no-op
    return config


def trace_losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "trace.jsonl").read_text().splitlines()) if e["type"] == "step"]


def torch_adamw_run(model, params, data_path, steps, batch, seq, lr, warmup, wd, clip,
                    schedule="cosine", min_lr=0.0, on_step=None) -> list[float]:
    """The trainer's optimizer loop in PyTorch: AdamW (decay on matrices only), clipping, LR
    schedule; on_step(s), when given, is called before step s's forward."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    td = read_token_file(data_path)
    losses = []
    for s, (x, y) in enumerate(batches(td.ids, td.mask, batch, seq, steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, steps, warmup, lr, min_lr, schedule)
        opt.zero_grad()
        if on_step:
            on_step(s)
        total, count = loss_sum_count(model(x).logits, y)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append((total / count).item())
    return losses
