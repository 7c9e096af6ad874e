"""Fuzzing every input file mfbench reads (issue 14), through the real CLI entry point.

Seeded mutations of valid workload, device and sweep YAML files, HF config.json files for
`mfbench plan`, and `mfbench tokenize` inputs: values replaced by junk (NaN, huge numbers,
YAML 1.1 booleans, long strings, wrong types), fields deleted or invented, and the text
itself damaged (a stray Latin-1 byte, truncation, deep nesting, aliases, tabs). Each case
runs `mfbench.cli.main` in this process (fast; an alarm catches a hang) and must end in one
of two ways: exit 2 with exactly one short line on stderr, or exit 0 with a result that
makes sense (finite numbers, a token file that reads back). Anything else, a traceback, a
hang or a NaN accepted, is collected and reported with the seed that reproduces it.

The default run tries a few hundred cases; `-m slow` tries five times as many.
"""
from __future__ import annotations

import copy
import io
import json
import math
import random
import signal
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from mfbench import cli
from mfbench.contracts.trace import read_summary
from mfbench.device.data import read_token_file

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = sorted((ROOT / "workloads").rglob("*.yaml"))
WORKLOADS = [w for w in WORKLOADS if "sweeps" not in w.parts]
DEVICES = sorted((ROOT / "devices").glob("*.yaml"))
SWEEP = {"name": "fuzz", "steps": 2, "battery_start_pct": 80, "ambient_c": 25, "devices": ["pixel8", "host"],
         "workloads": [str(ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml")],
         "scheduling": [{"policy": "paper"}, {"policy": "thermal_pacer", "limit_c": 40}]}
CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64,
              "tie_word_embeddings": True},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300,
                    "max_position_embeddings": 64},
}
HANG_S = 30
# how many times the default number of cases a test tries: 5 with -m slow
SCALE = pytest.mark.parametrize("scale", [pytest.param(1, id="default"),
                                          pytest.param(5, id="more", marks=pytest.mark.slow)])

JUNK = [None, True, False, "yes", "no", "on", 0, -1, 1, 3, 2**31, 2**63, 10**30, -10**30, 0.5, -0.0, 1e308, 1e-300,
        float("nan"), float("inf"), -float("inf"), "", "x" * 5000, "é", "\x00", "auto", "none", "../../x",
        [], [1, 2], ["a"], {}, {"a": 1}, {"value": float("nan"), "estimated": "x"}, {"policy": "paper"}]


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no handler in mfbench swallows it."""


def _alarm(signum, frame):
    raise Hang


def cli_case(argv: list[str], accept=None) -> str | None:
    """Run `mfbench ARGV` in this process; None when the contract holds, else the problem."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    except Hang:
        return f"no answer within {HANG_S} s"
    except BaseException as e:  # noqa: BLE001 -- any escape is what the fuzzer looks for
        return "traceback: " + "".join(traceback.format_exception_only(type(e), e)).strip()[:300] + \
            " at " + traceback.extract_tb(e.__traceback__)[-1].filename.split("/")[-1] + ":" + \
            str(traceback.extract_tb(e.__traceback__)[-1].lineno)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    stderr = err.getvalue()
    if code == 2:
        lines = stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("mfbench: error: ") or len(lines[0]) > 500:
            return f"exit 2 without one short error line: {stderr[:300]!r}"
        return None
    if code != 0:
        return f"exit {code}: {stderr[-300:]!r}"
    return accept(out.getvalue()) if accept else None


def finite_text(text: str) -> str | None:
    """A printed result must not show a NaN or an infinity."""
    for word in ("nan", "inf"):
        if any(token.strip("(),%:").lower() in (word, f"-{word}") for token in text.split()):
            return f"accepted with a non-finite number in the output: {text[:300]!r}"
    return None


def sane_summary(out: Path):
    def check(_stdout: str) -> str | None:
        s = read_summary(out / "summary.json")
        numbers = {k: v for k, v in s.__dict__.items() if isinstance(v, float)}
        if bad := [k for k, v in numbers.items() if not math.isfinite(v)]:
            return f"accepted with non-finite {bad}"
        if s.wall_s < 0 or (s.energy_j is not None and s.energy_j < 0) or s.peak_memory_bytes <= 0:
            return f"accepted with a negative time, energy or memory: {s}"
        if s.battery_end_pct is not None and not 0 <= s.battery_end_pct <= 100:
            return f"battery ended at {s.battery_end_pct} %"
        return None
    return check


