"""Fuzzing the native trainer (issue 14): seeded, bounded mutations of every input it reads —
config.json, model.safetensors, token files, peft adapters, options and run specs — each run
through the real binary, the normal build and an AddressSanitizer + UBSan build
(`-DMFB_SANITIZE=ON`, kernels_native/build-sanitize; any report aborts the run).

Every run keeps the contract (tests/native_fuzz.py: exit 0; exit 2 with one error line; or a
diverged run's exit 1 with one line; never a signal, a sanitizer report or a hang), and where
a reference exists it agrees with it: a safetensors file the `safetensors` library refuses is
refused; an option value the workload schema refuses is refused (but lr 0 and steps 0, kept
for the numerics checks, and --grad-clip 0, which is "off"); a size field that is not a
positive integer is refused; a run that exits 0 reports the steps asked for and a finite loss.

The default run makes about 240 cases (the same corpus for both builds); `-m slow` runs
eight times as many, drawn from the same seeded generator.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from native_fixtures import load_gpt2, make_gpt2, peft_model, random_token_file
from native_fuzz import (TOKEN_HEADER, Violation, check_contract, refused_by_library, safetensors_bytes,
                         safetensors_parts)
from pydantic import ValidationError

from mfbench.device.native import sanitized_binary, trainer_binary
from mfbench.spec.workload import Method, Optimizer

SEED = 14
COUNTS = {"config": 40, "safetensors": 60, "tokens": 30, "adapter": 30, "options": 50, "spec": 30}
SLOW_FACTOR = 8
TIMEOUT = 60
V = 101
SAN_ENV = {"ASAN_OPTIONS": "exitcode=86:detect_leaks=1:allocator_may_return_null=1:max_allocation_size_mb=3072",
           "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87:print_stacktrace=1"}


@dataclass
class Case:
    name: str
    args: list[str]  # "{dir}" stands for the case's folder, "{base}" for the shared inputs
    files: dict[str, bytes] = field(default_factory=dict)
    allowed: frozenset = frozenset({"ok", "refused", "diverged"})  # outcomes the references allow
    steps: int | None = None  # exit 0 must report this many steps (and a finite loss)


# ------------------------------------------------------------------------------------------
# the inputs every case starts from


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-base")
    trainer_binary()
    make_gpt2(d / "gpt2", seed=0)
    random_token_file(d / "tokens.bin", 600, V, seed=1, mask_prob=0.2)
    peft_model(load_gpt2(d / "gpt2"), ["c_attn", "attn.c_proj"], r=4, alpha=8, fan_in_fan_out=True).save_pretrained(
        d / "adapter")
    configs = {
        "qwen2": dict(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        "gemma3_text": dict(model_type="gemma3_text", vocab_size=V, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            max_position_embeddings=64, sliding_window=8),
        "gpt2": json.loads((d / "gpt2" / "config.json").read_text()),
    }
    (d / "configs.json").write_text(json.dumps(configs))
    return d


TRAIN = ["--data", "{base}/tokens.bin", "--seq-len", "8", "--batch", "2", "--steps", "1", "--threads", "1", "--quiet"]
SIZE_FIELDS = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"}
ODD_VALUES = [0, -1, 1, 2, 3, 7, 64, 1.5, 2.0, "8", True, None, [], {}, 2**16, 2**20, 2**30, 2**31, 2**32 + 8, 2**63,
              2**64 + 1, -2**63, 1e300]


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def config_cases(rng: random.Random, n: int, base: Path) -> list[Case]:
    configs = json.loads((base / "configs.json").read_text())
    out = []
    for i in range(n):
        family = rng.choice(sorted(configs))
        cfg = dict(configs[family])
        edits = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            key = rng.choice(sorted(cfg) + ["sliding_window_pattern", "layer_types", "rope_scaling", "tie_word_embeddings"])
            value = rng.choice(ODD_VALUES + ["delete"])
            if value == "delete":
                cfg.pop(key, None)
            else:
                cfg[key] = value
            edits.append((key, value))
        # values that make big models are planned (--plan), not trained: a plan allocates lazily
        big = any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 64 or v == "delete" for _, v in edits)
        case = Case(f"config {family} {edits}", ["--config", "{dir}/config.json", *TRAIN, *(["--plan"] if big else [])],
                    {"config.json": json.dumps(cfg).encode()}, steps=None if big else 1)
        last = {}
        for k, v in edits:
            last[k] = v
        if any(k in SIZE_FIELDS and v not in ("delete", None) and not positive_int(v) for k, v in last.items()):
            case.allowed = frozenset({"refused"})
        out.append(case)
    return out


# ------------------------------------------------------------------------------------------
# safetensors: the reference library decides


DTYPES = ["F32", "F16", "BF16", "I32", "U8", "F64", "F33", "", "f32", "BOOL", "F4"]


def mutate_safetensors(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    header, data = safetensors_parts(raw)
    names = sorted(k for k in header if k != "__metadata__")
    n = int.from_bytes(raw[:8], "little")
    kind = rng.choice(["header byte", "length", "truncate", "append", "shape", "offsets", "dtype", "delete",
                       "duplicate", "extra", "metadata", "data byte", "swap"])
    t = rng.choice(names)
    if kind == "header byte":
        b = bytearray(raw)
        b[8 + rng.randrange(n)] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "length":
        return kind, (n + rng.choice([-9, -8, -2, -1, 1, 2, 8, 2**32, -n + 1])).to_bytes(8, "little", signed=True) + raw[8:]
    if kind == "truncate":
        return kind, raw[:rng.randrange(len(raw))]
    if kind == "append":
        return kind, raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "shape":
        shape = list(header[t]["shape"])
        op = rng.choice(["inc", "dec", "float", "neg", "huge", "str", "drop", "add"])
        if op == "inc" and shape:
            shape[0] += 1
        elif op == "dec" and shape:
            shape[-1] -= 1
        elif op == "float" and shape:
            shape[0] = float(shape[0])
        elif op == "neg" and shape:
            shape[0] = -shape[0]
        elif op == "huge":
            shape = [2**40, 2**40]
        elif op == "str" and shape:
            shape[0] = str(shape[0])
        elif op == "drop" and shape:
            shape = shape[1:]
        else:
            shape = shape + [1]
        header[t]["shape"] = shape
        return f"shape {op}", safetensors_bytes(header, data)
    if kind == "offsets":
        off = list(header[t]["data_offsets"])
        op = rng.choice(["shift", "swap", "beyond", "float", "three", "grow"])
        if op == "shift":
            d = rng.choice([-4, -1, 1, 4])
            off = [off[0] + d, off[1] + d]
        elif op == "swap":
            off = off[::-1]
        elif op == "beyond":
            off = [off[0], len(data) + 4]
        elif op == "float":
            off = [float(off[0]), off[1]]
        elif op == "three":
            off = off + [off[1]]
        else:
            off = [off[0], off[1] + 4]
        header[t]["data_offsets"] = off
        return f"offsets {op}", safetensors_bytes(header, data)
    if kind == "dtype":
        header[t]["dtype"] = rng.choice(DTYPES)
        return kind, safetensors_bytes(header, data)
    if kind == "delete":
        del header[t]
        return kind, safetensors_bytes(header, data)
    if kind == "duplicate":
        h = raw[8:8 + n].rstrip()
        entry = json.dumps({t: header[t]})[1:-1].encode()
        h = h[:-1] + b"," + entry + b"}"
        return kind, len(h).to_bytes(8, "little") + h + data
    if kind == "extra":
        header["extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
        return kind, safetensors_bytes(header, data + bytes(8))
    if kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"format": "pt", "x": None}, {"a": "b"}])
        return kind, safetensors_bytes(header, data)
    if kind == "data byte":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[8 + n + rng.randrange(len(data))] = rng.randrange(256)
        return kind, bytes(b)
    # swap the ranges of two tensors of one size: a valid file whose tensors hold each other's values
    same = [(a, b) for a in names for b in names if a < b and header[a]["shape"] == header[b]["shape"]]
    a, b = rng.choice(same)
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return kind, safetensors_bytes(header, data)


def tensor_table(raw: bytes) -> dict | None:
    try:
        h, _ = safetensors_parts(raw)
        return {k: (v["dtype"], v["shape"]) for k, v in h.items() if k != "__metadata__"}
    except Exception:
        return None


def safetensors_cases(rng: random.Random, n: int, base: Path) -> list[Case]:
    raw = (base / "gpt2" / "model.safetensors").read_bytes()
    want = tensor_table(raw)
    config = (base / "gpt2" / "config.json").read_bytes()
    out = []
    for i in range(n):
        kind, mutated = mutate_safetensors(rng, raw)
        case = Case(f"safetensors {kind} #{i}", ["--model", "{dir}", *TRAIN],
                    {"model.safetensors": mutated, "config.json": config}, steps=1)
        duplicate = kind == "duplicate"
        if refused_by_library(mutated):
            case.allowed = frozenset({"refused"})
        elif tensor_table(mutated) == want and not duplicate:
            case.allowed = frozenset({"ok", "diverged"})  # a valid file of this model: trained (NaN data diverges)
        out.append(case)
    return out


# ------------------------------------------------------------------------------------------
# token files


def token_cases(rng: random.Random, n: int, base: Path) -> list[Case]:
    raw = (base / "tokens.bin").read_bytes()
    magic, version, flags, vocab, reserved, count = TOKEN_HEADER.unpack(raw[:TOKEN_HEADER.size])
    out = []
    for i in range(n):
        kind = rng.choice(["version", "flags", "vocab", "count", "truncate", "append", "id", "mask zero", "mask value",
                           "magic", "empty", "no mask"])
        b, allowed = bytearray(raw), {"refused"}
        head = [magic, version, flags, vocab, reserved, count]
        if kind == "version":
            head[1] = rng.choice([0, 2, 2**32 - 1])
        elif kind == "flags":
            head[2] = rng.choice([2, 3, 0x80000001])
        elif kind == "vocab":  # the header's own vocabulary size is informational
            head[3], allowed = rng.choice([0, 1, 50000, 2**32 - 1]), {"ok"}
        elif kind == "count":
            head[5] = rng.choice([count - 1, count + 1, 0, 2**62, 2**63 + 5, 2**64 - 1, count // 4])
        elif kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind == "append":
            b += bytes(rng.randint(1, 9))
        elif kind == "id":
            at = TOKEN_HEADER.size + 4 * rng.randrange(count)
            b[at:at + 4] = rng.choice([V, 2**31, 2**32 - 1]).to_bytes(4, "little")
        elif kind == "mask zero":
            b[TOKEN_HEADER.size + 4 * count:] = bytes(count)
        elif kind == "mask value":
            b[TOKEN_HEADER.size + 4 * count + rng.randrange(count)] = rng.randint(2, 255)
        elif kind == "magic":
            b[rng.randrange(8)] ^= 0x20
        elif kind == "empty":
            b = b[:TOKEN_HEADER.size]
            head[5] = 0
        else:  # a file without a mask: every token a target
            b = b[:TOKEN_HEADER.size + 4 * count]
            head[2], allowed = 0, {"ok"}
        if kind not in ("truncate", "append", "id", "mask zero", "mask value", "magic"):
            b[:TOKEN_HEADER.size] = TOKEN_HEADER.pack(*head)
        args = ["--model", "{base}/gpt2", *TRAIN]
        args[args.index("{base}/tokens.bin")] = "{dir}/tokens.bin"
        out.append(Case(f"tokens {kind} #{i}", args, {"tokens.bin": bytes(b)}, frozenset(allowed), steps=1))
    return out


# ------------------------------------------------------------------------------------------
# peft adapters (--lora-init): adapter_config.json decides rank, alpha and targets


def adapter_cases(rng: random.Random, n: int, base: Path) -> list[Case]:
    config = json.loads((base / "adapter" / "adapter_config.json").read_text())
    weights = (base / "adapter" / "adapter_model.safetensors").read_bytes()
    header, data = safetensors_parts(weights)
    names = sorted(k for k in header if k != "__metadata__")
    edits = [("r", v) for v in (0, -1, 8, 2, "4", 1.5, None)] + \
            [("lora_alpha", v) for v in (0, -1, 16, 0.5, "8", None, 1e300)] + \
            [("target_modules", v) for v in ("c_attn", [], ["c_attn"], ["c_attn", "attn.c_proj", "c_fc"], [1], None,
                                             ["attn.c_proj", "c_attn"])] + \
            [(k, v) for k in ("use_rslora", "use_dora", "lora_bias") for v in (True, "yes")] + \
            [("bias", "all"), ("peft_type", "IA3"), ("rank_pattern", {"c_attn": 2}), ("alpha_pattern", {"c_attn": 2}),
             ("modules_to_save", ["lm_head"]), ("layers_to_transform", [0]), ("lora_dropout", 0.1),
             ("fan_in_fan_out", False), ("delete", "r"), ("delete", "peft_type"), ("delete", "target_modules")]
    out = []
    for i in range(n):
        cfg, st = dict(config), weights
        key, value = rng.choice(edits + [("weights", "drop"), ("weights", "extra"), ("weights", "transpose"),
                                         ("config", "not json"), ("config", "missing")])
        allowed = {"refused"}
        if key == "delete":
            cfg.pop(value)
        elif key == "weights":
            h = json.loads(json.dumps(header))
            if value == "drop":
                t = rng.choice(names)
                del h[t]
                st = safetensors_bytes(h, data)  # the library refuses the gap; so does the trainer
            elif value == "extra":
                h["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = {
                    "dtype": "F32", "shape": [4, 32], "data_offsets": [len(data), len(data) + 512]}
                st = safetensors_bytes(h, data + bytes(512))
            else:
                t = rng.choice(names)
                h[t]["shape"] = h[t]["shape"][::-1]
                st = safetensors_bytes(h, data)
        elif key != "config":
            cfg[key] = value
            # peft's other settings and alpha are free; a same-set reordering of the targets too
            if (key == "lora_alpha" and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                    and math.isfinite(value)) or key in ("lora_dropout", "fan_in_fan_out") or \
                    (key == "target_modules" and value == ["attn.c_proj", "c_attn"]):
                allowed = {"ok", "diverged"} if value == 1e300 else {"ok"}
        files = {"adapter_model.safetensors": st,
                 "adapter_config.json": b"{" if value == "not json" else json.dumps(cfg).encode()}
        if value == "missing":
            del files["adapter_config.json"]
        out.append(Case(f"adapter {key}={value!r} #{i}", ["--model", "{base}/gpt2", "--method", "lora", "--lora-init",
                                                            "{dir}", *TRAIN], files, frozenset(allowed), steps=1))
    return out


# ------------------------------------------------------------------------------------------
# options: the workload schema decides


NUMBERS = ["-1", "0", "1", "2", "0.5", "1e30", "-1e-8", "1e309", "nan", "inf", "-inf", "abc", "", "1.5", " 3",
           "0.999", "1e-12", "2147483648"]
SIZES = ["-1", "0", "1", "3", "1.5", "abc", "", "1e9", "1e10", "2147483648", "4294967296", "9" * 30]
# flag: (values, schema model and field, or None)
OPTIONS = {
    "lr": (NUMBERS, (Optimizer, "lr")), "min-lr": (NUMBERS, (Optimizer, "min_lr")),
    "weight-decay": (NUMBERS, (Optimizer, "weight_decay")), "beta1": (NUMBERS, (Optimizer, "beta1")),
    "beta2": (NUMBERS, (Optimizer, "beta2")), "eps": (NUMBERS, (Optimizer, "eps")),
    "grad-clip": (NUMBERS, (Optimizer, "grad_clip")), "lora-alpha": (NUMBERS, (Method, "alpha")),
    "lora-r": (SIZES + ["64"], (Method, "rank")), "warmup": (SIZES, (Optimizer, "warmup_steps")),
    "batch": (SIZES, None), "seq-len": (SIZES + ["32", "33"], None), "accum": (SIZES, None),
    "steps": (["-1", "0", "1", "2", "1.5", "abc", "1e10"], None), "threads": (SIZES + ["256", "257", "100000"], None),
    "ce-chunk-rows": (SIZES, None), "seed": (SIZES + ["-5"], None), "schedule": (["cosine", "linear", "step", ""], None),
    "frozen-dtype": (["bfloat16", "float16", "int8", ""], None), "lora-targets": (["c_attn", "nope", ",", "c_fc,c_proj"], None),
    "sample-ms": (SIZES[:6], None), "pause-poll-s": (NUMBERS, None),
}


def finite(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def schema_refuses(flag: str, value: float) -> bool:
    spec = OPTIONS[flag][1]
    if spec is None:
        return False
    model, name = spec
    if (flag, value) in (("lr", 0), ("grad-clip", 0)):  # kept: gradients of an unchanged model; clipping off
        return False
    if name in ("rank", "warmup_steps") and value != int(value):
        return True
    try:
        model(**({"kind": "lora", "targets": ["c_attn"]} if model is Method else {}),
              **{name: int(value) if name in ("rank", "warmup_steps") else value})
    except ValidationError:
        return True
    return False


def option_cases(rng: random.Random, n: int, base: Path) -> list[Case]:
    out = []
    for i in range(n):
        chosen = {}
        for _ in range(rng.choice([1, 1, 2, 3])):
            flag = rng.choice(sorted(OPTIONS))
            chosen[flag] = rng.choice(OPTIONS[flag][0])
        args = ["--model", "{base}/gpt2", "--data", "{base}/tokens.bin", "--method", "lora", "--out", "{dir}/out",
                "--quiet"]
        defaults = {"seq-len": "8", "batch": "2", "steps": "2", "threads": "1"}
        for k, v in {**defaults, **chosen}.items():
            args += [f"--{k}", v]
        case = Case(f"options {chosen}", args, steps=int(float(chosen.get("steps", "2")))
                    if finite(chosen.get("steps", "2")) is not None else None)
        for flag, value in chosen.items():
            v = finite(value)
            if flag in ("schedule", "frozen-dtype", "lora-targets"):
                continue
            if v is None or schema_refuses(flag, v):
                case.allowed = frozenset({"refused"})
        out.append(case)
    return out


# ------------------------------------------------------------------------------------------
# run specs (--workload)


def spec_cases(rng: random.Random, n: int, base: Path) -> list[Case]:
    out = []
    for i in range(n):
        spec = {"version": 1, "name": "fuzz", "model": {"config": f"{base}/gpt2/config.json",
                                                         "weights": f"{base}/gpt2/model.safetensors"},
                "method": {"kind": "lora", "rank": 4, "alpha": 8.0, "targets": ["c_attn"]},
                "data": {"tokens": f"{base}/tokens.bin"}, "seq_len": 8, "batch": 2, "steps": 1, "threads": 1,
                "optimizer": {"lr": 0.001}, "memory": {"ce_chunk_rows": 5}, "out": "{dir}/out"}
        path = rng.choice([("seq_len",), ("batch",), ("micro_batch",), ("steps",), ("threads",), ("seed",),
                           ("method", "rank"), ("method", "alpha"), ("method", "targets"), ("method", "dropout"),
                           ("method", "kind"), ("optimizer", "lr"), ("optimizer", "eps"), ("optimizer", "beta2"),
                           ("optimizer", "grad_clip"), ("optimizer", "warmup_steps"), ("memory", "ce_chunk_rows"),
                           ("memory", "attention"), ("version",), ("model", "config"), ("data", "tokens"),
                           ("provenance",), ("scheduling",), ("name",)])
        value = rng.choice(ODD_VALUES + ["x", -0.5, 0.5, 1e-3, ["c_attn"], {"policy": "none"}, "delete"])
        d = spec
        for p in path[:-1]:
            d = d.setdefault(p, {})
        if value == "delete":
            d.pop(path[-1], None)
        else:
            d[path[-1]] = value
        # a valid big size or step count is planned (--plan), not run: it would only take long
        big = isinstance(value, int) and not isinstance(value, bool) and value > 64
        case = Case(f"spec {'.'.join(path)}={value!r}", ["--workload", "{dir}/run.json", "--quiet",
                                                          *(["--plan"] if big else [])],
                    {"run.json": json.dumps(spec).encode()})
        name = path[-1]
        if path[0] in ("optimizer", "method") and name in ("lr", "eps", "beta2", "alpha", "grad_clip") and value != "delete":
            model = Optimizer if path[0] == "optimizer" else Method
            try:
                model(**({"kind": "lora", "targets": ["c_attn"]} if model is Method else {}), **{name: value})
            except (ValidationError, TypeError):
                if not (name == "lr" and value == 0):
                    case.allowed = frozenset({"refused"})
        out.append(case)
    return out


KINDS: dict[str, Callable] = {"config": config_cases, "safetensors": safetensors_cases, "tokens": token_cases,
                              "adapter": adapter_cases, "options": option_cases, "spec": spec_cases}


# ------------------------------------------------------------------------------------------
# running


def corpus(kind: str, base: Path, factor: int) -> list[Case]:
    rng = random.Random(f"{SEED}-{kind}-{factor}")
    return KINDS[kind](rng, COUNTS[kind] * factor, base)


def _limit_memory():  # a mutation that asks for a huge model gets bad_alloc, not the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def run_case(binary: Path, case: Case, folder: Path, base: Path, sanitized: bool) -> str | None:
    """None when the case keeps the contract and its reference; else what went wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    args = [a.replace("{dir}", str(folder)).replace("{base}", str(base)) for a in case.args]
    if "run.json" in case.files:
        (folder / "run.json").write_text((folder / "run.json").read_text().replace("{dir}", str(folder)))
    env = {**os.environ, "OMP_WAIT_POLICY": "passive", **(SAN_ENV if sanitized else {})}
    try:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                           preexec_fn=None if sanitized else _limit_memory)
    except subprocess.TimeoutExpired:
        return f"{case.name}: no answer in {TIMEOUT} s (a hang)"
    if sanitized:  # allocator_may_return_null: ASan notes the refused allocation, then bad_alloc is the answer
        r.stderr = "".join(line for line in r.stderr.splitlines(True)
                           if not re.match(r"==\d+==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]+ bytes$", line))
    try:
        outcome = check_contract(r, case.name)
    except Violation as e:
        return str(e)
    if outcome not in case.allowed:
        return f"{case.name}: {outcome} ({r.stderr.strip()}), expected {sorted(case.allowed)}"
    if outcome == "ok" and case.steps is not None and "--plan" not in args:
        summary = next(folder.rglob("summary.json"), None)
        if summary is not None:
            s = json.loads(summary.read_text())
            loss_ok = case.steps == 0 or (s["final_loss"] is not None and math.isfinite(s["final_loss"]))
            if s["steps"] != case.steps or not loss_ok:
                return f"{case.name}: exit 0 with steps {s['steps']} and final loss {s['final_loss']}"
    shutil.rmtree(folder, ignore_errors=True)
    return None


