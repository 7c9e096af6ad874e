"""The native layer kernels (kernels_native/src/layers.cpp) on their own, against PyTorch
autograd and transformers' own modules on the same inputs.

layers.cpp is compiled with g++ into a shared library (with tests/native_layers_capi.cpp,
test-only C entry points) and called through ctypes on numpy arrays.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "kernels_native" / "src"
GELU_TANH, GELU_ERF, SILU = 0, 1, 2  # ActKind

P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
SIGNATURES = {
    "c_set_threads": [I],
    "c_act_forward_deriv": [P, P, P, L, I],
    "c_gated_forward": [P, P, P, L, I],
    "c_gated_backward": [P, P, P, P, P, L, I],
    "c_layernorm_forward": [P, P, P, P, P, P, I, I, F],
    "c_layernorm_backward": [P] * 9 + [I, I],
    "c_rmsnorm_forward": [P, P, P, P, I, I, F, I],
    "c_rmsnorm_apply": [P, P, P, P, I, I, I],
    "c_rmsnorm_backward": [P, P, P, P, P, P, P, I, I, I, I],
    "c_rope_tables": [P, P, I, I, F, F],
    "c_rope_forward": [P, P, P, I, I, I, I, I],
    "c_rope_backward": [P, P, P, I, I, I, I, I],
    "c_attention_forward": [P, P, P, P, P] + [I] * 8 + [F, I],
    "c_attention_backward": [P] * 9 + [I] * 8 + [F, I],
    "c_cross_entropy_chunk": [P, P, I, I, I, F],
    "c_attention_me_scratch": [I, I],
    "c_attention_me_forward": [P, P, P, I, P, P, P] + [I] * 8 + [F, I, I],
    "c_attention_me_backward": [P, P, P, P, I] + [P] * 6 + [I] * 8 + [F, I, I],
}
THREADS = 2


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.fail("g++ not found: apt-get install g++")
    so = tmp_path_factory.mktemp("layers") / "liblayers.so"
    cmd = ["g++", "-std=c++17", "-O2", "-fopenmp", "-fPIC", "-shared", f"-I{SRC}",
           '-DMFB_GEMM_BACKEND="portable"', str(SRC / "layers.cpp"), str(SRC / "gemm.cpp"),
           str(REPO / "tests" / "native_layers_capi.cpp"), "-o", str(so)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
    lib.c_cross_entropy_chunk.restype = ctypes.c_double
    lib.c_attention_me_scratch.restype = ctypes.c_long
    lib.c_set_threads(THREADS)
    return lib


class Ptr(ctypes.c_void_p):
    """A pointer into a numpy array that keeps the array alive for the call."""


def ptr(a: np.ndarray, offset: int = 0) -> Ptr:
    assert a.flags.c_contiguous
    p = Ptr(a.ctypes.data + offset * a.itemsize)
    p.array = a
    return p


def f32(t: torch.Tensor) -> np.ndarray:
    return np.array(t.detach().numpy(), dtype=np.float32, order="C")  # a copy: kernels write in place


def close(native: np.ndarray, ref: torch.Tensor, tol: float = 1e-5):
    ref = ref.detach().double().numpy()
    err = np.abs(native.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err < tol, f"relative error {err:.3g}"


# ---------------------------------------------------------------------------- activations

@pytest.mark.parametrize("act,hf_name", [(GELU_TANH, "gelu_pytorch_tanh"), (GELU_ERF, "gelu"), (SILU, "silu")])
def test_activation_and_gated_activation(lib, act, hf_name):
    from transformers.activations import ACT2FN

    fn = ACT2FN[hf_name]
    torch.manual_seed(0)
    gate = (3 * torch.randn(4000)).requires_grad_()
    up = torch.randn(4000).requires_grad_()
    dout = torch.randn(4000)
    n = gate.numel()

    out, deriv = np.empty(n, np.float32), np.empty(n, np.float32)
    lib.c_act_forward_deriv(ptr(out), ptr(deriv), ptr(f32(gate)), n, act)
    close(out, fn(gate))
    close(deriv, torch.autograd.grad(fn(gate), gate, torch.ones_like(gate))[0])

    lib.c_gated_forward(ptr(out), ptr(f32(gate)), ptr(f32(up)), n, act)
    ref = fn(gate) * up
    close(out, ref)
    dgate, dup = torch.autograd.grad(ref, (gate, up), dout)
    ng, nu = f32(dout), np.empty(n, np.float32)  # dgate written over dout, as the trainer does
    lib.c_gated_backward(ptr(ng), ptr(nu), ptr(ng), ptr(f32(gate)), ptr(f32(up)), n, act)
    close(ng, dgate)
    close(nu, dup)


# ---------------------------------------------------------------------------- norms

def test_layernorm_matches_torch(lib):
    N, C, eps = 37, 48, 1e-5
    torch.manual_seed(1)
    norm = torch.nn.LayerNorm(C, eps=eps)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (2 * torch.randn(N, C) + 0.5).requires_grad_()
    dout = torch.randn(N, C)
    ref = norm(x)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(ref, (x, norm.weight, norm.bias), dout)
    out, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    w, b = f32(norm.weight), f32(norm.bias)
    lib.c_layernorm_forward(ptr(out), ptr(mean), ptr(rstd), ptr(f32(x)), ptr(w), ptr(b), N, C, eps)
    close(out, ref)
    dx, dw, db = np.zeros((N, C), np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32)
    part = np.empty(THREADS * 2 * C, np.float32)
    lib.c_layernorm_backward(ptr(dx), ptr(dw), ptr(db), ptr(part), ptr(f32(dout)), ptr(f32(x)), ptr(w), ptr(mean),
                             ptr(rstd), N, C)
    close(dx, dx_ref)
    close(dw, dw_ref)
    close(db, db_ref)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_rmsnorm_matches_transformers(lib, family):
    if family == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm as Norm
    else:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
    N, C, eps = 37, 48, 1e-6
    torch.manual_seed(1)
    norm = Norm(C, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(C))
    x = (2 * torch.randn(N, C) + 0.5).requires_grad_()
    dout = torch.randn(N, C)
    ref = norm(x)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, norm.weight), dout)
    plus_one = int(family == "gemma3")

    out, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32)
    w = f32(norm.weight)
    lib.c_rmsnorm_forward(ptr(out), ptr(rstd), ptr(f32(x)), ptr(w), N, C, eps, plus_one)
    close(out, ref)
    again = np.empty_like(out)
    lib.c_rmsnorm_apply(ptr(again), ptr(rstd), ptr(f32(x)), ptr(w), N, C, plus_one)
    np.testing.assert_array_equal(again, out)

    dx, dw = np.ones((N, C), np.float32), np.full(C, 0.5, np.float32)
    part = np.empty(THREADS * C, np.float32)
    lib.c_rmsnorm_backward(ptr(dx), ptr(dw), ptr(part), ptr(f32(dout)), ptr(f32(x)), ptr(w), ptr(rstd), N, C,
                           plus_one, 1)  # accumulates into dx and dw
    close(dx - 1, dx_ref)
    close(dw - 0.5, dw_ref)
    dx = f32(dout)  # in place: dx written over dout
    lib.c_rmsnorm_backward(ptr(dx), 0, ptr(part), ptr(dx), ptr(f32(x)), ptr(w), ptr(rstd), N, C, plus_one, 0)
    close(dx, dx_ref)


# ---------------------------------------------------------------------------- rotary embedding

def rotary_modules():
    """(name, rotary module, layer_type or None, head_dim, theta, factor) from transformers configs."""
    from transformers import Gemma3TextConfig, Qwen2Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    qwen = Qwen2Config(hidden_size=64, num_attention_heads=4, rope_theta=1_000_000.0)
    gemma = Gemma3TextConfig(hidden_size=64, num_attention_heads=2, head_dim=32, num_hidden_layers=6,
                             rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                             rope_scaling={"rope_type": "linear", "factor": 8.0})
    g = Gemma3RotaryEmbedding(gemma)
    return [("qwen2", Qwen2RotaryEmbedding(qwen), None, 16, 1e6, 1.0),
            ("gemma3-local", g, "sliding_attention", 32, 1e4, 1.0),
            ("gemma3-global", g, "full_attention", 32, 1e6, 8.0)]


@pytest.mark.parametrize("case", range(3), ids=["qwen2", "gemma3-local", "gemma3-global-linear8"])
def test_rope_tables_and_rotation_match_transformers(lib, case):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    name, rotary, layer_type, hd, theta, factor = rotary_modules()[case]
    B, T, H, KV = 2, 300, 3, 1
    pos = torch.arange(T)[None]
    x = torch.zeros(1, T, hd)
    cos, sin = rotary(x, pos) if layer_type is None else rotary(x, pos, layer_type)
    ncos, nsin = np.empty((T, hd // 2), np.float32), np.empty((T, hd // 2), np.float32)
    lib.c_rope_tables(ptr(ncos), ptr(nsin), T, hd, theta, factor)
    close(ncos, cos[0, :, : hd // 2], 1e-6)
    close(nsin, sin[0, :, : hd // 2], 1e-6)

    # q and k packed side by side in one [N, (H + KV) hd] buffer, as the trainer may hold them
    torch.manual_seed(2)
    q = torch.randn(B, H, T, hd, requires_grad=True)
    k = torch.randn(B, KV, T, hd, requires_grad=True)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    dq, dk = torch.randn_like(rq), torch.randn_like(rk)
    gq, gk = torch.autograd.grad((rq, rk), (q, k), (dq, dk))

    def packed(a, b):  # [B, H, T, hd] x2 -> [B*T, (H + KV) hd]
        return f32(torch.cat([a.transpose(1, 2).reshape(B * T, -1), b.transpose(1, 2).reshape(B * T, -1)], 1))

    def unpacked(buf):
        buf = torch.from_numpy(buf)
        return (buf[:, : H * hd].reshape(B, T, H, hd).transpose(1, 2),
                buf[:, H * hd:].reshape(B, T, KV, hd).transpose(1, 2))

    ld = (H + KV) * hd
    buf = packed(q, k)
    lib.c_rope_forward(ptr(buf), ptr(ncos), ptr(nsin), B * T, T, H, hd, ld)
    lib.c_rope_forward(ptr(buf, H * hd), ptr(ncos), ptr(nsin), B * T, T, KV, hd, ld)
    nq, nk = unpacked(buf)
    close(nq.numpy(), rq)
    close(nk.numpy(), rk)
    buf = packed(dq, dk)
    lib.c_rope_backward(ptr(buf), ptr(ncos), ptr(nsin), B * T, T, H + KV, hd, ld)  # one call: same rotation
    nq, nk = unpacked(buf)
    close(nq.numpy(), gq)
    close(nk.numpy(), gk)


# ---------------------------------------------------------------------------- attention

def reference_attention(q, k, v, scale, window):
    """transformers' eager attention (repeat_kv, scale, additive mask, fp32 softmax) with the
    mask made by transformers' own mask functions."""
    from transformers.masking_utils import (
        causal_mask_function,
        sliding_window_causal_mask_function,
    )
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    B, H, T, _ = q.shape
    fn = sliding_window_causal_mask_function(window) if window else causal_mask_function
    zero = torch.tensor(0)
    allowed = fn(zero, zero, torch.arange(T)[:, None], torch.arange(T)[None, :])
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]

    class Module(torch.nn.Module):
        num_key_value_groups = H // k.shape[1]

    module = Module().eval()
    out, _ = eager_attention_forward(module, q, k, v, mask, scaling=scale)
    return out  # [B, T, H, hd]


