"""The native trainer against docs/contracts.md: the run spec (--workload), the plan
(--plan), the summary and trace schema, flag defaults; and three bugs (LoRA seed with loaded
weights, per-thread scratch capacity, durable writes)."""
from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from native_fixtures import make_gpt2, random_token_file, trainer
from safetensors.torch import load_file

from mfbench.device.native import run_trainer, trainer_binary

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "kernels_native" / "src"
V = 101


@pytest.fixture(scope="module")
def binary() -> Path:
    return trainer_binary()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, binary) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "model", seed=0)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return random_token_file(tmp_path_factory.mktemp("data") / "plain.tok", 2000, V, seed=1)


# ------------------------------------------------------------------------------------------
# bug a: the seed reaches LoRA adapter init when weights are loaded


def test_seed_drives_lora_init_with_loaded_weights(tiny, tokens, tmp_path):
    def adapter(seed, name):
        out = tmp_path / name
        trainer("--model", tiny, "--data", tokens, "--seq-len", 8, "--batch", 2, "--steps", 0, "--method", "lora",
                "--seed", seed, "--out", out)
        return load_file(out / "adapter_model.safetensors")

    a1, a1b, a2 = adapter(1, "a1"), adapter(1, "a1b"), adapter(2, "a2")
    names = [n for n in a1 if "lora_A" in n]
    assert names
    for n in names:
        assert (a1[n] == a1b[n]).all(), n
        assert not (a1[n] == a2[n]).all(), n


# ------------------------------------------------------------------------------------------
# bug b: per-thread scratch never used by more threads than it was sized for


def test_attention_backward_respects_scratch_capacity(tmp_path):
    if shutil.which("g++") is None:
        pytest.fail("g++ not found: apt-get install g++")
    so = tmp_path / "liblayers.so"
    subprocess.run(["g++", "-std=c++17", "-O2", "-fopenmp", "-fPIC", "-shared", f"-I{SRC}",
                    '-DMFB_GEMM_BACKEND="portable"', str(SRC / "layers.cpp"), str(SRC / "gemm.cpp"),
                    str(REPO / "tests" / "native_layers_capi.cpp"), "-o", str(so)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(so))
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.c_set_threads.argtypes = [I]
    lib.c_attention_backward_scratch.argtypes = [P] * 4 + [I] + [P] * 5 + [I] * 8 + [F, I]

    B, T, H, KV, hd = 4, 48, 4, 4, 8
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B * T, 3 * H * hd)).astype(np.float32)
    dy = rng.standard_normal((B * T, H * hd)).astype(np.float32)
    probs = rng.random((B, H, T, T)).astype(np.float32)
    ld, ko, vo = 3 * H * hd, H * hd, 2 * H * hd

    def run(threads):
        lib.c_set_threads(threads)
        scratch = np.full(T * T + 4096, 7.0, np.float32)  # one thread's T x T, then a canary
        dqkv = np.zeros_like(qkv)
        base, dbase, f = qkv.ctypes.data, dqkv.ctypes.data, 4
        lib.c_attention_backward_scratch(dbase, dbase + ko * f, dbase + vo * f, scratch.ctypes.data, 1, dy.ctypes.data,
                                         base, base + ko * f, base + vo * f, probs.ctypes.data,
                                         B, T, H, KV, hd, ld, ld, H * hd, 0.3, 0)
        return dqkv, scratch[T * T:]

    one, canary1 = run(1)
    two, canary2 = run(2)
    assert (canary1 == 7.0).all()
    assert (canary2 == 7.0).all(), "a second thread wrote past the scratch sized for one"
    np.testing.assert_array_equal(two, one)


# ------------------------------------------------------------------------------------------
# bug c: durable writes (fsync of the file before its rename, of the folder after)


