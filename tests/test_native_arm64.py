"""The static linux-arm64 build of the native trainer (cross-compiled; Debian's arm64 OpenBLAS
linked in when installed) run under qemu-aarch64 against transformers/PyTorch/peft on a tiny
random-init GPT-2: the binary a phone would run gives the same logits, loss, gradients and
adapters as the host build, and the same one-line errors; and `mfbench run --target qemu-arm64`
(the runner interface) gives the host's losses.

The trainer is reached through $MFBENCH_TRAINER (a wrapper running the qemu-arm64 runner's
command), so the tests drive it with the same helpers as tests/test_native_gpt2.py."""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from native_fixtures import (
    assert_grads_match,
    check_adapter_loads_in_peft,
    expect_error,
    load_gpt2,
    make_gpt2,
    make_tokenizer,
    random_token_file,
    rel_err,
    torch_loss,
    trace_losses,
    trainer,
)
from safetensors.torch import load_file

from mfbench.device import runners
from mfbench.device.data import pydoc_text
from mfbench.device.native import ENV_OVERRIDE

V = 101
B, T = 3, 16


@pytest.fixture(scope="module")
def arm64(request, tmp_path_factory) -> Path:
    """The arm64 binary (kernels_native/build-arm64, built when stale); while this module
    runs, $MFBENCH_TRAINER is a wrapper that runs it as the qemu-arm64 runner does."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # show that a build is under way
        runner = runners.Qemu()
        binary = Path(runner.binary())
    wrapper = tmp_path_factory.mktemp("arm64") / "mfbench-train-qemu"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(runner.command([]))} "$@"\n')
    wrapper.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_OVERRIDE, str(wrapper))
        yield binary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "model", seed=0)


@pytest.fixture(scope="module")
def masked_tokens(tmp_path_factory) -> Path:
    return random_token_file(tmp_path_factory.mktemp("data") / "masked.tok", 2000, V, seed=2, mask_prob=0.3)


def test_binary_is_static_arm64(arm64):
    desc = subprocess.run(["file", "-b", str(arm64)], capture_output=True, text=True, check=True).stdout
    assert "ELF 64-bit" in desc and "ARM aarch64" in desc and "statically linked" in desc, desc


def test_run_on_qemu_arm64_gives_the_hosts_losses(arm64, tmp_path, monkeypatch):
    """`mfbench run --target qemu-arm64` and `--target local` on one tiny Full-FT workload: the
    same losses step by step (within 1e-5), the arm64 build with Debian's arm64 OpenBLAS."""
    from mfbench.device import run
    monkeypatch.delenv(ENV_OVERRIDE)  # each target finds its own build
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_tokenizer(make_gpt2(tmp_path / "tiny", vocab_size=300), 300)
    (tmp_path / "data.txt").write_text(pydoc_text()[:20_000])
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({
        "name": "tiny-full", "model": "tiny", "method": {"kind": "full"}, "data": {"source": "data.txt"},
        "seq_len": 16, "batch": 2, "steps": 4, "threads": 2, "optimizer": {"lr": 1e-3}}))
    losses = {}
    for target in ("local", "qemu-arm64"):
        summary, out = run.run(tmp_path / "w.yaml", target=target, out=tmp_path / target)
        steps = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
        losses[target] = [e["loss"] for e in steps if e["type"] == "step"]
        assert summary.steps == 4 and json.loads((out / "run.json").read_text())["provenance"]["target"] == target
    assert "openblas" in summary.details["gemm"], summary.details["gemm"]  # the README's apt line installs it
    assert len(losses["local"]) == 4 and losses["local"][-1] < losses["local"][0]
    assert max(abs(a - b) for a, b in zip(losses["local"], losses["qemu-arm64"])) < 1e-5, losses


def test_logits_loss_and_gradients_match_torch(arm64, tiny, masked_tokens, tmp_path):
    """One step at lr 0: the first forward's logits and loss, and every Full-FT gradient."""
    trainer("--model", tiny, "--data", masked_tokens, "--seq-len", T, "--batch", B, "--steps", 1, "--lr", 0,
            "--dump-logits", tmp_path / "l.st", "--dump-grads", tmp_path / "g.st", threads=2)
    model = load_gpt2(tiny)
    logits, loss = torch_loss(model, masked_tokens, B, T)
    loss.backward()
    got = load_file(tmp_path / "l.st")
    assert got["logits"].shape == (B, T, V)
    assert rel_err(got["logits"], logits.detach()) < 1e-4
    assert abs(got["loss"].item() - loss.item()) / loss.item() < 1e-4
    grads = load_file(tmp_path / "g.st")
    names = dict(model.named_parameters())
    assert_grads_match(grads, names)


