"""The native trainer on Qwen 2 / 2.5 and Gemma 3 text: tiny random-init models built with
transformers (grouped-query attention with more than one kv head, a sliding window shorter
than the sequence, Gemma's local and global layers), checked against transformers, PyTorch
autograd and peft: logits, loss, every gradient, AdamW trajectories, accumulation, saved
models and adapters, and bad configs."""
from __future__ import annotations

import json
from pathlib import Path

import native_fixtures
import pytest
import torch
from native_fixtures import (
    assert_grads_match,
    expect_error,
    load_model,
    pattern_token_file,
    peft_model,
    random_token_file,
    rel_err,
    torch_adamw_run,
    torch_loss,
    trace_losses,
)
from safetensors.torch import load_file, save_file

from mfbench.device.native import trainer_binary

V = 211
B, T = 3, 16
WINDOW = 5  # shorter than T: local layers really mask
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (family, config overrides). Every variant has 6 query heads on 2 kv heads or 4 on 2.
VARIANTS = {
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied-sliding": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=True,
                                           sliding_window=WINDOW, max_window_layers=1)),
    "gemma3": ("gemma3_text", {}),
    "gemma3-bias-linear-rope": ("gemma3_text", dict(attention_bias=True,
                                                    rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


def hf_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, Qwen2Config

    if family == "qwen2":
        kw = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=10_000.0, rms_norm_eps=1e-6)
        return Qwen2Config(**{**kw, **overrides})
    kw = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
              sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6)
    return Gemma3TextConfig(**{**kw, **overrides})


def make_model(folder: Path, variant: str, seed: int = 0, dtype=torch.float32) -> Path:
    """A random-init model saved as an HF folder; norm weights and biases randomised too, so a
    layout mistake or a missed (1 + w) shows."""
    from transformers import AutoModelForCausalLM

    family, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def binary() -> Path:
    return trainer_binary()


