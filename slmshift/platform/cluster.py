"""Ray bootstrap: an embedded local cluster by default, or an existing cluster by address; and token handling.

Ray 2.60's token authentication: a head started with `ray start --head` enforces a token when one exists on its
machine (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token, which any embedded `ray.init()`
creates), and a client sends its token only when RAY_AUTH_MODE=token, or for `address='auto'`. `use_local_token`
extends Ray's 'auto' rule to an explicit address of a head on this machine; a remote head gets this machine's token
only when RAY_AUTH_MODE=token says so, as in Ray.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slmshift.platform.config import RaySection
from slmshift.platform.errors import RayConnectError, one_line_error

NAMESPACE = "slmshift"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_FIX = ("set RAY_AUTH_MODE=token in this shell, with the cluster's token in ~/.ray/auth_token, in a file named by "
             "RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)")


@dataclass
class RayInfo:
    embedded: bool
    address: str
    dashboard_url: str | None
    metrics_port: int | None


def cluster_address(cfg: RaySection, address: str | None = None) -> str | None:
    """The cluster to join: the argument, then RAY_ADDRESS, then the config; None means embedded."""
    return address or os.environ.get("RAY_ADDRESS") or cfg.address


def start_ray(cfg: RaySection, address: str | None = None, *, log_to_driver: bool = True) -> RayInfo:
    """Join `address` (argument > RAY_ADDRESS > config) or start an embedded cluster. `log_to_driver=False` keeps
    workers' output (Ray Train / Data internals) in Ray's session log files instead of the console.

    Raises RayConnectError with the fix when a given address cannot be reached.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cluster_address(cfg, address)
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return RayInfo(False, ctx.gcs_address, None, None)
    if address:
        _check_reachable(address)
        use_local_token(address)
        try:
            ctx = ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
                           log_to_driver=log_to_driver)
        except Exception as e:  # ConnectionError, ValueError, TimeoutError: all mean the same to the user
            raise _connect_error(address, one_line_error(e)) from None
        return RayInfo(False, address, ctx.dashboard_url or None, None)
    dashboard = cfg.dashboard and importlib.util.find_spec("aiohttp") is not None  # ray[default] deps present
    kwargs = dict(
        address="local",  # embedded means a new cluster, even when a `ray start` one runs on this machine
        num_cpus=cfg.num_cpus, namespace=NAMESPACE, include_dashboard=dashboard, logging_level=logging.WARNING,
        dashboard_host="127.0.0.1", dashboard_port=cfg.dashboard_port, log_to_driver=log_to_driver,
    )
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 1024**2
    if cfg.metrics_export_port:
        kwargs["_metrics_export_port"] = cfg.metrics_export_port
    try:
        ctx = ray.init(**kwargs)
    except Exception as e:
        fix = (f"set another `ray.dashboard_port` in the YAML (or leave it out: the first free port from 8265 is "
               f"used), or `ray: {{dashboard: false}}`" if "already occupied" in str(e)
               else "check free memory and /tmp space, or stop a stale cluster with `ray stop`")
        raise RayConnectError(f"Could not start an embedded Ray cluster: {type(e).__name__}: {e}. Fix: {fix}.") from None
    node = ray.nodes()[0] if ray.nodes() else {}
    url = f"http://{ctx.dashboard_url}" if ctx.dashboard_url else None
    if url:
        try:  # where Ray's dashboard looks for Grafana dashboards
            from slmshift.platform.grafana import install_dashboard

            install_dashboard()
        except OSError as e:
            logging.getLogger(__name__).warning("Grafana dashboard not installed: %s", e)
    return RayInfo(True, ctx.address_info.get("gcs_address", ""), url, node.get("MetricsExportPort"))


def _connect_error(address: str, why: str) -> RayConnectError:
    token = "" if os.environ.get(AUTH_MODE_ENV, "").lower() == "token" else (
        f" If the cluster uses Ray's token authentication (its log says 'Token authentication is enabled'), {TOKEN_FIX}.")
    return RayConnectError(
        f"Could not connect to the Ray cluster at {address!r} ({why}). Fix: start it with `ray start --head` or "
        "`ray up cluster.yaml`, check the address (e.g. 'auto' on a cluster node, 'ray://HEAD:10001' from "
        f"outside), or drop --address / RAY_ADDRESS / ray.address to run on an embedded local cluster.{token}")


