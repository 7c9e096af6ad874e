"""Bad input: every malformed workload or device file ends as one clear message and exit 2."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfbench.errors import InputError
from mfbench.spec.profile import DEVICES_DIR, load_device
from mfbench.spec.workload import load_workload

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "workloads" / "paper" / "gpt2-full-seq128.yaml"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mfbench.cli", *args], capture_output=True, text=True, timeout=120)


def write(tmp_path, data, name="w.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def valid_workload():
    return yaml.safe_load(WORKLOAD.read_text())


@pytest.mark.parametrize("change, field, expected", [
    (lambda w: w.update(model="gpt5"), "model", "unknown model"),
    (lambda w: w.update(batch=-8), "batch", "greater than 0"),
    (lambda w: w.update(batch=8, micro_batch=3), None, "must divide batch"),
    (lambda w: w.pop("seq_len"), "seq_len", "missing"),
    (lambda w: w.update(seq_len="long"), "seq_len", "integer"),
    (lambda w: w.update(scheduling={"policy": "napping"}), "scheduling", "napping"),
    (lambda w: w["method"].update(kind="qlora"), "method.kind", "full"),
    (lambda w: w.update(stepz=3), "stepz", "unknown field"),
    (lambda w: w.update(batch=8_000_000_000), "batch", "less than or equal to 4096"),  # planning it hung
    (lambda w: w.update(data={"format": "jsonl"}), "data", "pydoc (the default) is prose"),  # no data.source
])
def test_bad_workload_names_file_and_field(tmp_path, change, field, expected):
    data = valid_workload()
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(InputError) as e:
        load_workload(path)
    assert e.value.file == path
    if field:
        assert e.value.field and e.value.field.startswith(field)
    assert expected in str(e.value)

    result = run_cli("plan", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr


def test_bad_yaml_and_missing_file(tmp_path):
    bad = write(tmp_path, "model: gpt2\n  batch: [8\n")
    for path, expected in ((bad, "not valid YAML"), (tmp_path / "nope.yaml", "file not found")):
        result = run_cli("plan", str(path))
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_binary_or_non_utf8_file_or_a_folder_is_one_line_and_exit_2(tmp_path):
    """Every command that reads a YAML file: one byte that is not UTF-8, a binary file, a
    folder where a file belongs."""
    valid = (ROOT / "workloads" / "paper" / "gpt2-lora-seq128.yaml").read_bytes()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(valid.replace(b"GPT-2 small", b"GPT-2 sm\xe4ll"))  # one Latin-1 byte
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    for path, expected in ((latin1, "not UTF-8 text: byte 0xe4"), (binary, "not UTF-8"), (folder, "cannot read")):
        for args in (["plan", str(path)], ["plan", "--json", str(path)], ["simulate", str(path)],
                     ["run", str(path)], ["devices", "show", str(path)], ["sweep", str(path)]):
            result = run_cli(*args)
            assert result.returncode == 2, (args, result.stderr)
            assert result.stderr.count("\n") == 1 and expected in result.stderr and str(path) in result.stderr, args


def test_unknown_device_lists_shipped_ones():
    result = run_cli("devices", "show", "nokia3310")
    assert result.returncode == 2 and "pixel8" in result.stderr and "Traceback" not in result.stderr


def test_a_device_name_too_long_for_a_file_name_is_one_line(tmp_path):
    result = run_cli("simulate", str(WORKLOAD), "--device", "x" * 5000, "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unknown device" in result.stderr
    assert len(result.stderr) < 500 and "Traceback" not in result.stderr


# --- property-based: random mutations of valid files never escape as anything but InputError

def _paths(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def mutate(data, draw):
    data = copy.deepcopy(data)
    paths = list(_paths(data))
    path = draw(st.sampled_from(paths))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["delete", "replace", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = draw(JUNK)
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=6))] = draw(JUNK)
    return data


def check_only_input_errors(load, path):
    try:
        load(path)
    except InputError as e:
        assert e.file is not None and str(e.file) in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_workloads_give_input_errors_only(tmp_path, data):
    path = write(tmp_path, mutate(valid_workload(), data.draw))
    check_only_input_errors(load_workload, path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_devices_give_input_errors_only(tmp_path, data):
    device = yaml.safe_load((DEVICES_DIR / "pixel8.yaml").read_text())
    path = write(tmp_path, mutate(device, data.draw), "d.yaml")
    check_only_input_errors(load_device, path)


# --- issue 14: every reproducer of bad input on the Python side

def one_line(result, *expected, code=2):
    """The contract: exit code 2, exactly one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert len(result.stderr) < 500, result.stderr[:500]
    for e in expected:
        assert e in result.stderr, (e, result.stderr)


