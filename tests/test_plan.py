"""The step program against closed forms, and every shipped workload against its schema."""
import json
from pathlib import Path

import pytest

from mfbench import plan, shipped
from mfbench.errors import InputError
from mfbench.spec.workload import Workload, load_workload

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = sorted(p for p in (ROOT / "workloads").glob("*/*.yaml") if p.parent.name not in shipped.NOT_WORKLOADS)

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 4099, "n_positions": 64}
C, L, H, V = 64, 3, 4, 4099  # a vocabulary large enough that the peak is at the loss head


@pytest.fixture
def tiny(tmp_path):
    """A workload factory on a tiny GPT-2 given as a config.json path relative to the workload."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY_GPT2))

    def workload(**fields):
        base = dict(name="tiny", model="tiny", method={"kind": "full"}, seq_len=16, batch=4)
        return Workload.model_validate({**base, **fields})

    def make(**fields):
        return plan.compile_workload(workload(**fields), base_dir=tmp_path)
    make.workload, make.base = workload, tmp_path
    return make


def blocks_of(names, suffix):
    return list(dict.fromkeys(n.split(".")[1] for n in names if n.startswith("block") and n.endswith(suffix)))


def test_op_order(tiny):
    program = tiny(micro_batch=2, memory={"checkpointing": {"policy": "every_block"}})
    for mb in range(2):
        own = [op for op in program.ops if op.micro_batch == mb]
        names = [op.name.split(".", 1)[1] for op in own]
        assert names[0] == "embed.embed" and own[0].phase == "forward"
        assert names[-1] == "embed.embed" and own[-1].phase == "backward"
        forward = [op.name.split(".")[1] for op in own if op.phase == "forward" and op.layer is not None]
        backward = [op.name.split(".")[1] for op in own if op.phase == "backward" and op.layer is not None]
        assert list(dict.fromkeys(forward)) == ["block0", "block1", "block2"]
        assert list(dict.fromkeys(backward)) == ["block2", "block1", "block0"]
        head = [(n, op.phase) for n, op in zip(names, own) if n.startswith("head.")]
        assert head == [("head.ln_f", "forward"), ("head.lm_head", "forward"), ("head.lm_head", "backward"),
                        ("head.ln_f", "backward")]
        # each checkpointed block recomputes its forward right before its backward
        for b in range(L):
            first_backward = next(i for i, op in enumerate(own) if op.layer == b and op.phase == "backward")
            recompute = [i for i, op in enumerate(own) if op.layer == b and op.phase == "recompute" and op.kind != "norm"]
            assert recompute and max(recompute) < first_backward
            assert min(recompute) > max(i for i, op in enumerate(own) if op.layer == b + 1) if b + 1 < L else True
    # micro-batches run one after the other, then the update
    assert max(i for i, op in enumerate(program.ops) if op.micro_batch == 0) < \
        min(i for i, op in enumerate(program.ops) if op.micro_batch == 1)
    assert [op.name for op in program.ops if op.phase == "update"] == \
        ["update.grad_norm", "update.embed", "update.block0", "update.block1", "update.block2"]
    assert program.micro_batches == 2 and program.tokens_per_step == 64


def test_gpt2_block_is_the_trainers_kernel_sequence(tiny):
    """The order model.cpp's block_forward and block_backward call their kernels, LoRA ops
    right after their linear; norm outputs are applied again (recompute) before backward."""
    lora = tiny(method={"kind": "lora", "targets": ["attn.c_attn", "mlp.c_proj"]})
    block1 = [(op.name.split(".", 2)[2], op.phase) for op in lora.ops if op.layer == 1]
    f, b, r = "forward", "backward", "recompute"
    assert block1 == [
        ("ln_1", f), ("attn.c_attn", f), ("attn.c_attn.lora", f), ("attn.sdpa", f), ("attn.c_proj", f), ("ln_2", f),
        ("mlp.c_fc", f), ("mlp.act", f), ("mlp.c_proj", f), ("mlp.c_proj.lora", f),
        ("ln_2", r), ("mlp.c_proj", b), ("mlp.c_proj.lora", b), ("mlp.act", b), ("mlp.c_fc", b), ("ln_2", b),
        ("attn.c_proj", b), ("attn.sdpa", b), ("ln_1", r), ("attn.c_attn", b), ("attn.c_attn.lora", b), ("ln_1", b)]
    block0 = [(op.name.split(".", 2)[2], op.phase) for op in lora.ops if op.layer == 0]
    assert block0[-1] == ("attn.c_attn.lora", b)  # frozen embeddings: no input gradient below block 0
    assert [op.kind for op in lora.ops if op.layer == 1 and op.phase == f] == [
        "norm", "linear", "lora", "attention", "linear", "norm", "linear", "elementwise", "linear", "lora"]


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
    assert [(op.name, op.shard) for op in lora.ops if op.phase == "update"] == [("update.grad_norm", None),
                                                                                ("update.lora", None)]


def test_every_kernel_is_counted_once(tiny):
    """The ops' work is mfbench.spec.models' kernels, each once a phase (norm re-applications in
    backward are the norms' forward again), and attention and AdamW match closed forms."""
    from mfbench.spec import models
    B, T = 4, 16
    config = TINY_GPT2
    for fields, adapters in [({}, None), ({"method": {"kind": "lora", "targets": ["c_fc"]}},
                                          models.lora(config, 8, ["c_fc"]))]:
        for micro in (4, 2, 1):  # accumulation does not change the work of a step
            program = tiny(micro_batch=micro, **fields)
            kernels = [k for i in range(L) for k in models.block_kernels(config, i, micro, T, "standard", adapters)]
            kernels += models.embed_kernels(config, micro, T, adapters) + models.head_kernels(config, micro, T, adapters)
            expected = (B // micro) * sum(k.forward_flops + k.backward_flops for k in kernels)
            if adapters:  # the trainer skips block 0's ln_1 backward: nothing below it learns
                expected -= (B // micro) * kernels[0].backward_flops
            norms_again = sum(op.flops for op in program.ops if op.phase == "recompute")
            assert sum(op.flops for op in program.ops if op.phase != "update") - norms_again == pytest.approx(expected)
            sdpa = sum(op.flops for op in program.ops if op.op_class == "attention")
            attention = 3 * L * 2 * (2 * B * H * T * T * (C // H))
            assert sdpa == attention + L * B * H * T * T * 9  # softmax: 5 forward, 4 backward per score
    full = tiny()
    update = sum(op.flops for op in full.ops if op.phase == "update")
    assert update == 12 * full.trainable_params
    no_clip = tiny(optimizer={"grad_clip": None})
    assert sum(op.flops for op in no_clip.ops if op.phase == "update") == 10 * full.trainable_params


def test_recompute_is_the_forward_again(tiny):
    program = tiny(memory={"checkpointing": {"policy": "every_k", "k": 2}})  # blocks 0 and 2
    recomputed = {op.layer for op in program.ops if op.phase == "recompute" and op.kind != "norm"}
    assert recomputed == {0, 2}
    for layer in recomputed:
        forward = [op.flops for op in program.ops if op.layer == layer and op.phase == "forward"]
        again = [op.flops for op in program.ops if op.layer == layer and op.phase == "recompute"]
        assert again[:len(forward)] == forward  # then the norm re-applications of its backward
    names = {b.name: b.lifetime for b in program.buffers}
    assert names["block0.attn.qkv"] == names["block2.attn.probs"] == "recomputed"
    assert names["block1.attn.qkv"] == names["block0.x"] == "kept"


def live_after(program, name, phase="forward"):
    """Kept bytes alive after the first op called `name` in `phase` ends."""
    live = 0
    for op, (alloc, free) in zip(program.ops, program.memory_deltas):
        live += alloc - free
        if op.name == name and op.phase == phase:
            return live
    raise AssertionError(name)


def test_kept_bytes_closed_forms(tiny):
    """Kept after the last block's forward (GPT-2, Full-FT): per block its input, qkv, the
    attention output, the residual, the activation and its derivative (14 N C), the two
    norms' mean and rstd (4 N) and the probabilities B H T T; then the head's input N C.
    Memory-efficient attention keeps B H T log-sum-exp rows instead of the probabilities;
    with every block checkpointed only the inputs stay."""
    B, T = 4, 16
    N = B * T
    last = f"mb0.block{L - 1}.mlp.c_proj"
    for fields, per_block in [({}, 14 * N * C + 4 * N + B * H * T * T),
                              ({"memory": {"attention": "memory_efficient"}}, 14 * N * C + 4 * N + B * H * T),
                              ({"memory": {"checkpointing": {"policy": "every_block"}}}, N * C)]:
        assert live_after(tiny(**fields), last) == 4 * (L * per_block + N * C)
    # LoRA on c_attn only: no activation output (mlp.c_proj frozen), x A kept per adapted linear
    lora = tiny(method={"kind": "lora", "rank": 4, "targets": ["c_attn"]})
    assert live_after(lora, last) == 4 * (L * (10 * N * C + 4 * N + B * H * T * T + 4 * N) + N * C)


def test_every_kept_buffer_is_freed_once_a_micro_batch(tiny):
    for fields in ({}, {"micro_batch": 1}, {"method": {"kind": "lora", "targets": ["c_attn", "c_proj"]}},
                   {"memory": {"checkpointing": {"policy": "every_block"}, "ce_chunk_rows": 8,
                               "attention": "memory_efficient"}}):
        program = tiny(**fields)
        lives = {b.name: {"kept": 1, "recomputed": 2}[b.lifetime] for b in program.buffers
                 if b.lifetime in ("kept", "recomputed")}  # recomputed: once after forward, again after backward
        for mb in range(program.micro_batches):
            ops = [op for op in program.ops if op.micro_batch == mb]
            freed = [n for op in ops for n in op.free]
            assert sorted(freed) == sorted(n for n, times in lives.items() for _ in range(times))
            live: set[str] = set()
            for op in ops:  # allocated before freed, never twice while alive
                assert not live & set(op.alloc)
                live |= set(op.alloc)
                assert set(op.free) <= live
                live -= set(op.free)
            assert not live
        assert sum(a for a, _ in program.memory_deltas) == sum(f for _, f in program.memory_deltas)


def test_logits_chunk_rows(tiny):
    B, T = 4, 16
    logits = {r: tiny(memory={"ce_chunk_rows": r}).sizes["head.logits"] for r in (0, 8, 1000, "auto")}
    assert logits[0] == logits[1000] == 4 * B * T * V  # all rows; a chunk larger than the batch is the batch
    assert logits[8] == 4 * 8 * V
    assert logits["auto"] == 4 * min(B * T, max(128, 8 * 2**20 // V)) * V
    assert plan.chunk_rows("auto", 4096, 262144) == 128 and plan.chunk_rows("auto", 4096, 50257) == 166


def test_per_thread_scratch_follows_the_threads(tiny):
    T = 16
    one, four = (plan.compile_workload(tiny.workload(), tiny.base, threads=n) for n in (1, 4))
    assert four.sizes["scratch.datt"] == 4 * one.sizes["scratch.datt"] == 4 * 4 * T * T
    assert four.peak_bytes() > one.peak_bytes()


def test_memory_savers_lower_the_peak(tiny):
    base = tiny().peak_bytes()
    assert tiny(memory={"checkpointing": {"policy": "every_block"}}).peak_bytes() < base
    assert tiny(memory={"attention": "memory_efficient"}).peak_bytes() < base
    assert tiny(micro_batch=1).peak_bytes() < base
    assert tiny(method={"kind": "lora", "targets": ["c_attn"]}).peak_bytes() < base
    assert tiny(memory={"ce_chunk_rows": 8}).peak_bytes() < tiny(memory={"ce_chunk_rows": 0}).peak_bytes()


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
    for expected in ("parameters", "gradients", "optimizer state", "kept for backward", "logits chunk",
                     f"planned peak {program.peak_bytes() / 2**20:,.1f}", f"{program.flops / 1e9:,.1f} GFLOP", "1,024"):
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
