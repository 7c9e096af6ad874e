"""Exact accounting of the models mfbench trains, from their HF `config.json` fields.

For a model: every parameter tensor (HF name, shape, dtype), the parameter count, its
shards, the work of every kernel of a training step (FLOPs and bytes moved, forward and
backward), and the trainable parameters of LoRA at any rank and target set (peft's naming
and matching). What a step holds in memory, buffer by buffer, is the step program's buffer
table (mfbench.plan, docs/contracts.md).

Families: GPT-2 (`gpt2`), Qwen 2 / 2.5 (`qwen2`), Gemma 3 text (`gemma3_text`). The trainer
computes and keeps everything in float32, except that LoRA may hold the frozen weights in
bfloat16 or float16 (`memory.frozen_dtype`), widened to float32 for each use.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mfbench.errors import InputError, did_you_mean

FLOAT = 4  # bytes of a float32: parameters, gradients, optimizer state and activations

# ------------------------------------------------------------------------------ registry
# config.json of each model as the HF hub has it (fields that do not change the network,
# like token ids and dropout, are kept so a registry entry is a faithful copy).

_GEMMA_270M_LAYERS = (["sliding_attention"] * 5 + ["full_attention"]) * 3

REGISTRY: dict[str, dict] = {
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "bos_token_id": 50256,
        "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "vocab_size": 50257,
    },
    "gpt2-medium": {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "bos_token_id": 50256,
        "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24, "n_positions": 1024,
        "n_special": 0, "predict_special_tokens": True, "vocab_size": 50257,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536,
        "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 131072,
        "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "gemma-3-270m": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "_sliding_window_pattern": 6,
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "bos_token_id": 2, "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "initializer_range": 0.02,
        "intermediate_size": 2048, "layer_types": _GEMMA_270M_LAYERS, "max_position_embeddings": 32768,
        "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": 512, "torch_dtype": "bfloat16", "use_bidirectional_attention": False,
        "use_cache": True, "vocab_size": 262144,
    },
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": None,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 262144,
    },
}

HUB_IDS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
           "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
           "gemma-3-270m": "google/gemma-3-270m", "gemma-3-1b": "google/gemma-3-1b-pt"}

FAMILIES = ("gpt2", "qwen2", "gemma3_text")


def model_names() -> list[str]:
    return list(REGISTRY)


def get_config(name_or_path: str | Path, base: str | Path | None = None) -> dict:
    """A model's config dict: a registry name, a config.json, or an HF folder holding one.
    Relative paths are resolved against `base` (the workload file's folder)."""
    name = str(name_or_path)
    if name in REGISTRY:
        return dict(REGISTRY[name])
    path = Path(name)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(None, None, f"unknown model {name!r}{did_you_mean(name, REGISTRY)}; known: {', '.join(REGISTRY)} "
                         "(or a path to an HF config.json or model folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, None, f"expected an HF config.json: {e}") from None
    if not isinstance(config, dict):
        raise InputError(path, None, "expected an HF config.json (a JSON object)")
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        config = {"model_type": "gemma3_text", **config["text_config"]}
    if config.get("model_type") not in FAMILIES:
        raise InputError(path, "model_type", f"unknown model family {config.get('model_type')!r}; "
                         f"known: {', '.join(FAMILIES)} (and gemma3 with a text_config)")
    return config


# ------------------------------------------------------------------------- architecture

# transformers' defaults for the fields a config.json may leave out (GPT2Config,
# Qwen2Config, Gemma3TextConfig); tests check them against the config classes.
DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_inner": None, "tie_word_embeddings": True, "add_cross_attention": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "max_position_embeddings": 131072, "tie_word_embeddings": True,
                    "attention_bias": False},
}
MAX_SIZE = 1 << 30  # the trainer's bound on every size field of a config.json (model.cpp)


