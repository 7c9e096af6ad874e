"""The trainer's memory options on whole models: memory-efficient attention gives the
standard path's loss and gradients (within 1e-5: another order of floating operations), and
activation checkpointing gives the plain run's loss trajectory and gradients bit for bit (the
recompute runs the same kernels on the same input)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from native_fixtures import random_token_file
from safetensors.numpy import load_file

from mfbench.device.native import run_trainer, trainer_binary

V = 101
T = 80  # longer than the attention's key block (64): the streaming kernel runs two blocks
CONFIGS = {
    "gpt2": {"model_type": "gpt2", "vocab_size": V, "n_positions": 128, "n_embd": 32, "n_layer": 3, "n_head": 4},
    "qwen2": {"model_type": "qwen2", "vocab_size": V, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
              "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False},
    # sliding window 20 < T on layers 0 and 2
    "gemma3_text": {"model_type": "gemma3_text", "vocab_size": V, "hidden_size": 48, "intermediate_size": 80,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "max_position_embeddings": 128, "query_pre_attn_scalar": 24, "sliding_window": 20,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}
TARGETS = {"gpt2": ["c_attn", "mlp.c_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
           "gemma3_text": ["q_proj", "o_proj", "up_proj"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    trainer_binary()
    root = tmp_path_factory.mktemp("memory")
    for family, cfg in CONFIGS.items():
        (root / family).mkdir()
        (root / family / "config.json").write_text(json.dumps(cfg))
    return root, random_token_file(root / "data.tok", 4000, V, seed=3)


def run(setup, tmp_path: Path, family: str, method: str, name: str, dropout: float = 0.0,
        **memory) -> tuple[list[float], dict]:
    """Three steps of 2 micro-batches of 2 x T on two threads, random init; the step losses
    and the first step's dumped loss and gradients."""
    root, tokens = setup
    kind = {"kind": "full"} if method == "full" else {"kind": "lora", "rank": 4, "alpha": 8.0,
                                                       "targets": TARGETS[family], "dropout": dropout}
    spec = {"version": 1, "name": name, "model": {"config": str(root / family / "config.json"), "weights": None},
            "method": kind, "data": {"tokens": str(tokens)}, "seq_len": T, "batch": 4, "micro_batch": 2, "steps": 3,
            "seed": 5, "threads": 2,
            "optimizer": {"name": "adamw", "lr": 0.003, "min_lr": 0.0, "weight_decay": 0.0, "beta1": 0.9,
                          "beta2": 0.999, "eps": 1e-08, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
            "memory": {"sharding": {"policy": "none"}, "checkpointing": {"policy": "none"}, "attention": "standard",
                       "ce_chunk_rows": 0, **memory},
            "scheduling": {"policy": "none"}, "out": str(tmp_path / name), "provenance": {}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    run_trainer(["--workload", str(path), "--quiet", "--dump-grads", str(tmp_path / f"{name}.st")],
                timeout=300)
    trace = [json.loads(line) for line in (tmp_path / name / "trace.jsonl").read_text().splitlines()]
    return [e["loss"] for e in trace if e["type"] == "step"], load_file(tmp_path / f"{name}.st")


@pytest.mark.parametrize("family,method", [("gpt2", "full"), ("qwen2", "lora"), ("gemma3_text", "full")])
def test_memory_efficient_attention_gives_the_standard_loss_and_gradients(setup, tmp_path, family, method):
    losses, grads = run(setup, tmp_path, family, method, "standard")
    me_losses, me_grads = run(setup, tmp_path, family, method, "efficient", attention="memory_efficient")
    assert grads.keys() == me_grads.keys() and len(grads) > 3
    for name, want in grads.items():
        err = np.abs(me_grads[name].astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
        assert err < 1e-5, f"{name}: relative error {err:.3g}"
    assert len(losses) == 3 and np.allclose(me_losses, losses, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family,method,checkpointing,attention", [
    ("gpt2", "full", {"policy": "every_block"}, "standard"),
    ("gpt2", "lora", {"policy": "every_k", "k": 2}, "standard"),
    ("qwen2", "lora", {"policy": "every_block"}, "standard"),
    ("gemma3_text", "lora", {"policy": "every_k", "k": 2}, "memory_efficient"),
    ("gemma3_text", "full", {"policy": "every_block"}, "standard"),
])
def test_checkpointing_is_bit_identical_to_the_plain_run(setup, tmp_path, family, method, checkpointing, attention):
    losses, grads = run(setup, tmp_path, family, method, "plain", attention=attention)
    ck_losses, ck_grads = run(setup, tmp_path, family, method, "checkpointed", checkpointing=checkpointing,
                              attention=attention)
    assert len(losses) == 3 and ck_losses == losses  # the trace's losses, as printed: every bit
    assert grads.keys() == ck_grads.keys()
    for name, want in grads.items():
        assert np.array_equal(ck_grads[name], want), name


def test_lora_dropout_recomputes_the_forwards_masks(setup, tmp_path):
    """A checkpointed block runs its forward again in backward: it draws the forward's dropout
    masks, so the run equals the plain run with dropout bit for bit."""
    losses, grads = run(setup, tmp_path, "qwen2", "lora", "plain", dropout=0.2)
    ck_losses, ck_grads = run(setup, tmp_path, "qwen2", "lora", "checkpointed", dropout=0.2,
                              checkpointing={"policy": "every_block"})
    assert len(losses) == 3 and ck_losses == losses
    assert all(np.array_equal(ck_grads[name], want) for name, want in grads.items())
    no_dropout, _ = run(setup, tmp_path, "qwen2", "lora", "no-dropout", checkpointing={"policy": "every_block"})
    assert no_dropout[1:] != losses[1:]  # (the first step's loss is the base model's: B starts at zero)
