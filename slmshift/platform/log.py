"""The S1 interaction log: buffered, atomic Parquet shards, compacted on close.

Layout under `run_dir` (local path or URI, all IO through a pyarrow filesystem):
  interactions/shard-<seq>-<uuid8>.parquet   one per flush; `part-<n>.parquet` after close
  episodes/shard-<seq>-<uuid8>.parquet       episode outcomes per flush; `episodes.parquet` after close
Files are written to a hidden `.<name>.tmp` and renamed, so readers (ours, pyarrow datasets, ray.data)
never see half a file. Records are re-keyed by `id`; readers keep the latest version (attempt, shard
sequence, then ts), so the log is correct before compaction too, e.g. after a crash. An episode re-run after its
team actor died writes the same ids with `attempt + 1`; records of an earlier attempt that the re-run did not
overwrite are superseded: for an episode with an outcome, readers keep only the records of the outcome's attempt.

Nothing acknowledged is lost when the log actor dies: a `LogClient` keeps every batch until the writer reports it
written to a file (`put` and `sync` answer with the batches now durable and the writer's incarnation), and sends
again what a dead incarnation had taken but not written. Resent records have the same ids, so readers see them once.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import typing
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from slmshift.platform.errors import SlmshiftError, one_line_error
from slmshift.platform.types import EpisodeResult, Interaction

_PA = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
_SHARD = re.compile(r"^shard-(\d+)-[0-9a-f]+\.parquet$")
PART_ROWS = 100_000
_EP_KEY = ["experiment_id", "episode_id"]
NUDGE_S = 2.5  # a little over LogWriter's default flush interval


def _schema(model: type) -> pa.Schema:
    """Explicit schema from the pydantic fields, so every shard matches even with all-null columns."""
    fields = []
    for name, f in model.model_fields.items():
        args = [a for a in typing.get_args(f.annotation) if a is not type(None)] or [f.annotation]
        nullable = type(None) in typing.get_args(f.annotation)
        fields.append(pa.field(name, _PA[args[0]], nullable=nullable))
    return pa.schema(fields)


INTERACTION_SCHEMA = _schema(Interaction)
EPISODE_SCHEMA = _schema(EpisodeResult)


def _open(run_dir: str) -> tuple[pafs.FileSystem, str]:
    uri = run_dir if "://" in run_dir else os.path.abspath(os.path.expanduser(run_dir))
    return pafs.FileSystem.from_uri(uri)


def _list(fs: pafs.FileSystem, path: str) -> list[str]:
    """Parquet files in a directory (not recursive); `.tmp` files and missing dirs are ignored."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith("."))


