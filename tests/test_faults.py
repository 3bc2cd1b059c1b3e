"""Faults on a real local Ray: kill -9 of a team actor's or the log actor's process mid-run, SIGINT of `slmshift run`
then `--resume`. Each run must end with every episode logged once and exactly `n_calls` records per episode.

Every run joins the module's one Ray (the CLI ones through `--address`), so no test pays for a second cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

import slmshift.scenarios  # noqa: F401  fills the scenario registry
from slmshift.platform.config import load_config
from slmshift.platform.log import read_episodes, read_interactions
from slmshift.platform.scenario import scenario_options
from slmshift.runner import run_experiment

# Simulated models with a little latency, so that episodes are in flight when the fault hits.
CONFIG = """\
experiment: {{name: {name}, seed: 5, storage: {storage}}}
models:
  - {{name: small, tier: slm, backend: simulated, resources: {{num_cpus: 0}},
     profile: {{accuracy: {{default: 0.6}}, latency_base_s: {latency}}}}}
  - {{name: big, tier: llm, backend: simulated, resources: {{num_cpus: 0}},
     profile: {{accuracy: {{default: 1.0}}, latency_base_s: {latency}}}}}
router: {{policies: [{{kind: llm, name: llm}}]}}
scenarios: [{{kind: operator, episodes: {episodes}, teams: 2, concurrency: 3, episode_attempts: {attempts}}}]
"""


def write_config(tmp_path: Path, name: str, episodes: int = 30, latency: float = 0.25, attempts: int = 3) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, storage=tmp_path / "runs", episodes=episodes, latency=latency,
                                  attempts=attempts))
    return path


def actors(class_name: str, state: str | None = "ALIVE") -> list[dict]:
    """Actors whose class name starts with `class_name`, from the GCS actor table (what `ray.util.state.list_actors` shows, without needing the dashboard)."""
    from ray._private.state import actors as table

    return [a for a in table().values()
            if a["ActorClassName"].startswith(class_name) and (state is None or a["State"] == state)]


def kill_later(class_name: str, after_s: float, killed: list[int], when: str = "TeamActor") -> threading.Thread:
    """kill -9 (what the OOM killer does) one process of `class_name`, `after_s` after a `when` actor (a team: the
    episodes have started) is alive."""

    def go() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not actors(when):
            time.sleep(0.1)
        time.sleep(after_s)
        alive = actors(class_name)
        if alive:
            os.kill(alive[0]["Pid"], signal.SIGKILL)
            killed.append(alive[0]["Pid"])

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def assert_logged_exactly_once(run_dir: str, episodes: int) -> tuple:
    df, ep = read_interactions(run_dir), read_episodes(run_dir)
    assert len(ep) == episodes and ep["episode_id"].is_unique
    assert df["id"].is_unique
    main = df[~df["escalated"]]
    per_episode = main.groupby("episode_id").size().reindex(ep["episode_id"], fill_value=0)
    assert per_episode.to_dict() == ep.set_index("episode_id")["n_calls"].to_dict()
    # each record belongs to its episode's final attempt
    assert (df.merge(ep[["episode_id", "attempt"]], on="episode_id", suffixes=("", "_ep"))
            .eval("attempt == attempt_ep").all())
    return df, ep


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run of the config the SIGINT test interrupts: episode ids and call counts to match."""
    tmp = tmp_path_factory.mktemp("reference")
    res = run_experiment(load_config(write_config(tmp, "faults"), scenario_options()), keep_ray=True)
    df, ep = assert_logged_exactly_once(res.run_dir, 30)
    return df, ep


def test_team_actor_killed_mid_run(cluster, reference, tmp_path):
    killed: list[int] = []
    killer = kill_later("TeamActor", 1.0, killed)
    res = run_experiment(load_config(write_config(tmp_path, "faults"), scenario_options()), keep_ray=True)
    killer.join(5)
    assert killed, "the team actor was never killed"
    df, ep = assert_logged_exactly_once(res.run_dir, 30)
    assert (ep["attempt"] >= 1).any()  # the kill landed on running episodes; they were run again
    assert ep["error"].isna().all() and ep["success"].all()  # a re-run is not a failure
    assert max(a["NumRestarts"] for a in actors("TeamActor", state=None)) >= 1
    # same work as the uninterrupted run: the same episodes with the same number of calls
    ref_df, ref_ep = reference
    assert sorted(ep["episode_id"]) == sorted(ref_ep["episode_id"])
    assert ep.set_index("episode_id")["n_calls"].to_dict() == ref_ep.set_index("episode_id")["n_calls"].to_dict()
    assert len(df) == len(ref_df)
    assert res.summary["totals"]["calls"] == len(df) and res.summary["arms"][0]["success_rate"] == 1.0


