"""The command's conventions: `--set`, `--json`, `--version`, "did you mean", shipped workloads
by name, the plan quick form, run folders that are not replaced silently, `train --help`
without a build, and a non-editable install that works outside the source tree.

Every command runs as a real process (`python -m mfbench.cli`). References are independent of
the option under test: `--set` against the same change written into a copy of the file, names
against paths, `--json` against the files and registries the tables are made from.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import mfbench
from mfbench import shipped
from mfbench.spec import models, profile

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "workloads" / "paper"
GPT2_LORA = PAPER / "gpt2-lora-seq128.yaml"


def mfbench_cli(*args, cwd, env=None, python=sys.executable, timeout=300):
    return subprocess.run([python, "-m", "mfbench.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def ok(r) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr
    return r


def one_error_line(r) -> str:
    """The contract for bad input: exit 2, one line on stderr, nothing on stdout."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert lines[0].startswith("mfbench: error: ")
    return lines[0]


def edited_copy(src: Path, dst: Path, change) -> Path:
    data = yaml.safe_load(src.read_text())
    change(data)
    dst.write_text(yaml.safe_dump(data))
    return dst


def summary_without_command(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    del s["provenance"]["command"]  # the command line differs by construction
    return s


# ------------------------------------------------------------------------------------ --set

def test_set_on_simulate_equals_the_same_change_written_in_the_files(tmp_path):
    workload = edited_copy(GPT2_LORA, tmp_path / "gpt2-lora-seq128.yaml", lambda d: (
        d.update(batch=4), d["optimizer"].update(lr=3e-4), d["method"].update(targets=["attn.c_attn"])))
    device = edited_copy(shipped.folder("devices") / "pixel8.yaml", tmp_path / "pixel8.yaml",
                         lambda d: d["ram"]["app_limit_mb"].update(value=4000))
    ok(mfbench_cli("simulate", workload, "--device", device, "--steps", 5, "--out", "edited", cwd=tmp_path))
    r = ok(mfbench_cli("simulate", GPT2_LORA, "--steps", 5, "--out", "set", "--set", "batch=4",
                       "--set", "optimizer.lr=3e-4", "--set", "method.targets=[attn.c_attn]",
                       "--set-device", "ram.app_limit_mb.value=4000", cwd=tmp_path))
    assert "J/token" in r.stdout
    edited, set_ = summary_without_command(tmp_path / "edited"), summary_without_command(tmp_path / "set")
    assert set_ == edited
    assert set_["provenance"]["workload"]["batch"] == 4 and set_["provenance"]["workload"]["optimizer"]["lr"] == 3e-4
    assert set_["provenance"]["device"]["ram"]["app_limit_mb"]["value"] == 4000
    assert set_["tokens_per_step"] == 4 * 128
    # the run records what made it: the command with its --set options
    made = json.loads((tmp_path / "set" / "summary.json").read_text())["provenance"]
    assert "--set batch=4" in made["command"] and "--set-device ram.app_limit_mb.value=4000" in made["command"]
    assert made["mfbench_version"] == mfbench.__version__ and made["seed"] == 1234 and made["charging"] is False


@pytest.mark.parametrize("field, value", [
    ("optimizer.lr", "-1"),           # out of range
    ("batch", "many"),                # wrong type
    ("method.rnak", "4"),             # unknown field
    ("memory.sharding.budget_mb", "-5"),  # a policy parameter
    ("model", "gtp2"),                # a misspelt model: did you mean
])
def test_a_bad_set_gives_the_same_line_as_the_bad_value_in_the_file(tmp_path, field, value):
    sharded = field.startswith("memory.sharding")  # a budget needs a sharding policy to belong to

    def change(d):
        if sharded:
            d.setdefault("memory", {})["sharding"] = {"policy": "lru"}
        *parents, last = field.split(".")
        node = d
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = yaml.safe_load(value)
    path = edited_copy(GPT2_LORA, tmp_path / GPT2_LORA.name, change)
    from_file = one_error_line(mfbench_cli("plan", path, cwd=tmp_path))
    sets = ["--set", "memory.sharding.policy=lru"] if sharded else []
    from_set = one_error_line(mfbench_cli("plan", GPT2_LORA, *sets, "--set", f"{field}={value}", cwd=tmp_path))
    assert from_set.replace(str(GPT2_LORA), "FILE") == from_file.replace(str(path), "FILE")
    assert f": {field}: " in from_set
    if field == "model":
        assert "did you mean 'gpt2'?" in from_set


def test_set_syntax_errors_are_one_line(tmp_path):
    assert "expected field.path=value" in one_error_line(mfbench_cli("plan", GPT2_LORA, "--set", "batch", cwd=tmp_path))
    line = one_error_line(mfbench_cli("plan", GPT2_LORA, "--set", "batch.size=2", cwd=tmp_path))
    assert "batch is a int, not a mapping of fields" in line
    line = one_error_line(mfbench_cli("simulate", GPT2_LORA, "--set-device", "ram.app_limit_mb", cwd=tmp_path))
    assert line == "mfbench: error: --set-device: expected field.path=value, got 'ram.app_limit_mb'"


def test_set_on_plan_and_on_the_run_spec(tmp_path):
    edited = edited_copy(GPT2_LORA, tmp_path / "w.yaml", lambda d: d.update(seq_len=64, micro_batch=2))
    want = ok(mfbench_cli("plan", "--json", edited, "--threads", 2, cwd=tmp_path)).stdout
    got = ok(mfbench_cli("plan", "--json", GPT2_LORA, "--threads", 2, "--set", "seq_len=64", "--set", "micro_batch=2",
                         cwd=tmp_path)).stdout
    assert got == want

    from mfbench.device import run
    spec = run.resolve(GPT2_LORA, out=tmp_path / "out", progress=False, command="mfbench run",
                       sets=["steps=3", "optimizer.lr=5e-4", "seq_len=64"])
    assert spec["steps"] == 3 and spec["optimizer"]["lr"] == 5e-4 and spec["seq_len"] == 64
    assert spec["provenance"]["workload"]["steps"] == 3
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == spec


def test_set_on_a_sweep_changes_the_sweep_file(tmp_path):
    r = ok(mfbench_cli("sweep", ROOT / "workloads" / "sweeps" / "schedulers.yaml", "--out", "s", "--json",
                       "--set", "steps=3", "--set", "devices=[pixel8]", "--set", "scheduling=[{policy: none}]",
                       "--set", "workloads=[../paper/gpt2-lora-seq128.yaml]", "--inline", cwd=tmp_path,
                       timeout=600))
    rows = json.loads(r.stdout)
    assert [(row["device"], row["scheduling"], row["steps"]) for row in rows] == [("pixel8", "none", 3)]
    assert "1 runs" in r.stderr and (tmp_path / "s" / "results.csv").is_file()
    line = one_error_line(mfbench_cli("sweep", ROOT / "workloads" / "sweeps" / "schedulers.yaml",
                                      "--set", "devices=[pixl8]", cwd=tmp_path))
    assert "devices[0]: unknown device 'pixl8' (did you mean 'pixel8'?)" in line


# ------------------------------------------------------------------- --version, --json, names

def test_version_is_the_package_version():
    r = ok(mfbench_cli("--version", cwd=ROOT))
    assert r.stdout.strip() == f"mfbench {mfbench.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()  # one place for the version
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "mfbench.__version__"}' in pyproject


