"""Table: the models (exact parameter counts and FLOPs per token from their HF configs) and
the planned memory of one training step per method and dtype (sequence 128, batch 8,
float32 compute, no sharding or checkpointing), from the step program `mfbench plan` prints."""
from __future__ import annotations

from mfbench.analysis.figures import DOUBLE, Context, draw_table, table_height
from mfbench.plan import compile_program
from mfbench.spec import models
from mfbench.spec.workload import Workload
from mfbench.units import MB

SEQ, BATCH = 128, 8
LORA = {"gpt2": ["attn.c_attn", "attn.c_proj"], "gpt2-medium": ["attn.c_attn", "attn.c_proj"]}
QKV = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the paper's Qwen and Gemma LoRA targets
METHODS = [("full", "float32"), ("lora", "float32"), ("lora", "bfloat16")]


def planned_peak(model: str, method: str, frozen: str) -> int:
    spec = {"name": f"{model}-{method}", "model": model, "seq_len": SEQ, "batch": BATCH, "threads": 1,
            "method": {"kind": method, "rank": 8, "alpha": 16, "targets": LORA.get(model, QKV)} if method == "lora"
            else {"kind": "full"}, "memory": {"frozen_dtype": frozen}}
    return compile_program(Workload.model_validate(spec), threads=1).peak_bytes()


def make(ctx: Context):
    rows = []
    for name in models.model_names():
        config = models.get_config(name)
        per_token = models.flops_per_token(config, SEQ)
        row = {"model": name, "family": models.arch(config).family, "params": models.param_count(config),
               "gflops_per_token_fwd_bwd": round(sum(f + b for f, b in per_token.values()) / 1e9, 3)}
        for method, dtype in METHODS:
            row[f"{method}_{dtype}_peak_mb"] = round(planned_peak(name, method, dtype) / MB, 1)
        rows.append(row)
    header = ["model", "family", "parameters", "GFLOP per token (fwd + bwd)", "Full-FT fp32 step (MB)",
              "LoRA fp32 step (MB)", "LoRA, bf16 frozen (MB)"]
    cells = [[r["model"], r["family"], f"{r['params'] / 1e6:,.1f} M", f"{r['gflops_per_token_fwd_bwd']:.2f}",
              *(f"{r[f'{m}_{d}_peak_mb']:,.0f}" for m, d in METHODS)] for r in rows]
    fig = ctx.figure(DOUBLE, table_height(2, cells))
    draw_table(fig, header, cells)
    return ctx.save(fig, "models", rows)
