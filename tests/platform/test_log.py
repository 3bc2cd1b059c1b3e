"""S1 interaction log: round trip, retries, episode join, no hidden reference, atomic files, Ray actor."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow.parquet as pq
import pytest
import ray

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.log import (
    INTERACTION_SCHEMA,
    InteractionLog,
    LogWriter,
    read_episodes,
    read_interactions,
)
from slmshift.platform.types import EpisodeResult, Hidden, Interaction, LMRequest


def make_request(episode: str, call: int, experiment: str = "exp1", hidden: Hidden | None = None) -> LMRequest:
    return LMRequest(
        experiment_id=experiment, episode_id=episode, call_index=call, scenario="travel", role="planner",
        call_kind="intent", task_id=f"t-{episode}", policy="llm_only",
        messages=[{"role": "user", "content": f"call {call} of {episode}"}], hidden=hidden,
    )


def make_interaction(episode: str, call: int, output: str = "ok", experiment: str = "exp1",
                     request: LMRequest | None = None, **kw) -> Interaction:
    """Build a record the way a client does: prompt is the request's messages as JSON."""
    req = request or make_request(episode, call, experiment)
    fields = dict(
        id=req.record_id, experiment_id=req.experiment_id, episode_id=req.episode_id,
        call_index=req.call_index, scenario=req.scenario, task_id=req.task_id, policy=req.policy,
        role=req.role, call_kind=req.call_kind, category=req.category, expect=req.expect,
        prompt=json.dumps(req.messages), output=output, model="sim-llm", tier="llm", backend="simulated",
        route_kind="intent", route_reason="policy", tokens_in=10, tokens_out=3, latency_s=0.01,
        engine_latency_s=0.005, cost_usd=1e-5, flops=1e9, simulated=True,
    )
    fields.update(kw)
    return Interaction(**fields)


def make_episode(episode: str, success: bool, reward: float, experiment: str = "exp1") -> EpisodeResult:
    return EpisodeResult(experiment_id=experiment, episode_id=episode, scenario="travel", task_id=f"t-{episode}",
                         policy="llm_only", success=success, reward=reward, n_calls=3)


def parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()


def test_round_trip_pandas_pyarrow_ray(tmp_path, ray_session):
    run = str(tmp_path / "run")
    w = LogWriter(run, flush_every=7)
    recs = [make_interaction(f"ep{e}", c) for e in range(10) for c in range(5)]
    w.add(recs[:20])
    w.add([r.model_dump() for r in recs[20:]])  # dicts are accepted too
    assert len(read_interactions(run)) == 50  # readable before close
    counts = w.close()
    assert counts == {"interactions": 50, "episodes": 0, "duplicates_dropped": 0, "superseded": 0}

    df = read_interactions(run)
    assert len(df) == 50 and df["id"].is_unique
    assert set(df["id"]) == {r.id for r in recs}
    assert [p.name for p in parquet_files(tmp_path / "run" / "interactions")] == ["part-00000.parquet"]
    table = pq.read_table(os.path.join(run, "interactions"))
    assert table.num_rows == 50 and table.schema.equals(INTERACTION_SCHEMA)
    assert ray.data.read_parquet(run + "/interactions").count() == 50


def test_schema_fixed_when_columns_all_null(tmp_path):
    w = LogWriter(str(tmp_path), flush_every=1000)
    w.add([make_interaction("e", 0)])  # adapter, valid, correct, error, mean_logprob all None
    w.flush()
    w.add([make_interaction("e", 1, adapter="lora-1", valid=True, correct=False, error="x", mean_logprob=-0.2)])
    w.flush()
    shards = parquet_files(tmp_path / "interactions")
    assert len(shards) == 2
    assert all(pq.read_schema(p).equals(INTERACTION_SCHEMA) for p in shards)


def test_retried_episode_overwrites(tmp_path):
    run = str(tmp_path)
    w = LogWriter(run, flush_every=1000)
    w.add([make_interaction("ep1", c, output="first") for c in range(3)] + [make_interaction("ep2", 0)])
    w.flush()
    w.add([make_interaction("ep1", c, output="retry") for c in range(3)])
    w.flush()
    assert len(parquet_files(tmp_path / "interactions")) == 2

    df = read_interactions(run)  # before compaction: readers dedup across shards
    assert len(df) == 4 and df["id"].is_unique
    assert set(df[df.episode_id == "ep1"]["output"]) == {"retry"}

    counts = w.close()
    assert counts["interactions"] == 4 and counts["duplicates_dropped"] == 3
    table = pq.read_table(os.path.join(run, "interactions")).to_pandas()
    assert len(table) == 4 and table["id"].is_unique
    assert set(table[table.episode_id == "ep1"]["output"]) == {"retry"}


