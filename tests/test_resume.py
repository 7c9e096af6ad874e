"""Checkpoints and resume of the native trainer (issue 10): kill -9 at random moments and
resume gives the uninterrupted run's losses and weights bit for bit; SIGTERM and SIGINT
checkpoint and exit 0; a corrupted or truncated checkpoint falls back to the previous one;
a full disk is one clear error that leaves the last good checkpoint intact.

Everything runs the real trainer on a tiny random-init GPT-2 (2 layers, 32 wide).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from native_fixtures import expect_error, gpt2_config, pattern_token_file, trainer

STEPS = 30
METHODS = {"full": [], "lora": ["--method", "lora", "--lora-r", "4", "--lora-targets", "c_attn,c_proj"]}
METHODS["lora-dropout"] = [*METHODS["lora"], "--lora-dropout", "0.1"]
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors",
           "lora-dropout": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-inputs")
    config = gpt2_config()
    config.save_pretrained(d / "model")
    tokens = pattern_token_file(d / "tokens.bin", config.vocab_size)
    return d / "model" / "config.json", tokens


def run_args(inputs, method: str, steps: int = STEPS) -> list[str]:
    """A run with accumulation (2 micro-batches of 2 rows), warmup and a cosine schedule, so
    the data position, the schedule and AdamW's step count all matter after a resume."""
    config, tokens = inputs
    return ["--config", config, "--data", tokens, "--seq-len", 16, "--batch", 2, "--accum", 2, "--steps", steps,
            "--lr", 1e-2, "--warmup", 3, "--schedule", "cosine", "--min-lr", 1e-3, *METHODS[method]]


