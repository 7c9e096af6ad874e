"""LoRA with the frozen weights held 16-bit (`memory.frozen_dtype`, `--frozen-dtype`): the
trainer computes in fp32 on the rounded weights, so its loss and adapter gradients equal
PyTorch/peft in fp32 on a model whose weights went through torch's bfloat16 / float16 and
back. The tiny models are sized so that the LM head is widened in more than one block of
vocabulary rows and the embedding is initialised and loaded in more than one chunk."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from native_fixtures import (
    load_gpt2,
    make_gpt2,
    peft_model,
    random_token_file,
    rel_err,
    torch_loss,
    trainer,
)
from safetensors.torch import load_file
from test_native_qwen_gemma import load_model, make_model

from mfbench.device.native import trainer_binary

B, T = 3, 16
TOL = 1e-5
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# family -> (vocabulary, LoRA targets); GPT-2's n_inner 40 makes its widest weight c_attn (32 x 96),
# so the head (101 x 32) is widened in two blocks of 96 rows; Qwen's and Gemma's (211 x 48) in three of 80
CASES = {"gpt2": (101, ["c_attn", "attn.c_proj", "c_fc"]),
         "qwen2-untied-sliding": (211, ["q_proj", "v_proj", "down_proj"]),
         "gemma3": (211, ["q_proj", "o_proj", "up_proj"])}


def rounded(model, dtype):
    """`model` with every parameter rounded to `dtype` and back to fp32 (what the trainer holds)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    trainer_binary()
    d = tmp_path_factory.mktemp("frozen")
    return {"gpt2": (make_gpt2(d / "gpt2", seed=8, n_inner=40), load_gpt2),
            **{v: (make_model(d / v, v, seed=9), load_model) for v in ("qwen2-untied-sliding", "gemma3")}}


@pytest.mark.parametrize("variant, dtype", [("gpt2", "bfloat16"), ("gpt2", "float16"),
                                            ("qwen2-untied-sliding", "bfloat16"), ("gemma3", "bfloat16"),
                                            ("gemma3", "float16")])
def test_lora_loss_and_gradients_equal_peft_on_rounded_weights(models, variant, dtype, tmp_path):
    folder, load = models[variant]
    vocab, targets = CASES[variant]
    tokens = random_token_file(tmp_path / "t.tok", 600, vocab, seed=3, mask_prob=0.2)
    gpt2 = variant == "gpt2"
    pm = peft_model(rounded(load(folder), DTYPES[dtype]), targets, fan_in_fan_out=gpt2)
    pm.save_pretrained(tmp_path / "init")
    trainer("--model", folder, "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 1, "--lr", 0,
            "--method", "lora", "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", ",".join(targets),
            "--lora-init", tmp_path / "init", "--frozen-dtype", dtype, "--dump-grads", tmp_path / "g.st", threads=2)
    got = load_file(tmp_path / "g.st")
    _, loss = torch_loss(pm, tokens, B, T)
    loss.backward()
    params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(got) - {"loss"} == set(params)
    assert abs(got["loss"].item() - loss.item()) / loss.item() < TOL
    for name, p in params.items():
        assert rel_err(got[name], p.grad) < TOL, name

    # the test can fail: the same adapters on the unrounded weights give other gradients
    exact = peft_model(load(folder), targets, fan_in_fan_out=gpt2)
    _, exact_loss = torch_loss(exact, tokens, B, T)
    exact_loss.backward()
    exact_grads = {n.replace(".default", ""): p.grad for n, p in exact.named_parameters() if p.requires_grad}
    assert max(rel_err(got[n], g) for n, g in exact_grads.items()) > 10 * TOL


def test_random_init_is_the_fp32_init_rounded(tmp_path, models):
    """Random init through scratch.weight, a chunk at a time, gives the fp32 init rounded: the
    logits of a bf16 LoRA run from --config equal the fp32 model the trainer initialises
    (saved by a zero-step Full-FT run), rounded, with zero adapters."""
    folder, _ = models["gpt2"]
    tokens = random_token_file(tmp_path / "t.tok", 600, 101, seed=4)
    common = ["--config", folder / "config.json", "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 0, "--seed", 77]
    trainer(*common, "--out", tmp_path / "init")
    trainer(*common, "--method", "lora", "--frozen-dtype", "bfloat16", "--dump-logits", tmp_path / "l.st")
    with torch.no_grad():
        logits, _ = torch_loss(rounded(load_gpt2(tmp_path / "init"), torch.bfloat16), tokens, B, T)
        exact, _ = torch_loss(load_gpt2(tmp_path / "init"), tokens, B, T)
    got = load_file(tmp_path / "l.st")["logits"]
    assert rel_err(got, logits) < TOL
    assert rel_err(got, exact) > 10 * TOL  # the rounding shows


def test_rounding_and_widening_are_torchs(tmp_path):
    """half.h against torch's .to(bfloat16 / float16) and back, bit for bit: random bit
    patterns (every exponent: subnormals, infinities), normals over 14 decades, and the edges
    (ties to even, the largest half, half's overflow and underflow)."""
    import shutil
    import subprocess

    import numpy as np
    if shutil.which("g++") is None:
        pytest.fail("g++ not found: apt-get install g++")
    src = Path(__file__).resolve().parents[1] / "kernels_native" / "src"
    subprocess.run(["g++", "-std=c++17", "-O2", "-fopenmp", f"-I{src}", str(Path(__file__).with_name("native_half_check.cpp")),
                    "-o", str(tmp_path / "check")], check=True, capture_output=True, text=True)
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1 << 19,), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)
    spread = torch.randn(1 << 18, generator=g) * torch.logspace(-9, 5, 1 << 18)
    edges = torch.tensor([0., -0., 65504., 65519.99, 65520., -65520., 2**-24, 2**-25, 2**-25 * 1.0001, 2**-14,
                          2**-14 * 0.99, float("inf"), -float("inf"), 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8])
    x = torch.cat([bits, spread, edges])
    x = x[~torch.isnan(x)]  # NaN stays NaN, but its payload bits are torch's own business
    x.numpy().tofile(tmp_path / "in.bin")
    subprocess.run([str(tmp_path / "check"), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    n, out = len(x), np.fromfile(tmp_path / "out.bin", dtype=np.uint8)
    bf, h = out[:2 * n].view(np.int16), out[2 * n:4 * n].view(np.int16)
    wbf, wh = out[4 * n:8 * n].view(np.float32), out[8 * n:].view(np.float32)
    assert np.array_equal(bf, x.to(torch.bfloat16).view(torch.int16).numpy())
    assert np.array_equal(h, x.to(torch.float16).view(torch.int16).numpy())
    assert np.array_equal(wbf, x.to(torch.bfloat16).float().numpy())
    assert np.array_equal(wh, x.to(torch.float16).float().numpy())


def test_frozen_dtype_needs_lora(models, tmp_path):
    from native_fixtures import expect_error
    folder, _ = models["gpt2"]
    expect_error("--model", folder, "--data", tmp_path / "none.tok", "--frozen-dtype", "bfloat16",
                 match="--frozen-dtype 'bfloat16' needs LoRA")
    expect_error("--model", folder, "--data", tmp_path / "none.tok", "--method", "lora", "--frozen-dtype", "bf16",
                 match="expected float32, bfloat16 or float16")
