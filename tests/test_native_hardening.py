"""The native trainer's side of issue 14, one test per reproducer: sizes that wrapped
(a 9-field config.json, --batch x --seq-len, --threads 100000), options the workload schema
refuses, a diverged run that replaced a good model, --lora-init ignoring adapter_config.json,
safetensors files the reference library refuses, a token file with no loss target, and
outputs that were not a consistent set (a failure midway, leftovers, a full disk found after
the training).

Everything runs the real trainer on tiny random-init models; peft and the `safetensors`
library are the references.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from native_fixtures import (assert_grads_match, expect_error, load_gpt2, make_gpt2, peft_model, random_token_file,
                             torch_loss, trainer)
from native_fuzz import raw_token_file, refused_by_library, safetensors_bytes, safetensors_parts
from pydantic import ValidationError
from safetensors.torch import load_file

from mfbench.device.native import run_trainer, trainer_binary
from mfbench.spec.workload import Method, Optimizer

V, T, B = 101, 8, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    trainer_binary()
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "model", seed=0)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return random_token_file(tmp_path_factory.mktemp("data") / "t.tok", 600, V, seed=1, mask_prob=0.2)


def short(tiny, tokens, *args):
    return ["--model", tiny, "--data", tokens, "--seq-len", T, "--batch", B, *args]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if re.search(r"\.(tmp|staging)\.\d+$|\.partial$", p.name))


# ------------------------------------------------------------------------------------------
# sizes: 64-bit checked products, threads capped


def test_config_whose_heads_times_head_dim_wraps_is_refused(tiny, tokens, tmp_path):
    """Nine fields, each in range: num_attention_heads x head_dim is 2^32, which wrapped to 0 in an int."""
    cfg = {"model_type": "qwen2", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 65536, "num_key_value_heads": 65536, "head_dim": 65536, "max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for extra in ([], ["--plan"]):
        line = expect_error("--config", tmp_path / "config.json", "--data", tokens, "--seq-len", T, "--batch", B, *extra,
                            match="config.json: num_attention_heads x head_dim: 65536 x 65536 = 4294967296")
        assert "expected at most 2147483647" in line


def test_batch_times_seq_len_that_wraps_is_refused(tiny, tokens, tmp_path):
    expect_error("--config", tiny / "config.json", "--data", tokens, "--seq-len", T, "--batch", 2**29, "--steps", 1,
                 match="--batch x --seq-len: 536870912 x 8 = 4294967296")
    # a run spec's integer beyond an int was truncated (2^32 + 8 became 8)
    spec = {"version": 1, "model": {"config": str(tiny / "config.json"), "weights": None},
            "method": {"kind": "full"}, "data": {"tokens": str(tokens)}, "seq_len": 2**32 + 8, "batch": 2}
    (tmp_path / "run.json").write_text(json.dumps(spec))
    r = run_trainer(["--workload", tmp_path / "run.json"], check=False, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"mfbench-train: error: {tmp_path / 'run.json'}: seq_len is 4294967304 (expected an integer <= 2147483647)")


def test_threads_are_capped(tiny, tokens, tmp_path):
    r = run_trainer(list(map(str, short(tiny, tokens, "--steps", 1, "--threads", 100000))), check=False, timeout=60)
    assert r.returncode == 2 and r.stderr == "mfbench-train: error: option --threads got '100000' (expected an integer from 1 to 256)\n"
    # the cap itself runs (more threads than cores is allowed), and trains what one thread trains
    for threads in (1, 256):
        r = run_trainer(list(map(str, short(tiny, tokens, "--steps", 1, "--no-save", "--out", tmp_path / str(threads),
                                            "--threads", threads, "--quiet"))), timeout=120)
        assert r.returncode == 0
    one, many = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("1", "256"))
    assert many["details"]["threads"] == 256
    assert many["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------
# options: refused as the workload schema refuses them, flags and run specs alike

OPTIONS = [  # flag, value, run spec field, schema object and its field
    ("--lr", -1, "optimizer.lr", Optimizer, "lr"),
    ("--eps", -1, "optimizer.eps", Optimizer, "eps"),
    ("--eps", 0, "optimizer.eps", Optimizer, "eps"),
    ("--grad-clip", -1, "optimizer.grad_clip", Optimizer, "grad_clip"),
    ("--min-lr", -0.5, "optimizer.min_lr", Optimizer, "min_lr"),
    ("--weight-decay", -0.1, "optimizer.weight_decay", Optimizer, "weight_decay"),
    ("--beta1", 1, "optimizer.beta1", Optimizer, "beta1"),
    ("--beta2", -0.1, "optimizer.beta2", Optimizer, "beta2"),
    ("--lora-alpha", 0, "method.alpha", Method, "alpha"),
    ("--lora-alpha", -8, "method.alpha", Method, "alpha"),
]


@pytest.mark.parametrize("flag, value, field, schema, name", OPTIONS, ids=[f"{o[0]}={o[1]}" for o in OPTIONS])
def test_options_the_schema_refuses_are_refused(tiny, tokens, tmp_path, flag, value, field, schema, name):
    with pytest.raises(ValidationError):  # the reference: the workload schema refuses it
        schema(**({"kind": "lora", "targets": ["c_attn"]} if schema is Method else {}), **{name: value})
    expect_error(*short(tiny, tokens, "--steps", 1, "--method", "lora"), flag, value,
                 match=f"option {flag} got '{value}' (expected a number")
    section, key = field.split(".")
    spec = {"version": 1, "model": {"config": str(tiny / "config.json"), "weights": None},
            "method": {"kind": "lora", "targets": ["c_attn"]}, "data": {"tokens": str(tokens)}, "seq_len": T, "batch": B}
    spec.setdefault(section, {})[key] = value
    (tmp_path / "run.json").write_text(json.dumps(spec))
    r = run_trainer(["--workload", tmp_path / "run.json"], check=False, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"run.json: {field} is {value} (expected a number" in lines[0], lines[0]


def test_grad_clip_zero_in_a_run_spec_is_refused_null_is_off(tiny, tokens, tmp_path):
    with pytest.raises(ValidationError):
        Optimizer(grad_clip=0)
    spec = {"version": 1, "model": {"config": str(tiny / "config.json"), "weights": None}, "method": {"kind": "full"},
            "data": {"tokens": str(tokens)}, "seq_len": T, "batch": B, "steps": 1, "optimizer": {"grad_clip": 0}}
    (tmp_path / "run.json").write_text(json.dumps(spec))
    r = run_trainer(["--workload", tmp_path / "run.json"], check=False, timeout=60)
    assert r.returncode == 2 and "optimizer.grad_clip is 0 (expected a number > 0, or null for no clipping)" in r.stderr
    spec["optimizer"]["grad_clip"] = None
    (tmp_path / "run.json").write_text(json.dumps(spec))
    assert run_trainer(["--workload", tmp_path / "run.json", "--quiet"], timeout=60).returncode == 0


# ------------------------------------------------------------------------------------------
# a diverged run stops, exit 1, and saves nothing


@pytest.mark.parametrize("method", ["full", "lora"])
def test_nan_loss_stops_with_exit_1_and_keeps_the_previous_outputs(tiny, tokens, tmp_path, method):
    out = tmp_path / "out"
    args = short(tiny, tokens, "--steps", 3, "--method", method, "--out", out)
    trainer(*args, "--lr", 1e-3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = trainer(*args, "--lr", 1e30, "--grad-clip", 0, check=False, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("mfbench-train: error: training diverged at step 2: its loss is ") and "nan" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good run's set, untouched


# ------------------------------------------------------------------------------------------
# --lora-init: the adapter's own rank, alpha and targets


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A peft adapter of alpha 8, rank 4 (the trainer's defaults are 16 and 8) on three targets."""
    path = tmp_path_factory.mktemp("adapter") / "init"
    peft_model(load_gpt2(tiny), ["c_attn", "c_proj", "c_fc"], r=4, alpha=8, fan_in_fan_out=True).save_pretrained(path)
    return path