@dataclass(frozen=True)
class Arch:
    """The shape of a model: everything the accounting needs from config.json."""
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    positions: int       # learned position embeddings (GPT-2); 0 for rotary models
    tied: bool           # the LM head is the token embedding
    qkv_bias: bool
    o_bias: bool
    max_positions: int   # the longest sequence the model takes (n_positions, max_position_embeddings)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def arch(config: dict | str) -> Arch:
    """The Arch of a config dict (or a registry name), checked as the native trainer checks
    it (model.cpp): sizes are positive integers, heads divide the width (or head_dim is
    given), query heads are whole groups of key/value heads, rotary heads have an even width."""
    if isinstance(config, str):
        config = get_config(config)
    family = config.get("model_type")
    if family not in FAMILIES:
        raise InputError(None, "model_type", f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    c = {**DEFAULTS[family], **config}

    def size(key: str) -> int:
        v = c.get(key)
        if v is None:
            raise InputError(None, key, f"missing (expected a positive integer in a {family} config.json)")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIZE:
            raise InputError(None, key, f"expected a positive integer up to 2^30, got {v!r}")
        return v

    def flag(key: str) -> bool:
        if not isinstance(c[key], bool):
            raise InputError(None, key, f"expected true or false, got {c[key]!r}")
        return c[key]

    def width(hidden_key: str, heads_key: str) -> int:
        hidden, heads = size(hidden_key), size(heads_key)
        if family != "gpt2" and c.get("head_dim") is not None:
            return size("head_dim")
        if hidden % heads:
            raise InputError(None, heads_key, f"{heads} heads do not divide {hidden_key} {hidden} "
                             f"(expected a divisor of {hidden}{'' if family == 'gpt2' else ', or head_dim'})")
        return hidden // heads

    if family == "gpt2":
        if flag("add_cross_attention"):
            raise InputError(None, "add_cross_attention", "GPT-2 with cross-attention is not a causal LM we train")
        hidden, heads = size("n_embd"), size("n_head")
        return Arch(family, size("vocab_size"), hidden, size("n_layer"), heads, heads, width("n_embd", "n_head"),
                    size("n_inner") if c["n_inner"] is not None else 4 * hidden, size("n_positions"),
                    flag("tie_word_embeddings"), True, True, size("n_positions"))
    heads = size("num_attention_heads")
    kv_heads = size("num_key_value_heads") if c.get("num_key_value_heads") is not None else heads
    if heads % kv_heads:
        raise InputError(None, "num_key_value_heads", f"{kv_heads} key/value heads do not divide "
                         f"num_attention_heads {heads} (expected whole groups of query heads)")
    head_dim = width("hidden_size", "num_attention_heads")
    if head_dim % 2:
        raise InputError(None, "head_dim", f"{head_dim} is odd (expected an even head width for the rotary embedding)")
    bias = family == "gemma3_text" and flag("attention_bias")
    return Arch(family, size("vocab_size"), size("hidden_size"), size("num_hidden_layers"), heads, kv_heads,
                head_dim, size("intermediate_size"), 0, flag("tie_word_embeddings"),
                family == "qwen2" or bias, bias, size("max_position_embeddings"))


# ------------------------------------------------------------------ modules and tensors

@dataclass(frozen=True)
class Module:
    """A module that owns parameters, named as in transformers (`transformer.h.3.attn.c_attn`)."""
    name: str
    kind: str            # embedding | linear | conv1d (GPT-2's, weight stored in x out) | layernorm | rmsnorm
    fan_in: int          # embedding: rows (vocabulary or positions); norms: width
    fan_out: int = 0     # embedding: width
    bias: bool = False
    layer: int | None = None

    @property
    def shard(self) -> str:
        return "embed" if self.layer is None else f"block{self.layer}"

    @property
    def suffix(self) -> str:
        """The name inside its block (`attn.c_attn`), or the whole name outside blocks."""
        return self.name.split(f".{self.layer}.", 1)[1] if self.layer is not None else self.name

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.kind == "embedding":
            return [("weight", (self.fan_in, self.fan_out))]
        if self.kind in ("layernorm", "rmsnorm"):
            return [("weight", (self.fan_in,))] + ([("bias", (self.fan_in,))] if self.kind == "layernorm" else [])
        weight = (self.fan_in, self.fan_out) if self.kind == "conv1d" else (self.fan_out, self.fan_in)
        return [("weight", weight)] + ([("bias", (self.fan_out,))] if self.bias else [])


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    shard: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]


