"""`mfbench run`: a workload resolved into the run spec and run on the native trainer.

Models are tiny (random-init HF folders and config.json files); tokenizers are trained on
pydoc text; nothing is downloaded. Every test uses its own tokenizer and token cache.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pydantic
import pytest
import yaml
from native_fixtures import TINY_GPT2, make_gpt2, make_tokenizer

from mfbench.contracts.trace import read_summary, read_trace
from mfbench.device import run as run_mod
from mfbench.device.data import load_tokenizer, pydoc_text, read_token_file
from mfbench.plan import chunk_rows, compile_workload
from mfbench.spec.workload import Workload, load_workload

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300   # room for the byte-level alphabet (256) and some merges
BASE = {"name": "base", "model": "tiny", "method": {"kind": "lora", "targets": ["attn.c_attn"]},
        "data": {"source": "data.txt"}, "seq_len": 16, "batch": 4, "steps": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A workload folder: tiny GPT-2 HF folders with tokenizers, a config.json without one,
    data files, and its own cache (XDG_CACHE_HOME)."""
    d = tmp_path_factory.mktemp("run")
    make_tokenizer(make_gpt2(d / "tiny", vocab_size=VOCAB), VOCAB)
    make_tokenizer(make_gpt2(d / "tiny2", vocab_size=VOCAB, n_layer=1), VOCAB)
    (d / "tiny-config.json").write_text(json.dumps({**TINY_GPT2, "model_type": "gpt2", "vocab_size": VOCAB}))
    text = pydoc_text()
    (d / "data.txt").write_text(text[:20_000])
    (d / "data2.txt").write_text(text[50_000:60_000])
    (d / "chat.jsonl").write_text("".join(json.dumps({"prompt": text[i:i + 200], "response": text[i + 200:i + 400]})
                                          + "\n" for i in range(0, 20_000, 400)))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())  # a different tokenizer: a smaller vocabulary
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text[:20_000]], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    (d / "other_tok").mkdir()
    tok.save(str(d / "other_tok" / "tokenizer.json"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(d / "cache"))
        yield d


def write(folder: Path, stem: str, **fields) -> Path:
    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **fields}))
    return path


def resolve(path: Path, **kw) -> dict:
    return run_mod.resolve(path, out=path.parent / "out" / path.stem, progress=False, **kw)


