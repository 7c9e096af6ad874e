"""The contracts between prediction and measurement (docs/contracts.md), held by both sides:
the Python step program and the native trainer's plan, built independently from the same
workload, are the same bytes; and a native run's peak RSS is its planned peak plus the
runtime overhead this host's profile states."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mfbench import plan
from mfbench.device import run as runner
from mfbench.device.native import run_trainer
from mfbench.spec import models
from mfbench.spec.workload import load_workload
from mfbench.units import MB

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 301, "n_positions": 32},
    # untied head: params.embed holds an lm_head of its own
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 301, "max_position_embeddings": 64,
              "tie_word_embeddings": False},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 301,
                    "max_position_embeddings": 64, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"]},
}
TARGETS = {"gpt2": ["attn.c_attn", "mlp.c_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
           "gemma3_text": ["q_proj", "o_proj", "up_proj"]}


def workload_file(folder: Path, family: str, method: str, micro_batch: int, ce_chunk_rows, memory=None) -> Path:
    model = folder / f"tiny-{family}"  # a folder name no registry model has
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY[family]))
    kind = {"kind": "full"} if method == "full" else {"kind": "lora", "rank": 4, "alpha": 8, "targets": TARGETS[family]}
    memory = {"ce_chunk_rows": ce_chunk_rows, **(memory or {})}
    tag = "-".join(str(v.get("policy", "") + str(v.get("k", ""))) if isinstance(v, dict) else str(v)
                   for v in memory.values())
    path = folder / f"{family}-{method}-{micro_batch}-{tag}.yaml"
    path.write_text(json.dumps({"name": path.stem, "model": model.name, "method": kind, "seq_len": 8, "batch": 8,
                                "micro_batch": micro_batch, "threads": 2, "steps": 1,
                                "memory": memory}))  # JSON is YAML
    return path


def test_python_plan_equals_the_trainers_byte_for_byte(tmp_path):
    """Three families x Full-FT/LoRA x micro-batch 1/2/8 x the loss chunked (5 rows) or whole
    (every row of the micro-batch): mfbench.plan and mfbench-train --plan print the same JSON."""
    cases = list(itertools.product(TINY, ["full", "lora"], [1, 2, 8], [5, 0]))
    for family, method, micro_batch, chunk in cases:
        path = workload_file(tmp_path, family, method, micro_batch, chunk)
        spec = runner.resolve(path, out=tmp_path / "runs" / path.stem, progress=False)
        native = run_trainer(["--workload", tmp_path / "runs" / path.stem / "run.json", "--plan"]).stdout
        python = plan.compile_program(load_workload(path), base_dir=tmp_path, threads=spec["threads"]).to_json()
        assert native == python, (family, method, micro_batch, chunk)
        program = json.loads(python)
        assert program["micro_batches"] == 8 // micro_batch and program["ce_chunk_rows"] == min(chunk or 64, micro_batch * 8)
    # and through the command line, as a user compares them
    cli = subprocess.run([sys.executable, "-m", "mfbench.cli", "plan", "--json", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert cli.returncode == 0 and cli.stdout == native


def test_frozen_dtype_plans_equal_and_halve_the_params(tmp_path):
    """LoRA with frozen weights in bfloat16 / float16: both sides plan the same bytes, every
    params.<shard> holds half the bytes of the float32 plan, and scratch.weight (the largest
    block weight, widened for use) is the only buffer added."""
    for family, dtype in itertools.product(TINY, ["bfloat16", "float16"]):
        plans = {}
        for frozen in ("float32", dtype):
            path = workload_file(tmp_path, family, "lora", 2, 5, {"frozen_dtype": frozen})
            spec = runner.resolve(path, out=tmp_path / "runs" / path.stem, progress=False)
            native = run_trainer(["--workload", tmp_path / "runs" / path.stem / "run.json", "--plan"]).stdout
            python = plan.compile_program(load_workload(path), base_dir=tmp_path, threads=spec["threads"]).to_json()
            assert native == python, (family, frozen)
            plans[frozen] = {b["name"]: b["bytes"] for b in json.loads(native)["buffers"]}
        f32, half = plans["float32"], plans[dtype]
        params = [n for n in f32 if n.startswith("params.")]
        assert len(params) == 3 and all(half[n] * 2 == f32[n] for n in params), family
        C = TINY[family].get("n_embd") or TINY[family]["hidden_size"]
        widest = C * TINY[family].get("intermediate_size", 4 * C)  # the MLP's up projection, in every family here
        assert half["scratch.weight"] == 4 * widest
        assert {n: b for n, b in half.items() if n not in params} == {**{n: b for n, b in f32.items() if n not in params},
                                                                     "scratch.weight": 4 * widest}


EVERY_BLOCK, EVERY_2 = {"policy": "every_block"}, {"policy": "every_k", "k": 2}
MEMORY_OPTIONS = [  # a covering set: each option with each family and method, not the full product
    ("full", {"checkpointing": EVERY_BLOCK}), ("lora", {"checkpointing": EVERY_BLOCK}),
    ("full", {"checkpointing": EVERY_2}), ("lora", {"checkpointing": EVERY_2, "attention": "memory_efficient"}),
    ("full", {"attention": "memory_efficient"}), ("lora", {"attention": "memory_efficient"}),
    ("full", {"checkpointing": EVERY_BLOCK, "attention": "memory_efficient"}),
]


def test_lora_dropout_plans_equal_and_add_one_scratch(tmp_path):
    """LoRA dropout: both sides plan the same bytes, and the only buffer added is
    scratch.lora_x, one micro-batch of the widest adapted input."""
    for family, config in TINY.items():
        plans = {}
        for dropout in (0.0, 0.1):
            path = workload_file(tmp_path, family, "lora", 2, 5)
            data = json.loads(path.read_text())
            data["method"]["dropout"] = dropout
            path = path.with_name(f"{path.stem}-dropout{dropout}.yaml")
            path.write_text(json.dumps(data))
            spec = runner.resolve(path, out=tmp_path / "runs" / path.stem, progress=False)
            native = run_trainer(["--workload", tmp_path / "runs" / path.stem / "run.json", "--plan"]).stdout
            python = plan.compile_program(load_workload(path), base_dir=tmp_path, threads=spec["threads"]).to_json()
            assert native == python, (family, dropout)
            plans[dropout] = {b["name"]: b["bytes"] for b in json.loads(native)["buffers"]}
        widest = max(m.fan_in for m in models.modules(models.arch(config))
                     if m.layer is not None and any(m.name == t or m.name.endswith("." + t) for t in TARGETS[family]))
        assert {k: v for k, v in plans[0.1].items() if k not in plans[0.0]} == {"scratch.lora_x": 2 * 8 * widest * 4}
        assert all(plans[0.1][k] == v for k, v in plans[0.0].items())


@pytest.mark.parametrize("family", list(TINY))
def test_python_plan_equals_the_trainers_with_checkpointing_and_memory_efficient_attention(tmp_path, family):
    """Activation checkpointing (every block; every 2nd: block 0 of 2) and memory-efficient
    attention, alone and together, Full-FT and LoRA, two micro-batches of 4: the same bytes
    on both sides, and each option changes the plan (recomputed buffers, recompute ops,
    attn.lse for attn.probs)."""
    for method, memory in MEMORY_OPTIONS:
        path = workload_file(tmp_path, family, method, 4, 5, memory)
        spec = runner.resolve(path, out=tmp_path / "runs" / path.stem, progress=False)
        assert spec["memory"]["checkpointing"] == memory.get("checkpointing", {"policy": "none"})
        assert spec["memory"]["attention"] == memory.get("attention", "standard")
        native = run_trainer(["--workload", tmp_path / "runs" / path.stem / "run.json", "--plan"]).stdout
        python = plan.compile_program(load_workload(path), base_dir=tmp_path, threads=spec["threads"]).to_json()
        assert native == python, (family, method, memory)
        program = json.loads(python)
        names = {b["name"]: b["lifetime"] for b in program["buffers"]}
        checkpointing = memory.get("checkpointing")
        assert ("recompute" in {op["phase"] for op in program["ops"] if op["kind"] == "attention"}) == bool(checkpointing)
        if checkpointing:
            assert names["block0.attn.out"] == "recomputed" and names["block0.x"] == "kept"
            assert names["block1.attn.out"] == ("recomputed" if checkpointing == EVERY_BLOCK else "kept")
        efficient = memory.get("attention") == "memory_efficient"
        assert ("block1.attn.lse" in names) == efficient and ("block1.attn.probs" in names) != efficient
    plain = workload_file(tmp_path, family, "full", 4, 5)
    spec = runner.resolve(plain, out=tmp_path / "runs" / "plain", progress=False)
    assert run_trainer(["--workload", tmp_path / "runs" / "plain" / "run.json", "--plan"]).stdout != native


def test_the_plan_changes_when_the_trainer_would_allocate_differently(tmp_path):
    """The comparison can fail: a workload the trainer plans differently (another chunk size,
    another thread count) gives different bytes."""
    path = workload_file(tmp_path, "gpt2", "lora", 2, 5)
    runner.resolve(path, out=tmp_path / "run", progress=False)
    native = run_trainer(["--workload", tmp_path / "run" / "run.json", "--plan"]).stdout
    workload = load_workload(path)
    assert plan.compile_program(workload, base_dir=tmp_path, threads=2).to_json() == native
    assert plan.compile_program(workload, base_dir=tmp_path, threads=1).to_json() != native
    other = workload.model_copy(update={"memory": workload.memory.model_copy(update={"ce_chunk_rows": 6})})
    assert plan.compile_program(other, base_dir=tmp_path, threads=2).to_json() != native


@pytest.mark.parametrize("name, frozen_dtype", [("gpt2-full-seq128", None), ("gpt2-lora-seq128", None),
                                               ("gpt2-lora-seq128", "bfloat16")])
def test_measured_peak_rss_is_the_predicted_peak(tmp_path, name, frozen_dtype):
    """GPT-2 small at batch 8 x 128 (random init, one step): the trainer's peak RSS is the
    simulator's predicted peak on the `host` profile (planned buffers + the profile's stated
    runtime overhead) within 3 %. Also with LoRA's frozen weights in bfloat16 (initialised
    through scratch.weight, so no fp32 copy of a weight ever exists)."""
    import yaml

    from mfbench import sim
    path = ROOT / "workloads" / "paper" / f"{name}.yaml"
    if frozen_dtype:  # the paper workload with memory.frozen_dtype set
        data = yaml.safe_load(path.read_text())
        data.setdefault("memory", {})["frozen_dtype"] = frozen_dtype
        path = tmp_path / f"{name}-{frozen_dtype}.yaml"
        path.write_text(json.dumps(data))
    measured, _ = runner.run(path, steps=1, out=tmp_path / "out")
    predicted, _ = sim.simulate(path, "host", steps=1, progress=False)
    assert predicted.provenance["workload"]["threads"] == measured.details["threads"]  # the same plan
    assert measured.details["plan"]["total_bytes"] == plan.compile_program(
        load_workload(path), base_dir=path.parent, threads=measured.details["threads"]).peak_bytes()
    error = (predicted.peak_memory_bytes - measured.peak_memory_bytes) / measured.peak_memory_bytes
    assert abs(error) <= 0.03, f"predicted {predicted.peak_memory_bytes:,} vs measured {measured.peak_memory_bytes:,}"


@pytest.mark.parametrize("memory", [{"checkpointing": {"policy": "every_block"}}, {"attention": "memory_efficient"}])
def test_measured_peak_rss_follows_the_replayed_peak_with_memory_options(tmp_path, memory):
    """GPT-2 small Full-FT at batch 8 x 128, one step, with every block checkpointed or with
    memory-efficient attention: the trainer reports the plan's replayed peak (below the sum of
    its buffer table when checkpointing: recomputed buffers share memory), and its peak RSS is
    that peak plus the host profile's runtime overhead within 3 %."""
    import yaml

    from mfbench.spec.profile import load_device
    source = ROOT / "workloads" / "paper" / "gpt2-full-seq128.yaml"
    data = yaml.safe_load(source.read_text())
    data.update(name="gpt2-full-seq128-memory", memory=memory)
    path = tmp_path / "workload.yaml"
    path.write_text(yaml.safe_dump(data))
    measured, _ = runner.run(path, steps=1, out=tmp_path / "out")
    threads = measured.details["threads"]
    program = plan.compile_program(load_workload(path), base_dir=source.parent, threads=threads)
    plain = plan.compile_program(load_workload(source), base_dir=source.parent, threads=threads)
    assert measured.details["plan"]["peak_bytes"] == program.peak_bytes()
    if "checkpointing" in memory:
        assert program.peak_bytes() < measured.details["plan"]["total_bytes"]
    overhead = load_device("host").ram.runtime_overhead_mb.value * 2**20
    expected = program.peak_bytes() + overhead
    assert program.peak_bytes() < plain.peak_bytes()  # the option saves memory
    error = (expected - measured.peak_memory_bytes) / measured.peak_memory_bytes
    print(f"{memory}: planned {expected:,} (plain {plain.peak_bytes() + overhead:,}) measured {measured.peak_memory_bytes:,}")
    assert abs(error) <= 0.03, f"planned {expected:,} vs measured {measured.peak_memory_bytes:,}"