def test_lora_init_uses_the_adapters_alpha_rank_and_targets(tiny, tokens, adapter, tmp_path):
    trainer(*short(tiny, tokens, "--steps", 1, "--method", "lora", "--lora-init", adapter, "--dump-grads",
                   tmp_path / "g.st", "--out", tmp_path / "out"))
    from peft import PeftModel
    pm = PeftModel.from_pretrained(load_gpt2(tiny), adapter, is_trainable=True)
    _, loss = torch_loss(pm, tokens, B, T)
    loss.backward()
    assert_grads_match(load_file(tmp_path / "g.st"),
                       {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad})
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (4, 8, ["c_attn", "c_fc", "c_proj"])


@pytest.mark.parametrize("flags, match", [
    (["--lora-alpha", 16], "lora_alpha is 8 but --lora-alpha is 16 (expected the same alpha, or no --lora-alpha)"),
    (["--lora-r", 8], "r is 4 but --lora-r is 8"),
    (["--lora-targets", "c_attn"], "target_modules is "),
])
def test_lora_init_flags_that_disagree_with_the_adapter_are_an_error(tiny, tokens, adapter, flags, match):
    line = expect_error(*short(tiny, tokens, "--steps", 1, "--method", "lora", "--lora-init", adapter), *flags, match=match)
    assert "adapter_config.json: " in line


