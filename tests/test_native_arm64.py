"""The static linux-arm64 build of the native trainer (cross-compiled, portable GEMM, no BLAS)
run under qemu-aarch64 against transformers/PyTorch/peft on a tiny random-init GPT-2: the
binary a phone would run gives the same logits, loss, gradients and adapters as the host build,
and the same one-line errors.

The trainer is reached through $MFBENCH_TRAINER (a wrapper that execs qemu-aarch64), so the
tests drive it with the same helpers as tests/test_native_gpt2.py."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from native_fixtures import (
    assert_grads_match,
    check_adapter_loads_in_peft,
    expect_error,
    load_gpt2,
    make_gpt2,
    random_token_file,
    rel_err,
    torch_loss,
    trainer,
)
from safetensors.torch import load_file

from mfbench.device.native import ENV_OVERRIDE, KERNELS

V = 101
B, T = 3, 16
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


def cross_build(build_dir: Path, log=print, jobs: int = 2) -> Path:
    """Cross-build the static arm64 `mfbench-train` (portable GEMM) into build_dir, logging
    each line of CMake's output as it comes; return the binary's path."""
    steps = [["cmake", "-S", str(KERNELS), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_TOOLCHAIN_FILE={KERNELS / 'cmake' / 'aarch64-linux-gnu.cmake'}",
              "-DMFB_STATIC=ON", "-DMFB_BLAS=OFF"],
             ["cmake", "--build", str(build_dir), f"-j{jobs}"]]
    for cmd in steps:
        log("$ " + " ".join(cmd))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in p.stdout:
            lines.append(line.rstrip())
            log(lines[-1])
        if p.wait() != 0:
            raise RuntimeError("arm64 cross-build failed:\n" + "\n".join(lines[-30:]))
    return build_dir / "mfbench-train"


@pytest.fixture(scope="module")
def arm64(request, tmp_path_factory) -> Path:
    """The cross-built binary; while this module runs, $MFBENCH_TRAINER is a wrapper that runs
    it under qemu-aarch64."""
    missing = [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: apt-get install g++-aarch64-linux-gnu qemu-user")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def log(line):  # show build progress even though pytest captures output
        with capture.global_and_fixture_disabled():
            print(f"[arm64] {line}", flush=True)

    tmp = tmp_path_factory.mktemp("arm64")
    binary = cross_build(tmp / "build", log)
    wrapper = tmp / "mfbench-train-qemu"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which(QEMU)} "{binary}" "$@"\n')
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