@pytest.fixture(scope="session")
def models(tmp_path_factory, binary) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {v: make_model(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> Path:
    return random_token_file(tmp_path_factory.mktemp("data") / "masked.tok", 2000, V, seed=2, mask_prob=0.3)


@pytest.fixture(scope="session")
def pattern_tokens(tmp_path_factory) -> Path:
    return pattern_token_file(tmp_path_factory.mktemp("data") / "pattern.tok", V)


def trainer(*args, **kw):
    """Two threads: GQA and the sliding window must hold across OpenMP's split too."""
    return native_fixtures.trainer(*args, threads=2, **kw)


# ------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_loss_match_transformers(models, variant, tokens, tmp_path):
    folder = models[variant]
    trainer("--model", folder, "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 0,
            "--dump-logits", tmp_path / "l.st")
    got = load_file(tmp_path / "l.st")
    with torch.no_grad():
        logits, loss = torch_loss(load_model(folder), tokens, B, T)
    assert got["logits"].shape == (B, T, V)
    assert rel_err(got["logits"], logits) < 1e-4
    assert abs(got["loss"].item() - loss.item()) / loss.item() < 1e-4


def test_sliding_window_changes_the_result(models, tokens, tmp_path):
    """The local layers' window matters at this sequence length (else the tests above prove little)."""
    from transformers import AutoModelForCausalLM

    folder = models["gemma3"]
    model = load_model(folder)
    wide = AutoModelForCausalLM.from_config(hf_config("gemma3_text", sliding_window=64), attn_implementation="eager")
    wide.load_state_dict(model.state_dict())
    wide.eval()
    with torch.no_grad():
        a, _ = torch_loss(model, tokens, B, T)
        b, _ = torch_loss(wide, tokens, B, T)
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("variant", ["qwen2-untied-sliding", "gemma3", "gemma3-bias-linear-rope"])
def test_full_gradients_match_autograd(models, variant, tokens, tmp_path):
    folder = models[variant]
    trainer("--model", folder, "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 1, "--lr", 0,
            "--ce-chunk-rows", 7, "--dump-grads", tmp_path / "g.st")  # several chunks, a short last one
    got = load_file(tmp_path / "g.st")
    model = load_model(folder)
    _, loss = torch_loss(model, tokens, B, T)
    loss.backward()
    names = dict(model.named_parameters())
    assert_grads_match(got, names)
    assert abs(got["loss"].item() - loss.item()) / loss.item() < 1e-4


@pytest.mark.parametrize("variant", ["qwen2-tied", "gemma3"])
def test_lora_gradients_match_peft(models, variant, tokens, tmp_path):
    folder = models[variant]
    pm = peft_model(load_model(folder), ALL_TARGETS)
    pm.save_pretrained(tmp_path / "init")
    trainer("--model", folder, "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 1, "--lr", 0,
            "--method", "lora", "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", ",".join(ALL_TARGETS),
            "--lora-init", tmp_path / "init", "--dump-grads", tmp_path / "g.st")
    got = load_file(tmp_path / "g.st")
    _, loss = torch_loss(pm, tokens, B, T)
    loss.backward()
    params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(params) == 2 * len(ALL_TARGETS) * pm.config.num_hidden_layers
    assert_grads_match(got, params)


@pytest.mark.parametrize("variant", ["qwen2-untied-sliding", "gemma3"])
def test_accumulation_4x2_equals_1x8(models, variant, tokens, tmp_path):
    common = ["--model", models[variant], "--data", tokens, "--seq-len", T, "--steps", 3, "--lr", 1e-3]
    trainer(*common, "--batch", 8, "--accum", 1, "--dump-grads", tmp_path / "big.st", "--out", tmp_path / "big", "--no-save")
    trainer(*common, "--batch", 2, "--accum", 4, "--dump-grads", tmp_path / "acc.st", "--out", tmp_path / "acc", "--no-save")
    big, acc = load_file(tmp_path / "big.st"), load_file(tmp_path / "acc.st")
    for name in big:
        assert rel_err(acc[name], big[name]) < 1e-4, name
    lb, la = trace_losses(tmp_path / "big"), trace_losses(tmp_path / "acc")
    assert len(lb) == 3 and max(abs(a - b) / b for a, b in zip(la, lb)) < 1e-5


@pytest.mark.parametrize("variant", ["qwen2-untied-sliding", "gemma3"])
def test_adamw_trajectory_full_matches_pytorch(models, variant, pattern_tokens, tmp_path):
    steps, lr, warmup, wd, clip = 20, 3e-3, 4, 0.1, 0.5
    trainer("--model", models[variant], "--data", pattern_tokens, "--seq-len", T, "--batch", B, "--steps", steps,
            "--lr", lr, "--warmup", warmup, "--schedule", "cosine", "--weight-decay", wd, "--grad-clip", clip,
            "--out", tmp_path / "o", "--no-save")
    model = load_model(models[variant])
    ref = torch_adamw_run(model, list(model.parameters()), pattern_tokens, steps, B, T, lr, warmup, wd, clip, "cosine")
    got = trace_losses(tmp_path / "o")
    assert len(got) == steps
    assert ref[-1] < ref[0] - 0.1  # it learns
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-3


@pytest.mark.parametrize("variant", ["qwen2-tied", "gemma3"])
def test_adamw_trajectory_lora_matches_peft(models, variant, pattern_tokens, tmp_path):
    steps, lr, targets = 20, 3e-2, ["q_proj", "v_proj", "down_proj"]
    pm = peft_model(load_model(models[variant]), targets)
    pm.save_pretrained(tmp_path / "init")
    trainer("--model", models[variant], "--data", pattern_tokens, "--seq-len", T, "--batch", B, "--steps", steps,
            "--lr", lr, "--warmup", 2, "--schedule", "linear", "--weight-decay", 0.01, "--method", "lora",
            "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", ",".join(targets), "--lora-init", tmp_path / "init",
            "--out", tmp_path / "o", "--no-save")
    params = [p for p in pm.parameters() if p.requires_grad]
    ref = torch_adamw_run(pm, params, pattern_tokens, steps, B, T, lr, 2, 0.01, 1.0, "linear")
    got = trace_losses(tmp_path / "o")
    assert ref[-1] < ref[0] - 0.05
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-3


# ------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("variant", ["qwen2-untied-sliding", "gemma3"])
def test_full_ft_model_loads_in_transformers(models, variant, tokens, tmp_path):
    out = tmp_path / "out"
    trainer("--model", models[variant], "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 3, "--lr", 1e-2,
            "--out", out, "--dump-logits", tmp_path / "l.st")
    with torch.no_grad():
        logits, _ = torch_loss(load_model(out), tokens, B, T)
        before, _ = torch_loss(load_model(models[variant]), tokens, B, T)
    got = load_file(tmp_path / "l.st")["logits"]
    assert rel_err(got, logits) < 1e-4
    assert rel_err(got, before) > 1e-2  # and it did change


@pytest.mark.parametrize("variant", ["qwen2-tied", "gemma3"])
def test_lora_adapter_loads_in_peft(models, variant, tokens, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    trainer("--model", models[variant], "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 4, "--lr", 2e-2,
            "--method", "lora", "--lora-r", 8, "--lora-alpha", 16, "--lora-targets", ",".join(ALL_TARGETS),
            "--out", out, "--dump-logits", tmp_path / "l.st")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["fan_in_fan_out"] is False
    pm = PeftModel.from_pretrained(load_model(models[variant]), out)
    pm.eval()
    with torch.no_grad():
        logits, _ = torch_loss(pm, tokens, B, T)
        base, _ = torch_loss(load_model(models[variant]), tokens, B, T)
    got = load_file(tmp_path / "l.st")["logits"]
    assert rel_err(got, logits) < 1e-4
    assert rel_err(got, base) > 1e-3  # the adapter is not a no-op


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_random_init_from_config(family, tokens, tmp_path, binary):
    cfg = tmp_path / "config.json"
    hf_config(family).to_json_file(cfg)
    out = tmp_path / "out"
    trainer("--config", cfg, "--data", tokens, "--seq-len", T, "--batch", 4, "--steps", 2, "--out", out)
    losses = trace_losses(out)
    assert len(losses) == 2 and abs(losses[0] - torch.log(torch.tensor(float(V))).item()) < 0.5
    model = load_model(out)  # loads in transformers
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.003
    if family == "gemma3_text":  # (1 + w) norms start at w = 0, as transformers initialises them
        assert model.model.norm.weight.abs().max().item() < 0.05


def test_half_precision_checkpoint_loads(tmp_path, tokens, binary):
    folder = make_model(tmp_path / "m", "gemma3", seed=3, dtype=torch.bfloat16)
    trainer("--model", folder, "--data", tokens, "--seq-len", T, "--batch", 2, "--steps", 0, "--dump-logits", tmp_path / "l.st")
    with torch.no_grad():
        logits, _ = torch_loss(load_model(folder), tokens, 2, T)
    assert rel_err(load_file(tmp_path / "l.st")["logits"], logits) < 1e-4


# ------------------------------------------------------------------------------------------
# bad input: one clear line naming the problem


def write_config(tmp_path: Path, family: str, **fields) -> Path:
    c = hf_config(family).to_dict()
    c.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del c[k]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c))
    return path


@pytest.mark.parametrize("family,fields,match", [
    ("qwen2", dict(model_type="llama"), "model_type 'llama' is not supported"),
    ("qwen2", dict(hidden_act="relu"), "hidden_act 'relu'"),
    ("qwen2", dict(num_key_value_heads=4), "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'yarn'"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("gemma3_text", dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types[1] 'chunked_attention'"),
    ("gemma3_text", dict(layer_types=["full_attention"]), "layer_types has 1 entries"),
    ("gemma3_text", dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar"),
    ("gemma3_text", dict(head_dim=0), "head_dim"),
])
def test_error_unsupported_config(tmp_path, tokens, family, fields, match):
    cfg = write_config(tmp_path, family, **fields)
    expect_error("--config", cfg, "--data", tokens, "--steps", 1, match=match)


def test_error_bad_lora_target_and_missing_tensor(models, tokens, tmp_path):
    expect_error("--model", models["gemma3"], "--data", tokens, "--method", "lora", "--lora-targets", "q_proj,c_attn",
                 match="--lora-targets 'c_attn' matches no module")
    m = tmp_path / "m"
    m.mkdir()
    src = models["qwen2-untied-sliding"]
    (m / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="missing tensor 'lm_head.weight'")