# ------------------------------------------------------------------------ mutations

def _paths(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def mutate_data(data, rng: random.Random):
    """One or two changes to a loaded document: delete, replace by junk, scale a number, add a key."""
    data = copy.deepcopy(data)
    for _ in range(rng.choice([1, 1, 2])):
        paths = list(_paths(data))
        if not paths:
            break
        path = rng.choice(paths)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key, action = path[-1], rng.choice(["delete", "junk", "junk", "junk", "scale", "add"])
        if action == "delete":
            del parent[key]
        elif action == "junk":
            parent[key] = rng.choice(JUNK)
        elif action == "scale" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] * rng.choice([0, -1, 1000, 10**9, 1e-9, 0.5])
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "value", "policy", "spec", "name"])] = rng.choice(JUNK)
    return data


def mutate_text(text: str, rng: random.Random) -> bytes:
    """Damage the text of a valid file."""
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    kind = rng.choice(["latin1", "truncate", "deep", "alias", "bomb", "tab", "duplicate", "binary", "flow"])
    if kind == "latin1":
        at = rng.randrange(len(text))
        return text[:at].encode() + b"\xe9" + text[at:].encode()
    if kind == "truncate":
        return text[:rng.randrange(len(text))].encode()
    if kind == "deep":
        n = rng.choice([49, 60, 500, 5000])
        return (text + f"\nextra: {'[' * n}{']' * n}\n").encode()
    if kind == "alias":
        return (text + "\nextra: *nowhere\n").encode()
    if kind == "bomb":
        laughs = ['l0: &l0 "lol"'] + [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
        return ("\n".join(laughs) + "\n" + text.replace(lines[i], lines[i].split(":")[0] + ": *l8", 1)
                if ":" in lines[i] and not lines[i].startswith(" ") else "\n".join(laughs) + "\n" + text).encode()
    if kind == "tab":
        lines[i] = "\t" + lines[i]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    elif kind == "binary":
        return bytes(rng.randrange(256) for _ in range(rng.choice([1, 64, 4096])))
    else:
        lines[i] = lines[i] + " {[: ,"
    return "\n".join(lines).encode()


def mutant(original: dict, text: str, rng: random.Random) -> bytes:
    if rng.random() < 0.7:
        return yaml.safe_dump(mutate_data(original, rng), allow_unicode=True).encode()
    return mutate_text(text, rng)


def report(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} broken contracts:\n" + "\n".join(problems[:30])


# ---------------------------------------------------------------------------- tests

@SCALE
def test_fuzz_workloads(tmp_path, scale):
    problems = []
    for seed in range(110 * scale):
        rng = random.Random(seed)
        source = rng.choice(WORKLOADS)
        text = source.read_text()
        path = tmp_path / f"w{seed}.yaml"
        path.write_bytes(mutant(yaml.safe_load(text), text, rng))
        out = tmp_path / f"out{seed}"
        for argv, accept in ((["plan", str(path)], finite_text),
                             (["simulate", str(path), "--steps", "2", "--out", str(out)], sane_summary(out))):
            if problem := cli_case(argv, accept):
                problems.append(f"seed {seed} ({source.name}) {argv[0]}: {problem}")
    report(problems)


@SCALE
def test_fuzz_devices(tmp_path, scale):
    workload = str(ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml")
    problems = []
    for seed in range(70 * scale):
        rng = random.Random(1000 + seed)
        source = rng.choice(DEVICES)
        text = source.read_text()
        path = tmp_path / f"d{seed}.yaml"
        path.write_bytes(mutant(yaml.safe_load(text), text, rng))
        out = tmp_path / f"out{seed}"
        for argv, accept in ((["devices", "show", str(path)], finite_text),
                             (["simulate", workload, "--device", str(path), "--steps", "2", "--out", str(out)],
                              sane_summary(out))):
            if problem := cli_case(argv, accept):
                problems.append(f"seed {1000 + seed} ({source.name}) {argv[0]}: {problem}")
    report(problems)


@SCALE
def test_fuzz_sweeps(tmp_path, scale):
    from mfbench.errors import InputError
    from mfbench.sim.sweep import load_sweep

    problems, runs = [], 0
    text = yaml.safe_dump(SWEEP)
    for seed in range(50 * scale):
        rng = random.Random(2000 + seed)
        path = tmp_path / f"s{seed}.yaml"
        path.write_bytes(mutant(SWEEP, text, rng))
        try:  # the sweep's own validation, in process: every value it names is checked before any run
            load_sweep(path)
        except InputError:
            continue
        except Exception as e:  # noqa: BLE001
            problems.append(f"seed {2000 + seed}: load_sweep raised {type(e).__name__}: {str(e)[:200]}")
            continue
        data = yaml.safe_load(path.read_text())
        if runs == 3 * scale or data.get("steps") != 2:
            continue  # a few whole sweeps show the runs report alike; more steps is long, not wrong
        runs += 1
        out = tmp_path / f"out{seed}"
        if problem := cli_case(["sweep", str(path), "--out", str(out), "--inline"]):
            problems.append(f"seed {2000 + seed} sweep: {problem}")
    report(problems)


@SCALE
def test_fuzz_config_json_for_plan(tmp_path, scale):
    problems = []
    for seed in range(70 * scale):
        rng = random.Random(3000 + seed)
        family = rng.choice(list(CONFIGS))
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        config = mutate_data(CONFIGS[family], rng)
        (folder / "config.json").write_text(json.dumps(config) if rng.random() < 0.9 else
                                            json.dumps(config)[:rng.randrange(40)])
        workload = {"name": "fuzz", "model": str(folder), "method": rng.choice(
            [{"kind": "full"}, {"kind": "lora", "targets": ["c_attn"] if family == "gpt2" else ["q_proj"]}]),
            "seq_len": 32, "batch": 2}
        path = tmp_path / f"w{seed}.yaml"
        path.write_text(yaml.safe_dump(workload))
        for argv in (["plan", str(path)], ["plan", "--json", str(path)]):
            if problem := cli_case(argv, finite_text):
                problems.append(f"seed {3000 + seed} ({family}: {json.dumps(config)[:200]}) {argv[:2]}: {problem}")
    report(problems)


def _jsonl_line(rng: random.Random) -> str:
    value = rng.choice([{"prompt": "hello", "response": "world"}, {"text": "some text"}, {"prompt": "p"},
                        {"prompt": "", "response": ""}, {"prompt": 1, "response": "r"}, [1, 2], "str", None,
                        {"text": "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")}])
    return json.dumps(value) if rng.random() < 0.9 else "{not json"


@SCALE
def test_fuzz_tokenize(tmp_path, scale):
    from native_fixtures import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    problems = []
    for seed in range(40 * scale):
        rng = random.Random(4000 + seed)
        kind = rng.choice(["text", "jsonl", "bytes", "empty"])
        data = tmp_path / f"in{seed}.{'jsonl' if kind == 'jsonl' else 'txt'}"
        if kind == "text":
            data.write_text("".join(rng.choice(["word ", "é", "\n", "\t", "\u2028", "<|endoftext|>"])
                                    for _ in range(rng.randrange(200))))
        elif kind == "jsonl":
            data.write_text("\n".join(_jsonl_line(rng) for _ in range(rng.randrange(1, 6))) + "\n")
        elif kind == "bytes":
            data.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        else:
            data.write_bytes(b"")
        out = rng.choice([tmp_path / f"t{seed}.bin", data, tmp_path, tmp_path / "in0.txt" / "x.bin", tokenizer])
        argv = ["tokenize", str(data), "--tokenizer", str(rng.choice([tokenizer, tmp_path / "nope.json", data])),
                "--out", str(out), "--format", rng.choice(["auto", "text", "jsonl"])]
        if rng.random() < 0.3:
            argv.append("--no-eos")

        def token_file_reads_back(stdout: str, out=out) -> str | None:
            counts = json.loads(stdout)
            tokens = read_token_file(out)
            if len(tokens.ids) != counts["tokens"] or counts["tokens"] == 0:
                return f"token file disagrees with the printed counts: {counts}"
            return None
        if problem := cli_case(argv, token_file_reads_back):
            problems.append(f"seed {4000 + seed} {kind} {argv[1:]}: {problem}")
    report(problems)