def test_the_trainers_flag_defaults_are_the_workload_schemas(tmp_path):
    """A flag run that leaves everything to the trainer trains what a workload that leaves
    everything to the schema describes: its steps, learning rate and schedule, clipping."""
    from mfbench.contracts.trace import read_summary, read_trace
    from mfbench.device.data import write_token_file
    from mfbench.spec.workload import Optimizer, Workload
    (tmp_path / "config.json").write_text(json.dumps(TINY["gpt2"]))
    write_token_file(tmp_path / "t.tok", [i % 301 for i in range(400)], 301)
    run_trainer(["--config", tmp_path / "config.json", "--data", tmp_path / "t.tok", "--seq-len", 8, "--batch", 2,
                 "--out", tmp_path / "out", "--no-save", "--quiet"])
    steps = [e for e in read_trace(tmp_path / "out" / "trace.jsonl") if e["type"] == "step"]
    assert read_summary(tmp_path / "out" / "summary.json").steps == Workload.model_fields["steps"].default
    assert {e["lr"] for e in steps} == {Optimizer().lr}  # constant, no warm-up
    assert all(e["grad_norm"] is not None for e in steps) and Optimizer().grad_clip is not None


SHARDING_OPTIONS = [  # budgets fit the tiny models' shards (about 40 to 80 KB each)
    ("lora", {"sharding": {"policy": "lru", "budget_mb": 0.1}}),
    ("lora", {"sharding": {"policy": "prefetch", "budget_mb": 0.1, "ahead": 2}, "frozen_dtype": "bfloat16"}),
    ("full", {"sharding": {"policy": "lru", "budget_mb": 0.15}}),
    ("full", {"sharding": {"policy": "prefetch", "budget_mb": 0.2}, "offload": ["gradients"], "checkpointing": EVERY_BLOCK}),
    ("full", {"sharding": {"policy": "lru", "budget_mb": 0.2}, "offload": ["optimizer", "gradients"],
              "attention": "memory_efficient"}),
    ("full", {"offload": ["optimizer"]}),
]