def _seq(path: str) -> int:
    """Shard sequence; compacted files (part-*, episodes.parquet) predate any shard still present."""
    m = _SHARD.match(path.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def _read(fs: pafs.FileSystem, paths: list[str], schema: pa.Schema, key: list[str]) -> tuple[pd.DataFrame, int]:
    """Read files, keep the latest row per key; returns (frame, duplicates dropped)."""
    frames = []
    for p in paths:
        try:
            t = pq.read_table(p, filesystem=fs, schema=schema)
        except FileNotFoundError:  # removed by a concurrent compaction; its rows live in the new parts
            continue
        frames.append(t.append_column("_seq", pa.array([_seq(p)] * len(t), pa.int64())).to_pandas())
    if not frames:
        return schema.empty_table().to_pandas(), 0
    df = pd.concat(frames, ignore_index=True)
    n = len(df)
    # A later attempt of an episode wins over an earlier one even when a resend wrote the earlier one later.
    order = (["attempt"] if "attempt" in df.columns else []) + ["_seq", "ts"]
    df = df.sort_values(order, kind="stable").drop_duplicates(key, keep="last")
    return df.drop(columns="_seq").reset_index(drop=True), n - len(df)


def _join_episodes(df: pd.DataFrame, eps: pd.DataFrame) -> pd.DataFrame:
    """Episode outcome overrides what the record carried (it is known only after the episode ends)."""
    if df.empty or eps.empty:
        return df
    out = eps[_EP_KEY + ["success", "reward"]]
    m = df[_EP_KEY].merge(out, on=_EP_KEY, how="left")
    has = m["success"].notna().to_numpy()
    df["episode_success"] = df["episode_success"].astype(object)
    df.loc[has, "episode_success"] = m.loc[has, "success"].astype(bool).to_numpy()
    df.loc[has, "episode_reward"] = m.loc[has, "reward"].astype(float).to_numpy()
    return df


def _supersede(df: pd.DataFrame, eps: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Per episode with an outcome, keep only the records of the outcome's attempt (cascade and shadow ids too)."""
    if df.empty or eps.empty:
        return df, 0
    m = df[_EP_KEY].merge(eps[_EP_KEY + ["attempt"]].rename(columns={"attempt": "_ep_attempt"}), on=_EP_KEY,
                          how="left")
    ep_attempt = m["_ep_attempt"].to_numpy()
    stale = m["_ep_attempt"].notna().to_numpy() & (df["attempt"].to_numpy() != ep_attempt)
    return df[~stale], int(stale.sum())


def _episode_paths(fs: pafs.FileSystem, root: str) -> list[str]:
    return [p for p in _list(fs, root) if p.endswith("/episodes.parquet")] + _list(fs, f"{root}/episodes")


def _read_all(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int], list[str], list[str]]:
    fs, root = _open(run_dir)
    ep_paths = _episode_paths(fs, root)
    eps, _ = _read(fs, ep_paths, EPISODE_SCHEMA, _EP_KEY)
    in_paths = _list(fs, f"{root}/interactions")
    df, dropped = _read(fs, in_paths, INTERACTION_SCHEMA, ["id"])
    df, superseded = _supersede(df, eps)
    df = _join_episodes(df, eps).sort_values(_EP_KEY + ["call_index"], kind="stable").reset_index(drop=True)
    return df, eps, {"duplicates_dropped": dropped, "superseded": superseded}, in_paths, ep_paths


def read_interactions(run_dir: str, *, include_shadow: bool = False) -> pd.DataFrame:
    """All interaction records, one per id (latest version), with episode outcomes joined; for an episode with an
    outcome, only its outcome's attempt. Shadow records (paired outcomes on the other tier, never part of an
    episode) only when asked for."""
    df = _read_all(run_dir)[0]
    return df if include_shadow else df[~df["shadow"].astype(bool)].reset_index(drop=True)


def read_episodes(run_dir: str) -> pd.DataFrame:
    """All episode results, one per (experiment_id, episode_id), latest version."""
    fs, root = _open(run_dir)
    return _read(fs, _episode_paths(fs, root), EPISODE_SCHEMA, _EP_KEY)[0]


class LogWriter:
    """Buffers S1 records and writes them as atomic Parquet shards. Usable with or without Ray."""

    def __init__(self, run_dir: str, flush_every: int = 256, flush_interval_s: float = 2.0):
        self.run_dir, self.flush_every, self.flush_interval_s = run_dir, flush_every, flush_interval_s
        self._fs, self._root = _open(run_dir)
        self._buf: dict[str, dict[str, Any]] = {}
        self._eps: dict[tuple[str, str], dict[str, Any]] = {}  # unflushed episode results
        self._outcomes: dict[tuple[str, str], tuple[bool, float]] = {}  # all known, to fill records at flush
        # Client batches (source -> batch numbers) in the buffer, and those written but not yet reported back.
        self._received: dict[str, set[int]] = {}
        self._durable: dict[str, set[int]] = {}
        # Tells a client that the writer it sent a batch to has died (a restart is a new incarnation).
        self.incarnation = time.time_ns()
        try:
            for sub in ("interactions", "episodes"):
                self._fs.create_dir(f"{self._root}/{sub}", recursive=True)
            probe = f"{self._root}/interactions/.probe-{uuid.uuid4().hex[:8]}.tmp"
            with self._fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self._fs.delete_file(probe)
        except OSError as e:
            raise self._error(e) from e
        # Continue after the highest existing shard, so a restarted writer's rows win over older ones.
        shards = _list(self._fs, f"{self._root}/interactions") + _list(self._fs, f"{self._root}/episodes")
        self._next_seq = max((_seq(p) for p in shards), default=-1) + 1
        self._last_flush = time.monotonic()

    def _error(self, e: Exception) -> SlmshiftError:
        return SlmshiftError(
            f"cannot write the interaction log at {self.run_dir!r}: {e}. Make sure the directory (or bucket) "
            "exists or can be created and is writable by this process, or choose another run directory."
        )

    def add(self, records: list[Interaction | dict]) -> None:
        self._buffer(records, [])
        self._maybe_flush()

    def add_episode(self, result: EpisodeResult | dict) -> None:
        self._buffer([], [result])
        self._maybe_flush()

    def _buffer(self, records: list[Interaction | dict], episodes: list[EpisodeResult | dict]) -> None:
        for r in records:
            # Validating dicts drops unknown keys (e.g. a stray 'hidden'), so the reference cannot leak.
            rec = (r if isinstance(r, Interaction) else Interaction.model_validate(r)).model_dump()
            self._buf[rec["id"]] = rec
        for result in episodes:
            ep = (result if isinstance(result, EpisodeResult) else EpisodeResult.model_validate(result)).model_dump()
            key = (ep["experiment_id"], ep["episode_id"])
            self._eps[key] = ep
            self._outcomes[key] = (ep["success"], ep["reward"])

    def put(self, source: str, batch: int, records: list[dict], episodes: list[dict]) -> tuple[int, list[int]]:
        """A `LogClient` batch. Returns (incarnation, this source's batches written to a file since the last answer):
        the client forgets a batch only once it is durable, so a writer killed with a full buffer loses nothing."""
        self._buffer(records, episodes)
        self._received.setdefault(source, set()).add(batch)
        self._maybe_flush()
        return self._ack(source)

    def sync(self, source: str | None = None) -> tuple[int, list[int]]:
        """Flush now; answers like `put`."""
        self.flush()
        return self._ack(source)

    def _ack(self, source: str | None) -> tuple[int, list[int]]:
        return self.incarnation, sorted(self._durable.pop(source, ())) if source is not None else []

    def _maybe_flush(self) -> None:
        if len(self._buf) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def tick(self) -> int:
        """Flush if the interval elapsed; for callers that drive a periodic flush (e.g. the actor's owner)."""
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            return self.flush()
        return 0

    def nudge(self, source: str) -> tuple[int, list[int]]:
        """`tick` for a LogClient waiting on its buffered batches; answers like `put`."""
        self.tick()
        return self._ack(source)

    def _write(self, table: pa.Table, path: str) -> None:
        d, name = path.rsplit("/", 1)
        tmp = f"{d}/.{name}.tmp"
        try:
            pq.write_table(table, tmp, filesystem=self._fs)
            self._fs.move(tmp, path)
        except OSError as e:
            raise self._error(e) from e

    def flush(self) -> int:
        """Write the buffer as one shard (and buffered episodes as another); returns interaction rows written."""
        self._last_flush = time.monotonic()
        n = self._flush()
        for source, batches in self._received.items():  # only now, after the files are in place
            self._durable.setdefault(source, set()).update(batches)
        self._received.clear()
        return n

    def _flush(self) -> int:
        if not self._buf and not self._eps:
            return 0
        seq, tag = self._next_seq, uuid.uuid4().hex[:8]
        self._next_seq += 1
        rows = list(self._buf.values())
        for rec in rows:
            out = self._outcomes.get((rec["experiment_id"], rec["episode_id"]))
            if out is not None:
                rec["episode_success"], rec["episode_reward"] = out
        if rows:
            table = pa.Table.from_pylist(rows, schema=INTERACTION_SCHEMA)
            self._write(table, f"{self._root}/interactions/shard-{seq:06d}-{tag}.parquet")
        if self._eps:
            table = pa.Table.from_pylist(list(self._eps.values()), schema=EPISODE_SCHEMA)
            self._write(table, f"{self._root}/episodes/shard-{seq:06d}-{tag}.parquet")
        self._buf.clear()
        self._eps.clear()
        return len(rows)

    def close(self) -> dict[str, int]:
        """Final flush, then compact shards into deduplicated part files (superseded attempts left out) and
        episodes.parquet."""
        self.flush()
        df, eps, dropped, in_paths, ep_paths = _read_all(self.run_dir)
        idir = f"{self._root}/interactions"
        new = []
        for i, start in enumerate(range(0, max(len(df), 1), PART_ROWS)):
            chunk = df.iloc[start:start + PART_ROWS]
            path = f"{idir}/part-{i:05d}.parquet"
            self._write(pa.Table.from_pandas(chunk, schema=INTERACTION_SCHEMA, preserve_index=False), path)
            new.append(path)
        self._write(pa.Table.from_pandas(eps, schema=EPISODE_SCHEMA, preserve_index=False),
                    f"{self._root}/episodes.parquet")
        # Only now are the old files redundant; a crash before this leaves duplicates readers resolve.
        for p in set(in_paths + ep_paths) - set(new) - {f"{self._root}/episodes.parquet"}:
            try:
                self._fs.delete_file(p)
            except FileNotFoundError:
                pass
        return {"interactions": len(df), "episodes": len(eps), **dropped}


# The log actor: one per run, serialises writes; num_cpus=0 so it never takes a slot from agents or engines.
# Restarted when its process dies (a restart re-opens the run dir and continues the shard sequence); calls in flight
# are retried by Ray, and what the dead one had buffered is resent by the clients (see LogClient).
InteractionLog = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1)(LogWriter)


