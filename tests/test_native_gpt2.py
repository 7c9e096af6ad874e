"""The native trainer (kernels_native, `mfbench-train`) against transformers/PyTorch/peft on
tiny random-init GPT-2 models: logits, loss, gradients, AdamW trajectories, accumulation,
saved models and adapters, data files, and bad inputs."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from native_fixtures import (
    assert_grads_match,
    check_adapter_loads_in_peft,
    expect_error,
    load_gpt2,
    make_gpt2,
    make_tokenizer,
    pattern_token_file,
    peft_model,
    random_token_file,
    rel_err,
    torch_adamw_run,
    torch_loss,
    trace_losses,
    trainer,
)
from safetensors.torch import load_file, save_file

from mfbench.device.data import read_token_file, tokenize, write_token_file
from mfbench.device.native import TrainerError, train, trainer_binary
from mfbench.errors import InputError

V = 101
B, T = 3, 16


@pytest.fixture(scope="session")
def binary() -> Path:
    return trainer_binary()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, binary) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "model", seed=0)


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> Path:
    return random_token_file(tmp_path_factory.mktemp("data") / "plain.tok", 2000, V, seed=1)


@pytest.fixture(scope="session")
def masked_tokens(tmp_path_factory) -> Path:
    return random_token_file(tmp_path_factory.mktemp("data") / "masked.tok", 2000, V, seed=2, mask_prob=0.3)


@pytest.fixture(scope="session")
def pattern_tokens(tmp_path_factory) -> Path:
    return pattern_token_file(tmp_path_factory.mktemp("data") / "pattern.tok", V)


# ------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("data", ["tokens", "masked_tokens"])
def test_logits_and_loss_match_transformers(tiny, data, request, tmp_path):
    path = request.getfixturevalue(data)
    trainer("--model", tiny, "--data", path, "--seq-len", T, "--batch", B, "--steps", 0, "--dump-logits", tmp_path / "l.st",
            threads=2)
    got = load_file(tmp_path / "l.st")
    with torch.no_grad():
        logits, loss = torch_loss(load_gpt2(tiny), path, B, T)
    assert got["logits"].shape == (B, T, V)
    assert rel_err(got["logits"], logits) < 1e-4
    assert abs(got["loss"].item() - loss.item()) / loss.item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load(tmp_path, tokens, dtype, binary):
    folder = make_gpt2(tmp_path / "m", seed=3, dtype=dtype)
    trainer("--model", folder, "--data", tokens, "--seq-len", T, "--batch", 2, "--steps", 0, "--dump-logits", tmp_path / "l.st")
    with torch.no_grad():
        logits, _ = torch_loss(load_gpt2(folder), tokens, 2, T)
    assert rel_err(load_file(tmp_path / "l.st")["logits"], logits) < 1e-4


def test_full_gradients_match_autograd(tiny, masked_tokens, tmp_path):
    trainer("--model", tiny, "--data", masked_tokens, "--seq-len", T, "--batch", B, "--steps", 1, "--lr", 0,
            "--dump-grads", tmp_path / "g.st", threads=2)
    got = load_file(tmp_path / "g.st")
    model = load_gpt2(tiny)
    _, loss = torch_loss(model, masked_tokens, B, T)
    loss.backward()
    names = dict(model.named_parameters())
    assert_grads_match(got, names)
    assert abs(got["loss"].item() - loss.item()) / loss.item() < 1e-4


def test_other_gpt2_configs_match(tmp_path, masked_tokens, binary):
    """Config fields beyond GPT-2 small's defaults: n_inner, exact-erf gelu, odd head count,
    attention scaled by 1/(layer+1), a different epsilon."""
    folder = make_gpt2(tmp_path / "m", seed=4, n_inner=40, activation_function="gelu", n_head=2, n_layer=3,
                       scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-4)
    trainer("--model", folder, "--data", masked_tokens, "--seq-len", T, "--batch", 2, "--steps", 1, "--lr", 0,
            "--dump-grads", tmp_path / "g.st", "--dump-logits", tmp_path / "l.st")
    model = load_gpt2(folder)
    logits, loss = torch_loss(model, masked_tokens, 2, T)
    loss.backward()
    assert rel_err(load_file(tmp_path / "l.st")["logits"], logits.detach()) < 1e-4
    assert_grads_match(load_file(tmp_path / "g.st"), dict(model.named_parameters()))


def test_threaded_gemm_split_matches(tmp_path, masked_tokens, binary):
    """Products large enough to be split across threads (n_embd 128, 256 rows): two threads
    give the autograd gradients too."""
    folder = make_gpt2(tmp_path / "m", seed=6, n_embd=128, n_head=4)
    trainer("--model", folder, "--data", masked_tokens, "--seq-len", 32, "--batch", 8, "--steps", 1, "--lr", 0,
            "--dump-grads", tmp_path / "g.st", threads=2)
    model = load_gpt2(folder)
    _, loss = torch_loss(model, masked_tokens, 8, 32)
    loss.backward()
    assert_grads_match(load_file(tmp_path / "g.st"), dict(model.named_parameters()))


def lora_grad_names(pm):
    return {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}


def test_lora_gradients_match_peft(tiny, masked_tokens, tmp_path):
    targets = ["c_attn", "c_proj", "c_fc"]
    pm = peft_model(load_gpt2(tiny), targets, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "init")
    trainer("--model", tiny, "--data", masked_tokens, "--seq-len", T, "--batch", B, "--steps", 1, "--lr", 0,
            "--method", "lora", "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", ",".join(targets),
            "--lora-init", tmp_path / "init", "--dump-grads", tmp_path / "g.st", threads=2)
    got = load_file(tmp_path / "g.st")
    _, loss = torch_loss(pm, masked_tokens, B, T)
    loss.backward()
    params = lora_grad_names(pm)
    assert_grads_match(got, params)  # only adapters hold gradients


def test_accumulation_4x2_equals_1x8(tiny, masked_tokens, tmp_path):
    common = ["--model", tiny, "--data", masked_tokens, "--seq-len", T, "--steps", 3, "--lr", 1e-3]
    trainer(*common, "--batch", 8, "--accum", 1, "--dump-grads", tmp_path / "big.st", "--out", tmp_path / "big", "--no-save")
    trainer(*common, "--batch", 2, "--accum", 4, "--dump-grads", tmp_path / "acc.st", "--out", tmp_path / "acc", "--no-save")
    big, acc = load_file(tmp_path / "big.st"), load_file(tmp_path / "acc.st")
    for name in big:
        assert rel_err(acc[name], big[name]) < 1e-4, name
    lb, la = trace_losses(tmp_path / "big"), trace_losses(tmp_path / "acc")
    assert len(lb) == 3 and max(abs(a - b) / b for a, b in zip(la, lb)) < 1e-5


def test_adamw_trajectory_full_matches_pytorch(tiny, pattern_tokens, tmp_path):
    steps, lr, warmup, wd, clip = 20, 3e-3, 4, 0.1, 0.5
    trainer("--model", tiny, "--data", pattern_tokens, "--seq-len", T, "--batch", B, "--steps", steps, "--lr", lr,
            "--warmup", warmup, "--schedule", "cosine", "--weight-decay", wd, "--grad-clip", clip, "--out", tmp_path / "o",
            "--no-save")
    model = load_gpt2(tiny)
    ref = torch_adamw_run(model, list(model.parameters()), pattern_tokens, steps, B, T, lr, warmup, wd, clip)
    got = trace_losses(tmp_path / "o")
    assert len(got) == steps
    assert ref[-1] < ref[0] - 0.1  # it learns
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-3


def test_adamw_trajectory_lora_matches_peft(tiny, pattern_tokens, tmp_path):
    tokens = pattern_tokens
    steps, lr = 20, 3e-2
    pm = peft_model(load_gpt2(tiny), ["c_attn", "attn.c_proj"], r=4, alpha=8, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "init")
    trainer("--model", tiny, "--data", tokens, "--seq-len", T, "--batch", B, "--steps", steps, "--lr", lr,
            "--warmup", 2, "--schedule", "linear", "--weight-decay", 0.01, "--method", "lora", "--lora-r", 4,
            "--lora-alpha", 8, "--lora-targets", "c_attn,attn.c_proj", "--lora-init", tmp_path / "init",
            "--out", tmp_path / "o", "--no-save")
    params = [p for p in pm.parameters() if p.requires_grad]
    ref = torch_adamw_run(pm, params, tokens, steps, B, T, lr, 2, 0.01, 1.0, schedule="linear")
    got = trace_losses(tmp_path / "o")
    assert ref[-1] < ref[0] - 0.05
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-3


# ------------------------------------------------------------------------------------------
# outputs


def test_full_ft_model_loads_in_transformers(tiny, tokens, tmp_path):
    out = tmp_path / "out"
    trainer("--model", tiny, "--data", tokens, "--seq-len", T, "--batch", B, "--steps", 3, "--lr", 1e-2,
            "--out", out, "--dump-logits", tmp_path / "l.st")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    with torch.no_grad():
        logits, _ = torch_loss(load_gpt2(out), tokens, B, T)
        before, _ = torch_loss(load_gpt2(tiny), tokens, B, T)
    got = load_file(tmp_path / "l.st")["logits"]
    assert rel_err(got, logits) < 1e-4
    assert rel_err(got, before) > 1e-2  # and it did change


def test_lora_adapter_loads_in_peft(tiny, tokens, tmp_path):
    assert check_adapter_loads_in_peft(tiny, tokens, tmp_path, B, T)["r"] == 8


def test_random_init_from_config_trace_and_summary(tmp_path, tokens, binary):
    from native_fixtures import gpt2_config

    cfg = tmp_path / "config.json"
    gpt2_config().to_json_file(cfg)
    out = tmp_path / "out"
    summary = train(config=cfg, data=tokens, out=out, seq_len=T, batch=4, steps=3, sample_ms=5, threads=2)
    from mfbench.contracts.trace import read_summary
    read_summary(out / "summary.json")  # the shared schema: every key, none unknown
    assert summary["source"] == "measured" and summary["steps"] == 3 and summary["killed"] is False
    assert summary["peak_memory_bytes"] > 1e6 and summary["step_tokens_per_s"] > 0
    events = [json.loads(s) for s in (out / "trace.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    assert [e["index"] for e in steps] == [0, 1, 2]
    assert all({"t", "loss", "tokens", "duration", "lr"} <= set(e) for e in steps)
    assert steps[0]["tokens"] == 4 * T
    assert all(e["rss"] > 0 for e in events if e["type"] == "sample")
    assert abs(steps[0]["loss"] - torch.log(torch.tensor(float(V))).item()) < 0.3  # N(0, 0.02) init: near uniform
    model = load_gpt2(out)  # the random-init model, trained, loads in transformers
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.003


# ------------------------------------------------------------------------------------------
# data files


def test_tokenize_text_and_jsonl(tmp_path):
    tok_path = make_tokenizer(tmp_path / "tok", vocab_size=300)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    text = "def f(x):\n    return x + 1\n\nThe quick brown fox.\n"
    (tmp_path / "a.txt").write_text(text)
    info = tokenize(tmp_path / "a.txt", tok_path, tmp_path / "a.tok")
    td = read_token_file(tmp_path / "a.tok")
    assert td.mask is None and td.vocab_size == 300 and info["tokens"] == len(td.ids)
    assert td.ids[-1] == eos and tok.decode(list(td.ids[:-1])) == text

    rows = [{"prompt": "Q: what is two plus two?", "response": " four"}, {"text": "plain text"}]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    tokenize(tmp_path / "b.jsonl", tmp_path / "tok", tmp_path / "b.tok")
    td = read_token_file(tmp_path / "b.tok")
    p = tok.encode(rows[0]["prompt"]).ids
    r = tok.encode(rows[0]["response"]).ids + [eos]
    t = tok.encode(rows[1]["text"]).ids + [eos]
    assert list(td.ids) == p + r + t
    assert list(td.mask) == [0] * len(p) + [1] * len(r) + [1] * len(t)


def test_tokenize_errors(tmp_path):
    tok_path = make_tokenizer(tmp_path / "tok", vocab_size=300)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"oops": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        tokenize(tmp_path / "bad.jsonl", tok_path, tmp_path / "x.tok")
    with pytest.raises(InputError, match="tokenizer.json not found"):
        tokenize(tmp_path / "bad.jsonl", tmp_path, tmp_path / "x.tok")
    with pytest.raises(InputError, match="out of the vocabulary"):
        write_token_file(tmp_path / "x.tok", [1, 2, 300], 300)
    write_token_file(tmp_path / "ok.tok", [1, 2, 3], 300, [0, 1, 1])
    raw = (tmp_path / "ok.tok").read_bytes()
    (tmp_path / "cut.tok").write_bytes(raw[:-2])
    with pytest.raises(InputError, match="truncated"):
        read_token_file(tmp_path / "cut.tok")


def test_tokenized_jsonl_trains_end_to_end(tmp_path, binary):
    tok_path = make_tokenizer(tmp_path / "model", vocab_size=300)
    folder = make_gpt2(tmp_path / "model", vocab_size=300, n_positions=64)
    rows = [{"prompt": f"Question {i}: add {i} and {i + 1}.", "response": f" The sum is {2 * i + 1}."} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)))
    tokenize(tmp_path / "d.jsonl", tok_path, tmp_path / "d.tok")
    s = train(model=folder, data=tmp_path / "d.tok", out=tmp_path / "o", method="lora", seq_len=32, batch=2,
              steps=3, threads=2, lora_targets=["c_attn", "c_proj"])
    assert s["final_loss"] > 0 and (tmp_path / "o" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------
# bad input: one clear line, exit code 2, no crash, no hang


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_error_missing_safetensors(tiny, tokens, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    (m / "model.safetensors").unlink()
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="model.safetensors: missing")


def test_error_bad_header_length(tiny, tokens, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    raw = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="bad header length")
    (m / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="not valid JSON")
    (m / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="outside the file")


def test_error_shape_disagrees_with_config(tiny, tokens, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["n_positions"] = 64
    (m / "config.json").write_text(json.dumps(cfg))
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="'transformer.wpe.weight' has shape [32, 32]")


def test_error_missing_tensor(tiny, tokens, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    sd = load_file(m / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="missing tensor 'transformer.h.1.mlp.c_fc.bias'")


def test_error_truncated_data(tiny, tokens, tmp_path):
    raw = tokens.read_bytes()
    (tmp_path / "cut.tok").write_bytes(raw[:-3])
    expect_error("--model", tiny, "--data", tmp_path / "cut.tok", "--steps", 1, match="truncated")
    (tmp_path / "junk.tok").write_bytes(b"hello world, not tokens at all....")
    expect_error("--model", tiny, "--data", tmp_path / "junk.tok", "--steps", 1, match="bad magic")


def test_error_token_out_of_vocabulary(tiny, tmp_path):
    write_token_file(tmp_path / "big.tok", [1, 2, 3, 500] * 20, 1000)
    expect_error("--model", tiny, "--data", tmp_path / "big.tok", "--steps", 1,
                 match="token id 500 at position 3 is out of the vocabulary")


def test_error_unwritable_output_folder(tiny, tokens, tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error("--model", tiny, "--data", tokens, "--steps", 1, "--out", tmp_path / "file" / "out",
                 match="not a folder")


def test_error_bad_config_and_options(tiny, tokens, tmp_path):
    (tmp_path / "c.json").write_text("{oops")
    expect_error("--config", tmp_path / "c.json", "--data", tokens, match="not valid JSON")
    expect_error("--model", tiny, "--data", tokens, "--seq-len", 64, match="exceeds n_positions")
    expect_error("--model", tiny, "--data", tokens, "--bogus", 1, match="unknown option --bogus")
    with pytest.raises(TrainerError, match="mfbench-train: error: .*--method"):
        trainer("--model", tiny, "--data", tokens, "--method", "qlora")
