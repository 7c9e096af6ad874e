"""`mfbench compare`: the native trainer and PyTorch (the independent reference) train one
workload from one transformers-made init on one token file; their loss curves agree."""
import json

import pytest
from native_fixtures import make_tokenizer
from transformers import GPT2Config

from mfbench.cli import main
from mfbench.contracts.trace import read_summary, read_trace


def workload(tmp_path, method="{kind: full}"):
    tokenizer = make_tokenizer(tmp_path / "tok", 300)
    GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4).save_pretrained(tmp_path / "model")
    path = tmp_path / "w.yaml"
    path.write_text(f"""name: tiny-compare
model: model/config.json
method: {method}
data: {{source: pydoc, tokenizer: {tokenizer}}}
seq_len: 32
batch: 4
micro_batch: 2
steps: 6
threads: 1
optimizer: {{lr: 3.0e-3, warmup_steps: 2, schedule: cosine, weight_decay: 0.1, grad_clip: 0.5}}
""")
    return path


def test_native_and_pytorch_losses_agree_from_one_init(tmp_path, capsys):
    assert main(["compare", str(workload(tmp_path)), "--out", str(tmp_path / "out")]) == 0
    losses = {side: [e["loss"] for e in read_trace(tmp_path / "out" / side / "trace.jsonl") if e["type"] == "step"]
              for side in ("native", "pytorch")}
    assert len(losses["native"]) == len(losses["pytorch"]) == 6
    assert losses["native"][-1] < losses["native"][0]  # it learns
    assert max(abs(a - b) / b for a, b in zip(losses["native"], losses["pytorch"])) < 1e-5
    pytorch = read_summary(tmp_path / "out" / "pytorch" / "summary.json")
    assert pytorch.details["engine"] == "pytorch" and pytorch.peak_memory_bytes > 0
    spec = json.loads((tmp_path / "out" / "native" / "run.json").read_text())
    assert spec["model"]["weights"] == str(tmp_path / "out" / "init" / "model.safetensors")
    assert "speed" in capsys.readouterr().out


def test_lora_is_refused_with_one_line(tmp_path, capsys):
    path = workload(tmp_path, "{kind: lora, targets: [attn.c_attn]}")
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "method.kind" in capsys.readouterr().err