def modules(a: Arch) -> list[Module]:
    """Every module that owns parameters, in transformers' registration order, and the LM
    head last (it owns no tensor of its own when tied)."""
    C, F, V = a.hidden, a.intermediate, a.vocab
    if a.family == "gpt2":
        mods = [Module("transformer.wte", "embedding", V, C), Module("transformer.wpe", "embedding", a.positions, C)]
        for i in range(a.layers):
            p = f"transformer.h.{i}."
            mods += [Module(p + "ln_1", "layernorm", C, layer=i),
                     Module(p + "attn.c_attn", "conv1d", C, 3 * C, True, i),
                     Module(p + "attn.c_proj", "conv1d", C, C, True, i),
                     Module(p + "ln_2", "layernorm", C, layer=i),
                     Module(p + "mlp.c_fc", "conv1d", C, F, True, i),
                     Module(p + "mlp.c_proj", "conv1d", F, C, True, i)]
        return mods + [Module("transformer.ln_f", "layernorm", C), Module("lm_head", "linear", C, V)]
    mods = [Module("model.embed_tokens", "embedding", V, C)]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        mods += [Module(p + "self_attn.q_proj", "linear", C, a.q_dim, a.qkv_bias, i),
                 Module(p + "self_attn.k_proj", "linear", C, a.kv_dim, a.qkv_bias, i),
                 Module(p + "self_attn.v_proj", "linear", C, a.kv_dim, a.qkv_bias, i),
                 Module(p + "self_attn.o_proj", "linear", a.q_dim, C, a.o_bias, i)]
        if a.family == "gemma3_text":
            mods += [Module(p + "self_attn.q_norm", "rmsnorm", a.head_dim, layer=i),
                     Module(p + "self_attn.k_norm", "rmsnorm", a.head_dim, layer=i)]
        mods += [Module(p + "mlp.gate_proj", "linear", C, F, False, i),
                 Module(p + "mlp.up_proj", "linear", C, F, False, i),
                 Module(p + "mlp.down_proj", "linear", F, C, False, i),
                 Module(p + "input_layernorm", "rmsnorm", C, layer=i),
                 Module(p + "post_attention_layernorm", "rmsnorm", C, layer=i)]
        if a.family == "gemma3_text":
            mods += [Module(p + "pre_feedforward_layernorm", "rmsnorm", C, layer=i),
                     Module(p + "post_feedforward_layernorm", "rmsnorm", C, layer=i)]
    return mods + [Module("model.norm", "rmsnorm", C), Module("lm_head", "linear", C, V)]