def test_lora_adapter_loads_in_peft(arm64, tiny, masked_tokens, tmp_path):
    check_adapter_loads_in_peft(tiny, masked_tokens, tmp_path, B, T, threads=2)


def test_lora_dropout_draws_the_hosts_masks(arm64, tiny, masked_tokens, tmp_path, monkeypatch):
    """LoRA dropout's masks are integer arithmetic on the seed, step, micro-batch, adapter and
    index: the arm64 build draws the host's, and learns the host's losses (within 1e-5)."""
    args = ["--model", tiny, "--data", masked_tokens, "--seq-len", T, "--batch", B, "--accum", 2, "--steps", 4,
            "--lr", 1e-2, "--method", "lora", "--lora-targets", "c_attn,c_proj", "--seed", 3, "--no-save"]
    trainer(*args, "--lora-dropout", 0.2, "--out", tmp_path / "arm64", threads=2)
    monkeypatch.delenv(ENV_OVERRIDE)  # the host build from here on
    trainer(*args, "--lora-dropout", 0.2, "--out", tmp_path / "host", threads=2)
    trainer(*args, "--out", tmp_path / "no-dropout", threads=2)
    arm, host = trace_losses(tmp_path / "arm64"), trace_losses(tmp_path / "host")
    assert len(arm) == 4 and max(abs(a - b) for a, b in zip(arm, host)) < 1e-5, (arm, host)
    assert max(abs(a - b) for a, b in zip(host, trace_losses(tmp_path / "no-dropout"))) > 1e-4  # the masks matter


def test_truncated_data_is_one_line_and_exit_2(arm64, tiny, masked_tokens, tmp_path):
    (tmp_path / "cut.tok").write_bytes(masked_tokens.read_bytes()[:-3])
    expect_error("--model", tiny, "--data", tmp_path / "cut.tok", "--steps", 1, match="truncated")


def test_the_control_channel_drives_the_arm64_trainer(arm64, tiny, masked_tokens, tmp_path):
    """The binary a phone would run takes its decisions over stdin/stdout as the host build does:
    the paper's rule, fed a fake phone's battery and temperature, makes the simulator's choices."""
    from sysfs_fixtures import controlled, write_battery
    from test_control import SCRIPT, ScriptedPaper

    root = tmp_path / "phone"
    write_battery(root, capacity=SCRIPT[0][0], temp=SCRIPT[0][1], status="Discharging")
    pol = ScriptedPaper(root)
    code, lines, trace, summary = controlled(tiny, masked_tokens, tmp_path / "out", len(SCRIPT), root, pol)
    assert code == 0, lines
    assert [(o["battery_pct"], o["temperature_c"]) for o in pol.seen] == [(b, t / 10) for b, t in SCRIPT]
    assert pol.made == [{}, {"sleep_s": 2.0}, {"sleep_s": 2.0}, {"sleep_s": 0.5}]
    assert summary["steps"] == len(SCRIPT) and summary["wall_s"] >= 4.5


def test_without_arm64_openblas_the_build_says_what_to_install(tmp_path):
    """Configure only, with OpenBLAS out of FindBLAS's reach (a BLAS vendor that is not
    installed): the portable GEMM, and the one line that says how to get OpenBLAS."""
    from mfbench.device.native import KERNELS
    r = subprocess.run(["cmake", "-S", KERNELS, "-B", tmp_path, "-DCMAKE_BUILD_TYPE=Release", "-DMFB_STATIC=ON",
                        f"-DCMAKE_TOOLCHAIN_FILE={KERNELS / 'cmake' / 'aarch64-linux-gnu.cmake'}", "-DBLA_VENDOR=FLAME"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("-- mfbench-train GEMM backend: portable (slower: arm64 OpenBLAS not found; install it with "
            "dpkg --add-architecture arm64 && apt-get update && apt-get install libopenblas-dev:arm64)") in r.stdout