def test_json_listings_are_the_registries(tmp_path):
    rows = json.loads(ok(mfbench_cli("models", "--json", cwd=tmp_path)).stdout)
    assert [r["name"] for r in rows] == list(models.REGISTRY)
    assert all(r["params"] == models.param_count(models.REGISTRY[r["name"]]) for r in rows)

    devices = json.loads(ok(mfbench_cli("devices", "--json", cwd=tmp_path)).stdout)
    assert [d["name"] for d in devices] == profile.device_names()
    assert devices == [profile.load_device(n).model_dump(mode="json") for n in profile.device_names()]
    one = json.loads(ok(mfbench_cli("devices", "show", "pixel8", "--json", "--set-device",
                                    "ram.total_mb.value=4096", cwd=tmp_path)).stdout)
    assert one["ram"]["total_mb"]["value"] == 4096 and one["name"] == "pixel8"

    listed = json.loads(ok(mfbench_cli("workloads", "--json", cwd=tmp_path)).stdout)
    files = sorted(p for p in (ROOT / "workloads").rglob("*.yaml") if p.parent.name not in shipped.NOT_WORKLOADS)
    assert sorted(Path(w["path"]) for w in listed) == files
    assert {w["name"]: w["description"] for w in listed} == {
        p.stem: " ".join(yaml.safe_load(p.read_text()).get("description", "").split()) for p in files}
    table = ok(mfbench_cli("workloads", cwd=tmp_path)).stdout
    assert all(re.search(rf"^{re.escape(p.stem)}\s", table, re.MULTILINE) for p in files)