def attention_case(H, KV, window, seed, B=2, T=24, hd=8, scale=0.37):
    """Random q, k, v [B, heads, T, hd] with transformers' eager attention, its gradients for a
    random dy, and the same inputs as the kernels take them: q | k | v packed in one
    [N, (H + 2 KV) hd] buffer (as a fused projection writes them), offsets and arguments.
    The scale is like Gemma's query_pre_attn_scalar ** -0.5: not 1 / sqrt(hd)."""
    torch.manual_seed(seed)
    q = torch.randn(B, H, T, hd, requires_grad=True)
    k = torch.randn(B, KV, T, hd, requires_grad=True)
    v = torch.randn(B, KV, T, hd, requires_grad=True)
    ref = reference_attention(q, k, v, scale, window)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(ref, (q, k, v), dy)
    ld = (H + 2 * KV) * hd
    qkv = f32(torch.cat([t.transpose(1, 2).reshape(B * T, -1) for t in (q, k, v)], 1))
    args = (B, T, H, KV, hd, ld, ld, H * hd, scale, window)
    return q, k, v, ref, dy, grads, qkv, H * hd, (H + KV) * hd, args


@pytest.mark.parametrize("H,KV,window", [(4, 4, 0), (4, 2, 0), (6, 2, 5), (4, 1, 1), (2, 1, 40)])
def test_attention_matches_transformers_eager(lib, H, KV, window):
    q, k, v, ref, dy, (gq, gk, gv), qkv, ko, vo, args = attention_case(H, KV, window, seed=3)
    B, T, hd = q.shape[0], q.shape[2], q.shape[3]
    y = np.empty((B * T, H * hd), np.float32)
    probs = np.empty((B, H, T, T), np.float32)
    lib.c_attention_forward(ptr(y), ptr(probs), ptr(qkv), ptr(qkv, ko), ptr(qkv, vo), *args)
    close(y, ref.reshape(B * T, H * hd))

    dqkv = np.full_like(qkv, np.nan)  # everything must be written
    dS = np.empty(THREADS * T * T, np.float32)
    lib.c_attention_backward(ptr(dqkv), ptr(dqkv, ko), ptr(dqkv, vo), ptr(dS), ptr(f32(dy.reshape(B * T, -1))),
                             ptr(qkv), ptr(qkv, ko), ptr(qkv, vo), ptr(probs), *args)
    for got, want, heads, off in ((gq, dqkv, H, 0), (gk, dqkv, KV, ko), (gv, dqkv, KV, vo)):
        part = want[:, off:off + heads * hd].reshape(B, T, heads, hd).transpose(0, 2, 1, 3)
        close(np.ascontiguousarray(part), got)