def test_repeated_id_in_buffer_keeps_last(tmp_path):
    w = LogWriter(str(tmp_path), flush_every=1000)
    w.add([make_interaction("e", 0, output="a"), make_interaction("e", 0, output="b")])
    assert w.flush() == 1
    assert list(read_interactions(str(tmp_path))["output"]) == ["b"]


def test_episode_outcomes_joined(tmp_path):
    run = str(tmp_path)
    w = LogWriter(run, flush_every=1000)
    w.add([make_interaction("ep1", c) for c in range(2)])
    w.flush()  # records written before the outcome is known
    w.add([make_interaction("ep2", c) for c in range(2)] + [make_interaction("ep3", 0)])
    w.add_episode(make_episode("ep1", True, 1.0))
    w.add_episode(make_episode("ep2", False, 0.25).model_dump())
    w.flush()

    def check(df):
        by = df.set_index("episode_id")
        assert list(by.loc["ep1", "episode_success"]) == [True, True]
        assert list(by.loc["ep2", "episode_reward"]) == [0.25, 0.25]
        assert df.loc[df.episode_id == "ep3", "episode_success"].isna().all()

    check(read_interactions(run))  # joined at read time (crash-safe)
    w.add_episode(make_episode("ep2", True, 0.5))  # a retried episode's newer outcome wins
    counts = w.close()
    assert counts["episodes"] == 2
    df = pq.read_table(os.path.join(run, "interactions")).to_pandas()
    assert set(df[df.episode_id == "ep2"]["episode_reward"]) == {0.5}
    assert set(df[df.episode_id == "ep1"]["episode_success"]) == {True}
    eps = read_episodes(run)
    assert len(eps) == 2 and dict(zip(eps.episode_id, eps.reward)) == {"ep1": 1.0, "ep2": 0.5}
    assert (tmp_path / "episodes.parquet").exists() and not parquet_files(tmp_path / "episodes")


def test_hidden_reference_never_written(tmp_path):
    secret, visible = "SECRET-REF-123", "VISIBLE-MARKER-987"
    req = make_request("ep1", 0, hidden=Hidden(answer=secret, distractors=["SECRET-DISTRACTOR"]))
    rec = make_interaction("ep1", 0, output=visible, request=req)
    leaky = rec.model_dump() | {"id": make_request("ep1", 1).record_id, "call_index": 1,
                                "hidden": {"answer": secret}}  # a careless client's dict
    w = LogWriter(str(tmp_path), flush_every=1000)
    w.add([rec, leaky])
    w.add_episode(make_episode("ep1", True, 1.0))
    w.flush()
    shards = [p.read_bytes() for p in parquet_files(tmp_path)]
    w.close()
    files = shards + [p.read_bytes() for p in parquet_files(tmp_path)]
    assert any(visible.encode() in b for b in files)  # the byte grep does see record text
    assert not any(secret.encode() in b or b"SECRET-DISTRACTOR" in b for b in files)
    df = read_interactions(str(tmp_path))
    assert "hidden" not in df.columns
    assert not df.astype(str).apply(lambda col: col.str.contains("SECRET")).to_numpy().any()


def test_atomic_no_tmp_and_stray_tmp_ignored(tmp_path):
    run = str(tmp_path)
    w = LogWriter(run, flush_every=3)
    for c in range(10):
        w.add([make_interaction("e", c)])
    assert not list(tmp_path.rglob("*.tmp"))
    stray = tmp_path / "interactions" / "shard-999999-deadbeef.parquet.tmp"
    stray.write_bytes(b"half a parquet file")  # as if a writer crashed mid-write
    (tmp_path / "interactions" / ".shard-999998-deadbeef.parquet.tmp").write_bytes(b"garbage")
    assert len(read_interactions(run)) == 9  # 10th still buffered
    w.close()
    assert len(read_interactions(run)) == 10
    assert {p.name for p in tmp_path.rglob("*.tmp")} == {stray.name, ".shard-999998-deadbeef.parquet.tmp"}


