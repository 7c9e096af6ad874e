"""LoRA dropout in the native trainer (method.dropout, --lora-dropout) against peft.

The trainer draws its masks from its counter-based generator (docs/native.md: value i of
adapter a in micro-batch k of step s is kept when uniform01(seed, stream(s, k, a), i) >= p).
`keep_mask` below draws them again in numpy, and `with_masks` puts them in peft's dropout
modules; then the gradients (with two micro-batches a step, on GPT-2's Conv1D and on Qwen's
grouped-query linears) and a 12-step AdamW trajectory must match peft's. Resume and
activation checkpointing keep the masks: tests/test_resume.py and tests/test_native_memory.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from native_fixtures import (
    assert_grads_match,
    expect_error,
    load_model,
    make_gpt2,
    pattern_token_file,
    peft_model,
    random_token_file,
    rel_err,
    torch_adamw_run,
    trace_losses,
    trainer,
)
from safetensors.torch import load_file

from mfbench.device.data import read_token_file
from mfbench.device.reference import batches, loss_sum_count

V = 101
B, T, P, SEED = 2, 16, 0.3, 7


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps, as in C++)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keep_mask(seed: int, step: int, micro_batch: int, adapter: int, n: int, p: float) -> np.ndarray:
    """Which of the n input values adapter `adapter` keeps in micro-batch `micro_batch` of step `step`."""
    def u64(v):
        return np.array([v], dtype=np.uint64)

    stream = mix64(mix64(mix64(u64(step)) ^ u64(micro_batch)) ^ u64(adapter))
    i = np.arange(n, dtype=np.uint64)
    bits = mix64(u64(seed) ^ mix64(stream * np.uint64(0x100000001B3) + i)) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0) >= p


class MaskedDropout(torch.nn.Module):
    """peft's lora_dropout with the trainer's mask for the micro-batch `where` points at."""

    def __init__(self, adapter: int, where: dict):
        super().__init__()
        self.adapter, self.where = adapter, where

    def forward(self, x):
        w = self.where
        keep = keep_mask(SEED, w["step"], w["micro_batch"], self.adapter, x.numel(), P)
        scale = np.where(keep, np.float32(1.0 / (1.0 - P)), np.float32(0)).astype(np.float32)
        return x * torch.from_numpy(scale).view_as(x)


def with_masks(pm) -> dict:
    """Put a MaskedDropout in each adapted module, numbered in module order as the trainer
    numbers its adapters; returns the dict that says which micro-batch runs."""
    from peft.tuners.lora import LoraLayer

    where = {"step": 0, "micro_batch": 0}
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    for a, m in enumerate(layers):
        m.lora_dropout["default"] = MaskedDropout(a, where)
    return where


# family -> (LoRA targets: every linear of a block, peft's fan_in_fan_out for GPT-2's Conv1D)
FAMILIES = {"gpt2": (["c_attn", "c_proj", "c_fc"], True),
            "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random-init GPT-2 and Qwen 2 (grouped-query: 6 heads on 2 kv heads) HF folders and
    a token file with masked targets."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    root = tmp_path_factory.mktemp("dropout")
    make_gpt2(root / "gpt2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(root / "qwen2")
    return root, random_token_file(root / "tokens.tok", 3000, V, seed=2, mask_prob=0.3)


def test_the_mask_drops_p_of_the_values_independently():
    keep = keep_mask(SEED, 3, 1, 5, 200_000, P)
    assert abs(1 - keep.mean() - P) < 0.005
    # another adapter, micro-batch or step draws another mask; the same one draws it again
    for other in ((SEED, 3, 1, 6), (SEED, 3, 0, 5), (SEED, 4, 1, 5), (SEED + 1, 3, 1, 5)):
        assert abs((keep != keep_mask(*other, 200_000, P)).mean() - 2 * P * (1 - P)) < 0.01
    assert np.array_equal(keep, keep_mask(SEED, 3, 1, 5, 200_000, P))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_peft_with_the_trainers_masks(models, family, tmp_path):
    """One step of two micro-batches (each its own masks), on two threads: every adapter's
    gradient equals autograd's through peft with the same masks, and differs from the
    gradient without dropout."""
    root, tokens = models
    targets, conv1d = FAMILIES[family]
    pm = peft_model(load_model(root / family), targets, fan_in_fan_out=conv1d)
    pm.save_pretrained(tmp_path / "init")
    args = ["--model", root / family, "--data", tokens, "--seq-len", T, "--batch", B, "--accum", 2, "--steps", 1,
            "--lr", 0, "--method", "lora", "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", ",".join(targets),
            "--lora-init", tmp_path / "init", "--seed", SEED]
    trainer(*args, "--lora-dropout", P, "--dump-grads", tmp_path / "dropout.st", threads=2)
    trainer(*args, "--dump-grads", tmp_path / "plain.st", threads=2)

    where = with_masks(pm)
    td = read_token_file(tokens)
    total = count = 0
    for k, (x, y) in enumerate(batches(td.ids, td.mask, B, T, 2)):
        where["micro_batch"] = k
        s, c = loss_sum_count(pm(x).logits, y)
        total, count = total + s, count + c
    (total / count).backward()
    params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    got = load_file(tmp_path / "dropout.st")
    assert_grads_match(got, params)
    assert max(rel_err(got[n], p.grad) for n, p in params.items()) < 1e-5
    plain = load_file(tmp_path / "plain.st")
    assert min(rel_err(got[n], plain[n]) for n in params) > 1e-2  # every adapter saw its mask
    assert abs(got["loss"].item() - (total / count).item()) < 1e-5


def test_adamw_trajectory_with_dropout_matches_peft(models, tmp_path):
    """Twelve steps (a new mask every step) learn as peft does with the same masks."""
    root, _ = models
    tokens = pattern_token_file(tmp_path / "pattern.tok", V)
    steps, lr, targets = 12, 3e-2, ["c_attn", "attn.c_proj"]
    pm = peft_model(load_model(root / "gpt2"), targets, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "init")
    trainer("--model", root / "gpt2", "--data", tokens, "--seq-len", T, "--batch", B, "--steps", steps, "--lr", lr,
            "--method", "lora", "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", ",".join(targets),
            "--lora-init", tmp_path / "init", "--lora-dropout", P, "--seed", SEED, "--out", tmp_path / "o", "--no-save")
    where = with_masks(pm)
    params = [p for p in pm.parameters() if p.requires_grad]
    ref = torch_adamw_run(pm, params, tokens, steps, B, T, lr, 0, 0.0, 1.0, schedule="constant",
                          on_step=lambda s: where.update(step=s))
    got = trace_losses(tmp_path / "o")
    assert ref[-1] < ref[0] - 0.05  # it learns
    assert len(got) == steps and max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-5


def test_dropout_is_a_probability_of_lora(models, tmp_path):
    root, tokens = models
    args = ["--model", root / "gpt2", "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 1]
    expect_error(*args, "--method", "lora", "--lora-dropout", 1, match="option --lora-dropout got '1' (expected a number >= 0 and < 1)")
    expect_error(*args, "--lora-dropout", 0.1, match="(expected 0 for Full-FT (dropout applies to LoRA adapters))")