@pytest.mark.parametrize("H,KV,window", [(4, 4, 0), (4, 2, 0), (6, 2, 5), (4, 1, 1), (2, 1, 40)])
@pytest.mark.parametrize("block", [5, 64])
def test_memory_efficient_attention_matches_transformers_and_the_standard_path(lib, H, KV, window, block):
    """GPT-2's causal attention (H = KV), Qwen's GQA, Gemma's sliding window shorter than T:
    the streaming kernel's output and gradients are transformers' eager attention's, and the
    standard kernel's, within 1e-5; its lse is logsumexp of the scaled, masked scores. Key
    blocks of 5 (not dividing T = 24) stream several blocks; 64 holds T in one block."""
    q, k, v, ref, dy, (gq, gk, gv), qkv, ko, vo, args = attention_case(H, KV, window, seed=5)
    B, T, hd, scale = q.shape[0], q.shape[2], q.shape[3], args[8]
    dy32 = f32(dy.reshape(B * T, -1))

    scratch = np.full(THREADS * lib.c_attention_me_scratch(T, block), np.nan, np.float32)
    assert scratch.size == THREADS * (2 * min(block, T) ** 2 + 2 * min(block, T))  # never T x T per thread
    y = np.full((B * T, H * hd), np.nan, np.float32)
    lse = np.full((B, H, T), np.nan, np.float32)
    lib.c_attention_me_forward(ptr(y), ptr(lse), ptr(scratch), THREADS, ptr(qkv), ptr(qkv, ko), ptr(qkv, vo), *args, block)
    close(y, ref.reshape(B * T, H * hd))
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(H // KV, 1)) * scale
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    close(lse, torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1))

    dqkv = np.full_like(qkv, np.nan)  # everything must be written
    lib.c_attention_me_backward(ptr(dqkv), ptr(dqkv, ko), ptr(dqkv, vo), ptr(scratch), THREADS, ptr(dy32), ptr(qkv),
                                ptr(qkv, ko), ptr(qkv, vo), ptr(y), ptr(lse), *args, block)
    for got, heads, off in ((gq, H, 0), (gk, KV, ko), (gv, KV, vo)):
        part = dqkv[:, off:off + heads * hd].reshape(B, T, heads, hd).transpose(0, 2, 1, 3)
        close(np.ascontiguousarray(part), got)

    # the standard path on the same inputs
    ys, probs = np.empty_like(y), np.empty((B, H, T, T), np.float32)
    lib.c_attention_forward(ptr(ys), ptr(probs), ptr(qkv), ptr(qkv, ko), ptr(qkv, vo), *args)
    standard = np.full_like(qkv, np.nan)
    lib.c_attention_backward(ptr(standard), ptr(standard, ko), ptr(standard, vo), ptr(np.empty(THREADS * T * T, np.float32)),
                             ptr(dy32), ptr(qkv), ptr(qkv, ko), ptr(qkv, vo), ptr(probs), *args)
    close(y, torch.from_numpy(ys))
    close(dqkv, torch.from_numpy(standard))