def test_flush_by_interval(tmp_path, monkeypatch):
    w = LogWriter(str(tmp_path), flush_every=1000, flush_interval_s=60)
    w.add([make_interaction("e", 0)])
    assert w.tick() == 0 and not parquet_files(tmp_path / "interactions")
    w.flush_interval_s = 0.0
    w.add([make_interaction("e", 1)])  # interval elapsed -> add flushes
    assert len(read_interactions(str(tmp_path))) == 2


def test_reopen_continues_sequence(tmp_path):
    """A restarted writer (e.g. after a crash) must win over shards of the one before it."""
    w1 = LogWriter(str(tmp_path), flush_every=1000)
    for _ in range(3):
        w1.add([make_interaction("e", 0, output="old")])
        w1.flush()
    w2 = LogWriter(str(tmp_path), flush_every=1000)
    w2.add([make_interaction("e", 0, output="new")])
    w2.close()
    w3 = LogWriter(str(tmp_path), flush_every=1000)  # after compaction, appending still works
    w3.add([make_interaction("e", 1)])
    assert w3.close()["interactions"] == 2
    assert list(read_interactions(str(tmp_path))["output"]) == ["new", "ok"]


def test_unwritable_dir_raises_slmshift_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SlmshiftError, match="file/run"):
        LogWriter(str(blocker / "run"))


def test_empty_run_dir_reads_empty(tmp_path):
    assert read_interactions(str(tmp_path / "nothing")).empty
    assert read_episodes(str(tmp_path / "nothing")).empty


def test_ray_actor(tmp_path, ray_session):
    run = str(tmp_path / "run")
    log = InteractionLog.remote(run, flush_every=4)
    ray.get([log.add.remote([make_interaction(f"ep{e}", c) for c in range(3)]) for e in range(5)])
    ray.get(log.add_episode.remote(make_episode("ep0", True, 1.0)))
    ray.get(log.tick.remote())
    counts = ray.get(log.close.remote())
    assert counts == {"interactions": 15, "episodes": 1, "duplicates_dropped": 0, "superseded": 0}
    ray.kill(log)
    df = read_interactions(run)
    assert len(df) == 15 and set(df[df.episode_id == "ep0"]["episode_success"]) == {True}
    assert ray.data.read_parquet(run + "/interactions").count() == 15


