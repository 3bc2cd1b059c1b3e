"""The S1 interaction log: buffered, atomic Parquet shards, compacted on close.

Layout under `run_dir` (local path or URI, all IO through a pyarrow filesystem):
  interactions/shard-<seq>-<uuid8>.parquet   one per flush; `part-<n>.parquet` after close
  episodes/shard-<seq>-<uuid8>.parquet       episode outcomes per flush; `episodes.parquet` after close
Files are written to a hidden `.<name>.tmp` and renamed, so readers (ours, pyarrow datasets, ray.data)
never see half a file. Records are re-keyed by `id`; readers keep the latest version (shard sequence,
then ts), so the log is correct before compaction too, e.g. after a crash.
"""

from __future__ import annotations

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

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.types import EpisodeResult, Interaction

_PA = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
_SHARD = re.compile(r"^shard-(\d+)-[0-9a-f]+\.parquet$")
PART_ROWS = 100_000
_EP_KEY = ["experiment_id", "episode_id"]


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
    df = df.sort_values(["_seq", "ts"], kind="stable").drop_duplicates(key, keep="last")
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


def _episode_paths(fs: pafs.FileSystem, root: str) -> list[str]:
    return [p for p in _list(fs, root) if p.endswith("/episodes.parquet")] + _list(fs, f"{root}/episodes")


def _read_all(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame, int, list[str], list[str]]:
    fs, root = _open(run_dir)
    ep_paths = _episode_paths(fs, root)
    eps, _ = _read(fs, ep_paths, EPISODE_SCHEMA, _EP_KEY)
    in_paths = _list(fs, f"{root}/interactions")
    df, dropped = _read(fs, in_paths, INTERACTION_SCHEMA, ["id"])
    df = _join_episodes(df, eps).sort_values(_EP_KEY + ["call_index"], kind="stable").reset_index(drop=True)
    return df, eps, dropped, in_paths, ep_paths


def read_interactions(run_dir: str, *, include_shadow: bool = False) -> pd.DataFrame:
    """All interaction records, one per id (latest version), with episode outcomes joined. Shadow records (paired
    outcomes on the other tier, never part of an episode) only when asked for."""
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
        for r in records:
            # Validating dicts drops unknown keys (e.g. a stray 'hidden'), so the reference cannot leak.
            rec = (r if isinstance(r, Interaction) else Interaction.model_validate(r)).model_dump()
            self._buf[rec["id"]] = rec
        self._maybe_flush()

    def add_episode(self, result: EpisodeResult | dict) -> None:
        ep = (result if isinstance(result, EpisodeResult) else EpisodeResult.model_validate(result)).model_dump()
        key = (ep["experiment_id"], ep["episode_id"])
        self._eps[key] = ep
        self._outcomes[key] = (ep["success"], ep["reward"])
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._buf) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def tick(self) -> int:
        """Flush if the interval elapsed; for callers that drive a periodic flush (e.g. the actor's owner)."""
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            return self.flush()
        return 0

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
        """Final flush, then compact shards into deduplicated part files and episodes.parquet."""
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
        return {"interactions": len(df), "episodes": len(eps), "duplicates_dropped": dropped}


# The log actor: one per run, serialises writes; num_cpus=0 so it never takes a slot from agents or engines.
InteractionLog = ray.remote(num_cpus=0, max_concurrency=1)(LogWriter)


class LogClient:
    """The writer's side inside a team actor (or the gateway): buffers records and episode outcomes and ships them
    to the log actor in batches, keeping the refs until acknowledged so `drain` can wait for every one."""

    def __init__(self, log: Any, flush_every: int = 64):
        self.log, self.flush_every = log, flush_every
        self._records: list[dict] = []
        self._episodes: list[dict] = []
        self._pending: list[Any] = []  # log-actor calls not yet acknowledged

    def add(self, record: dict) -> None:
        self._records.append(record)
        if len(self._records) >= self.flush_every:
            self.flush()

    def add_episode(self, result: dict) -> None:
        self._episodes.append(result)
        self.flush()  # an outcome is written as soon as its episode finishes

    def flush(self) -> None:
        """Ship buffered records to the log actor without waiting (the actor serialises writes)."""
        if self._records:
            self._pending.append(self.log.add.remote(self._records))
            self._records = []
        self._pending += [self.log.add_episode.remote(ep) for ep in self._episodes]
        self._episodes = []
        if len(self._pending) > 256:  # drop acknowledged refs so the list stays short
            _, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)

    async def drain(self) -> None:
        """Flush and wait until the log actor has every record. Call before the owning actor exits:
        calls still in flight from a killed actor are lost."""
        self.flush()
        pending, self._pending = self._pending, []
        for ref in pending:
            await ref