def start_log_actor(run_dir: str, name: str | None = None) -> Any:
    """The run's log actor, pinned to this process's node (hard affinity): a local run dir is on this machine's disk,
    and the writer must not share a fate with a worker node. A soft affinity is not enough: with zero CPUs on the
    head, Ray placed it on a worker about 2 times in 5, and removing that node together with a team actor that had
    finished episodes lost their records (the client that would resend them died too). The driver's node going away
    ends the run anyway, so a writer that cannot move loses nothing more."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return InteractionLog.options(scheduling_strategy=here, name=name).remote(run_dir)


class LogClient:
    """The writer's side inside a team actor (or the gateway, or the driver): buffers records and episode outcomes
    and ships them to the log actor in batches. Each batch is kept until the writer reports it written to a file,
    and sent again when the writer that took it died before writing it, so `drain` returning means on disk."""

    def __init__(self, log: Any, flush_every: int = 64):
        self.log, self.flush_every = log, flush_every
        self._records: list[dict] = []
        self._episodes: list[dict] = []
        self._source = uuid.uuid4().hex
        self._next = 0
        self._unacked: dict[int, tuple[list[dict], list[dict]]] = {}  # batch -> payload, until durable
        self._inflight: dict[int, Any] = {}  # batch -> ref of its put, not answered yet
        self._receiver: dict[int, int] = {}  # batch -> incarnation of the writer that took it
        self._latest = 0  # newest writer incarnation heard from
        self._tasks: set[Any] = set()  # reply watchers (kept referenced until done)
        self._nudger: Any = None

    def add(self, record: dict) -> None:
        self._records.append(record)
        if len(self._records) >= self.flush_every:
            self.flush()

    def add_episode(self, result: dict) -> None:
        self._episodes.append(result)
        self.flush()  # an outcome is shipped as soon as its episode finishes

    def flush(self) -> None:
        """Ship buffered records and outcomes to the log actor as one batch, without waiting."""
        if self._records or self._episodes:
            b, self._next = self._next, self._next + 1
            self._unacked[b] = (self._records, self._episodes)
            self._records, self._episodes = [], []
            self._send(b)

    def _send(self, b: int) -> None:
        self._receiver.pop(b, None)
        ref = self._inflight[b] = self.log.put.remote(self._source, b, *self._unacked[b])
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a synchronous caller (the driver): answers are read in drain
            return
        task = loop.create_task(self._settle(b, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, b: int, ref: Any) -> None:
        try:
            reply = await ref
        except Exception:  # the writer is gone for good (Ray retried on restarts): drain sends it again
            if self._inflight.get(b) is ref:
                del self._inflight[b]
            return
        if self._inflight.get(b) is ref:
            del self._inflight[b]
            if b in self._unacked:
                self._receiver[b] = reply[0]
        self._apply(reply)
        if self._receiver and (self._nudger is None or self._nudger.done()):
            self._nudger = asyncio.get_running_loop().create_task(self._nudge())

    async def _nudge(self) -> None:
        """The writer flushes on its interval only when called: call it while it holds batches of ours not yet in a
        file, so records reach a file even when this client (a gateway with no more traffic) sends nothing more.
        Until they are: a nudge can land just before the interval ends (another client's put flushed meanwhile)."""
        while self._receiver:
            await asyncio.sleep(NUDGE_S)
            try:
                self._apply(await self.log.nudge.remote(self._source))
            except Exception:
                return  # a dead writer: drain resends

    def _apply(self, reply: tuple[int, list[int]]) -> None:
        incarnation, durable = reply
        for b in durable:
            self._unacked.pop(b, None)
            self._receiver.pop(b, None)
        self._latest = max(self._latest, incarnation)
        for b, taker in list(self._receiver.items()):
            if taker < self._latest:  # taken by a writer that has since been replaced, never written: resend
                self._send(b)

    async def received(self) -> None:
        """Wait until the log actor holds every batch shipped so far (not necessarily on disk yet): after this,
        the death of this process cannot lose them."""
        for b, ref in list(self._inflight.items()):
            await self._settle(b, ref)

    async def drain(self, timeout_s: float = 300.0) -> None:
        """Flush and wait until every record and outcome is in a file. Call before the owning actor exits."""
        self.flush()
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            await self.received()
            if not self._unacked:
                return
            try:
                self._apply(await self.log.sync.remote(self._source))
            except Exception as e:
                last = one_line_error(e)
                await asyncio.sleep(0.5)
            if not self._unacked:
                return
            if time.monotonic() > deadline:
                raise SlmshiftError(
                    f"the interaction log actor did not confirm {len(self._unacked)} batch(es) within {timeout_s:.0f} s"
                    f"{f' (last error: {last})' if last else ''}; their records may be missing from the run's log.")
            for b in self._unacked:
                if b not in self._inflight and b not in self._receiver:
                    self._send(b)


class ScrubbingLog:
    """A LogClient whose records and episode outcomes have secrets and PII removed (`log.scrub`) before they leave
    the process: every text field but the identifiers (`scrub_record`)."""

    def __init__(self, inner: Any):
        from slmshift.platform.scrub import Scrubber

        self.inner, self.scrubber = inner, Scrubber()

    def add(self, record: dict) -> None:
        self.inner.add(self.scrubber.record(record))

    def add_episode(self, result: dict) -> None:
        self.inner.add_episode(self.scrubber.record(result))  # its detail and error quote model output

    def flush(self) -> None:
        self.inner.flush()

    async def drain(self) -> None:
        await self.inner.drain()

    def __getattr__(self, name: str) -> Any:  # received(), etc.
        return getattr(self.inner, name)
