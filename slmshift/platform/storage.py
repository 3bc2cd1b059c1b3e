"""Where slmshift reads and writes: a local path, or a URI that pyarrow opens (`file://`, `s3://`, `gs://`, ...).

Run directories are written straight through pyarrow's filesystem (the S1 log actor's shards, config.yaml, the
report); each file appears whole, so a reader never sees half of one. `slmshift convert` and `slmshift loop` hand
their directories to libraries that want local paths (Ray Train, faiss, Ray Tune, matplotlib), so with a URI they
work in a local mirror of it (`mirror_dir`, under the slmshift cache) and `upload` the mirror at the end of each
stage: what a stage reports as done is in the URI. Resuming from a URI `download`s it into the mirror first.

Endpoint and credentials come from the environment, as pyarrow reads them (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3
for an S3-compatible server, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_DEFAULT_REGION; for gs://,
GOOGLE_APPLICATION_CREDENTIALS). URIs with a query string are refused: every path is joined onto them.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slmshift.platform.errors import SlmshiftError

SCHEMES_HINT = "a local path, file:///abs/path, s3://bucket/path or gs://bucket/path"
CREDENTIALS_HINT = ("give this process credentials for it: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                    "plus AWS_ENDPOINT_URL for an S3-compatible server; GOOGLE_APPLICATION_CREDENTIALS for gs://. On a "
                    "cluster, every node needs them")
_MANIFEST = ".slmshift-uploaded.json"  # in a mirror: what `upload` already sent (size, mtime per file)


def is_uri(path: str | Path) -> bool:
    """A remote location (after `normalize`, `file://` is a local path)."""
    return "://" in str(path)


def normalize(path: str | Path, what: str = "path") -> str:
    """Local paths and `file://` URIs as absolute local paths; other URIs without a trailing slash."""
    path = str(path)
    if "://" not in path:
        return str(Path(path).expanduser().resolve())
    parts = urlsplit(path)
    if parts.query or parts.fragment:
        raise SlmshiftError(f"{what}: {path!r} has a query string; slmshift joins paths onto it, so options cannot ride "
                            "in the URI. Fix: drop the '?…' and set them in the environment (e.g. AWS_ENDPOINT_URL, "
                            "AWS_DEFAULT_REGION).")
    if parts.scheme == "file":
        return str(Path(parts.path).resolve())
    return path.rstrip("/")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def storage_error(uri: str, what: str, e: BaseException) -> SlmshiftError:
    """One paragraph naming the flag or field, the location and the fix."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    scheme = urlsplit(uri).scheme
    if "Unrecognized filesystem type" in msg or "Unrecognized filesystem" in msg:
        return SlmshiftError(f"{what}: {uri!r} has an unknown storage scheme {scheme + '://'!r}. Fix: use {SCHEMES_HINT}.")
    bucket = re.search(r"[Bb]ucket '([^']+)' not found|NoSuchBucket|NO_SUCH_BUCKET", msg)
    if bucket:
        name = bucket.group(1) or urlsplit(uri).netloc
        return SlmshiftError(f"{what}: the bucket {name!r} of {uri!r} does not exist. Fix: create it (e.g. `aws s3 mb "
                             f"{scheme}://{name}`) or choose one that exists.")
    if re.search(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY|SIGNATURE_DOES_NOT_MATCH|[Cc]redentials|HTTP status 40[13]|"
                 r"PERMISSION_DENIED|Permission denied", msg):
        return SlmshiftError(f"{what}: access to {uri!r} was refused ({msg[:200]}). Fix: {CREDENTIALS_HINT}.")
    return SlmshiftError(f"{what}: cannot use {uri!r} ({type(e).__name__}: {msg[:300]}). Fix: use {SCHEMES_HINT} that "
                         "this process can reach and write.")


def open_fs(uri: str, what: str = "path") -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(normalize(uri, what))
    except SlmshiftError:
        raise
    except Exception as e:  # ArrowInvalid (scheme), OSError (libraries, credentials)
        raise storage_error(uri, what, e) from None


