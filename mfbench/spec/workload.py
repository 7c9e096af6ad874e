"""Workloads: what to train, how, and under which policies (`workloads/*.yaml`).

The schema is documented in docs/workloads.md; `load_workload` validates a file and turns
every problem into one InputError naming the file and the field path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mfbench.errors import (
    InputError,
    Int,
    Number,
    Strict,
    apply_sets,
    did_you_mean,
    load_schema,
    validate,
)

MAX_BATCH = 4096  # sequences a step


class Method(Strict):
    kind: Literal["full", "lora"]
    rank: Int = Field(8, gt=0)
    alpha: Number = Field(16.0, gt=0)
    # module names matched as peft does: a module is adapted when its name equals a target or
    # ends with "." + target (so "c_proj" on GPT-2 adapts both attn.c_proj and mlp.c_proj)
    targets: tuple[str, ...] = ()
    dropout: Number = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _lora_needs_targets(self):
        if self.kind == "lora" and not self.targets:
            raise ValueError("LoRA needs targets, the modules to adapt, e.g. [attn.c_attn, attn.c_proj] "
                             "for GPT-2 or [q_proj, v_proj] for Qwen and Gemma")
        return self


class Data(Strict):
    # "pydoc": the standard library's pydoc_data.topics prose (a WikiText-2 stand-in);
    # otherwise a path to a .txt or .jsonl file ({"prompt", "response"} lines, loss on response).
    source: str = "pydoc"
    format: Literal["text", "jsonl"] = "text"
    # tokenizer.json (or a folder holding one); default: the model folder's, else a byte-level
    # BPE of the model's vocabulary size trained on the data and cached
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _pydoc_is_text(self):
        if self.source == "pydoc" and self.format != "text":
            raise ValueError(f"data.source pydoc (the default) is prose, not {self.format} (expected format text, "
                             "or a source file of that format)")
        return self


class Optimizer(Strict):
    name: Literal["adamw"] = "adamw"
    lr: Number = Field(1e-4, gt=0)
    min_lr: Number = Field(0.0, ge=0)  # where the cosine and linear schedules end
    weight_decay: Number = Field(0.0, ge=0)
    beta1: Number = Field(0.9, ge=0, lt=1)
    beta2: Number = Field(0.999, ge=0, lt=1)
    eps: Number = Field(1e-8, gt=0)
    warmup_steps: Int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: Number | None = Field(1.0, gt=0)


class PolicySpec(BaseModel):
    """`policy: NAME` (a built-in, or `module:Class`); every other key is a parameter of it."""

    model_config = ConfigDict(extra="allow", frozen=True)
    policy: str = "none"

    @property
    def params(self) -> dict:
        return dict(self.model_extra or {})


class Memory(Strict):
    sharding: PolicySpec = PolicySpec()
    checkpointing: PolicySpec = PolicySpec()
    attention: Literal["standard", "memory_efficient"] = "standard"
    # rows of logits alive at once in the loss: auto = about 32 MB worth (at least 128 rows),
    # 0 = all rows of the micro-batch
    ce_chunk_rows: Annotated[Int, Field(ge=0)] | Literal["auto"] = "auto"
    # LoRA: how the frozen parameters are held; 16-bit halves their bytes, compute stays fp32
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Full-FT: what lives with its shard on flash besides the parameters (docs/native.md)
    offload: list[Literal["optimizer", "gradients"]] = []


class Workload(Strict):
    name: str
    description: str = ""
    model: str  # registry name (see `mfbench models`) or a path to an HF config.json / model folder
    method: Method
    data: Data = Data()
    seq_len: Int = Field(gt=0)
    # a phone's step holds a handful of sequences; the bound keeps the step program (one set of
    # ops per micro-batch) a size that plans in seconds
    batch: Int = Field(gt=0, le=MAX_BATCH)
    micro_batch: Int | None = Field(None, gt=0)  # default: the whole batch at once
    steps: Int = Field(100, gt=0)
    optimizer: Optimizer = Optimizer()
    memory: Memory = Memory()
    accumulation: PolicySpec = PolicySpec(policy="fixed")
    scheduling: PolicySpec = PolicySpec()
    threads: Annotated[Int, Field(gt=0)] | Literal["auto"] = "auto"  # auto: every core of the cluster that runs it
    seed: Int = Field(1234, ge=0)  # random init and LoRA adapter init

    @model_validator(mode="after")
    def _micro_batch_divides_batch(self):
        if self.micro_batch is not None and self.batch % self.micro_batch:
            raise ValueError(f"micro_batch ({self.micro_batch}) must divide batch ({self.batch})")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.micro_batch or self.batch

    @property
    def accumulation_steps(self) -> int:
        return self.batch // self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def resolved(self, program) -> dict:
        """The workload as `program` (its StepProgram) runs it: the micro-batch the
        accumulation policy chose, the thread count and the loss's chunk rows as numbers."""
        data = self.model_dump(mode="json")
        data.update(micro_batch=program.micro_batch, threads=program.threads)
        data["memory"]["ce_chunk_rows"] = program.ce_chunk_rows
        return data