def run_corpus(binary: Path, cases: list[Case], tmp: Path, base: Path, sanitized: bool) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for p in pool.map(lambda ic: run_case(binary, ic[1], tmp / str(ic[0]), base, sanitized),
                                        enumerate(cases)) if p]
    assert not problems, f"{len(problems)} of {len(cases)} cases broke the contract:\n" + "\n".join(problems[:15])


@pytest.fixture(scope="module")
def sanitized() -> Path:
    return sanitized_binary()


@pytest.mark.parametrize("kind", list(KINDS))
def test_fuzz(kind, base, tmp_path):
    run_corpus(trainer_binary(), corpus(kind, base, 1), tmp_path, base, sanitized=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fuzz_sanitized(kind, base, sanitized, tmp_path):
    run_corpus(sanitized, corpus(kind, base, 1), tmp_path, base, sanitized=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_fuzz_more(kind, base, sanitized, tmp_path):
    cases = corpus(kind, base, SLOW_FACTOR)
    run_corpus(trainer_binary(), cases, tmp_path / "plain", base, sanitized=False)
    run_corpus(sanitized, cases, tmp_path / "sanitized", base, sanitized=True)


def test_the_sanitized_build_is_instrumented(sanitized):
    """The sanitized runs above are not a plain build's in disguise: ASan and UBSan are linked in."""
    r = subprocess.run([str(sanitized), "--help"], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, **SAN_ENV})
    assert r.returncode == 0 and "usage: mfbench-train" in r.stdout
    nm = subprocess.run(["nm", "-C", str(sanitized)], capture_output=True, text=True)
    assert "__asan_init" in nm.stdout and "__ubsan_handle" in nm.stdout