def popen(*args) -> subprocess.Popen:
    from mfbench.device.native import trainer_binary
    return subprocess.Popen([str(trainer_binary()), *map(str, args), "--threads", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def steps_of(trace: Path, missing_ok: bool = False) -> list[tuple[int, float]]:
    """(index, loss) of each step event; a line torn by a kill is left out. missing_ok: a
    trace not there (yet, or renamed by the run's end since one looked) has none."""
    try:
        text = trace.read_text()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    out = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e["type"] == "step":
            out.append((e["index"], e["loss"]))
    return out


def reference(inputs, method: str, tmp_path: Path, steps: int = STEPS) -> tuple[Path, float]:
    """An uninterrupted run (no checkpoints) and its wall time."""
    out = tmp_path / f"ref-{method}-{steps}"
    if not (out / "summary.json").exists():
        from mfbench.device.native import trainer_binary
        trainer_binary()  # a (re)build is not part of the run's time
        t0 = time.monotonic()
        trainer(*run_args(inputs, method, steps), "--out", out)
        return out, time.monotonic() - t0
    return out, 0.0


def assert_same_run(got: Path, ref: Path, method: str) -> None:
    """Per-step losses equal as floats, in order 0..n-1 with no step twice, and the saved
    weights or adapter equal byte for byte; nothing partial or temporary left."""
    want = steps_of(ref / "trace.jsonl")
    have = steps_of(got / "trace.jsonl")
    assert [i for i, _ in have] == list(range(len(want)))
    assert have == want
    assert (got / WEIGHTS[method]).read_bytes() == (ref / WEIGHTS[method]).read_bytes()
    assert not (got / "trace.jsonl.partial").exists()
    left = sorted(p.name for p in (got / "checkpoints").iterdir())
    assert len(left) <= 2 and all(n.startswith("ckpt-") and n.endswith(".bin") for n in left), left


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kill9_at_ten_random_moments_resumes_bit_identical(inputs, tmp_path, method):
    ref, wall = reference(inputs, method, tmp_path)
    rng = random.Random(f"kill9-{method}")  # reproducible moments
    step_s = max(wall, 0.05) / STEPS
    args = [*run_args(inputs, method), "--checkpoint-every", 2]
    kills, progress, finished, attempt = 0, [], 0, 0
    out = tmp_path / "run0"
    resume: list[str] = []
    while kills < 10:
        p = popen(*args, "--out", out, *resume)
        # a moment counted in steps of this run, not in seconds (a loaded machine is slower):
        # after `done` more steps have finished, plus a random part of the next one
        done, partial = rng.randrange(0, STEPS // 2), out / "trace.jsonl.partial"
        start = len(steps_of(partial, missing_ok=True)) if resume else 0
        while p.poll() is None and len(steps_of(partial, missing_ok=True)) < start + done:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 1.5 * step_s))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            partial = out / "trace.jsonl.partial"
            progress.append(len(steps_of(partial, missing_ok=True)))
            resume = ["--resume"]
        else:  # finished before the moment came: check it, start a new run for the remaining kills
            assert p.returncode == 0, p.stderr.read()
            if resume:
                assert_same_run(out, ref, method)
                finished += 1
            attempt += 1
            out, resume = tmp_path / f"run{attempt}", []
    p = popen(*args, "--out", out, "--resume")
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert_same_run(out, ref, method)
    # the moments fell at different points of the run, not all before its first step
    assert len(set(progress)) >= 2, progress


def test_resume_with_other_options_is_an_error(inputs, tmp_path):
    out = tmp_path / "run"
    trainer(*run_args(inputs, "full", steps=4), "--checkpoint-every", 2, "--out", out)
    args = run_args(inputs, "full", steps=4)
    args[args.index("--lr") + 1] = 2e-2
    line = expect_error(*args, "--out", out, "--resume", match="ckpt-4.bin")
    assert "lr 0.01 in the checkpoint, 0.02 now" in line


def test_resume_without_a_checkpoint_starts_over(inputs, tmp_path):
    ref, _ = reference(inputs, "full", tmp_path, steps=6)
    out = tmp_path / "run"
    r = trainer(*run_args(inputs, "full", steps=6), "--out", out, "--resume", check=False)
    assert r.returncode == 0, r.stderr
    assert_same_run(out, ref, "full")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_0(inputs, tmp_path, sig):
    steps = 400
    ref, _ = reference(inputs, "full", tmp_path, steps=steps)
    out = tmp_path / "run"
    args = [*run_args(inputs, "full", steps), "--checkpoint-every", 1000]  # only the signal checkpoints
    p = popen(*args, "--out", out)
    partial = out / "trace.jsonl.partial"
    deadline = time.monotonic() + 60
    while len(steps_of(partial, missing_ok=True)) < 3:
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.002)
    os.kill(p.pid, sig)
    assert p.wait(timeout=60) == 0, p.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    done = summary["steps"]
    assert summary["stop_reason"] == f"signal {sig.name}" and not summary["killed"]
    assert 3 <= done < steps
    assert [i for i, _ in steps_of(out / "trace.jsonl")] == list(range(done))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"ckpt-{done}.bin"]
    assert not (out / "model.safetensors").exists()  # a stopped run's state is its checkpoint
    r = trainer(*args, "--out", out, "--resume", check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_same_run(out, ref, "full")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["stop_reason"] is None


def finished_with_checkpoints(inputs, tmp_path) -> Path:
    out = tmp_path / "run"
    trainer(*run_args(inputs, "lora"), "--checkpoint-every", 5, "--out", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-25.bin", "ckpt-30.bin"]
    return out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


def test_lora_dropout_resumes_with_the_uninterrupted_runs_masks(inputs, tmp_path):
    """Masks are a function of the seed, step and micro-batch: steps 25..29 run again from
    ckpt-25 draw the masks they drew the first time."""
    ref, _ = reference(inputs, "lora-dropout", tmp_path)
    out = tmp_path / "run"
    trainer(*run_args(inputs, "lora-dropout"), "--checkpoint-every", 5, "--out", out)
    (out / "checkpoints" / "ckpt-30.bin").unlink()
    trainer(*run_args(inputs, "lora-dropout"), "--checkpoint-every", 5, "--out", out, "--resume")
    assert_same_run(out, ref, "lora-dropout")
    assert steps_of(ref / "trace.jsonl") != steps_of(reference(inputs, "lora", tmp_path)[0] / "trace.jsonl")


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_a_bad_newest_checkpoint_falls_back_to_the_previous(inputs, tmp_path, damage):
    ref, _ = reference(inputs, "lora", tmp_path)
    out = finished_with_checkpoints(inputs, tmp_path)
    damage(out / "checkpoints" / "ckpt-30.bin")
    r = trainer(*run_args(inputs, "lora"), "--checkpoint-every", 5, "--out", out, "--resume", check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mfbench-train: warning: "), r.stderr
    assert "ckpt-30.bin" in lines[0] and "ckpt-25.bin" in lines[0]
    assert ("checksum mismatch" if damage is flip_byte else "truncated") in lines[0]
    assert_same_run(out, ref, "lora")  # steps 25..29 ran again and the trace holds each once


def test_no_good_checkpoint_is_an_error(inputs, tmp_path):
    out = finished_with_checkpoints(inputs, tmp_path)
    flip_byte(out / "checkpoints" / "ckpt-30.bin")
    truncate(out / "checkpoints" / "ckpt-25.bin")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    line = expect_error(*run_args(inputs, "lora"), "--out", out, "--resume", match="ckpt-30.bin: checksum mismatch")
    assert "ckpt-25.bin: truncated" in line
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before  # nothing removed


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()} (run the tests as root, as CI does)")


def test_full_disk_while_checkpointing(inputs, tmp_path):
    ref, _ = reference(inputs, "full", tmp_path, steps=10)
    args = [*run_args(inputs, "full", steps=10), "--checkpoint-every", 1]
    probe = tmp_path / "probe"
    trainer(*run_args(inputs, "full", steps=1), "--checkpoint-every", 1, "--no-save", "--out", probe)
    ckpt = (probe / "checkpoints" / "ckpt-1.bin").stat().st_size
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 2 * ckpt + ckpt // 2 + 65536)  # two checkpoints fit, a third does not
    try:
        out = disk / "run"
        line = expect_error(*args, "--out", out, match="ckpt-3.bin: cannot write: No space left on device")
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["ckpt-1.bin", "ckpt-2.bin"]  # no temporary left
        copy = tmp_path / "copy"
        shutil.copytree(out, copy)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    # the last good checkpoint is intact: the run continues from it as if never stopped
    r = trainer(*args, "--out", copy, "--resume", check=False)
    assert r.returncode == 0, r.stderr
    assert_same_run(copy, ref, "full")
    assert line


def test_full_disk_while_writing_the_trace(inputs, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 4096)
    try:
        out = disk / "run"
        expect_error(*run_args(inputs, "lora", steps=200), "--out", out, "--no-save",
                     match="trace.jsonl.partial: cannot write: No space left on device")
        assert not (out / "summary.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------ `mfbench run --resume`

def mfbench_run(*args, cwd: Path):
    import sys
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "mfbench.cli", "run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_mfbench_run_resume_continues_the_run_in_its_folder(tmp_path):
    import yaml
    from native_fixtures import TINY_GPT2, corpus_text

    (tmp_path / "config.json").write_text(json.dumps({**TINY_GPT2, "model_type": "gpt2", "vocab_size": 300}))
    (tmp_path / "data.txt").write_text(corpus_text(30_000))
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({
        "name": "w", "model": "config.json", "method": {"kind": "full"}, "data": {"source": "data.txt"},
        "seq_len": 16, "batch": 4, "micro_batch": 2, "steps": 12, "threads": 1}))
    r = mfbench_run("w.yaml", "--checkpoint-every", 4, "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-12.bin", "ckpt-8.bin"]
    want = steps_of(out / "trace.jsonl")
    weights = (out / "model.safetensors").read_bytes()
    spec = (out / "run.json").read_text()

    flip_byte(out / "checkpoints" / "ckpt-12.bin")  # steps 8..11 run again from ckpt-8
    r = mfbench_run("w.yaml", "--resume", "--checkpoint-every", 4, "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ckpt-12.bin: checksum mismatch" in r.stderr and "step 12/12" in r.stderr and "step 8/12" not in r.stderr
    assert steps_of(out / "trace.jsonl") == want and (out / "model.safetensors").read_bytes() == weights
    assert (out / "run.json").read_text() == spec  # the run's spec is re-used, not resolved again
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert json.loads((out / "trace.chrome.json").read_text())["traceEvents"]

    for args, expect in ((["--out", "nowhere"], "nowhere/run.json: not found: no run to resume"),
                         (["--out", "out", "--steps", "3"], "expected no --steps or --seed")):
        r = mfbench_run("w.yaml", "--resume", *args, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], r.stderr


def test_a_run_whose_loss_diverged_stops_and_its_checkpoint_resumes(inputs, tmp_path):
    """A diverged step (loss NaN) stops the run, exit 1, before it is checkpointed: the
    checkpoints hold the last finite state, its partial trace stays for a resume, and the
    resume reads the checkpoint back (and diverges again at the same step)."""
    config, tokens = inputs
    out = tmp_path / "out"
    args = ["--config", config, "--data", tokens, "--seq-len", 16, "--batch", 2, "--steps", 3, "--lr", 1e30,
            "--grad-clip", 0, "--checkpoint-every", 1, "--out", out]
    p = popen(*args)
    assert p.wait(timeout=60) == 1
    assert p.stderr.read().startswith("mfbench-train: error: training diverged at step 2: its loss is ")
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == ["ckpt-1.bin"]
    assert [i for i, loss in steps_of(out / "trace.jsonl.partial")] == [0]
    assert not (out / "summary.json").exists()
    p = popen(*args, "--resume")  # the checkpoint after step 1 verifies and loads
    assert p.wait(timeout=60) == 1
    assert p.stderr.read().startswith("mfbench-train: error: training diverged at step 2: its loss is ")


def test_a_resume_keeps_the_last_two_checkpoints(inputs, tmp_path):
    """A kill between a checkpoint's save and the pruning of older ones leaves three; the
    resume that follows (here one with no step left to run) prunes them."""
    config, tokens = inputs
    args = ["--config", config, "--data", tokens, "--seq-len", 16, "--batch", 2, "--steps", 6,
            "--checkpoint-every", 2, "--out", tmp_path / "out"]
    assert popen(*args).wait(timeout=60) == 0
    ckpts = tmp_path / "out" / "checkpoints"
    (ckpts / "ckpt-2.bin").write_bytes(b"an older checkpoint a kill left behind")
    p = popen(*args, "--resume")
    assert p.wait(timeout=60) == 0, p.stderr.read()
    assert sorted(f.name for f in ckpts.iterdir()) == ["ckpt-4.bin", "ckpt-6.bin"]