def test_outputs_are_fsynced_before_and_after_rename(tiny, tokens, tmp_path):
    if shutil.which("strace") is None:
        pytest.fail("strace not found: apt-get install strace")
    out = tmp_path / "out"
    log = tmp_path / "strace.log"
    cmd = ["strace", "-f", "-y", "-qq", "-o", str(log), "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
           str(trainer_binary()), "--model", str(tiny), "--data", str(tokens), "--seq-len", "8", "--batch", "2",
           "--steps", "1", "--method", "lora", "--out", str(out), "--threads", "1", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    calls = [line.split(None, 1)[1] if line[:1].isdigit() else line for line in log.read_text().splitlines()]
    renames = [i for i, c in enumerate(calls) if c.startswith("rename")]
    finals, moved = set(), set()  # moved: durable files renamed once already (staged, then committed)
    for i in renames:
        src, dst = re.findall(r'"([^"]*)"', calls[i])[:2]
        finals.add(Path(dst).name)
        before = [c for c in calls[:i] if c.startswith(("fsync(", "fdatasync(")) and f"<{src}>" in c]
        assert before or src in moved, f"{src} renamed without fsync"
        moved.add(dst)
        after = [c for c in calls[i + 1:] if c.startswith(("fsync(", "fdatasync(")) and f"<{Path(dst).parent}>" in c]
        assert after, f"folder of {dst} not fsynced after the rename"
    assert {"trace.jsonl", "summary.json", "adapter_model.safetensors", "adapter_config.json"} <= finals
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "summary.json", "trace.jsonl"]


# ------------------------------------------------------------------------------------------
# the run spec (--workload) and the summary and trace schema

SUMMARY_KEYS = {"schema", "source", "workload", "device", "steps", "tokens_per_step", "median_step_s",
                "step_tokens_per_s", "wall_s", "wall_tokens_per_s", "peak_memory_bytes", "energy_j", "j_per_token",
                "battery_start_pct", "battery_end_pct", "battery_drop_pct", "max_temperature_c", "io_read_bytes",
                "io_write_bytes", "final_loss", "killed", "kill_reason", "stop_reason", "provenance", "details"}
STEP_KEYS = {"type", "index", "t", "duration", "tokens", "loss", "lr", "grad_norm"}
SAMPLE_KEYS = {"type", "t", "rss", "battery", "current", "voltage", "temperature", "frequency",
               "peak_rss", "pss", "charging", "zones", "frequencies", "cpus"}