def check(uri: str, what: str, *, write: bool = True, timeout_s: float = 60.0) -> str:
    """Fail now, with the fix, when `uri` cannot be opened (or written: a probe file is created and removed under
    it). A store that does not answer within `timeout_s` (no network, a metadata server that never replies) fails
    too. Returns the normalized location."""
    uri = normalize(uri, what)
    if not is_uri(uri):
        return uri

    def probe() -> None:
        import pyarrow.fs as pafs

        fs, path = open_fs(uri, what)
        if write:
            fs.create_dir(path, recursive=True)
            tmp = f"{path}/.probe-{uuid.uuid4().hex[:8]}.tmp"
            with fs.open_output_stream(tmp) as f:
                f.write(b"ok")
            fs.delete_file(tmp)
        elif fs.get_file_info(path).type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            gone = bucket != path and fs.get_file_info(bucket).type == pafs.FileType.NotFound
            raise SlmshiftError(f"{what}: {uri!r} does not exist" + (f" (nor does its bucket {bucket!r})" if gone else "")
                                + ". Fix: pass a location that `slmshift run` (or `--out`) wrote.")

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(probe).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise SlmshiftError(f"{what}: no answer from {uri!r} within {timeout_s:.0f} s. Fix: check the network and "
                            f"the endpoint; {CREDENTIALS_HINT}.") from None
    except SlmshiftError:
        raise
    except Exception as e:
        raise storage_error(uri, what, e) from None
    finally:
        pool.shutdown(wait=False)
    return uri


def exists(uri: str) -> bool:
    if not is_uri(uri):
        return Path(uri).exists()
    import pyarrow.fs as pafs

    fs, path = open_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    """A file's text; FileNotFoundError when it is missing."""
    if not is_uri(uri):
        return Path(uri).read_text()
    fs, path = open_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write a whole file (local: via a temp file and rename; S3/GCS objects appear whole anyway)."""
    if not is_uri(uri):
        p = Path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(text)
        tmp.replace(p)
        return
    fs, path = open_fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def mirror_dir(uri: str) -> Path:
    """The local working copy of a URI: <slmshift cache>/storage/<scheme>/<bucket>/<path>."""
    from slmshift.platform.assets import cache_dir

    parts = urlsplit(uri)
    return cache_dir() / "storage" / parts.scheme / parts.netloc / parts.path.strip("/")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != _MANIFEST and not p.name.endswith(".tmp")}


def upload(local: str | Path, uri: str) -> int:
    """Copy the files of `local` that changed since its last upload to `uri`; returns how many. JSON state files
    should go last, so that what they record is already there: files named `*.json` at the top are sent after the rest."""
    local = Path(local)
    fs, root = open_fs(uri)
    manifest_path = local / _MANIFEST
    sent = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    now = _files(local)
    todo = sorted((k for k, v in now.items() if sent.get(k) != list(v)), key=lambda k: ("/" not in k and k.endswith(".json"), k))
    for rel in todo:
        dest = f"{root}/{rel}"
        try:
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with open(local / rel, "rb") as src, fs.open_output_stream(dest) as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
        except OSError as e:
            raise storage_error(uri, "upload", e) from None
        sent[rel] = list(now[rel])
    manifest_path.write_text(json.dumps(sent))
    return len(todo)


def download(uri: str, local: str | Path) -> int:
    """Copy every file under `uri` into `local` (created); returns how many. A missing `uri` copies nothing."""
    import pyarrow.fs as pafs

    local = Path(local)
    fs, root = open_fs(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage_error(uri, "download", e) from None
    files = [i for i in infos if i.is_file]
    sent = {}
    for i in files:
        rel = i.path[len(root):].lstrip("/")
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(i.path) as src, open(dest, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        sent[rel] = [dest.stat().st_size, dest.stat().st_mtime_ns]  # the mirror now matches: no need to send them back
    if files:
        (local / _MANIFEST).write_text(json.dumps(sent))
    return len(files)
