"""`mfbench run`: a workload file run on the native trainer, measured.

`resolve` turns a workload into the run spec of docs/contracts.md section 1 (every field
either reaches the trainer or is rejected here, naming it) and writes <out>/run.json; `run`
then runs `mfbench-train --workload run.json` on a target (mfbench.device.runners: this
machine, qemu-arm64 or a phone over adb) and returns its summary.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from mfbench.device import runners
from mfbench.errors import InputError
from mfbench.units import MB

SIMULATE_ONLY = "the native trainer does not run it yet; `mfbench simulate` does"
SAMPLE_MS = 50  # the measured trace's memory samples: 20 a second
CHECKPOINT_EVERY = 10  # steps between checkpoints in <out>/checkpoints (`mfbench run --resume` continues from them)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def local_threads(workload, cpus: int | None = None) -> int:
    """The workload's threads on this machine (or on a target with `cpus` CPUs): `auto` is
    every usable core."""
    return workload.threads if isinstance(workload.threads, int) else cpus or usable_cores()


def default_out(workload_path: str | Path, target: str) -> Path:
    return Path("runs") / Path(workload_path).stem / f"measured-{target}"


def unsupported(workload) -> list[tuple[str, object, str]]:
    """(field, value, expected) of each workload value the native trainer cannot run yet."""
    out = []
    if workload.memory.sharding.policy not in ("none", "lru", "prefetch"):  # a user policy
        out.append(("memory.sharding.policy", workload.memory.sharding.policy, "none, lru or prefetch"))
    if workload.memory.checkpointing.policy not in ("none", "every_block", "every_k"):  # a user policy
        out.append(("memory.checkpointing.policy", workload.memory.checkpointing.policy, "none, every_block or every_k"))
    return out


def resolve(workload_path: str | Path, *, target: str = "local", steps: int | None = None, seed: int | None = None,
            out: str | Path | None = None, command: str = "", progress: bool = True, sets=(),
            runner=None) -> dict:
    """Validate the workload (after `--set` overrides `sets`), prepare its model config and
    token file, and write the run spec to <out>/run.json (returned). Raises InputError
    naming the file and field. `runner` (else the target's, made here) tells the target's
    CPUs and what it is."""
    from mfbench.contracts.trace import provenance
    from mfbench.files import write_atomic
    from mfbench.plan import compile_program
    from mfbench.spec import models
    from mfbench.spec.profile import load_device
    from mfbench.spec.workload import load_workload

    runner = runner or runners.get(target)
    if seed is not None and seed < 0:
        raise InputError(None, "--seed", f"expected a seed >= 0, got {seed}")
    path = Path(workload_path)
    workload = load_workload(path, sets)
    if bad := unsupported(workload):
        field, value, expected = bad[0]
        raise InputError(path, field, f"{value!r} is not supported: {SIMULATE_ONLY} (expected {expected})")
    _scheduling(path, workload.scheduling)  # a bad policy is named before any work
    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    workload = workload.model_copy(update=overrides)
    base = path.resolve().parent
    out = Path(out or default_out(path, target)).resolve()

    config = models.get_config(workload.model, base=base)  # load_workload checked it and seq_len against it
    model_config, weights, folder = _model_files(workload.model, base, config, out, path)

    # the micro-batch the accumulation policy chooses, priced as this host runs it
    host = load_device("host")
    overhead = int(host.ram.runtime_overhead_mb.value * MB)
    threads = local_threads(workload, runner.cpus())
    try:
        program = compile_program(workload, base_dir=base, threads=threads, overhead_bytes=overhead)
    except InputError as e:
        raise InputError(path, e.field, e.message) from None
    if not isinstance(runner, runners.Adb):  # a phone's memory is its own (and its profile's)
        _check_fits(path, program.peak_bytes() + overhead, host)

    tokens = _tokens(path, base, workload, config, folder, progress)
    spec = {
        "version": 1,
        "name": workload.name,
        "model": {"config": str(model_config), "weights": weights and str(weights)},
        "method": workload.method.model_dump(mode="json"),
        "data": {"tokens": tokens},
        "seq_len": workload.seq_len, "batch": workload.batch, "micro_batch": program.micro_batch,
        "steps": workload.steps, "seed": workload.seed, "threads": program.threads,
        "optimizer": workload.optimizer.model_dump(mode="json"),
        "memory": {**workload.memory.model_dump(mode="json"), "ce_chunk_rows": program.ce_chunk_rows},
        "scheduling": workload.scheduling.model_dump(mode="json"),
        "out": str(out),
        "provenance": provenance(command=command, workload=workload.resolved(program), device=runner.device(),
                                 target=target, ambient_c=None, charging=None, seed=workload.seed),
    }
    write_atomic(out / "run.json", json.dumps(spec, indent=2) + "\n")
    return spec


def run(workload_path: str | Path, *, target: str = "local", steps: int | None = None, seed: int | None = None,
        out: str | Path | None = None, command: str = "", resume: bool = False,
        checkpoint_every: int = CHECKPOINT_EVERY, sets=()):
    """Resolve the workload (after `--set` overrides `sets`), run the trainer on it (progress
    lines on stderr), write trace.chrome.json, and return (Summary, out folder). With resume,
    continue the run in `out` (its run.json as it was written) from its newest good checkpoint."""
    from mfbench.contracts import trace
    from mfbench.errors import validate
    from mfbench.spec.workload import PolicySpec

    runner = runners.get(target)
    if resume:
        if steps is not None or seed is not None or sets:
            raise InputError(None, "--resume", "continues a run as its run.json says "
                             "(expected no --steps or --seed, and no --set)")
        out = Path(out or default_out(workload_path, target)).resolve()
        if not (out / "run.json").is_file():
            raise InputError(out / "run.json", None, "not found: no run to resume (expected the --out folder of an "
                             "earlier `mfbench run`)")
    else:
        out = Path(resolve(workload_path, target=target, steps=steps, seed=seed, out=out, command=command,
                           sets=sets, runner=runner)["out"])
    # the policy as run.json records it (--set included), so a resumed run keeps it
    try:
        recorded = json.loads((out / "run.json").read_text())["scheduling"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(out / "run.json", "scheduling", f"cannot read it: {e} (expected the run spec "
                         "`mfbench run` wrote)") from None
    scheduling = _scheduling(out / "run.json", validate(PolicySpec, recorded, out / "run.json"))
    spec = runner.prepare(out / "run.json", resume)
    try:
        _run_trainer(runner, spec, scheduling, checkpoint_every, resume)
    except BaseException:  # a failed run's trace and checkpoints come back too, if they can
        with contextlib.suppress(Exception):
            runner.fetch(out)
        raise
    runner.fetch(out)
    summary = trace.read_summary(out / "summary.json")
    trace.write_chrome(out / "trace.chrome.json", trace.iter_trace(out / "trace.jsonl"))
    return summary, out


# ------------------------------------------------------------------------------ parts

def _model_files(model: str, base: Path, config: dict, out: Path, path: Path):
    """(config.json, model.safetensors or None for random init, the model's folder or None).
    A registry model's config
    (or a Gemma 3 config wrapping its text_config, which the trainer does not unwrap) is
    written into the output folder."""
    from mfbench.files import write_atomic
    from mfbench.spec import models

    weights = folder = None
    if model in models.REGISTRY:
        source = None
    else:
        source = Path(model) if Path(model).is_absolute() else base / model
        if source.is_dir():
            folder, source = source, source / "config.json"
            if (folder / "model.safetensors").is_file():
                weights = (folder / "model.safetensors").resolve()
            elif any(folder.glob("*.safetensors*")) or any(folder.glob("pytorch_model*.bin")):
                raise InputError(path, "model", f"{folder} holds weights other than one model.safetensors "
                                 "(expected a single model.safetensors; sharded and .bin checkpoints are not read yet)")
        if json.loads(source.read_text()) != config:
            source = None
    if source is None:
        source = write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return source.resolve(), weights, folder


def _check_fits(path: Path, need: int, host) -> None:
    """Stop before starting a run the kernel would kill for lack of memory."""
    limit = int(host.ram.app_limit_mb.value * MB)
    available = _mem_available()
    for what, have in (("the host profile's app_limit_mb", limit), ("MemAvailable in /proc/meminfo", available)):
        if have is not None and need > have:
            raise InputError(path, "model", f"needs {need / MB:,.0f} MB (planned peak + runtime overhead), more than "
                             f"{what} ({have / MB:,.0f} MB) (expected a smaller model, batch, micro_batch or seq_len)")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tokens(path: Path, base: Path, workload, config: dict, folder: Path | None, progress: bool) -> str:
    """The token file of the workload's data (cached): its text, tokenized with the
    workload's tokenizer, the model folder's, or a BPE trained on the text."""
    from mfbench.device import data
    from mfbench.spec import models

    d = workload.data
    vocab = models.arch(config).vocab
    if d.source == "pydoc":  # text: the schema refuses another format
        text = data.pydoc_text()
        text_path = data.cache_dir("data") / f"pydoc-{data.digest(text)}.txt"
        if not text_path.is_file():
            from mfbench.files import write_atomic
            write_atomic(text_path, text)
    else:
        text_path = base / d.source
        if not text_path.is_file():
            raise InputError(path, "data.source", f"{text_path}: file not found (expected pydoc or a .txt or .jsonl "
                             "file, relative to the workload)")
        try:
            text = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(path, "data.source", f"{text_path}: cannot read as UTF-8 text: {e}") from None

    if d.tokenizer is not None:
        tokenizer, field = base / d.tokenizer, "data.tokenizer"
        if not (tokenizer.is_file() or (tokenizer / "tokenizer.json").is_file()):
            raise InputError(path, field, f"{tokenizer}: not found (expected a tokenizer.json or a folder holding one)")
    elif folder is not None and (folder / "tokenizer.json").is_file():
        tokenizer, field = folder / "tokenizer.json", "model"
    else:
        field = "model"
        try:
            tokenizer = data.train_tokenizer(data.training_text(text, d.format), vocab, progress=progress)
        except InputError as e:
            raise InputError(path, field, f"{e.message}; or give data.tokenizer") from None
    try:
        size = data.load_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
    except InputError as e:
        raise InputError(path, field, str(e)) from None
    if size > vocab:
        raise InputError(path, field, f"the tokenizer {tokenizer} has {size:,} tokens, more than the model's "
                         f"vocab_size {vocab:,} (expected the model's own tokenizer)")
    try:
        counts = data.cached_tokens(text_path, tokenizer, d.format, progress=progress)
    except InputError as e:
        raise InputError(path, "data.source", str(e)) from None
    if counts["tokens"] < workload.seq_len + 1:
        raise InputError(path, "data.source", f"{d.source} has {counts['tokens']:,} tokens (expected at least "
                         f"seq_len + 1 = {workload.seq_len + 1})")
    return counts["path"]


def _scheduling(path: Path, spec):
    """The scheduling policy object of `spec` (a PolicySpec; None for `none`): it drives the
    trainer over the control channel (mfbench.device.control)."""
    from mfbench import policies

    if spec.policy == "none":
        return None
    try:
        return policies.make("scheduling", spec)
    except InputError as e:
        field = "scheduling." + e.field if e.field and e.field != "policy" else "scheduling.policy"
        raise InputError(path, field, e.message) from None


def _run_trainer(runner, spec: str, scheduling=None, checkpoint_every: int = CHECKPOINT_EVERY,
                 resume: bool = False) -> None:
    """Run `mfbench-train --workload spec` through the runner, passing its progress lines to
    stderr; a scheduling policy drives it over stdin/stdout. Its one-line error becomes an
    InputError (exit 2: a value it cannot run) or a TrainerError."""
    from mfbench.device import control
    from mfbench.device.native import BINARY_NAME, TrainerError

    args = ["--workload", spec, "--sample-ms", SAMPLE_MS, "--checkpoint-every", checkpoint_every,
            *(["--resume"] if resume else [])]
    code, lines = control.run(args, scheduling, command=runner.command)
    if code == 0:
        return
    last = lines[-1] if lines else f"{BINARY_NAME} exited with {code}"
    if code == 2:
        raise InputError(None, None, last.removeprefix(f"{BINARY_NAME}: error: "))
    reason = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
    raise TrainerError(f"{BINARY_NAME} {reason}: {last}", code, "\n".join(lines))
