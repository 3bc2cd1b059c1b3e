"""Synthetic operator-scenario logs for the conversion tests, written through the real S1 `LogWriter`.

Every call uses a real BFCL task, the operator scenario's own prompts and a correct reference output, so the
scenario's checker can grade held-out calls. Planted on purpose, with the expected counts in `SyntheticLog`:
failed episodes, a wrong call in a successful episode, exact duplicates (the same episodes replayed under a
second policy arm), near duplicates (the same request re-cased and re-spaced), and secrets/PII in requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slmshift.platform.log import LogWriter
from slmshift.platform.types import EpisodeResult, Interaction, record_id
from slmshift.scenarios.bfcl import call_messages, intent_messages, intent_reference, load_tasks, reference_call

EXPERIMENT = "synthetic-20260101-000000"
SECRETS = {
    "email": "jane.roe@example.org",
    "phone": "+1 415-555-0132",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "github": "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB",
    "card": "4111 1111 1111 1111",
    "ipv4": "203.0.113.42",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6\n"
                   "-----END RSA PRIVATE KEY-----",
}
CONFIG_YAML = """\
experiment: {name: synthetic, seed: 0, storage: runs}
models:
  - {name: teacher, tier: llm, backend: simulated}
router:
  policies: [{kind: llm, name: arm-a}, {kind: llm, name: arm-b}]
scenarios:
  - {kind: operator, episodes: 12, options: {categories: [simple, multiple]}}
"""


@dataclass
class SyntheticLog:
    run_dir: str
    n_tasks: int
    expected: dict[str, int] = field(default_factory=dict)
    secret_tasks: list[str] = field(default_factory=list)


def _record(episode: str, idx: int, policy: str, task, role: str, kind: str, messages: list[dict], output: str,
            *, valid: bool = True, correct: bool | None = True, tier: str = "llm") -> Interaction:
    return Interaction(
        id=record_id(EXPERIMENT, episode, idx), experiment_id=EXPERIMENT, episode_id=episode, call_index=idx,
        scenario="operator", task_id=task.id, policy=policy, role=role, call_kind=kind, category="template",
        expect="json" if kind == "intent" else "code", prompt=json.dumps(messages), output=output, model="teacher",
        tier=tier, backend="simulated", route_kind="llm", route_reason="", tokens_in=100, tokens_out=10,
        latency_s=0.1, engine_latency_s=0.1, cost_usd=0.0, flops=0.0, simulated=True, valid=valid, correct=correct,
        error=None if valid else "unparsable")


def _with_secrets(messages: list[dict], text: str) -> list[dict]:
    out = [dict(m) for m in messages]
    out[-1]["content"] += "\n" + text
    return out


def write_synthetic_log(run_dir: Path, n_tasks: int = 12) -> SyntheticLog:
    """Two policy arms replay the same n_tasks successful episodes (2 calls each); plus planted failures,
    near duplicates and secrets. Returns the counts curation must report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(CONFIG_YAML)
    tasks = load_tasks(["simple", "multiple"], n=n_tasks + 3, seed=0)
    main, extra = tasks[:n_tasks], tasks[n_tasks:]
    log = LogWriter(str(run_dir), flush_every=10_000, flush_interval_s=3600)
    secret_text = ("Contact {email} or {phone}. AWS key {aws}, token {github}, card {card}, server {ipv4}.\n"
                   "{private_key}").format(**SECRETS)
    secret_tasks = []
    for arm in ("arm-a", "arm-b"):  # arm-b is an exact replay: every one of its calls is an exact duplicate
        for i, task in enumerate(main):
            ep = f"{arm}-{i}"
            im, cm = intent_messages(task), call_messages(task, None)
            if i < 2:  # planted secrets in the request of the first two tasks
                im, cm = _with_secrets(im, secret_text), _with_secrets(cm, secret_text)
                secret_tasks.append(task.id)
            log.add([_record(ep, 0, arm, task, "planner", "intent", im, intent_reference(task)),
                     _record(ep, 1, arm, task, "operator", "function_call", cm, reference_call(task))])
            log.add_episode(EpisodeResult(experiment_id=EXPERIMENT, episode_id=ep, scenario="operator",
                                          task_id=task.id, policy=arm, success=True, reward=1.0, n_calls=2))
    # Near duplicates: the first two requests again, re-cased and re-spaced (a formatting variant of one call).
    for i, task in enumerate(main[2:4]):
        ep = f"near-{i}"
        im, cm = intent_messages(task), call_messages(task, None)
        im[-1]["content"] = im[-1]["content"].upper().replace(" ", "  ")
        cm[-1]["content"] = cm[-1]["content"].upper().replace(" ", "  ")
        log.add([_record(ep, 0, "arm-c", task, "planner", "intent", im, intent_reference(task)),
                 _record(ep, 1, "arm-c", task, "operator", "function_call", cm, reference_call(task))])
        log.add_episode(EpisodeResult(experiment_id=EXPERIMENT, episode_id=ep, scenario="operator",
                                      task_id=task.id, policy="arm-c", success=True, reward=1.0, n_calls=2))
    # Failed episodes: a wrong intent (valid) and an unparsable call (invalid, retried once, invalid again).
    for i, task in enumerate(extra[:2]):
        ep = f"fail-{i}"
        log.add([_record(ep, 0, "arm-c", task, "planner", "intent", intent_messages(task), '{"functions": []}',
                         correct=False, tier="slm"),
                 _record(ep, 1, "arm-c", task, "operator", "function_call", call_messages(task, None), "oops",
                         valid=False, correct=False, tier="slm"),
                 _record(ep, 2, "arm-c", task, "operator", "function_call", call_messages(task, None), "oops again",
                         valid=False, correct=False, tier="slm")])
        log.add_episode(EpisodeResult(experiment_id=EXPERIMENT, episode_id=ep, scenario="operator",
                                      task_id=task.id, policy="arm-c", success=False, reward=0.0, n_calls=3))
    # A successful episode whose intent call was graded wrong: kept by the episode rule, dropped as incorrect.
    task = extra[2]
    log.add([_record("lucky-0", 0, "arm-c", task, "planner", "intent", intent_messages(task), '{"functions": []}',
                     correct=False),
             _record("lucky-0", 1, "arm-c", task, "operator", "function_call", call_messages(task, None),
                     reference_call(task))])
    log.add_episode(EpisodeResult(experiment_id=EXPERIMENT, episode_id="lucky-0", scenario="operator",
                                  task_id=task.id, policy="arm-c", success=True, reward=1.0, n_calls=2))
    log.close()
    logged = 4 * n_tasks + 4 + 6 + 2
    expected = {"logged": logged, "dropped_invalid": 4, "dropped_by_rule": 3, "dropped_exact_dup": 2 * n_tasks,
                "dropped_near_dup": 4, "curated": 2 * n_tasks + 1}
    return SyntheticLog(str(run_dir), n_tasks, expected, secret_tasks)


@pytest.fixture(scope="session")
def synthetic_log(tmp_path_factory) -> SyntheticLog:
    return write_synthetic_log(tmp_path_factory.mktemp("synthetic") / EXPERIMENT)


@pytest.fixture(scope="session")
def planted_secrets() -> dict[str, str]:
    return dict(SECRETS)