@pytest.mark.parametrize("family", list(TINY))
def test_python_plan_equals_the_trainers_with_sharding_and_offload(tmp_path, family):
    """Parameter sharding (lru, prefetch) and offload of the optimizer and the gradients, with
    the other memory options: the same bytes on both sides; the io ops keep the resident shard
    parts within the budget, move each part's exact bytes, and leave nothing resident."""
    for method, memory in SHARDING_OPTIONS:
        path = workload_file(tmp_path, family, method, 4, 5, memory)
        spec = runner.resolve(path, out=tmp_path / "runs" / path.stem, progress=False)
        native = run_trainer(["--workload", tmp_path / "runs" / path.stem / "run.json", "--plan"]).stdout
        program = plan.compile_program(load_workload(path), base_dir=tmp_path, threads=spec["threads"])
        assert native == program.to_json(), (family, method, memory)
        buffers = {b.name: b for b in program.buffers}
        offload = memory.get("offload", [])
        assert ("optimizer.m" in buffers) != ("optimizer" in offload) and ("scratch.moments" in buffers) == (
            "optimizer" in offload)
        sharded = {n: b.bytes for n, b in buffers.items() if b.lifetime == "sharded"}
        budget = memory["sharding"]["budget_mb"] * MB if "sharding" in memory else None
        assert ("grads.block0" in sharded) == ("gradients" in offload)
        assert ("params.block0" in sharded) == (budget is not None)
        resident: set[str] = set()
        for op in program.ops:
            if ".optimizer." in op.name:  # offloaded moments: streamed by the update, no part of RAM
                assert op.io_bytes == 2 * program.shards[op.shard] and not op.alloc
            elif op.kind in ("load", "zero"):
                assert op.alloc[0] not in resident and op.io_bytes == (sharded[op.alloc[0]] if op.kind == "load" else 0)
                resident.add(op.alloc[0])
                assert sum(sharded[p] for p in resident) <= budget
            elif op.kind == "evict":
                resident.remove(op.free[0])
            elif op.kind == "store":
                assert op.io_bytes == sharded[op.name.split(".", 2)[2]]
            elif op.phase != "io" and op.shard is not None and budget is not None:
                assert f"params.{op.shard}" in resident, op.name  # every op finds its shard in RAM
        assert not resident
        moments = [op for op in program.ops if ".optimizer." in op.name]
        assert len(moments) == (2 * (TINY[family].get("n_layer", 2) + 1) if "optimizer" in offload else 0)