POLICY_FIELDS = {
    "sharding": lambda w: w.memory.sharding,
    "checkpointing": lambda w: w.memory.checkpointing,
    "accumulation": lambda w: w.accumulation,
    "scheduling": lambda w: w.scheduling,
}
POLICY_PATHS = {"sharding": "memory.sharding", "checkpointing": "memory.checkpointing",
                "accumulation": "accumulation", "scheduling": "scheduling"}


def workload_path(name_or_path: str | Path) -> Path:
    """A shipped workload by name (`gpt2-full-seq128`; `mfbench workloads` lists them), or a
    workload file by path."""
    from mfbench import shipped

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    names = shipped.workload_names()
    if str(name_or_path) not in names:
        raise InputError(None, "workload", f"unknown workload {str(name_or_path)!r}{did_you_mean(name_or_path, names)}"
                         "; expected a YAML path or a shipped name (mfbench workloads)")
    return names[str(name_or_path)]


def load_workload(path: str | Path, sets: list[str] | tuple[str, ...] = (), data: dict | None = None) -> Workload:
    """Validate a workload file, after `--set field.path=value` overrides: schema, model name,
    and every policy with its parameters. With `data`, validate that document instead (one
    built on the command line); `path` then only names it in errors and its folder is the base
    of relative paths."""
    from mfbench import policies
    from mfbench.spec import models

    workload = load_schema(Workload, path, sets) if data is None else validate(Workload, apply_sets(data, sets), path)
    try:
        config = models.get_config(workload.model, base=Path(path).parent)
        arch = models.arch(config)  # checked as the trainer checks it
    except InputError as e:
        raise InputError(path, "model", str(e)) from None
    if workload.seq_len > arch.max_positions:
        raise InputError(path, "seq_len", f"{workload.seq_len} is longer than the {arch.max_positions} positions of "
                         f"model {workload.model} (expected at most {arch.max_positions})")
    if workload.method.kind == "lora":
        try:
            models.lora(config, workload.method.rank, workload.method.targets)
        except InputError as e:
            raise InputError(path, "method.targets", e.message) from None
    elif workload.method.dropout != 0:
        raise InputError(path, "method.dropout", f"{workload.method.dropout} needs LoRA: dropout applies to the "
                         "adapters' input (expected 0 with method full)")
    elif workload.memory.frozen_dtype != "float32":
        raise InputError(path, "memory.frozen_dtype", f"{workload.memory.frozen_dtype} needs LoRA: Full-FT freezes "
                         "no parameter (expected float32 with method full)")
    offload = workload.memory.offload
    if offload and workload.method.kind != "full":
        raise InputError(path, "memory.offload", f"{offload} needs Full-FT: LoRA's trainable state is small "
                         "(expected [] with method lora)")
    if "gradients" in offload and workload.memory.sharding.policy == "none":
        raise InputError(path, "memory.offload", "gradients live with their shard on flash: expected a "
                         "memory.sharding policy (lru or prefetch) with them")
    for kind, get in POLICY_FIELDS.items():
        try:
            policies.make(kind, get(workload))
        except InputError as e:
            field = POLICY_PATHS[kind] + (f".{e.field}" if e.field else "")
            raise InputError(path, field, e.message) from None
    return workload