def _actor_pid(class_name: str) -> int:
    """The live process of an actor class, from the GCS actor table (what `ray.util.state.list_actors` shows,
    without needing the dashboard)."""
    from ray._private.state import actors

    alive = [a for a in actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    return alive[0]["Pid"]


def test_client_resends_what_a_killed_writer_had_buffered(tmp_path, ray_session):
    """kill -9 the log actor while it holds taken-but-unwritten batches: the client resends them to the restarted
    actor, and drain returns only when every record is in a file, each once."""
    import asyncio
    import signal
    import time

    from slmshift.platform.log import LogClient

    run = str(tmp_path / "run")
    log = InteractionLog.options(name="killed-log").remote(run, flush_interval_s=3600)  # never flushes on its own
    client = LogClient(log, flush_every=5)
    for e in range(4):
        for c in range(5):
            client.add(make_interaction(f"ep{e}", c).model_dump())
        client.add_episode(make_episode(f"ep{e}", True, 1.0).model_dump())

    async def received():
        await client.received()

    asyncio.run(received())
    assert client._unacked and read_interactions(run).empty  # taken by the writer, not in a file yet
    pid = _actor_pid("LogWriter")
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the restart (a new process)
        try:
            if _actor_pid("LogWriter") != pid:
                break
        except AssertionError:
            pass
        time.sleep(0.2)
    client.add(make_interaction("ep9", 0).model_dump())  # the new incarnation's answer tells the client
    asyncio.run(client.drain(timeout_s=60))
    assert not client._unacked
    df, eps = read_interactions(run), read_episodes(run)
    assert len(df) == 21 and df["id"].is_unique and len(eps) == 4
    assert df.groupby("episode_id").size().to_dict() == {"ep0": 5, "ep1": 5, "ep2": 5, "ep3": 5, "ep9": 1}
    counts = ray.get(log.close.remote())
    assert counts["interactions"] == 21 and counts["episodes"] == 4
    ray.kill(log)


def test_superseded_attempt_records(tmp_path):
    """An episode re-run with attempt 1 made fewer calls than the crashed attempt 0: readers keep only attempt 1's
    records (cascade and shadow ids too); an episode without an outcome keeps what it has."""
    run = str(tmp_path)
    w = LogWriter(run, flush_every=1000)
    first = [make_interaction("ep1", c, output="first", attempt=0) for c in range(4)]
    shadow0 = make_interaction("ep1", 3, attempt=0, shadow=True, id=first[3].id + ":shadow")
    w.add(first + [shadow0] + [make_interaction("ep2", c, attempt=0) for c in range(2)])
    w.flush()
    retry = [make_interaction("ep1", c, output="retry", attempt=1) for c in range(2)]
    cascade = make_interaction("ep1", 1, attempt=1, escalated=True, tier="slm", id=retry[1].id + ":cascade")
    w.add(retry + [cascade])
    w.add_episode(make_episode("ep1", True, 1.0).model_copy(update={"attempt": 1, "n_calls": 2}))
    w.flush()
    w.add([make_interaction("ep1", 0, output="late resend of attempt 0", attempt=0)])  # written after attempt 1
    w.flush()
    df = read_interactions(run, include_shadow=True)
    one = df[df.episode_id == "ep1"]
    assert set(one["attempt"]) == {1} and len(one) == 3 and set(one[~one.escalated]["output"]) == {"retry"}
    assert len(df[df.episode_id == "ep2"]) == 2  # no outcome yet: nothing superseded
    counts = w.close()
    assert counts["superseded"] == 3 and counts["interactions"] == 5  # calls 2, 3 and 3:shadow of attempt 0
    after = read_interactions(run)
    assert set(after[(after.episode_id == "ep1") & ~after.escalated]["output"]) == {"retry"}


async def _one_record_taken(log):
    """A LogClient that has shipped one record, which the writer holds (its flush interval restarted just before)."""
    from slmshift.platform.log import LogClient

    await log.sync.remote()  # the interval starts now
    client = LogClient(log, flush_every=100)
    client.add(make_interaction("ep0", 0).model_dump())
    client.flush()
    await client.received()
    return client


def test_client_nudges_an_idle_writer_to_flush(tmp_path, ray_session):
    """A client that stops sending (an idle gateway) still gets its records into a file within the flush interval."""
    import asyncio

    from slmshift.platform.log import NUDGE_S

    run = str(tmp_path / "run")
    log = InteractionLog.remote(run)  # default 2 s flush interval

    async def go():
        client = await _one_record_taken(log)
        assert read_interactions(run).empty  # taken, not yet written
        await asyncio.sleep(NUDGE_S + 1.5)
        assert len(read_interactions(run)) == 1
        await client.drain()
        assert not client._unacked

    asyncio.run(go())
    ray.kill(log)


def test_a_nudge_that_lands_before_the_interval_ends_is_followed_by_another(tmp_path, ray_session, monkeypatch):
    """The writer's interval restarts whenever anything flushes (another client's batch): a client's nudge can land
    just before it ends and flush nothing. The client nudges again until its batch is in a file, instead of leaving
    it in the writer's buffer until the next call comes (an idle gateway's last records never reached disk)."""
    import asyncio

    from slmshift.platform import log as log_module

    monkeypatch.setattr(log_module, "NUDGE_S", 0.5)  # the first nudge comes well inside the writer's 2 s interval
    run = str(tmp_path / "run")
    log = InteractionLog.remote(run)

    async def go():
        client = await _one_record_taken(log)
        await asyncio.sleep(1.0)  # the first nudge (at 0.5 s) has flushed nothing
        assert read_interactions(run).empty
        deadline = time.time() + 10
        while read_interactions(run).empty and time.time() < deadline:
            await asyncio.sleep(0.2)
        assert len(read_interactions(run)) == 1 and not client._unacked  # written, and the client knows it
        await client.drain()

    asyncio.run(go())
    ray.kill(log)


# Planted secrets and PII, each of a kind the scrubber catches (tests/platform/test_scrub_corpus.py).
AWS_ID, AWS_SECRET = "AKIAQ4X7N2M5R8T3W6YZ", "kq3Zp9Vb7XwL2mN4rT8yH1cF6jD0sA5gE9uB2nQx"
GH_TOKEN = "ghp_R7tY2uI9oP4aS6dF1gH3jK8lZ5xC0vB7nM2q"
EMAIL = "alice.jones@corp-mail.example"
SECRETS = (AWS_ID, AWS_SECRET, GH_TOKEN, EMAIL, "alice.jones")


def test_scrubbing_log_scrubs_every_text_field_of_what_it_writes(tmp_path, ray_session):
    """`log.scrub`: a cascade call through the real pipeline whose context, SLM error (and so the route reason),
    output and check reason all carry secrets, and an episode outcome whose detail and error do, written by the
    log actor: no string in any Parquet file holds a secret, the JSON fields still parse, the identifiers are as
    they were."""
    import asyncio
    from types import SimpleNamespace

    import pyarrow as pa

    from slmshift.platform.log import LogClient, ScrubbingLog
    from slmshift.platform.policies import policy_spec
    from slmshift.platform.types import ModelSpec
    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.pipeline import CallPipeline, LocalHandle

    class Unreachable(ScriptedEngine):  # an SLM whose error quotes the request
        async def generate(self, requests):
            raise ValueError(f"cannot deliver to {EMAIL}")

    llm = ModelSpec(name="big", tier="llm", backend="simulated")
    slm = ModelSpec(name="small", tier="slm", backend="simulated")
    run = str(tmp_path / "run")
    log = InteractionLog.remote(run)

    async def go():
        client = LogClient(log)
        sink = ScrubbingLog(client)
        handles = {"big": LocalHandle(ScriptedEngine(llm, answer=lambda r: f'{{"token": "{GH_TOKEN}"}}')),
                   "small": LocalHandle(Unreachable(slm))}
        pipeline = CallPipeline(policy=policy_spec(kind="cascade", name="casc", tau=0.5), models=[llm, slm],
                                handles=handles, params={}, log=sink)
        request = make_request("ep-s", 0).model_copy(update={"policy": "casc"})
        context = {"page": f"aws_access_key_id={AWS_ID} aws_secret_access_key={AWS_SECRET}", "to": EMAIL}
        check = lambda text: SimpleNamespace(valid=False, correct=None, reason=f"wrong token in {text}")  # noqa: E731
        result = await pipeline.call(request, check, context)
        assert result.escalated
        sink.add_episode(make_episode("ep-s", False, 0.0).model_copy(update={
            "detail": f"mailed {EMAIL}", "error": f"RuntimeError: bad key {GH_TOKEN}"}).model_dump())
        await sink.drain()

    asyncio.run(go())
    ray.get(log.close.remote())
    files = parquet_files(tmp_path / "run")
    assert files
    cells = [v for f in files for col in pq.read_table(f).columns if pa.types.is_string(col.type)
             for v in col.to_pylist() if v]
    leaks = [(s, v) for v in cells for s in SECRETS if s in v]
    assert not leaks, leaks

    df = read_interactions(run)
    assert len(df) == 2 and set(df.tier) == {"llm", "slm"}
    slm_row, llm_row = df[df.tier == "slm"].iloc[0], df[df.tier == "llm"].iloc[0]
    assert json.loads(llm_row.context) == json.loads(slm_row.context) == {
        "page": "aws_access_key_id=[SECRET] aws_secret_access_key=[SECRET]", "to": "[EMAIL]"}
    assert "cannot deliver to [EMAIL]" in slm_row.error and "[EMAIL]" in slm_row.route_reason
    assert "[EMAIL]" in llm_row.route_reason and "[SECRET]" in llm_row.error
    assert json.loads(llm_row.output) == {"token": "[SECRET]"}
    # identifiers are keys: left as they were, so the record still joins its episode
    assert (llm_row.episode_id, llm_row.task_id, llm_row.scenario, llm_row.policy) == ("ep-s", "t-ep-s", "travel",
                                                                                        "casc")
    ep = read_episodes(run).iloc[0]
    assert (ep.episode_id, ep.detail, ep.error) == ("ep-s", "mailed [EMAIL]", "RuntimeError: bad key [SECRET]")