def test_simulate_by_name_equals_by_path_and_json_is_the_summary(tmp_path):
    r = ok(mfbench_cli("simulate", "gpt2-full-seq128", "--steps", 4, "--json", cwd=tmp_path))
    out = tmp_path / "runs" / "gpt2-full-seq128" / "predicted-pixel8"  # the default folder
    assert json.loads(r.stdout) == json.loads((out / "summary.json").read_text())
    assert "wrote" in r.stderr and "wrote" not in r.stdout  # stdout is the JSON alone
    ok(mfbench_cli("simulate", PAPER / "gpt2-full-seq128.yaml", "--steps", 4, "--out", "by-path", cwd=tmp_path))
    assert summary_without_command(tmp_path / "by-path") == summary_without_command(out)


@pytest.mark.parametrize("args, expect", [
    (["simualte", "gpt2-full-seq128"], "unknown command 'simualte' (did you mean 'simulate'?)"),
    (["simulate", "gpt2-ful-seq128"], "unknown workload 'gpt2-ful-seq128' (did you mean 'gpt2-full-seq128'?)"),
    (["simulate", "gpt2-full-seq128", "--device", "pixl8"], "unknown device 'pixl8' (did you mean 'pixel8'?)"),
    (["devices", "show", "pixel-8"], "unknown device 'pixel-8' (did you mean 'pixel8'?)"),
    (["plan", "--model", "qwen2.5-0.5", "--method", "lora"], "unknown model 'qwen2.5-0.5' (did you mean 'qwen2.5-0.5b'?)"),
    (["plan", "--model", "gtp2"], "unknown model 'gtp2' (did you mean 'gpt2'?)"),
    (["simulate", "nothing-like-it"], "unknown workload 'nothing-like-it'; expected a YAML path"),
])
def test_did_you_mean(tmp_path, args, expect):
    assert expect in one_error_line(mfbench_cli(*args, cwd=tmp_path))


# --------------------------------------------------------------------------- plan quick form

@pytest.mark.parametrize("model, method, targets", [
    ("gpt2", "lora", ["attn.c_attn", "attn.c_proj"]),
    ("qwen2.5-0.5b", "lora", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("gpt2-medium", "full", None),
])
def test_plan_quick_form_equals_the_same_workload_file(tmp_path, model, method, targets):
    doc = {"name": "w", "model": model, "method": {"kind": method, **({"targets": targets} if targets else {})},
           "seq_len": 64, "batch": 4}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(doc))
    want = ok(mfbench_cli("plan", "--json", "w.yaml", "--threads", 2, cwd=tmp_path)).stdout
    got = ok(mfbench_cli("plan", "--json", "--model", model, "--method", method, "--seq-len", 64, "--batch", 4,
                         "--threads", 2, cwd=tmp_path)).stdout
    assert got == want
    text = ok(mfbench_cli("plan", "--model", model, "--method", method, "--seq-len", 64, "--batch", 4,
                          cwd=tmp_path)).stdout
    assert text.startswith(f"plan of {model}-{method}-seq64: {model}") and "planned peak" in text


def test_plan_quick_form_checks_its_options(tmp_path):
    assert "seq_len: Input should be greater than 0" in one_error_line(
        mfbench_cli("plan", "--model", "gpt2", "--seq-len", 0, cwd=tmp_path))
    assert "not both" in one_error_line(mfbench_cli("plan", GPT2_LORA, "--model", "gpt2", cwd=tmp_path))
    assert "not both" in one_error_line(mfbench_cli("plan", cwd=tmp_path))
    assert "--seq-len: belongs to the quick form" in one_error_line(
        mfbench_cli("plan", GPT2_LORA, "--seq-len", 64, cwd=tmp_path))  # not silently ignored
    assert "method.targets" in one_error_line(
        mfbench_cli("plan", "--model", "gpt2", "--method", "lora", "--targets", "q_proj", cwd=tmp_path))


# ------------------------------------------------------------------------------ run folders

def test_a_rerun_does_not_replace_an_earlier_run(tmp_path):
    ok(mfbench_cli("simulate", "gpt2-lora-seq128", "--steps", 3, "--battery-start", 80, cwd=tmp_path))
    out = tmp_path / "runs" / "gpt2-lora-seq128" / "predicted-pixel8"
    before = (out / "summary.json").read_bytes()
    line = one_error_line(mfbench_cli("simulate", "gpt2-lora-seq128", "--steps", 4, cwd=tmp_path))
    assert "runs/gpt2-lora-seq128/predicted-pixel8: holds an earlier run" in line and "--force" in line
    assert (out / "summary.json").read_bytes() == before
    ok(mfbench_cli("simulate", "gpt2-lora-seq128", "--steps", 4, "--force", cwd=tmp_path))
    assert json.loads((out / "summary.json").read_text())["steps"] == 4

    # `mfbench run` refuses before resolving or training anything
    run_out = tmp_path / "measured"
    run_out.mkdir()
    (run_out / "run.json").write_text("{}")
    line = one_error_line(mfbench_cli("run", "gpt2-lora-seq128", "--out", run_out, cwd=tmp_path))
    assert "holds an earlier run" in line and (run_out / "run.json").read_text() == "{}"
    assert "--set" in one_error_line(mfbench_cli("run", "gpt2-lora-seq128", "--out", run_out, "--resume",
                                                 "--set", "steps=2", cwd=tmp_path))


