"""mfbench.models against independent references: transformers models built from the same
config on the meta device (nothing downloaded), peft's LoRA, and closed forms."""
import inspect
import json

import pytest
import torch
import transformers

from mfbench.errors import InputError
from mfbench.spec import models

transformers.logging.set_verbosity_error()


def hf_model(config: dict):
    """The transformers causal LM of a config dict, on the meta device."""
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


TINY = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 97, "n_positions": 32,
             "bos_token_id": 0, "eos_token_id": 0},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 97, "tie_word_embeddings": True},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 96, "vocab_size": 97},
}


@pytest.mark.parametrize("name", models.model_names())
def test_registry_tensors_equal_transformers(name):
    config = models.get_config(name)
    hf = [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in hf_model(config).named_parameters()]
    ours = [(t.name, t.shape, t.dtype) for t in models.parameters(config, dtype=models.checkpoint_dtype(config))]
    assert ours == hf
    assert models.param_count(config) == sum(p.numel() for p in hf_model(config).parameters())


def test_known_parameter_totals():
    assert models.param_count("gpt2") == 124_439_808
    assert models.param_count("gemma-3-270m") == 268_098_176
    assert models.param_count("qwen2.5-0.5b") == 494_032_768


@pytest.mark.parametrize("config", [
    {**TINY["gpt2"], "tie_word_embeddings": False, "n_inner": 80},
    {**TINY["qwen2"], "tie_word_embeddings": False},
    {**TINY["gemma3_text"], "attention_bias": True, "tie_word_embeddings": False},
], ids=["gpt2-untied", "qwen2-untied", "gemma3-bias-untied"])
def test_variants_equal_transformers(config):
    hf = [(n, tuple(p.shape)) for n, p in hf_model(config).named_parameters()]
    assert [(t.name, t.shape) for t in models.parameters(config)] == hf


@pytest.mark.parametrize("family,cls", [("gpt2", "GPT2Config"), ("qwen2", "Qwen2Config"),
                                        ("gemma3_text", "Gemma3TextConfig")])
def test_defaults_are_transformers_defaults(family, cls):
    signature = inspect.signature(getattr(transformers, cls).__init__).parameters
    for field, value in models.DEFAULTS[family].items():
        assert signature[field].default == value, field


def test_config_paths(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY["qwen2"]))
    assert models.get_config("m", base=tmp_path) == TINY["qwen2"]
    assert models.get_config(tmp_path / "m" / "config.json") == TINY["qwen2"]
    multimodal = {"model_type": "gemma3", "text_config": TINY["gemma3_text"]}
    (tmp_path / "mm.json").write_text(json.dumps(multimodal))
    assert models.arch(models.get_config(tmp_path / "mm.json")).family == "gemma3_text"


@pytest.mark.parametrize("bad,expected", [("llama-7b", "unknown model 'llama-7b'"),
                                          ("nope/config.json", "unknown model")])
def test_unknown_models(bad, expected):
    with pytest.raises(InputError, match=expected):
        models.get_config(bad)


def test_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="unknown model family 'llama'"):
        models.get_config(tmp_path)


# --------------------------------------------------------------------------------- LoRA

