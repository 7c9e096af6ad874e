"""The step program against closed forms, and every shipped workload against its schema."""
import json
from pathlib import Path

import pytest

from mfbench import plan
from mfbench.errors import InputError
from mfbench.workload import Workload, load_workload

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = sorted(p for p in (ROOT / "workloads").glob("*/*.yaml") if p.parent.name != "sweeps")

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 4099, "n_positions": 64}
C, L, H, V = 64, 3, 4, 4099  # a vocabulary large enough that the peak is at the loss head


@pytest.fixture
def tiny(tmp_path):
    """A workload factory on a tiny GPT-2 given as a config.json path relative to the workload."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY_GPT2))

    def make(**fields):
        base = dict(name="tiny", model="tiny", method={"kind": "full"}, seq_len=16, batch=4)
        return plan.compile_workload(Workload.model_validate({**base, **fields}), base_dir=tmp_path)
    return make


def test_op_order(tiny):
    program = tiny(micro_batch=2, memory={"checkpointing": {"policy": "every_block"}})
    names = [op.name for op in program.ops]
    for mb in range(2):
        own = [n.split(".", 1)[1] for n in names if n.startswith(f"mb{mb}.")]
        blocks = [n.split(".")[0] for n in own if n.startswith("block")]
        forward = [b for b, n in zip(blocks, [n for n in own if n.startswith("block")]) if n.endswith(".forward")]
        backward = [b for b, n in zip(blocks, [n for n in own if n.startswith("block")]) if n.endswith(".backward")]
        assert own[0] == "embed.forward" and own[-1] == "embed.backward"
        assert list(dict.fromkeys(forward)) == ["block0", "block1", "block2"]
        assert list(dict.fromkeys(backward)) == ["block2", "block1", "block0"]
        head = own.index("head_loss.forward")
        assert own[head + 1] == "head_loss.backward"
        # each checkpointed block recomputes right before its backward
        for b in ("block0", "block1", "block2"):
            assert own.index(f"{b}.attn.recompute") < own.index(f"{b}.elementwise.backward")
    # micro-batches run one after the other, the update last
    assert names.index("mb0.embed.backward") < names.index("mb1.embed.forward")
    assert all(op.phase == "update" for op in program.ops[-(L + 2):])
    assert program.micro_batches == 2 and program.tokens_per_step == 64


def test_shards(tiny):
    program = tiny()
    assert set(program.shards) == {"embed", "block0", "block1", "block2"}
    assert program.shards["block1"] == 4 * (12 * C * C + 13 * C)  # c_attn, c_proj, c_fc, mlp.c_proj, 2 norms
    for op in program.ops:
        if op.layer is not None:
            assert op.shard == f"block{op.layer}"
        elif op.phase != "update":
            assert op.shard == "embed"
    # Full-FT updates shard by shard (a sharded run brings each in); LoRA adapters in one op
    assert {op.shard for op in program.ops if op.phase == "update"} == {None} | set(program.shards)
    lora = tiny(method={"kind": "lora", "targets": ["c_attn"]})
    assert [op.shard for op in lora.ops if op.phase == "update"] == [None, None]  # grad norm, AdamW


def test_flops_closed_forms(tiny):
    """Matmuls in blocks: 6 x tokens x weights for Full-FT, 4x for frozen (LoRA) weights;
    attention 3 x (2 matmuls of 2 B H T T hd); AdamW 10 and clipping 2 FLOPs a parameter."""
    B, T = 4, 16
    weights = L * 12 * C * C
    attention = 3 * L * 2 * (2 * B * H * T * T * (C // H))
    for fields, factor in [({}, 6), ({"method": {"kind": "lora", "targets": ["c_fc"]}}, 4)]:
        for micro in (4, 2, 1):  # accumulation does not change the work of a step
            program = tiny(micro_batch=micro, **fields)
            gemm = sum(op.flops for op in program.ops if op.op_class == "gemm" and op.layer is not None)
            assert gemm == factor * B * T * weights
            sdpa = sum(op.flops for op in program.ops if op.op_class == "attention")
            assert sdpa == attention + L * B * H * T * T * 9  # softmax: 5 forward, 4 backward per score
    full = tiny()
    update = sum(op.flops for op in full.ops if op.phase == "update")
    assert update == 12 * full.trainable_params
    no_clip = tiny(optimizer={"grad_clip": None})
    assert sum(op.flops for op in no_clip.ops if op.phase == "update") == 10 * full.trainable_params


def test_recompute_is_the_forward_again(tiny):
    program = tiny(memory={"checkpointing": {"policy": "every_k", "k": 2}})  # blocks 0 and 2
    recomputed = {op.layer for op in program.ops if op.recompute}
    assert recomputed == {0, 2}
    for layer in recomputed:
        forward = [op.flops for op in program.ops if op.layer == layer and op.phase == "forward"]
        again = [op.flops for op in program.ops if op.layer == layer and op.phase == "recompute"]
        assert forward == again
    assert all(op.phase == "recompute" for op in program.ops if op.recompute)


def test_activation_closed_forms(tiny):
    """Live bytes after the last block's forward: tokens and targets (int32), the embedding
    output, and per block 16 N C + 4 N + B H T T floats (GPT-2, Full-FT, standard attention);
    only the block outputs with every block checkpointed."""
    B, T = 4, 16
    N = B * T
    for fields, per_block in [({}, 16 * N * C + 4 * N + B * H * T * T),
                              ({"memory": {"attention": "memory_efficient"}}, 16 * N * C + 4 * N + B * H * T),
                              ({"memory": {"checkpointing": {"policy": "every_block"}}}, N * C)]:
        program = tiny(**fields)
        live = 0
        for op in program.ops:
            live += op.alloc - op.free
            if op.name == f"mb0.block{L - 1}.elementwise.forward":
                break
        assert live == 8 * N + 4 * (N * C + L * per_block)


def test_every_buffer_is_freed(tiny):
    for fields in ({}, {"micro_batch": 1}, {"method": {"kind": "lora", "targets": ["c_attn"]}},
                   {"memory": {"checkpointing": {"policy": "every_block"}, "ce_chunk_rows": 8,
                               "attention": "memory_efficient"}}):
        program = tiny(**fields)
        assert sum(op.alloc for op in program.ops) == sum(op.free for op in program.ops)


def test_logits_full_or_chunked(tiny):
    B, T = 4, 16
    full, chunked = tiny(), tiny(memory={"ce_chunk_rows": 8})
    assert full.extras["logits_bytes"] == 4 * B * T * V
    assert chunked.extras["logits_bytes"] == 4 * 8 * V
    assert held_at_head(full) - held_at_head(chunked) == 4 * (B * T - 8) * V


def held_at_head(program) -> int:
    """Most activation bytes held during a head_loss op."""
    live, held = 0, 0
    for op in program.ops:
        live += op.alloc
        if ".head_loss." in op.name:
            held = max(held, live + op.workspace)
        live -= op.free
    return held


def test_memory_savers_lower_the_peak(tiny):
    base = tiny().peak_activation_bytes()
    assert tiny(memory={"checkpointing": {"policy": "every_block"}}).peak_activation_bytes() < base
    assert tiny(memory={"attention": "memory_efficient"}).peak_activation_bytes() < base
    assert tiny(micro_batch=1).peak_activation_bytes() < base
    assert tiny(method={"kind": "lora", "targets": ["c_attn"]}).peak_activation_bytes() < base


def test_state_bytes(tiny):
    full = tiny()
    assert full.grad_bytes == 4 * full.trainable_params and full.optimizer_bytes == 8 * full.trainable_params
    assert full.param_bytes == sum(full.shards.values())
    lora = tiny(method={"kind": "lora", "rank": 4, "targets": ["c_attn"]})
    assert lora.trainable_params == L * 4 * (C + 3 * C)
    assert lora.param_bytes == sum(lora.shards.values()) + 4 * lora.trainable_params  # adapters stay resident


def test_gpt2_step_flops_match_the_reference_estimate():
    """REFERENCE_NUMBERS.md: a GPT-2 small Full-FT step at batch 8 x 128 is about 6 x P x tokens
    plus attention (3 x 4 B T^2 C per layer)."""
    program = plan.compile_workload(load_workload(ROOT / "workloads/paper/gpt2-full-seq128.yaml"))
    estimate = 6 * 124_439_808 * 1024 + 12 * 12 * 8 * 128 * 128 * 768
    assert program.flops == pytest.approx(estimate, rel=0.01)


def test_bad_lora_target_is_an_input_error(tiny):
    with pytest.raises(InputError, match="q_proj"):
        tiny(method={"kind": "lora", "targets": ["q_proj"]})


def test_format_plan(tiny):
    w = Workload.model_validate(dict(name="fmt", model="gpt2", method={"kind": "full"}, seq_len=128, batch=8))
    program = plan.compile_workload(w)
    text = plan.format_plan(program, w)
    assert text == plan.format_plan(program, w)
    peak = program.param_bytes + program.grad_bytes + program.optimizer_bytes + program.peak_activation_bytes()
    for expected in ("parameters", "gradients", "optimizer state", "activations", "logits",
                     f"peak estimate {peak / 2**20:,.1f}", f"{program.flops / 1e9:,.1f} GFLOP", "1,024"):
        assert expected in " ".join(text.split()), expected


# ------------------------------------------------------------------------- workloads

def test_workloads_shipped():
    names = {p.stem for p in WORKLOADS}
    for model in ("gpt2", "gpt2-medium", "gemma3-270m", "gemma3-1b", "qwen2.5-0.5b"):
        assert {f"{model}-lora-seq128", f"{model}-lora-seq256"} <= names
    assert "gpt2-full-seq128" in names
    assert {f"gemma3-270m-lora-seq128-accum-{a}" for a in ("4x2", "2x4", "1x8")} <= names
    assert {f"gpt2-lora-shard-{b}mb" for b in (200, 250, 650, 1200)} <= names
    assert len([n for n in names if "energy" in n]) >= 3
    assert len(list((ROOT / "workloads/examples").glob("*.yaml"))) >= 2


@pytest.mark.parametrize("path", WORKLOADS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_workload_validates_and_compiles(path):
    workload = load_workload(path)
    assert workload.name == path.stem
    program = plan.compile_workload(workload, base_dir=path.parent)
    assert program.tokens_per_step == workload.batch * workload.seq_len
    assert plan.format_plan(program, workload)
