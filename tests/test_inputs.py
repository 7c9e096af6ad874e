"""Bad input: every malformed workload or device file ends as one clear message and exit 2."""
from __future__ import annotations

import copy
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