def test_sliding_window_boundary_is_transformers():
    """A query sees `window` keys, itself included: i - window < j <= i."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(3)
    zero = torch.tensor(0)
    assert fn(zero, zero, torch.tensor(6), torch.arange(10)).nonzero().flatten().tolist() == [4, 5, 6]


# ---------------------------------------------------------------------------- cross-entropy

def test_cross_entropy_chunk_matches_torch(lib):
    rows, V = 33, 1000
    torch.manual_seed(4)
    logits = (4 * torch.randn(rows, V)).requires_grad_()
    targets = torch.randint(0, V, (rows,))
    targets[[3, 10, 11]] = -100
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    scale = 1 / 30
    (grad,) = torch.autograd.grad(loss * scale, logits)
    native_targets = np.ascontiguousarray(np.where(targets.numpy() < 0, -1, targets.numpy()), dtype=np.int32)

    buf = f32(logits)
    got = lib.c_cross_entropy_chunk(ptr(buf), ptr(native_targets), rows, V, 0, 0.0)
    assert abs(got - loss.item()) < 1e-4 * abs(loss.item())
    buf = f32(logits)
    got = lib.c_cross_entropy_chunk(ptr(buf), ptr(native_targets), rows, V, 1, scale)
    assert abs(got - loss.item()) < 1e-4 * abs(loss.item())
    close(buf, grad)
    assert not buf[[3, 10, 11]].any()