def test_episode_given_up_after_its_attempts(cluster, tmp_path):
    """episode_attempts: 1 — the episodes a kill interrupts are recorded as failed by the infrastructure (none of
    their records count), the rest of the run goes on and the report keeps them out of the success rate."""
    killed: list[int] = []
    killer = kill_later("TeamActor", 1.0, killed)
    res = run_experiment(load_config(write_config(tmp_path, "faults", attempts=1), scenario_options()), keep_ray=True)
    killer.join(5)
    assert killed
    df, ep = assert_logged_exactly_once(res.run_dir, 30)
    lost = ep[ep["error"].fillna("").str.startswith("infra: the team actor died")]
    assert 1 <= len(lost) < 30 and (lost["n_calls"] == 0).all() and (lost["attempt"] == 1).all()
    assert not df["episode_id"].isin(lost["episode_id"]).any()  # their partial records are superseded
    arm = res.summary["arms"][0]
    assert arm["infra_lost_episodes"] == len(lost) and arm["success_rate"] == 1.0 and arm["episodes"] == 30


def test_log_actor_killed_mid_run(cluster, reference, tmp_path):
    killed: list[int] = []
    killer = kill_later("LogWriter", 2.0, killed)
    res = run_experiment(load_config(write_config(tmp_path, "faults"), scenario_options()), keep_ray=True)
    killer.join(5)
    assert killed, "the log actor was never killed"
    df, ep = assert_logged_exactly_once(res.run_dir, 30)
    ref_df, ref_ep = reference
    assert len(df) == len(ref_df) and res.log_counts["interactions"] == len(ref_df)
    assert max(a["NumRestarts"] for a in actors("LogWriter", state=None)) >= 1


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slmshift.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigint_then_resume(cluster, reference, tmp_path):
    cfg = write_config(tmp_path, "faults")
    proc = cli("run", str(cfg), "--address", cluster, "--grace", "0.5")
    runs = tmp_path / "runs"
    deadline = time.time() + 90
    while time.time() < deadline:  # interrupt once a few outcomes are in files
        shards = list(runs.glob("*/episodes/shard-*.parquet"))
        if shards and len(read_episodes(str(shards[0].parent.parent))) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-3000:]
    run_dir = str(next(runs.iterdir()))
    assert f"slmshift run --resume {run_dir}" in err and "Traceback" not in err + out
    first = read_episodes(run_dir)
    assert 5 <= len(first) < 30, "the run was not interrupted mid-way"
    report = Path(run_dir, "report.md").read_text()
    assert "Interrupted" in report and "--resume" in report

    proc = cli("run", "--resume", run_dir, "--address", cluster)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    df, ep = assert_logged_exactly_once(run_dir, 30)
    ref_df, ref_ep = reference
    assert len(df) == len(ref_df)
    assert ep.set_index("episode_id")["n_calls"].to_dict() == ref_ep.set_index("episode_id")["n_calls"].to_dict()
    assert set(ep["experiment_id"]) == set(df["experiment_id"]) == {Path(run_dir).name}
    # episodes finished before the interrupt were not run again
    kept = ep.set_index("episode_id").loc[first["episode_id"]]
    assert (kept["ts"].to_numpy() == first.set_index("episode_id")["ts"].to_numpy()).all()
    assert "Interrupted" not in Path(run_dir, "report.md").read_text()


def test_resume_needs_a_run_dir(tmp_path):
    proc = cli("run", "--resume", str(tmp_path / "nope"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no config.yaml" in err and "Traceback" not in err


def test_model_replica_killed_mid_run(cluster, reference, tmp_path):
    """kill -9 the teacher's Serve replica: calls in flight are retried (bounded) while Serve replaces it, and any
    that still fail are recorded as infrastructure errors, left out of the model's quality and SLM share."""
    killed: list[int] = []
    killer = kill_later("ServeReplica:big", 1.5, killed)
    res = run_experiment(load_config(write_config(tmp_path, "faults"), scenario_options()), keep_ray=True)
    killer.join(5)
    assert killed, "the replica was never killed"
    df, ep = assert_logged_exactly_once(res.run_dir, 30)
    infra = df[df["infra_error"]]
    assert infra["error"].str.startswith("infra: ").all()
    arm = res.summary["arms"][0]
    assert arm["infra_errors"] == len(infra)
    assert arm["valid_rate"] == 1.0  # the teacher is always right: failures of the infrastructure are not its own
    print(f"{len(infra)} call(s) recorded as infrastructure errors after the replica was killed")


def test_stop_signals_escalate_and_handlers_are_restored():
    """SIGTERM like SIGINT: the first asks for a graceful stop, the second cancels now, the third aborts; the
    previous handlers come back afterwards."""
    from slmshift.runner import _Stop

    before = signal.getsignal(signal.SIGTERM)
    with _Stop(grace_s=60) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested.is_set() and not stop.grace_over()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.cancel_now.is_set() and stop.grace_over()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before
