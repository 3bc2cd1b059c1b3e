"""Bad experiment files: whatever is wrong with the file, load_config raises ConfigError (exit 2) naming where,
never a traceback. Property-based over mutations of the shipped scenario YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slmshift.scenarios  # noqa: F401  (registers the scenario kinds whose options are validated)
from slmshift.platform.config import GatewayConfig, load_config
from slmshift.platform.errors import ConfigError
from slmshift.platform.scenario import scenario_options

SHIPPED = sorted((Path(__file__).parents[2] / "scenarios").glob("*.yaml"))
OPTIONS = scenario_options()
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _load(path: Path):
    """A gateway file (a `gateway:` section, as `slmshift gateway` reads it) by the gateway's schema, else an
    experiment."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        doc = None  # load_config says what is wrong with it
    gateway = isinstance(doc, dict) and "gateway" in doc
    return load_config(path, OPTIONS, schema=GatewayConfig if gateway else None)


def _paths(node, prefix=()):
    """Every (path, value) in a parsed YAML tree."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _set(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["", "-1", "1e400", "~", "llm", "slm", "hf", "nan"]))
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=6), _scalars, max_size=3))


@st.composite
def _mutated(draw):
    """A shipped scenario with one to three fields replaced, deleted or added, written back as YAML."""
    src = draw(st.sampled_from(SHIPPED))
    tree = yaml.safe_load(src.read_text(encoding="utf-8"))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(tree) if p]
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        if op == "replace":
            _set(tree, path, draw(_values))
        elif op == "delete":
            _delete(tree, path)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(_values)
        else:
            parent.append(draw(_values))
    return src.name, tree


def _check_error(e: ConfigError, path: Path) -> None:
    assert e.exit_code == 2 and str(path) in str(e)
    assert e.problems and all(isinstance(p, str) and p.strip() for p in e.problems), e.problems


@pytest.mark.parametrize("src", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_scenarios_load(src):
    _load(src)


@FUZZ
@given(case=_mutated())
def test_mutated_tree_is_config_error_with_field_path(tmp_path_factory, case):
    name, tree = case
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    try:
        _load(path)
    except ConfigError as e:
        _check_error(e, path)
        # every problem names where: a field path (experiment..., models[0]..., <top>) or the YAML line
        for p in e.problems:
            head = p.split(":", 1)[0]
            assert head and (head.split(".")[0].split("[")[0] in {"experiment", "models", "router", "scenarios",
                                                                 "ray", "log", "<top>"} or "line" in head
                             or "must be a mapping" in p), p


@FUZZ
@given(src=st.sampled_from(SHIPPED), data=st.data())
def test_mutated_bytes_are_config_error(tmp_path_factory, src, data):
    """Random byte edits: invalid YAML, invalid UTF-8, NULs, truncation. Never a traceback."""
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        byte = data.draw(st.sampled_from([0x00, 0x09, 0x0A, 0x22, 0x27, 0x3A, 0x2D, 0x5B, 0x7B, 0x26, 0x2A, 0x21,
                                          0x80, 0xC3, 0xFF, 0xFE]))
        if op == "flip":
            raw[pos] = byte
        elif op == "insert":
            raw.insert(pos, byte)
        elif op == "delete":
            del raw[pos]
        else:
            del raw[pos:]
        if not raw:
            raw = bytearray(b"x")
    path = tmp_path_factory.mktemp("bytes") / src.name
    path.write_bytes(bytes(raw))
    try:
        _load(path)
    except ConfigError as e:
        _check_error(e, path)


def test_not_utf8_says_so(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes("experiment:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        _load(path)
    assert "not UTF-8 text" in str(e.value) and "byte 23" in str(e.value) and e.value.exit_code == 2


def test_binary_file_says_not_utf8(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        _load(path)


def test_directory_says_so_and_suggests_a_file():
    d = SHIPPED[0].parent
    with pytest.raises(ConfigError) as e:
        _load(d)
    msg = str(e.value)
    assert "is a directory" in msg and str(d / SHIPPED[0].name) in msg


def test_cli_prints_one_paragraph_and_exits_2(tmp_path):
    """Through the real CLI: exit 2 and no traceback for a non-UTF-8 file."""
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00e\x00x")
    proc = subprocess.run([sys.executable, "-m", "slmshift.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "not UTF-8 text" in proc.stdout + proc.stderr