def cli(*args, cwd, cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([sys.executable, "-m", "mfbench.cli", "run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


# ---------------------------------------------------------------------------- resolution

def test_resolves_an_hf_folder_workload_into_the_run_spec(folder, monkeypatch):
    monkeypatch.chdir(folder)
    path = write(folder, "hf", micro_batch=2, seed=7)
    spec = run_mod.resolve(path.name, command="mfbench run hf.yaml", progress=False)
    out = folder / "runs" / "hf" / "measured-local"
    assert spec["out"] == str(out)
    assert json.loads((out / "run.json").read_text()) == spec
    assert spec["model"] == {"config": str(folder / "tiny" / "config.json"),
                             "weights": str(folder / "tiny" / "model.safetensors")}
    assert (spec["seq_len"], spec["batch"], spec["micro_batch"], spec["steps"], spec["seed"]) == (16, 4, 2, 2, 7)
    assert spec["threads"] == len(os.sched_getaffinity(0))       # threads: auto
    assert spec["memory"] == {"sharding": {"policy": "none"}, "checkpointing": {"policy": "none"},
                              "attention": "standard", "ce_chunk_rows": chunk_rows("auto", 2 * 16, VOCAB),
                              "frozen_dtype": "float32", "offload": []}
    # the model folder's tokenizer, on data.txt, with <|endoftext|> at the end
    tok = load_tokenizer(folder / "tiny")
    ids = list(read_token_file(spec["data"]["tokens"]).ids)
    assert ids == tok.encode((folder / "data.txt").read_text()).ids + [tok.token_to_id("<|endoftext|>")]
    p = spec["provenance"]
    assert (p["command"], p["device"]["name"], p["target"], p["seed"]) == ("mfbench run hf.yaml", "local", "local", 7)
    assert p["device"]["usable_cpus"] >= 1 and p["device"]["hostname"]
    assert p["workload"]["micro_batch"] == 2 and p["workload"]["threads"] == spec["threads"]


def test_registry_model_gets_its_config_written_and_a_trained_tokenizer(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = resolve(write(folder, "registry", model="gpt2", steps=3), steps=5, seed=11)
    config = json.loads(Path(spec["model"]["config"]).read_text())
    assert Path(spec["model"]["config"]) == folder / "out" / "registry" / "config.json"
    assert config["n_embd"] == 768 and spec["model"]["weights"] is None
    assert (spec["steps"], spec["seed"], spec["provenance"]["workload"]["steps"]) == (5, 11, 5)
    tokens = read_token_file(spec["data"]["tokens"])
    assert max(tokens.ids) < 50257 and tokens.vocab_size <= 50257
    trained = list((tmp_path / "mfbench" / "tokenizers").glob("bpe-*.json"))
    assert len(trained) == 1 and load_tokenizer(trained[0]).token_to_id("<|endoftext|>") is not None


# ------------------------------------------------------- every workload field reaches the trainer

def leaf_fields(model: type[pydantic.BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of a pydantic schema, through nested models."""
    out = []
    for name, field in model.model_fields.items():
        args = typing.get_args(field.annotation) if isinstance(field.annotation, types.UnionType) \
            else (field.annotation,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
        out += leaf_fields(nested[0], f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return out


def at(d: dict, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def nested(path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tokens_of(folder, tokenizer, data):
    tok = load_tokenizer(folder / tokenizer)
    return tok.encode((folder / data).read_text()).ids + [tok.token_to_id("<|endoftext|>")]


def max_fit_budget(folder) -> float:
    """A max_fit budget (MB) that fits micro-batch 2 of batch 4 but not 4."""
    from mfbench.spec.profile import load_device
    w = load_workload(write(folder, "budget"))
    overhead = load_device("host").ram.runtime_overhead_mb.value * 2**20
    peak = {m: compile_workload(w.model_copy(update={"micro_batch": m}), folder).peak_bytes() + overhead
            for m in (2, 4)}
    return (peak[2] + peak[4]) / 2 / 2**20


# field -> (workload changes, where the value must arrive in run.json: a path, or a check).
# A schema field missing here fails test_every_workload_field_is_covered.
CASES = {
    "name": ({"name": "other"}, "name"),
    "description": ({"description": "about it"}, "provenance.workload.description"),
    "model": ({"model": "tiny-config.json"},
              lambda s, f: s["model"] == {"config": str(f / "tiny-config.json"), "weights": None}),
    "method.kind": ({"method": {"kind": "full"}}, "method.kind"),
    "method.rank": ({"method": {"rank": 4}}, "method.rank"),
    "method.alpha": ({"method": {"alpha": 8.0}}, "method.alpha"),
    "method.targets": ({"method": {"targets": ["attn.c_attn", "attn.c_proj"]}}, "method.targets"),
    "method.dropout": ({"method": {"dropout": 0.1}}, "method.dropout"),
    "data.source": ({"data": {"source": "data2.txt"}},
                    lambda s, f: list(read_token_file(s["data"]["tokens"]).ids) == tokens_of(f, "tiny", "data2.txt")),
    "data.format": ({"data": {"source": "chat.jsonl", "format": "jsonl"}},
                    lambda s, f: read_token_file(s["data"]["tokens"]).mask is not None),
    "data.tokenizer": ({"data": {"tokenizer": "other_tok"}},
                       lambda s, f: read_token_file(s["data"]["tokens"]).vocab_size == 280),
    "seq_len": ({"seq_len": 8}, "seq_len"),
    "batch": ({"batch": 8}, "batch"),
    "micro_batch": ({"micro_batch": 2}, "micro_batch"),
    "steps": ({"steps": 7}, "steps"),
    "optimizer.name": ({"optimizer": {"name": "adamw"}}, "optimizer.name"),  # the only valid value
    "optimizer.lr": ({"optimizer": {"lr": 0.003}}, "optimizer.lr"),
    "optimizer.min_lr": ({"optimizer": {"min_lr": 1e-5}}, "optimizer.min_lr"),
    "optimizer.weight_decay": ({"optimizer": {"weight_decay": 0.1}}, "optimizer.weight_decay"),
    "optimizer.beta1": ({"optimizer": {"beta1": 0.8}}, "optimizer.beta1"),
    "optimizer.beta2": ({"optimizer": {"beta2": 0.99}}, "optimizer.beta2"),
    "optimizer.eps": ({"optimizer": {"eps": 1e-6}}, "optimizer.eps"),
    "optimizer.warmup_steps": ({"optimizer": {"warmup_steps": 5}}, "optimizer.warmup_steps"),
    "optimizer.schedule": ({"optimizer": {"schedule": "cosine"}}, "optimizer.schedule"),
    "optimizer.grad_clip": ({"optimizer": {"grad_clip": None}}, "optimizer.grad_clip"),
    "memory.sharding.policy": ({"memory": {"sharding": {"policy": "prefetch", "budget_mb": 100, "ahead": 2}}},
                               lambda s, f: s["memory"]["sharding"] == {"policy": "prefetch", "budget_mb": 100, "ahead": 2}),
    "memory.offload": ({"method": {"kind": "full"}, "memory": {"offload": ["optimizer"]}}, "memory.offload"),
    "memory.checkpointing.policy": ({"memory": {"checkpointing": {"policy": "every_k", "k": 2}}},
                                    lambda s, f: s["memory"]["checkpointing"] == {"policy": "every_k", "k": 2}),
    "memory.attention": ({"memory": {"attention": "memory_efficient"}}, "memory.attention"),
    "memory.ce_chunk_rows": ({"memory": {"ce_chunk_rows": 8}}, "memory.ce_chunk_rows"),
    "memory.frozen_dtype": ({"memory": {"frozen_dtype": "bfloat16"}}, "memory.frozen_dtype"),
    # max_fit under a budget that fits micro-batch 2 (of 4) but not 4
    "accumulation.policy": ({"accumulation": {"policy": "max_fit", "budget_mb": "BUDGET"}},
                            lambda s, f: s["micro_batch"] == 2),
    "scheduling.policy": ({"scheduling": {"policy": "paper"}}, "scheduling.policy"),  # run by the control channel
    "threads": ({"threads": 1}, "threads"),
    "seed": ({"seed": 99}, "seed"),
}


def test_every_workload_field_is_covered():
    leaves = leaf_fields(Workload)
    assert "optimizer.lr" in leaves and "memory.sharding.policy" in leaves  # the walk goes into nested models
    missing = [f for f in leaves if f not in CASES]
    assert not missing, (f"workload fields {missing} are not handled by `mfbench run`: pass them to the trainer "
                         "(mfbench/device/run.py), then add them to CASES")
    assert not [f for f in CASES if f not in leaves]


@pytest.mark.parametrize("field", list(CASES))
def test_workload_field_reaches_the_run_spec(folder, field):
    changes, where = CASES[field]
    if field == "accumulation.policy":
        changes = {"accumulation": {"policy": "max_fit", "budget_mb": max_fit_budget(folder)}}
    workload = merge(BASE, changes)
    path = write(folder, "field-" + field.replace(".", "-"), **workload)
    value = at(workload, field)
    if field != "optimizer.name":  # the only valid value is the default
        assert value != at(load_workload(write(folder, "field-baseline")).model_dump(mode="json"), field)
    spec = resolve(path)
    if callable(where):
        assert where(spec, folder), f"{field}: {json.dumps(spec)[:2000]}"
    else:
        assert at(spec, where) == value
    # the workload as resolved, in the provenance that summary.json carries
    assert at(spec["provenance"]["workload"], field) == value


# ----------------------------------------------------------------- bad input: one line, exit 2

def bad(folder, **fields):
    return write(folder, "bad", **fields).name


@pytest.mark.parametrize("args, fields, expect", [
    (["--target", "pixel"], {}, ["--target", "unknown target 'pixel'", "local, qemu-arm64, adb or adb:SERIAL"]),
    (["--seed", "-1"], {}, ["--seed", "expected a seed >= 0"]),
    ([], {"scheduling": {"policy": "nope"}}, ["bad.yaml: scheduling.policy", "expected a built-in scheduling policy"]),
    ([], {"scheduling": {"policy": "paper", "every_k_steps": 0}},
     ["bad.yaml: scheduling.every_k_steps", "expected a positive integer"]),
    ([], {"memory": {"checkpointing": {"policy": "mfbench.policies:EveryBlock"}}},  # a policy class: simulator only
     ["bad.yaml: memory.checkpointing.policy", "mfbench simulate", "expected none, every_block or every_k"]),
    ([], {"method": {"kind": "full", "dropout": 0.1}},
     ["bad.yaml: method.dropout", "needs LoRA", "expected 0 with method full"]),
    ([], {"data": {"source": "nope.txt"}}, ["bad.yaml: data.source", "nope.txt: file not found"]),
    ([], {"data": {"source": "short.txt"}}, ["bad.yaml: data.source", "expected at least seq_len + 1 = 17"]),
    ([], {"data": {"source": "pydoc", "format": "jsonl"}}, ["bad.yaml: data: ", "expected format text"]),
    ([], {"data": {"source": "latin1.txt"}}, ["bad.yaml: data.source", "cannot read as UTF-8 text"]),
    ([], {"data": {"source": "short.txt", "tokenizer": "binary.json"}},
     ["bad.yaml: data.tokenizer", "binary.json: cannot load tokenizer"]),
    ([], {"model": "huge.json"}, ["bad.yaml: model", "planned peak", "expected a smaller model"]),
    ([], {"seq_len": 33}, ["bad.yaml: seq_len", "33 is longer than the 32 positions of model tiny"]),
    ([], {"method": {"kind": "full"}, "memory": {"frozen_dtype": "bfloat16"}},
     ["bad.yaml: memory.frozen_dtype", "Full-FT freezes no parameter", "expected float32 with method full"]),
])
def test_bad_input_is_one_line_and_exit_2(folder, args, fields, expect):
    (folder / "short.txt").write_text("hi")
    (folder / "latin1.txt").write_bytes("caf\u00e9 au lait ".encode("latin-1") * 50)
    (folder / "binary.json").write_bytes(bytes(range(256)))
    (folder / "huge.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8192, "n_layer": 96,
                                                  "n_head": 64, "vocab_size": VOCAB}))
    r = cli(bad(folder, **fields), *args, cwd=folder, cache=folder / "cache")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("mfbench: error: ") and r.stdout == ""
    for text in expect:
        assert text in lines[0]


# ---------------------------------------------------------------------------------- end to end

def test_run_end_to_end_and_the_tokenizer_cache_is_reused(tmp_path):
    """A tiny GPT-2 LoRA from a config.json (random init, a BPE trained on the data)."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_GPT2, "model_type": "gpt2", "vocab_size": VOCAB}))
    (tmp_path / "data.txt").write_text(pydoc_text()[:30_000])
    write(tmp_path, "tiny-lora", model="config.json", steps=50, threads=1)
    cache = tmp_path / "cache"

    outs = []
    for n in (1, 2):
        r = cli("tiny-lora.yaml", "--steps", 3, "--out", f"out{n}", cwd=tmp_path, cache=cache)
        assert r.returncode == 0, r.stderr
        assert ("training a byte-level BPE" in r.stderr) == (n == 1), r.stderr  # the second run reuses it
        assert "step 3/3" in r.stderr                                             # progress is streamed
        outs.append(tmp_path / f"out{n}")
    assert len(list((cache / "mfbench" / "tokenizers").glob("*.json"))) == 1
    for out in outs:
        s = read_summary(out / "summary.json")
        assert s.source == "measured" and s.steps == 3 and s.final_loss is not None and math.isfinite(s.final_loss)
        assert s.provenance["workload"]["name"] == "base" and s.provenance["workload"]["steps"] == 3
        assert s.provenance["command"] == f"mfbench run tiny-lora.yaml --steps 3 --out {out.name}"
        assert json.loads((out / "trace.chrome.json").read_text())["traceEvents"]
        assert (out / "adapter_model.safetensors").is_file()
        events = read_trace(out / "trace.jsonl")
        samples = [e for e in events if e["type"] == "sample"]  # memory over time
        assert samples and all(0 < e["rss"] <= s.peak_memory_bytes and e["battery"] is None for e in samples)
        # op events: each region of the first 3 steps, in order, inside its step (as the simulator's)
        steps = [e for e in events if e["type"] == "step"]
        for k, step in enumerate(steps):
            begin = step["t"] - step["duration"]
            ops = [e for e in events if e["type"] == "op" and begin <= e["start"] < step["t"]]
            assert [e["name"] for e in ops] == ["embed.forward", "block0.forward", "block1.forward", "head.forward",
                                                "block1.backward", "block0.backward", "update.grad_norm.update",
                                                "update.lora.update"]
            assert [e["shard"] for e in ops] == ["embed", "block0", "block1", "head", "block1", "block0", None, None]
            assert all(e["start"] + e["duration"] <= step["t"] + 1e-9 and e["bytes"] is None for e in ops)
            assert 0.5 * step["duration"] < sum(e["duration"] for e in ops) <= step["duration"]
    # same seed, same data: the same run
    assert read_summary(outs[0] / "summary.json").final_loss == read_summary(outs[1] / "summary.json").final_loss


# ----------------------------------------------------------------------- shipped workloads (slow)

@pytest.mark.slow
def test_every_paper_workload_runs_or_says_why(tmp_path):
    rows = []
    for path in sorted((REPO / "workloads" / "paper").glob("*.yaml")):
        r = cli(path, "--steps", 3, "--out", tmp_path / path.stem, cwd=tmp_path, cache=tmp_path / "cache")
        errors = [line for line in r.stderr.splitlines() if line.startswith("mfbench: error:")]
        if r.returncode == 0:
            s = read_summary(tmp_path / path.stem / "summary.json")
            assert s.steps == 3 and math.isfinite(s.final_loss)
            outcome = (f"ran: loss {s.final_loss:.3f}, median step {s.median_step_s:.2f} s, "
                       f"peak {s.peak_memory_bytes / 2**20:,.0f} MB")
        else:
            assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
            # said by `mfbench run` about the workload: the trainer rejecting a run.json is a bug here
            assert errors[0].startswith(f"mfbench: error: {path}: "), r.stderr
            outcome = "exit 2: " + errors[0].removeprefix("mfbench: error: ")
        rows.append((path.stem, outcome))
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {outcome}" for name, outcome in rows))
