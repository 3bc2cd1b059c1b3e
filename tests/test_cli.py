"""The command line: help everywhere, and bad input is one clear paragraph with exit code 2, no traceback."""

import subprocess
import sys
import time

import pytest

SIMULATED_ONLY = """\
experiment: {name: cli, storage: STORAGE}
models:
  - {name: small, tier: slm, backend: simulated, resources: {num_cpus: 0}}
  - {name: big, tier: llm, backend: simulated, resources: {num_cpus: 0}}
router: {policies: [{kind: llm}]}
scenarios: [{kind: operator, episodes: 1}]
"""


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "slmshift.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["models", "--help"], ["models", "pull", "--help"],
                                  ["report", "--help"]])
def test_help_everywhere(args):
    r = cli(*args)
    assert r.returncode == 0 and "Usage" in r.stdout


def test_bad_yaml_is_exit_2_without_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(SIMULATED_ONLY.replace("backend: simulated", "backend: llamacpp", 1).replace("STORAGE", str(tmp_path)))
    r = cli("run", str(p))
    assert r.returncode == 2
    assert f"{p}: invalid experiment config" in r.stderr and "models[0].backend (line 3)" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_missing_model_file_is_exit_2(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(SIMULATED_ONLY.replace("backend: simulated,", "backend: hf, source: /no/such/model.gguf,", 1)
                 .replace("STORAGE", str(tmp_path)))
    r = cli("run", str(p))
    assert r.returncode == 2 and "/no/such/model.gguf" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_unreachable_ray_address_is_exit_2(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(SIMULATED_ONLY.replace("STORAGE", str(tmp_path)))
    t0 = time.time()
    r = cli("run", str(p), "--address", "127.0.0.1:1", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Could not connect to the Ray cluster at '127.0.0.1:1'" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert time.time() - t0 < 120


def test_report_on_missing_run_dir(tmp_path):
    r = cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no interaction log found" in r.stderr