def parameters(config: dict | str, dtype: str = "float32") -> list[Tensor]:
    """Every parameter tensor as `model.named_parameters()` lists it (a tied head appears
    once, as the embedding). `dtype`: how the trainer holds them (float32)."""
    a = arch(config)
    return [Tensor(f"{m.name}.{suffix}", shape, dtype, m.shard)
            for m in modules(a) if not (m.name == "lm_head" and a.tied)
            for suffix, shape in m.tensor_shapes()]


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint stores (config.json's torch_dtype or dtype; float32 if absent)."""
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def param_count(config: dict | str) -> int:
    return sum(t.numel for t in parameters(config))


def shard_bytes(config: dict | str, dtype: str = "float32") -> dict[str, int]:
    """Parameter bytes of each shard: `embed` (embeddings, final norm, LM head) and `block{i}`,
    every tensor held as `dtype` (LoRA's frozen weights may be bfloat16 or float16)."""
    a = arch(config)
    shards = {"embed": 0} | {f"block{i}": 0 for i in range(a.layers)}
    for t in parameters(config, dtype):
        shards[t.shard] += t.nbytes
    return shards


# --------------------------------------------------------------------------------- LoRA

@dataclass(frozen=True)
class LoRA:
    """LoRA adapters of one rank on a set of linear modules (full HF module names), their
    input dropped out with probability `dropout` in training."""
    rank: int
    modules: frozenset[str]
    dropout: float = 0.0


def lora(config: dict | str, rank: int, targets: tuple[str, ...] | list[str], dropout: float = 0.0) -> LoRA:
    """Match `targets` as peft does for a list: a module is adapted when its name equals a
    target or ends with "." + target. Only the linears inside blocks can be adapted; every
    target must match at least one of them."""
    a = arch(config)
    if rank <= 0:
        raise InputError(None, "method.rank", f"expected a positive LoRA rank, got {rank}")
    if not 0 <= dropout < 1:
        raise InputError(None, "method.dropout", f"expected a probability >= 0 and < 1, got {dropout}")
    if not targets:
        raise InputError(None, "method.targets", "expected at least one LoRA target module")
    mods = modules(a)
    adaptable = {m.name for m in mods if m.kind in ("linear", "conv1d") and m.layer is not None}
    chosen = set()
    for t in targets:
        hits = {m.name for m in mods if m.name == t or m.name.endswith("." + t)}
        if not hits:
            raise InputError(None, "method.targets", f"LoRA target {t!r} matches no module; this model's "
                             f"linears: {', '.join(_block_linear_suffixes(mods))}")
        if hits - adaptable:
            raise InputError(None, "method.targets", f"LoRA target {t!r} matches {sorted(hits - adaptable)[0]}; "
                             f"only the linears inside blocks can be adapted: {', '.join(_block_linear_suffixes(mods))}")
        chosen |= hits
    return LoRA(rank, frozenset(chosen), dropout)


def _block_linear_suffixes(mods: list[Module]) -> list[str]:
    return list(dict.fromkeys(m.suffix for m in mods if m.kind in ("linear", "conv1d") and m.layer is not None))


def lora_parameters(config: dict | str, adapters: LoRA) -> list[Tensor]:
    """The adapters' tensors with peft's names: lora_A (rank x in), lora_B (out x rank)."""
    r = adapters.rank
    out = []
    for m in modules(arch(config)):
        if m.name in adapters.modules:
            p = f"base_model.model.{m.name}"
            out += [Tensor(f"{p}.lora_A.default.weight", (r, m.fan_in), shard=m.shard),
                    Tensor(f"{p}.lora_B.default.weight", (m.fan_out, r), shard=m.shard)]
    return out


def trainable_params(config: dict | str, adapters: LoRA | None = None) -> int:
    """Full-FT (adapters None): every parameter; LoRA: the adapters only."""
    return param_count(config) if adapters is None else sum(t.numel for t in lora_parameters(config, adapters))


# -------------------------------------------------------------------------------- work
# A Kernel is one piece of a training step's work for a micro-batch of `batch` sequences of
# `seq_len` tokens. Matmuls cost 2*m*n*k FLOPs; elementwise kernels the few FLOPs per
# element of ELEMENTWISE. mfbench.plan sums them into the ops of the step program.

# kind: (forward FLOPs, backward FLOPs, forward tensors moved, backward tensors moved), each
# per element of the kernel's main tensor; a tensor moved is one float32 read or written.
ELEMENTWISE = {
    "layernorm": (7, 14, 2, 3),       # mean, variance, normalise, scale and shift
    "rmsnorm": (4, 8, 2, 3),          # sum of squares, rsqrt scale, weight
    "bias": (1, 1, 2, 1),             # backward: the bias gradient (a reduction), when trained
    "residual": (1, 1, 3, 3),         # backward: the gradient accumulates into the residual stream
    "gelu": (8, 16, 2, 3),            # tanh approximation
    "gated": (9, 18, 3, 5),           # act(gate) * up, per element of the product
    "rope": (3, 3, 2, 2),             # rotate pairs, per element of q and k
    "softmax": (5, 4, 2, 3),          # scale, mask, max, exp, normalise; per attention score
    "cross_entropy": (5, 1, 2, 2),    # softmax and loss per logit; backward: minus one-hot, in place
    "embedding": (1, 1, 2, 2),        # gather (+ positions or scale); backward: scatter-add
    "lora_scale": (2, 1, 3, 2),       # y += (alpha / r) * t; backward: dt = (alpha / r) * dy
    # the adapter's input masked and scaled (its mask drawn per element); backward: the dropped
    # input again for dA, and dx += the masked (du A); per element of the input
    "lora_dropout": (1, 3, 2, 5),
}


@dataclass(frozen=True)
class Kernel:
    name: str
    forward_flops: float
    backward_flops: float
    forward_bytes: float
    backward_bytes: float
    # what the cost model (mfbench.sim.cost) prices it as: `matmul` (shape: rows, fan_in,
    # fan_out, weight trained), `attention` (shape: B, T, H, KV, head_dim, memory-efficient;
    # on attn.scores, which stands for the whole attention), or an ELEMENTWISE kind
    cls: str = ""
    shape: tuple[int, ...] = ()


def _matmul(name: str, rows: int, fan_in: int, fan_out: int, weight_grad: bool) -> Kernel:
    """y = x W for x (rows x fan_in). Backward: dx = dy W^T always; dW = x^T dy when trained."""
    flops = 2 * rows * fan_in * fan_out
    moved = FLOAT * (rows * fan_in + fan_in * fan_out + rows * fan_out)
    dw_moved = FLOAT * (rows * fan_in + rows * fan_out + 2 * fan_in * fan_out)  # dW accumulates
    return Kernel(name, flops, flops * (2 if weight_grad else 1), moved, moved + (dw_moved if weight_grad else 0),
                  "matmul", (rows, fan_in, fan_out, int(weight_grad)))


def _elementwise(name: str, kind: str, elements: int, backward: bool = True) -> Kernel:
    f, b, tf, tb = ELEMENTWISE[kind]
    return Kernel(name, f * elements, b * elements if backward else 0,
                  FLOAT * tf * elements, FLOAT * tb * elements if backward else 0, kind, (elements,))


def _sdpa(a: Arch, batch: int, seq_len: int, attention: str) -> list[Kernel]:
    """Scores q k^T, softmax, and probs v, dense over T x T (the causal and sliding-window
    masks are applied to the scores, not skipped). Memory-efficient attention keeps the
    scores in on-chip tiles and recomputes them (and the softmax) in backward."""
    B, T, H = batch, seq_len, a.heads
    S = B * H * T * T                          # attention scores
    mm = 2 * B * H * T * T * a.head_dim        # one of the two matmuls
    q, kv = B * T * a.q_dim, B * T * a.kv_dim
    f, b, tf, tb = ELEMENTWISE["softmax"]
    shape = (B, T, H, a.kv_heads, a.head_dim, int(attention != "standard"))
    if attention == "standard":
        return [Kernel("attn.scores", mm, 2 * mm, FLOAT * (q + kv + S), 2 * FLOAT * (q + kv + S), "attention", shape),
                Kernel("attn.softmax", f * S, b * S, FLOAT * tf * S, FLOAT * tb * S, "attention"),
                Kernel("attn.values", mm, 2 * mm, FLOAT * (S + kv + q), 2 * FLOAT * (S + kv + q), "attention")]
    lse = B * H * T
    return [Kernel("attn.scores", mm, 3 * mm, FLOAT * (q + kv), 2 * FLOAT * (q + kv), "attention", shape),
            Kernel("attn.softmax", f * S, (f + b) * S, FLOAT * lse, 2 * FLOAT * lse, "attention"),
            Kernel("attn.values", mm, 2 * mm, FLOAT * (kv + q), 2 * FLOAT * (kv + q), "attention")]


def _trained(adapters: LoRA | None, module: str) -> bool:
    """Does backward need this linear's input: its weight is trained, or it has an adapter."""
    return adapters is None or module in adapters.modules


def block_kernels(config: dict | str | Arch, layer: int, batch: int, seq_len: int,
                  attention: str = "standard", adapters: LoRA | None = None) -> list[Kernel]:
    """The kernels of one transformer block for a micro-batch, in forward order."""
    a = config if isinstance(config, Arch) else arch(config)
    N, C, F = batch * seq_len, a.hidden, a.intermediate
    full = adapters is None
    mods = [m for m in modules(a) if m.layer == layer]
    linear = {m.suffix: m for m in mods if m.kind in ("linear", "conv1d")}

    def mm(suffix):
        m = linear[suffix]
        out = [_matmul(suffix, N, m.fan_in, m.fan_out, full)]
        if m.bias:
            out.append(_elementwise(suffix + ".bias", "bias", N * m.fan_out, backward=full))
        return out

    def ew(name, kind, elements):
        return [_elementwise(name, kind, elements)]

    if a.family == "gpt2":
        ks = (ew("ln_1", "layernorm", N * C) + mm("attn.c_attn") + _sdpa(a, batch, seq_len, attention)
              + mm("attn.c_proj") + ew("residual_1", "residual", N * C) + ew("ln_2", "layernorm", N * C)
              + mm("mlp.c_fc") + ew("mlp.gelu", "gelu", N * F) + mm("mlp.c_proj")
              + ew("residual_2", "residual", N * C))
    else:
        gemma = a.family == "gemma3_text"
        ks = (ew("input_layernorm", "rmsnorm", N * C) + mm("self_attn.q_proj")
              + mm("self_attn.k_proj") + mm("self_attn.v_proj")
              + (ew("self_attn.q_norm", "rmsnorm", N * a.q_dim) + ew("self_attn.k_norm", "rmsnorm", N * a.kv_dim)
                 if gemma else [])
              + ew("rope", "rope", N * (a.q_dim + a.kv_dim)) + _sdpa(a, batch, seq_len, attention)
              + mm("self_attn.o_proj")
              + (ew("post_attention_layernorm", "rmsnorm", N * C) if gemma else [])
              + ew("residual_1", "residual", N * C)
              + ew("pre_feedforward_layernorm" if gemma else "post_attention_layernorm", "rmsnorm", N * C)
              + mm("mlp.gate_proj") + mm("mlp.up_proj")
              # priced by its activation: SiLU (Qwen's SwiGLU) or tanh-GELU (Gemma's GeGLU)
              + [dataclasses.replace(ew("mlp.act", "gated", N * F)[0], cls="geglu" if gemma else "swiglu")]
              + mm("mlp.down_proj")
              + (ew("post_feedforward_layernorm", "rmsnorm", N * C) if gemma else [])
              + ew("residual_2", "residual", N * C))
    if adapters is not None:
        r = adapters.rank
        for m in mods:
            if m.name in adapters.modules:
                if adapters.dropout > 0:
                    ks.append(_elementwise(m.suffix + ".lora_dropout", "lora_dropout", N * m.fan_in))
                ks += [_matmul(m.suffix + ".lora_A", N, m.fan_in, r, True),
                       _matmul(m.suffix + ".lora_B", N, r, m.fan_out, True),
                       _elementwise(m.suffix + ".lora_scale", "lora_scale", N * m.fan_out)]
    return ks


def embed_kernels(config: dict | str | Arch, batch: int, seq_len: int, adapters: LoRA | None = None) -> list[Kernel]:
    """Token (+ position) embedding; its backward (a scatter-add) runs only when trained."""
    a = config if isinstance(config, Arch) else arch(config)
    return [_elementwise("embedding", "embedding", batch * seq_len * a.hidden, backward=adapters is None)]


def head_kernels(config: dict | str | Arch, batch: int, seq_len: int, adapters: LoRA | None = None) -> list[Kernel]:
    """Final norm, LM head and cross-entropy (the head's ops)."""
    a = config if isinstance(config, Arch) else arch(config)
    N = batch * seq_len
    norm = "layernorm" if a.family == "gpt2" else "rmsnorm"
    return [_elementwise("final_norm", norm, N * a.hidden),
            _matmul("lm_head", N, a.hidden, a.vocab, adapters is None),
            _elementwise("cross_entropy", "cross_entropy", N * a.vocab)]


def flops_per_token(config: dict | str, seq_len: int, attention: str = "standard",
                    adapters: LoRA | None = None) -> dict[str, tuple[float, float]]:
    """FLOPs of each kernel per token, (forward, backward), block kernels as `block{i}.NAME`."""
    a = arch(config)
    out = {}
    kernels = [("", k) for k in embed_kernels(a, 1, seq_len, adapters)]
    kernels += [(f"block{i}.", k) for i in range(a.layers) for k in block_kernels(a, i, 1, seq_len, attention, adapters)]
    kernels += [("", k) for k in head_kernels(a, 1, seq_len, adapters)]
    for prefix, k in kernels:
        out[prefix + k.name] = (k.forward_flops / seq_len, k.backward_flops / seq_len)
    return out


# ------------------------------------------------------------------------------ display

def registry_rows() -> list[dict]:
    """`mfbench models --json`: one dict a registry model."""
    rows = []
    for name, config in REGISTRY.items():
        a = arch(config)
        rows.append({"name": name, "family": a.family, "params": param_count(config), "layers": a.layers,
                     "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab,
                     "hub_id": HUB_IDS[name]})
    return rows


def format_registry() -> str:
    """`mfbench models`: the registry as a table."""
    from mfbench.table import table
    rows = [(r["name"], r["family"], f"{r['params'] / 1e6:,.1f} M", r["layers"], r["hidden"],
             f"{r['heads']} ({r['kv_heads']})", f"{r['vocab']:,}", r["hub_id"]) for r in registry_rows()]
    return table(rows, header=("model", "family", "params", "layers", "hidden", "heads (kv)", "vocab", "hub id"),
                 right={2, 3, 4, 5, 6}) + "\n\nAny HF config.json of these families (gpt2, qwen2, gemma3_text) works too: " \
        "give its path, or its model folder, as `model:` in a workload."