def test_non_utf8_byte_in_a_comment_is_one_line(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_bytes(WORKLOAD.read_bytes() + b"# caf\xe9\n")
    one_line(run_cli("plan", str(path)), str(path), "not UTF-8 text: byte 0xe9")


def test_deep_nesting_and_aliases_are_refused_without_expanding(tmp_path):
    deep = write(tmp_path, "model: " + "[" * 500 + "]" * 500 + "\n", "deep.yaml")
    one_line(run_cli("plan", str(deep)), "nested deeper than 50 levels")
    # billion laughs: nine levels of ten aliases each, 10^9 strings if expanded
    laughs = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = write(tmp_path, "\n".join(laughs) + "\nname: *a9\n", "bomb.yaml")
    for args in (["plan", str(bomb)], ["simulate", str(bomb)], ["devices", "show", str(bomb)], ["sweep", str(bomb)]):
        one_line(run_cli(*args), str(bomb), "alias *a0", "not supported")
    # an anchor alone expands nothing and is harmless
    data = valid_workload()
    data["name"] = "x"
    text = yaml.safe_dump(data).replace("name: x", "name: &n x")
    assert load_workload(write(tmp_path, text, "anchor.yaml")).name == "x"


@pytest.mark.parametrize("line, field", [("steps: yes", "steps"), ("steps: true", "steps"), ("steps: on", "steps"),
                                         ("seq_len: 128.0", "seq_len"), ("batch: '8'", "batch")])
def test_yaml_1_1_booleans_and_non_integers_are_refused_for_numbers(tmp_path, line, field):
    key = line.split(":")[0]
    text = "\n".join(ln for ln in WORKLOAD.read_text().splitlines() if not ln.startswith(key + ":")) + f"\n{line}\n"
    path = write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_workload(path)
    assert e.value.field == field and "integer" in e.value.message
    one_line(run_cli("simulate", str(path), "--out", str(tmp_path / "out")), f"{path}: {field}:")


def test_yaml_1_2_numbers_read_as_numbers(tmp_path):
    text = WORKLOAD.read_text().replace("lr: 1.0e-4", "lr: 3e-4").replace("steps: 200", "steps: 0x10")
    w = load_workload(write(tmp_path, text))
    assert w.optimizer.lr == 3e-4 and w.steps == 16


def pixel8():
    return yaml.safe_load((DEVICES_DIR / "pixel8.yaml").read_text())


@pytest.mark.parametrize("where, value", [("power.idle_w", ".nan"), ("thermal.capacitance_j_per_c", ".inf"),
                                          ("memory.bandwidth_gbs", "-.inf")])
def test_non_finite_device_numbers_are_refused(tmp_path, where, value):
    device = pixel8()
    section, key = where.split(".")
    device[section][key]["value"] = "NUMBER"
    path = write(tmp_path, yaml.safe_dump(device).replace("NUMBER", value), "d.yaml")
    with pytest.raises(InputError, match="finite number") as e:
        load_device(path)
    assert e.value.field == f"{where}.value"
    one_line(run_cli("simulate", str(WORKLOAD), "--device", str(path), "--out", str(tmp_path / "o")), "finite")


def test_non_finite_workload_and_sweep_numbers_are_refused(tmp_path):
    text = WORKLOAD.read_text().replace("lr: 1.0e-4", "lr: .inf")
    with pytest.raises(InputError, match="finite number"):
        load_workload(write(tmp_path, text))
    sweep = write(tmp_path, {"name": "s", "devices": ["pixel8"], "workloads": [str(WORKLOAD)], "steps": 2}, "s.yaml")
    bad = write(tmp_path, sweep.read_text() + "ambient_c: .nan\n", "bad.yaml")
    one_line(run_cli("sweep", str(bad), "--out", str(tmp_path / "o")), "ambient_c", "finite")


def test_absurd_ambient_and_battery_are_refused(tmp_path):
    out = str(tmp_path / "o")
    one_line(run_cli("simulate", str(WORKLOAD), "--ambient", "1000", "--out", out), "--ambient", "-40 to 60")
    one_line(run_cli("simulate", str(WORKLOAD), "--ambient", "nan", "--out", out), "--ambient", "finite")
    one_line(run_cli("simulate", str(WORKLOAD), "--battery-start", "150", "--out", out), "--battery-start")
    assert not (tmp_path / "o" / "summary.json").exists()
    sweep = {"name": "s", "devices": ["pixel8"], "workloads": [str(WORKLOAD)], "steps": 2}
    one_line(run_cli("sweep", str(write(tmp_path, {**sweep, "ambient_c": 1000}, "s.yaml")), "--out", out),
             "ambient_c", "-40 to 60")
    one_line(run_cli("sweep", str(write(tmp_path, {**sweep, "battery_start_pct": 0}, "s.yaml")), "--out", out),
             "battery_start_pct")
    device = pixel8()
    device["thermal"]["ambient_c"]["value"] = 1000
    with pytest.raises(InputError, match="-40 to 60") as e:
        load_device(write(tmp_path, device, "d.yaml"))
    assert e.value.field == "thermal.ambient_c"


def test_seq_len_beyond_the_models_positions_is_refused(tmp_path):
    data = valid_workload()
    data["seq_len"] = 2048
    path = write(tmp_path, data)
    for args in (["plan", str(path)], ["simulate", str(path), "--out", str(tmp_path / "o")],
                 ["run", str(path), "--out", str(tmp_path / "r")]):
        one_line(run_cli(*args), f"{path}: seq_len: 2048 is longer than the 1024 positions")


TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}