def test_lora_init_adapter_tensors_outside_the_targets_are_an_error(tiny, tokens, adapter, tmp_path):
    init = shutil.copytree(adapter, tmp_path / "init")
    cfg = json.loads((init / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]  # the file still holds c_proj and c_fc adapters
    (init / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(*short(tiny, tokens, "--steps", 1, "--method", "lora", "--lora-init", init),
                 match="adapter_model.safetensors: tensor 'base_model.model.transformer.h.0.attn.c_proj.lora_A.weight' "
                       "is not an adapter of the targeted modules")
    cfg["target_modules"], cfg["use_rslora"] = ["c_attn", "c_proj", "c_fc"], True  # alpha / sqrt(r): not implemented
    (init / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(*short(tiny, tokens, "--steps", 1, "--method", "lora", "--lora-init", init),
                 match="adapter_config.json: use_rslora is true: not supported by the native trainer")


# ------------------------------------------------------------------------------------------
# safetensors: what the reference library refuses


def _overlap(h, data):
    a, b = [k for k in h if k != "__metadata__"][:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]
    return h, data


def _float_shape(h, data):
    k = next(k for k in h if k != "__metadata__" and h[k]["shape"])
    h[k]["shape"] = [float(d) for d in h[k]["shape"]]
    return h, data


def _dtype_size(h, data):
    k = next(k for k in h if k != "__metadata__" and h[k]["dtype"] == "F32")
    h[k]["dtype"] = "F16"
    return h, data


def _out_of_range(h, data):
    k = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    h[k]["data_offsets"][1] += 4
    return h, data


STRICT = {
    "overlapping tensors": (_overlap, "overlaps another tensor"),
    "non-integer shape": (_float_shape, "(expected a list of non-negative integers)"),
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 8), "8 trailing bytes after the last tensor"),
    "dtype and size disagree": (_dtype_size, "(expected"),
    "offset out of range": (_out_of_range, "lies outside the file's"),
}


@pytest.mark.parametrize("case", list(STRICT))
def test_safetensors_the_library_refuses_are_refused(tiny, tokens, tmp_path, case):
    mutate, match = STRICT[case]
    m = shutil.copytree(tiny, tmp_path / "m")
    header, data = safetensors_parts((m / "model.safetensors").read_bytes())
    raw = safetensors_bytes(*mutate(header, data))
    (m / "model.safetensors").write_bytes(raw)
    assert refused_by_library(raw)
    expect_error("--model", m, "--data", tokens, "--steps", 1, match=match)


@pytest.mark.parametrize("delta", [-1, 1])
def test_safetensors_header_length_off_by_one_is_refused(tiny, tokens, tmp_path, delta):
    """The header is padded with spaces, so length - 1 still parses: every tensor then read one byte off."""
    m = shutil.copytree(tiny, tmp_path / "m")
    raw = bytearray((m / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 + n - 1:8 + n] == b" "  # the padding that let the shifted header parse
    raw[:8] = (n + delta).to_bytes(8, "little")
    (m / "model.safetensors").write_bytes(raw)
    assert refused_by_library(bytes(raw))
    expect_error("--model", m, "--data", tokens, "--steps", 1, match="model.safetensors: ")


def test_safetensors_duplicate_tensor_names_are_refused(tiny, tokens, tmp_path):
    """The library keeps the last of two entries silently; which one was meant is unknown, so it is an error here."""
    m = shutil.copytree(tiny, tmp_path / "m")
    raw = (m / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].rstrip()
    name = "transformer.wte.weight"
    entry = json.dumps({name: json.loads(header)[name]})[1:-1]
    dup = header[:-1] + b"," + entry.encode() + b"}"
    dup += b" " * (-len(dup) % 8)
    (m / "model.safetensors").write_bytes(len(dup).to_bytes(8, "little") + dup + raw[8 + n:])
    expect_error("--model", m, "--data", tokens, "--steps", 1, match=f"tensor '{name}' appears twice in the header")


# ------------------------------------------------------------------------------------------
# token files


def test_token_file_whose_mask_has_no_target_is_refused(tiny, tmp_path):
    raw_token_file(tmp_path / "none.tok", list(range(50)) * 4, V, [0] * 200)
    expect_error("--model", tiny, "--data", tmp_path / "none.tok", "--seq-len", T, "--batch", B, "--steps", 1,
                 match="none.tok: the loss mask marks no target token")
    raw = bytearray((tmp_path / "none.tok").read_bytes())
    raw[-1] = 2
    (tmp_path / "two.tok").write_bytes(raw)
    expect_error("--model", tiny, "--data", tmp_path / "two.tok", "--seq-len", T, "--batch", B, "--steps", 1,
                 match="two.tok: loss mask value 2 at position 199 (expected 0 or 1)")


# ------------------------------------------------------------------------------------------
# outputs: one set, committed together


def test_a_failure_while_committing_never_leaves_the_old_summary_next_to_a_new_model(tiny, tokens, tmp_path):
    out = tmp_path / "out"
    trainer(*short(tiny, tokens, "--steps", 2, "--lr", 1e-3, "--out", out))
    old_model = (out / "model.safetensors").read_bytes()
    (out / "trace.jsonl").unlink()
    (out / "trace.jsonl").mkdir()  # the trace cannot be put in place: the commit fails midway
    (out / "trace.jsonl" / "x").write_text("")
    r = trainer(*short(tiny, tokens, "--steps", 2, "--lr", 2e-3, "--out", out), check=False, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "trace.jsonl: cannot commit the run's outputs" in lines[0], r.stderr
    new_model = (out / "model.safetensors").read_bytes() != old_model
    assert not (new_model and (out / "summary.json").exists())
    assert leftovers(out) == []


def test_a_run_removes_what_a_killed_run_left(tiny, tokens, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / f"model.safetensors.tmp.{dead.pid}").write_bytes(b"\0" * 4096)  # a full-size temporary
    (out / f".staging.{dead.pid}").mkdir()
    (out / f".staging.{dead.pid}" / "model.safetensors").write_bytes(b"\0" * 4096)
    (out / "notes.tmp.txt").write_text("the user's")  # not a temporary of ours: kept
    trainer(*short(tiny, tokens, "--steps", 1, "--out", out))
    assert leftovers(out) == [] and (out / "notes.tmp.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "notes.tmp.txt", "summary.json", "trace.jsonl"]


def test_a_failed_run_leaves_no_partial_trace_unless_a_checkpoint_needs_it(tiny, tokens, tmp_path):
    out = tmp_path / "out"
    r = trainer(*short(tiny, tokens, "--steps", 3, "--lr", 1e30, "--grad-clip", 0, "--out", out), check=False, timeout=60)
    assert r.returncode == 1 and sorted(p.name for p in out.iterdir()) == []
    r = trainer(*short(tiny, tokens, "--steps", 3, "--lr", 1e30, "--grad-clip", 0, "--checkpoint-every", 1, "--out", out),
                check=False, timeout=60)
    assert r.returncode == 1 and sorted(p.name for p in out.iterdir()) == ["checkpoints", "trace.jsonl.partial"]


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()} (run the tests as root, as CI does)")


def test_a_full_disk_is_found_before_the_training(tiny, tokens, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 64 * 1024)  # the model alone is about 120 kB
    try:
        line = expect_error(*short(tiny, tokens, "--steps", 50, "--out", disk / "out"), match="bytes free; the model")
        assert line.endswith("(expected a folder with room for the run's outputs)")
        assert list((disk / "out").iterdir()) == []  # no step ran: no trace
    finally:
        subprocess.run(["umount", str(disk)], check=True)