def run_spec(tiny: Path, tokens: Path, out: Path | None, **over) -> dict:
    spec = {"version": 1, "name": "tiny-lora", "model": {"config": str(tiny / "config.json"),
                                                        "weights": str(tiny / "model.safetensors")},
            "method": {"kind": "lora", "rank": 4, "alpha": 8.0, "targets": ["c_attn", "attn.c_proj"], "dropout": 0.0},
            "data": {"tokens": str(tokens)}, "seq_len": 8, "batch": 4, "micro_batch": 2, "steps": 3, "seed": 7,
            "threads": 1,
            "optimizer": {"name": "adamw", "lr": 0.001, "min_lr": 0.0, "weight_decay": 0.0, "beta1": 0.9,
                          "beta2": 0.999, "eps": 1e-08, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
            "memory": {"sharding": {"policy": "none"}, "checkpointing": {"policy": "none"}, "attention": "standard",
                       "ce_chunk_rows": 5},
            "scheduling": {"policy": "none"}, "out": None if out is None else str(out),
            "provenance": {"target": "pixel-test", "seed": 7, "workload": {"nested": [1, 2.5, None]}}}
    for key, value in over.items():  # "a.b" sets spec["a"]["b"]; value None deletes... unless kept via keep_none
        *parents, leaf = key.split(".")
        d = spec
        for p in parents:
            d = d[p]
        d[leaf] = value
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[dict]:
    return [e for e in events(out) if e["type"] == "step"]


def test_workload_trains_and_writes_the_schema(tiny, tokens, tmp_path):
    out = tmp_path / "out"
    spec = run_spec(tiny, tokens, out)
    r = run_trainer(["--workload", str(write_spec(tmp_path, spec)), "--quiet"])
    assert r.returncode == 0 and r.stderr == ""
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["schema"] == 1 and summary["source"] == "measured" and summary["workload"] == "tiny-lora"
    assert summary["device"] == "pixel-test"  # provenance.target
    assert summary["provenance"] == spec["provenance"]  # verbatim
    assert summary["steps"] == 3 and summary["tokens_per_step"] == 4 * 8
    assert summary["step_tokens_per_s"] == pytest.approx(32 / summary["median_step_s"])
    assert summary["wall_tokens_per_s"] == pytest.approx(3 * 32 / summary["wall_s"])
    step_events = steps(out)
    assert summary["wall_s"] >= sum(e["duration"] for e in step_events) * 0.999
    for k in ("energy_j", "j_per_token", "battery_start_pct", "battery_end_pct", "battery_drop_pct",
              "max_temperature_c", "kill_reason", "stop_reason"):
        assert summary[k] is None, k
    assert summary["io_read_bytes"] == 0 and summary["io_write_bytes"] == 0 and summary["killed"] is False
    assert summary["final_loss"] == step_events[-1]["loss"]
    d = summary["details"]
    assert {"threads", "gemm", "method", "trainable_params", "micro_batch", "micro_batches", "seq_len", "plan"} <= set(d)
    assert (d["threads"], d["method"], d["micro_batch"], d["micro_batches"], d["seq_len"]) == (1, "lora", 2, 2, 8)
    # LoRA rank 4 on c_attn [32 -> 96] and attn.c_proj [32 -> 32], 2 blocks
    assert d["trainable_params"] == 2 * 4 * ((32 + 96) + (32 + 32))
    plan = json.loads(run_trainer(["--workload", str(write_spec(tmp_path, spec)), "--plan"]).stdout)
    bytes_of = lambda *lts: sum(b["bytes"] for b in plan["buffers"] if b["lifetime"] in lts)
    assert d["plan"] == {"static_bytes": bytes_of("static"), "kept_bytes": bytes_of("kept", "recomputed"),
                         "scratch_bytes": bytes_of("scratch"), "total_bytes": bytes_of("static", "kept", "scratch",
                                                                                       "recomputed"),
                         # no checkpointing: every kept buffer is alive at the loss head
                         "peak_bytes": bytes_of("static", "kept", "scratch")}
    assert plan["ce_chunk_rows"] == 5 and plan["micro_batches"] == 2 and plan["threads"] == 1
    assert [e["index"] for e in step_events] == [0, 1, 2]
    for e in step_events:
        assert set(e) == STEP_KEYS and e["tokens"] == 32 and e["lr"] == 0.001 and e["grad_norm"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == ["c_attn", "attn.c_proj"]


def test_workload_equals_the_same_flags(tiny, tokens, tmp_path):
    """A run spec and the flags it stands for train the same numbers (seed, K, chunks, optimizer)."""
    spec = run_spec(tiny, tokens, tmp_path / "spec")
    run_trainer(["--workload", str(write_spec(tmp_path, spec)), "--quiet"])
    trainer("--model", tiny, "--data", tokens, "--seq-len", 8, "--batch", 2, "--accum", 2, "--steps", 3, "--seed", 7,
            "--method", "lora", "--lora-r", 4, "--lora-alpha", 8, "--lora-targets", "c_attn,attn.c_proj",
            "--lr", 0.001, "--ce-chunk-rows", 5, "--out", tmp_path / "flags")
    a, b = steps(tmp_path / "spec"), steps(tmp_path / "flags")
    assert [(e["loss"], e["lr"], e["grad_norm"]) for e in a] == [(e["loss"], e["lr"], e["grad_norm"]) for e in b]
    flag_summary = json.loads((tmp_path / "flags" / "summary.json").read_text())
    assert flag_summary["workload"] == "" and flag_summary["device"] == "local"
    assert flag_summary["provenance"]["command"].split()[1:3] == ["--model", str(tiny)]
    sa = load_file(tmp_path / "spec" / "adapter_model.safetensors")
    sb = load_file(tmp_path / "flags" / "adapter_model.safetensors")
    assert all((sa[k] == sb[k]).all() for k in sa)


def test_workload_random_init_and_no_outputs(tiny, tokens, tmp_path):
    spec = run_spec(tiny, tokens, None, **{"model.weights": None, "method": {"kind": "full"}, "steps": 1})
    r = run_trainer(["--workload", str(write_spec(tmp_path, spec)), "--quiet", "--dump-logits", str(tmp_path / "l.st")])
    assert r.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.st", "run.json"]


def spec_error(tmp_path: Path, spec: dict, *extra: str) -> str:
    r = run_trainer(["--workload", str(write_spec(tmp_path, spec)), *extra], check=False, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mfbench-train: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("override,field", [
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"memory.sharding": {"policy": "none", "budget_mb": 200}}, "unknown field 'memory.sharding.budget_mb'"),
    ({"optimizer.nesterov": True}, "unknown field 'optimizer.nesterov'"),
    ({"model.revision": "main"}, "unknown field 'model.revision'"),
    ({"method.use_dora": False}, "unknown field 'method.use_dora'"),
    ({"data.format": "jsonl"}, "unknown field 'data.format'"),
    ({"scheduling": {"policy": "none", "every_k_steps": 2}}, "unknown field 'scheduling.every_k_steps'"),
    ({"memory.sharding": {"policy": "fifo", "budget_mb": 200}},
     "memory.sharding.policy 'fifo' (expected none, lru or prefetch)"),
    ({"memory.sharding": {"policy": "lru"}}, "missing field 'memory.sharding.budget_mb'"),
    ({"memory.sharding": {"policy": "lru", "budget_mb": 200, "ahead": 2}}, "unknown field 'memory.sharding.ahead'"),
    ({"memory.sharding": {"policy": "prefetch", "budget_mb": 200, "ahead": 0}},
     "memory.sharding.ahead is 0 (expected an integer >= 1)"),
    ({"memory.offload": ["optimizer"]}, "memory.offload [\"optimizer\"] needs Full-FT (expected [] with method lora)"),
    ({"memory.offload": ["weights"]}, "memory.offload 'weights' (expected a list of optimizer, gradients)"),
    ({"memory.checkpointing": {"policy": "every_other"}}, "memory.checkpointing.policy 'every_other' (expected none, every_block or every_k)"),
    ({"memory.checkpointing": {"policy": "every_k"}}, "missing field 'memory.checkpointing.k'"),
    ({"memory.checkpointing": {"policy": "every_k", "k": 0}}, "memory.checkpointing.k is 0 (expected an integer >= 1)"),
    ({"memory.checkpointing": {"policy": "every_block", "k": 2}}, "unknown field 'memory.checkpointing.k'"),
    ({"scheduling": {"policy": "paper"}}, "scheduling.policy 'paper' needs a controller (expected --control stdio"),
    ({"memory.attention": "flash"}, "memory.attention 'flash' (expected standard or memory_efficient)"),
    ({"method.dropout": 1}, "method.dropout is 1 (expected a number >= 0 and < 1)"),
    ({"optimizer.name": "sgd"}, "optimizer.name 'sgd' is not supported"),
    ({"optimizer.schedule": "step"}, "optimizer.schedule 'step'"),
    ({"method.kind": "qlora"}, "method.kind 'qlora'"),
    ({"micro_batch": 3}, "micro_batch 3 does not divide batch 4"),
    ({"seq_len": "8"}, "seq_len is \"8\""),
    ({"version": 2}, "version 2"),
    ({"method.targets": ["nope"]}, "method.targets 'nope' matches no module"),
])
def test_run_spec_rejects_unknown_and_unsupported_fields(tiny, tokens, tmp_path, override, field):
    line = spec_error(tmp_path, run_spec(tiny, tokens, tmp_path / "out", **override))
    assert f"run.json: {field}" in line, line
    assert not (tmp_path / "out").exists()


def test_workload_allows_only_a_few_flags(tiny, tokens, tmp_path):
    spec = run_spec(tiny, tokens, None)
    assert "--lr cannot be combined with --workload" in spec_error(tmp_path, spec, "--lr", "0.1")
    assert "--no-save cannot be combined with --workload" in spec_error(tmp_path, spec, "--no-save")
    line = spec_error(tmp_path, {**spec, "model": {"config": str(tmp_path / "missing.json"), "weights": None}})
    assert "missing.json: cannot open" in line
    (tmp_path / "bad.json").write_text("{")
    r = run_trainer(["--workload", str(tmp_path / "bad.json")], check=False)
    assert r.returncode == 2 and "bad.json: not valid JSON" in r.stderr


# ------------------------------------------------------------------------------------------
# flag defaults (the workload schema's)


def test_flag_defaults_are_the_schema_defaults(tiny, tokens, tmp_path):
    common = ["--model", tiny, "--data", tokens, "--seq-len", 8, "--batch", 2, "--steps", 3, "--method", "lora"]
    trainer(*common, "--out", tmp_path / "default")
    trainer(*common, "--lr", 1e-4, "--schedule", "constant", "--grad-clip", 1.0, "--weight-decay", 0, "--warmup", 0,
            "--seed", 1234, "--out", tmp_path / "explicit")
    a, b = steps(tmp_path / "default"), steps(tmp_path / "explicit")
    assert [e["lr"] for e in a] == [1e-4] * 3
    assert [(e["loss"], e["grad_norm"]) for e in a] == [(e["loss"], e["grad_norm"]) for e in b]
    # the same run spec with no optimizer section and no seed: the schema's defaults
    spec = run_spec(tiny, tokens, tmp_path / "spec", **{"method.rank": 8, "method.alpha": 16.0, "micro_batch": 2,
                                                        "batch": 2, "memory.ce_chunk_rows": 16})
    del spec["optimizer"], spec["seed"]
    run_trainer(["--workload", str(write_spec(tmp_path, spec)), "--quiet"])
    assert [(e["loss"], e["lr"], e["grad_norm"]) for e in steps(tmp_path / "spec")] == \
        [(e["loss"], e["lr"], e["grad_norm"]) for e in a]
    # grad clip 0 is off: no grad-norm op in the plan, none in the trace
    trainer(*common, "--grad-clip", 0, "--out", tmp_path / "noclip")
    assert all(e["grad_norm"] is None for e in steps(tmp_path / "noclip"))


def test_ce_chunk_rows_default_is_auto_and_zero_is_all_rows(tmp_path, binary):
    from native_fixtures import gpt2_config

    gpt2_config(vocab_size=100_000, n_embd=8, n_head=2, n_positions=64).save_pretrained(tmp_path)
    plan = lambda *a: json.loads(run_trainer(["--config", str(tmp_path / "config.json"), "--seq-len", "32",
                                              "--batch", "8", "--threads", "1", "--plan", *map(str, a)]).stdout)
    N = 8 * 32
    assert plan()["ce_chunk_rows"] == min(N, max(128, 8388608 // 100_000)) == 128
    assert plan("--ce-chunk-rows", 0)["ce_chunk_rows"] == N
    assert plan("--ce-chunk-rows", 7)["ce_chunk_rows"] == 7
    assert plan("--ce-chunk-rows", 10_000)["ce_chunk_rows"] == N
    logits = {b["name"]: b["bytes"] for b in plan()["buffers"]}["head.logits"]
    assert logits == 128 * 100_000 * 4


# ------------------------------------------------------------------------------------------
# the plan (--plan)


def tiny_configs(tmp_path: Path) -> dict[str, Path]:
    from transformers import Gemma3TextConfig, GPT2Config, Qwen2Config

    configs = {
        "gpt2": GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4),
        "qwen2": Qwen2Config(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False),
        "gemma3_text": Gemma3TextConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, query_pre_attn_scalar=24, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    }
    out = {}
    for name, cfg in configs.items():
        cfg.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name / "config.json"
    return out


def lora_targets(family: str) -> str:
    return "c_attn,mlp.c_proj" if family == "gpt2" else "q_proj,v_proj,down_proj"


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_plan_table_and_ops(tmp_path, binary, family, method):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = tiny_configs(tmp_path)[family]
    B, T, K, P = 2, 8, 3, 2
    args = ["--config", str(config), "--seq-len", str(T), "--batch", str(B), "--accum", str(K), "--threads", str(P),
            "--method", method, "--plan"]
    if method == "lora":
        args += ["--lora-r", "4", "--lora-targets", lora_targets(family)]
    r = run_trainer(args)
    line = r.stdout
    assert line.endswith("\n") and line.count("\n") == 1
    plan = json.loads(line)
    assert line == json.dumps(plan, sort_keys=True, separators=(",", ":")) + "\n"  # byte format
    assert re.search(r"\d\.\d|e-?\d", line) is None  # no floats
    assert (plan["family"], plan["method"], plan["micro_batch"], plan["micro_batches"], plan["seq_len"],
            plan["threads"], plan["version"]) == (family, method, B, K, T, P, 1)

    buffers = {b["name"]: b for b in plan["buffers"]}
    assert len(buffers) == len(plan["buffers"])
    assert all(set(b) == {"bytes", "lifetime", "name", "shard"} for b in plan["buffers"])
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.parent))
    n_params = sum(p.numel() for p in hf.parameters())  # tied heads counted once
    params = [b for b in plan["buffers"] if b["name"].startswith("params.")]
    assert sum(b["bytes"] for b in params) == 4 * n_params
    L = hf.config.num_hidden_layers
    assert [b["name"] for b in params] == ["params.embed"] + [f"params.block{l}" for l in range(L)]
    assert all(b["shard"] == b["name"][7:] for b in params)
    blocks = hf.transformer.h if family == "gpt2" else hf.model.layers
    assert buffers["params.block1"]["bytes"] == 4 * sum(p.numel() for p in blocks[1].parameters())
    if method == "full":
        assert plan["trainable_params"] == n_params
        assert [buffers["grads." + b["shard"]]["bytes"] for b in params] == [b["bytes"] for b in params]
    else:
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(hf, LoraConfig(r=4, target_modules=lora_targets(family).split(",")))
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        assert plan["trainable_params"] == trainable
        assert buffers["lora.params"]["bytes"] == buffers["lora.grads"]["bytes"] == 4 * trainable
    assert buffers["optimizer.m"]["bytes"] == buffers["optimizer.v"]["bytes"] == 4 * plan["trainable_params"]
    assert buffers["tokens.inputs"]["bytes"] == 4 * K * B * T
    assert ("rope.cos" in buffers) == (family != "gpt2")
    lifetimes = [b["lifetime"] for b in plan["buffers"]]
    assert lifetimes == sorted(lifetimes, key=["static", "kept", "scratch"].index)  # in section order
    hd = hf.config.hidden_size // hf.config.num_attention_heads if family != "gemma3_text" else 16
    assert buffers["scratch.datt"]["bytes"] == 4 * P * T * T
    assert buffers["scratch.normpart"]["bytes"] == 4 * P * 2 * max(hf.config.hidden_size, hd)

    kept = {n for n, b in buffers.items() if b["lifetime"] == "kept"}
    assert all(b["shard"] is None for n, b in buffers.items() if n in kept)
    ops = plan["ops"]
    assert all(set(o) == {"alloc", "free", "io_bytes", "kind", "layer", "micro_batch", "name", "phase", "shard"} for o in ops)
    assert all(o["io_bytes"] == 0 for o in ops)  # no io without sharding or offload
    for m in range(K):
        mine = [o for o in ops if o["micro_batch"] == m]
        allocs = [n for o in mine for n in o["alloc"]]
        frees = [n for o in mine for n in o["free"]]
        assert sorted(allocs) == sorted(frees) == sorted(kept)  # each kept buffer: one alloc, one free
        if m == 0:  # the kept table is micro-batch 0's allocations, in order
            assert allocs == [b["name"] for b in plan["buffers"] if b["lifetime"] == "kept"]
        alive = set()
        for o in mine:
            assert all(o["name"].startswith(f"mb{m}.") for o in mine)
            alive |= set(o["alloc"])
            assert set(o["free"]) <= alive
            alive -= set(o["free"])
        assert not alive
    assert [o["micro_batch"] for o in ops] == sorted(o["micro_batch"] for o in ops if o["micro_batch"] >= 0) + \
        [-1] * sum(o["micro_batch"] == -1 for o in ops)
    updates = [o["name"] for o in ops if o["phase"] == "update"]
    assert updates == ["update.grad_norm"] + (["update.embed"] + [f"update.block{l}" for l in range(L)]
                                              if method == "full" else ["update.lora"])
    for o in ops:
        assert o["layer"] is None or o["shard"] == f"block{o['layer']}"
        if o["phase"] != "update":
            assert o["shard"] == ("embed" if o["layer"] is None else f"block{o['layer']}")
    lora_ops = [o for o in ops if o["kind"] == "lora"]
    assert bool(lora_ops) == (method == "lora")
    for o in lora_ops:  # right after its linear, same phase
        i = ops.index(o)
        assert ops[i - 1]["name"] + ".lora" == o["name"] and ops[i - 1]["phase"] == o["phase"]
    embed_backward = [o for o in ops if o["kind"] == "embedding" and o["phase"] == "backward"]
    assert len(embed_backward) == (K if method == "full" else 0)