@pytest.mark.parametrize("change, field, expected", [
    ({"hidden_size": 0}, "hidden_size", "positive integer"),
    ({"num_attention_heads": 5, "num_key_value_heads": 1}, "num_attention_heads", "5 heads do not divide hidden_size 64"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "do not divide num_attention_heads 4"),
    ({"head_dim": 15}, "head_dim", "odd"),
    ({"vocab_size": 2.5}, "vocab_size", "positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers", "positive integer"),
    ({"model_type": "gpt2", "n_embd": 64, "n_head": 6, "n_layer": 1}, "n_head", "6 heads do not divide n_embd 64"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "true or false"),
])
def test_plan_refuses_a_config_json_the_trainer_refuses(tmp_path, change, field, expected):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **change}))
    data = {**valid_workload(), "model": "config.json", "seq_len": 32}
    path = write(tmp_path, data)
    one_line(run_cli("plan", str(path)), f"{path}: model: {field}: ", expected)


def test_run_refuses_a_missing_data_source_before_any_work(tmp_path):
    data = valid_workload()
    data["data"] = {"source": "notes.txt"}
    one_line(run_cli("run", str(write(tmp_path, data)), "--out", str(tmp_path / "r")), "data.source", "not found")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from native_fixtures import make_tokenizer
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenize_never_writes_over_its_input(tmp_path, tokenizer):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    one_line(run_cli("tokenize", str(notes), "--tokenizer", str(tokenizer), "--out", str(notes)), "--out",
             "is the input file")
    os.link(notes, tmp_path / "same.bin")  # the same file by another name
    one_line(run_cli("tokenize", str(notes), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "same.bin")),
             "is the input file")
    one_line(run_cli("tokenize", str(notes), "--tokenizer", str(tokenizer), "--out", str(tokenizer)),
             "is the tokenizer file")
    assert notes.read_text() == "my notes\n"


