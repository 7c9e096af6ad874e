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
from safetensors.torch import load_file

from mfbench.native import run_trainer, trainer_binary
from native_fixtures import make_gpt2, random_token_file, trainer

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
    finals = set()
    for i in renames:
        src, dst = re.findall(r'"([^"]*)"', calls[i])[:2]
        finals.add(Path(dst).name)
        before = [c for c in calls[:i] if c.startswith(("fsync(", "fdatasync(")) and f"<{src}>" in c]
        assert before, f"{src} renamed without fsync"
        after = [c for c in calls[i + 1:] if c.startswith(("fsync(", "fdatasync(")) and f"<{Path(dst).parent}>" in c]
        assert after, f"folder of {dst} not fsynced after the rename"
    assert {"trace.jsonl", "summary.json", "adapter_model.safetensors", "adapter_config.json"} <= finals
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "summary.json", "trace.jsonl"]