LORA_CASES = [
    ("gpt2", 8, ["attn.c_attn", "attn.c_proj"]),
    ("gpt2", 4, ["c_attn", "c_proj"]),             # peft's suffix match: c_proj hits attn and mlp
    ("gpt2", 16, ["c_fc"]),
    ("qwen2", 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("qwen2", 2, ["gate_proj", "up_proj", "down_proj"]),
    ("gemma3_text", 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("gemma3_text", 3, ["layers.1.self_attn.v_proj"]),
]


@pytest.mark.parametrize("family,rank,targets", LORA_CASES)
def test_lora_equals_peft(family, rank, targets):
    import peft

    config = TINY[family]
    model = peft.get_peft_model(hf_model(config), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                  target_modules=targets))
    hf = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    adapters = models.lora(config, rank, targets)
    assert sorted((t.name, t.shape) for t in models.lora_parameters(config, adapters)) == sorted(hf)
    assert models.trainable_params(config, adapters) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_gpt2_reference_count():
    adapters = models.lora("gpt2", 8, ["attn.c_attn", "attn.c_proj"])
    assert models.trainable_params("gpt2", adapters) == 442_368


@pytest.mark.parametrize("targets,expected", [(["q_proj"], "matches no module"),
                                              (["ln_1"], "only the linears inside blocks"),
                                              (["lm_head"], "only the linears inside blocks")])
def test_lora_bad_targets(targets, expected):
    with pytest.raises(InputError, match=expected):
        models.lora("gpt2", 8, targets)


# ------------------------------------------------------------------------------- FLOPs

def test_flops_closed_forms_gpt2():
    """Per token for a tiny GPT-2 at sequence length T: 2*m*n*k per matmul, attention
    scores and values 2*T*C each; backward = 2x forward (Full-FT), 1x for frozen weights."""
    C, V, T = 64, 97, 16
    f = models.flops_per_token(TINY["gpt2"], T)
    assert f["block0.attn.c_attn"] == (2 * C * 3 * C, 4 * C * 3 * C)
    assert f["block1.attn.c_proj"] == (2 * C * C, 4 * C * C)
    assert f["block0.mlp.c_fc"] == (2 * C * 4 * C, 4 * C * 4 * C)
    assert f["block0.mlp.c_proj"] == (2 * 4 * C * C, 4 * 4 * C * C)
    assert f["block0.attn.scores"] == (2 * T * C, 4 * T * C)
    assert f["block0.attn.values"] == (2 * T * C, 4 * T * C)
    assert f["lm_head"] == (2 * C * V, 4 * C * V)
    # a whole Full-FT step: 6 N P (non-embedding matmul weights and head) plus attention
    matmul_params = 2 * (3 * C * C + C * C + 8 * C * C) + C * V
    total = sum(fw + bw for name, (fw, bw) in f.items() if name.split(".")[-1] in ("c_attn", "c_proj", "c_fc", "lm_head"))
    assert total == 6 * matmul_params
    frozen = models.lora(TINY["gpt2"], 4, ["attn.c_attn"])
    g = models.flops_per_token(TINY["gpt2"], T, adapters=frozen)
    assert g["block0.attn.c_attn"] == (2 * C * 3 * C, 2 * C * 3 * C)
    assert g["block0.attn.c_attn.lora_A"] == (2 * C * 4, 4 * C * 4)
    assert g["block0.attn.c_attn.lora_B"] == (2 * 4 * 3 * C, 4 * 4 * 3 * C)
    assert g["lm_head"] == (2 * C * V, 2 * C * V)


def test_flops_closed_forms_gqa():
    """Qwen-style GQA: k and v project to kv_heads * head_dim; scores use every query head."""
    c = TINY["qwen2"]
    C, F, T, hd = 64, 96, 8, 16
    f = models.flops_per_token(c, T)
    assert f["block0.self_attn.q_proj"][0] == 2 * C * C
    assert f["block0.self_attn.k_proj"][0] == 2 * C * 2 * hd
    assert f["block0.mlp.gate_proj"][0] == f["block0.mlp.up_proj"][0] == f["block0.mlp.down_proj"][0] == 2 * C * F
    assert f["block0.attn.scores"][0] == 2 * T * 4 * hd
    mem = models.flops_per_token(c, T, attention="memory_efficient")
    assert mem["block0.attn.scores"] == (2 * T * C, 6 * T * C)  # the backward recomputes the scores


def test_flops_match_torch_counter():
    """Matmul FLOPs of a tiny GPT-2 forward equal PyTorch's own FLOP counter (which counts
    matmuls and attention at 2*m*n*k and nothing else)."""
    from torch.utils.flop_counter import FlopCounterMode
    config, B, T = TINY["gpt2"], 2, 16
    cfg = transformers.AutoConfig.for_model(**config, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    ids = torch.zeros(B, T, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(ids)
    ours = sum(fw for name, (fw, bw) in models.flops_per_token(config, T).items()
               if name.split(".")[-1] in ("c_attn", "c_proj", "c_fc", "lm_head", "scores", "values")) * B * T
    assert ours == counter.get_total_flops()


def test_format_registry_lists_all():
    text = models.format_registry()
    for name in models.model_names():
        assert name in text