def local_token() -> str | None:
    """This machine's Ray token, where Ray looks for it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names,
    ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    try:
        return Path(path).expanduser().read_text().strip() or None
    except OSError:
        return None


def is_local_address(address: str) -> bool:
    """'auto', or an address (host:port, scheme://host:port) whose host is this machine: one it can bind to."""
    if address in ("auto", "local"):
        return True
    host = urlsplit(address if "://" in address else f"//{address}").hostname
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def use_local_token(address: str) -> bool:
    """Switch this process (and its children) to token mode when RAY_AUTH_MODE is unset, `address` is a head on
    this machine and a token exists here: what Ray does for 'auto', and what a `ray start --head` on this machine
    expects. Returns whether it did."""
    if os.environ.get(AUTH_MODE_ENV) is not None or not is_local_address(address) or not local_token():
        return False
    os.environ[AUTH_MODE_ENV] = "token"
    from ray._raylet import Config

    Config.initialize("")  # Ray caches its config when imported: re-read it so this process sends the token
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init waits minutes on a dead host:port; a TCP connect tells in seconds. 'auto' is left to Ray,
    which fails fast when no local cluster is running."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise _connect_error(address, str(e.strerror or e)) from None


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


# --- jobs ------------------------------------------------------------------------------------------------------

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


@dataclass
class JobOutcome:
    job_id: str
    address: str
    status: str  # PENDING/RUNNING (not waited for), SUCCEEDED, FAILED, STOPPED
    run_dir: str | None = None  # as the job's `slmshift run` printed it


def dashboard_address(address: str | None = None) -> str:
    """Where jobs are submitted: the argument, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s)
    URL, else the local head's dashboard. No scheme means http."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None) or DEFAULT_DASHBOARD)
    return (address if "://" in address else f"http://{address}").rstrip("/")


def _job_client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address given; this one was chosen from them already.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    use_local_token(address)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        why = "the cluster needs a token and none was sent" if "required" in str(e) else "the token sent was refused"
        raise RayConnectError(f"The Ray dashboard at {address} refused the job ({why}: Ray token authentication). "
                              f"Fix: {TOKEN_FIX}.") from None
    except Exception as e:  # ConnectionError, requests errors, a non-Ray server
        raise RayConnectError(
            f"Could not reach the Ray dashboard at {address} ({one_line_error(e)[:250]}). "
            "Fix: start a head with `ray start --head` (its dashboard listens on 127.0.0.1:8265), or pass "
            "--address http://HEAD:DASHBOARD_PORT (or set RAY_API_SERVER_ADDRESS).") from None


def submit_job(config_yaml: str, name: str, *, address: str | None = None, python: str | None = None) -> JobOutcome:
    """Submit `slmshift run` of a validated experiment config (YAML text: absolute paths, storage resolved) as a
    Ray job. The job's working dir holds only that file; the cluster runs its own installed slmshift with
    `python` (default: this interpreter's path, right for a head on this machine or nodes set up alike)."""
    import datetime as dt
    import shlex
    import sys
    import tempfile

    address = dashboard_address(address)
    client = _job_client(address)
    job_id = f"slmshift-{name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="slmshift-job-") as d:
        (Path(d) / "experiment.yaml").write_text(config_yaml)
        client.submit_job(entrypoint=f"{shlex.quote(python or sys.executable)} -m slmshift.cli run experiment.yaml",
                          runtime_env={"working_dir": d}, submission_id=job_id, metadata={"slmshift_experiment": name})
    return JobOutcome(job_id, address, "PENDING")


def follow_job(job: JobOutcome, write: Any = print, poll_s: float = 1.0) -> JobOutcome:
    """Stream the job's log through `write` until it ends; fills in its final status and the run dir it printed."""
    import re
    import time

    client = _job_client(job.address)
    seen, logs = 0, ""
    while True:
        status = client.get_job_status(job.job_id)
        logs = client.get_job_logs(job.job_id)
        if len(logs) > seen:
            write(logs[seen:])
            seen = len(logs)
        if status.is_terminal():
            break
        time.sleep(poll_s)
    found = re.search(r"^slmshift experiment \S+ -> (.+?)\s*$", logs, re.M)
    job.status, job.run_dir = str(status.value), found.group(1) if found else None
    return job