def test_a_mask_without_targets_is_refused(tmp_path, tokenizer):
    from mfbench.device.data import read_token_file, write_token_file
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"prompt": "hello", "response": ""}\n')
    one_line(run_cli("tokenize", str(chat), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "t.bin"),
                     "--no-eos"), str(chat), "no token is a loss target")
    with pytest.raises(InputError, match="no token is a loss target"):
        write_token_file(tmp_path / "t.bin", [1, 2, 3], 10, [0, 0, 0])
    path = write_token_file(tmp_path / "t.bin", [1, 2, 3], 10, [0, 1, 0])
    raw = bytearray(path.read_bytes())
    raw[-2] = 0  # the one target gone
    path.write_bytes(raw)
    with pytest.raises(InputError, match="no token is a loss target"):
        read_token_file(path)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 kB tmpfs (a full disk after a few writes) and a read-only one; needs root, as CI runs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounts = {"full": tmp_path / "full", "ro": tmp_path / "ro"}
    for name, options in (("full", "size=64k"), ("ro", "ro,size=64k")):
        mounts[name].mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mounts[name])], check=True)
    yield mounts
    for m in mounts.values():
        subprocess.run(["umount", str(m)], check=True)


def test_unwritable_outputs_are_one_line(tmp_path, tiny_fs):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, expected in ((a_file, "a file is in the way"), (a_file / "sub", "a file is in the way"),
                          (tiny_fs["ro"] / "out", "Read-only file system"),
                          (tiny_fs["full"] / "out", "No space left on device")):
        one_line(run_cli("simulate", str(WORKLOAD), "--out", str(out), "--trace-all-ops"), "cannot write", expected)
        one_line(run_cli("figures", "--only", "memory_breakdown", "--out", str(out)), "cannot write", expected)
    assert a_file.read_text() == "x" and not list(tiny_fs["full"].rglob("*.json"))  # nothing half written


def test_a_user_policy_that_fails_to_import_or_construct_is_one_line(tmp_path):
    (tmp_path / "broken_policy.py").write_text("1 / 0\n")
    (tmp_path / "syntax_policy.py").write_text("def (:\n")
    (tmp_path / "angry_policy.py").write_text(
        "from mfbench.policies import Scheduling\n"
        "class Angry(Scheduling):\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('no way')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for policy, expected in (("broken_policy:P", "ZeroDivisionError"), ("syntax_policy:P", "SyntaxError"),
                             ("angry_policy:Angry", "RuntimeError: no way")):
        data = {**valid_workload(), "scheduling": {"policy": policy}}
        path = write(tmp_path, data)
        result = subprocess.run([sys.executable, "-m", "mfbench.cli", "simulate", str(path), "--out",
                                 str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=env)
        one_line(result, f"{path}: scheduling", expected)


def test_a_user_policy_that_raises_while_deciding_is_one_line(tmp_path):
    (tmp_path / "brokenpolicy.py").write_text(
        "class Broken:\n    def decide(self, observation):\n        return {'sleep_s': 1 / 0}\n")
    data = valid_workload()
    data["scheduling"] = {"policy": "brokenpolicy:Broken"}
    path = write(tmp_path, data)
    result = subprocess.run([sys.executable, "-m", "mfbench.cli", "simulate", str(path), "--steps", "2", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    one_line(result, "scheduling", "Broken.decide raised ZeroDivisionError")


def test_sweep_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = run_cli("sweep", str(ROOT / "workloads" / "sweeps" / "schedulers.yaml"), "--out", str(tmp_path / "taken"),
                     "--inline", "--set", "steps=2", "--set", "devices=[pixel8]")
    one_line(result, "a file is in the way")
    assert (tmp_path / "taken").read_text() == "mine"