# ------------------------------------------------------------------------------ train --help

def test_train_help_is_the_trainers_and_needs_no_build(tmp_path):
    from mfbench.device import native
    assert native.usage() is not None
    binary = native.trainer_binary()  # built as the other native tests build it
    want = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert ok(mfbench_cli("train", "--help", cwd=tmp_path)).stdout == want
    # an install without a build: help still prints, and nothing is built (see the install test)


# ------------------------------------------------------------------ a non-editable install

def source_files() -> list[str]:
    """The files of the source tree as a clean clone has them (tracked, or new and not ignored)."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return [f for f in r.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the source tree, installed (not editable) into a folder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the source files")
    d = tmp_path_factory.mktemp("install")
    src = d / "src"
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", d / "wheel", src], check=True,
                   capture_output=True, timeout=300)
    wheel = next((d / "wheel").glob("mfbench-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", d / "site", wheel], check=True, capture_output=True,
                   timeout=300)
    return wheel, d / "site"


def test_the_wheel_holds_the_package_and_every_shipped_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for f in source_files():
        top = f.split("/")[0]
        if f.startswith("mfbench/") and f.endswith(".py"):
            want.add(f)
        elif top in ("devices", "workloads", "paper_figures", "kernels_native") and not Path(f).name.startswith("."):
            want.add(f"mfbench/_shipped/{f}")
    assert want - names == set()
    assert not any("/build" in n for n in names)


def test_an_installed_mfbench_works_from_another_folder(installed, tmp_path):
    _, site = installed
    env = {"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    probe = ok(mfbench_cli("--version", cwd=tmp_path, env=env))
    assert probe.stdout.strip() == f"mfbench {mfbench.__version__}"
    where = subprocess.run([sys.executable, "-c", "import mfbench; print(mfbench.__file__)"], cwd=tmp_path, env={
        **os.environ, **env}, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))  # the installed copy, not the source tree

    r = ok(mfbench_cli("simulate", "gpt2-full-seq128", "--device", "pixel8", "--steps", 3, cwd=tmp_path, env=env))
    assert "J/token" in r.stdout and (tmp_path / "runs" / "gpt2-full-seq128" / "predicted-pixel8" / "summary.json").is_file()
    made = json.loads((tmp_path / "runs" / "gpt2-full-seq128" / "predicted-pixel8" / "summary.json").read_text())
    assert made["provenance"]["git_commit"] is None  # an installed package has no commit of its own
    assert "pixel8" in ok(mfbench_cli("devices", cwd=tmp_path, env=env)).stdout
    assert "gpt2-full-seq128" in ok(mfbench_cli("workloads", cwd=tmp_path, env=env)).stdout
    ok(mfbench_cli("figures", "--only", "memory_breakdown", "--out", "figs", cwd=tmp_path, env=env))
    assert (tmp_path / "figs").is_dir() and any((tmp_path / "figs").glob("*.png"))

    # the trainer's sources are shipped: help prints from them without building anything
    help_ = ok(mfbench_cli("train", "--help", cwd=tmp_path, env=env))
    assert help_.stdout.startswith("usage: mfbench-train") and not (tmp_path / "cache" / "mfbench").exists()
    from mfbench.device import native
    found = subprocess.run([sys.executable, "-c", "from mfbench.device import native; print(native.KERNELS, native.BUILD)"], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                           text=True, check=True).stdout.split()
    assert Path(found[0]) == site / "mfbench" / "_shipped" / "kernels_native"
    assert Path(found[0], "CMakeLists.txt").is_file() and Path(found[1]).is_relative_to(tmp_path / "cache")
    if shutil.which("cmake"):  # the shipped sources configure as they stand (the build itself is the native tests')
        subprocess.run(["cmake", "-S", found[0], "-B", tmp_path / "configured", "-DCMAKE_BUILD_TYPE=Release"],
                       check=True, capture_output=True, timeout=300)
    assert native.KERNELS == ROOT / "kernels_native"  # the source tree builds beside its sources
