"""Ray bootstrap: an embedded local cluster by default, or an existing cluster by address."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from slmshift.platform.config import RaySection
from slmshift.platform.errors import RayConnectError

NAMESPACE = "slmshift"


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
        try:
            ctx = ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
                           log_to_driver=log_to_driver)
        except Exception as e:  # ConnectionError, ValueError, TimeoutError: all mean the same to the user
            raise _connect_error(address, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
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
        raise RayConnectError(f"Could not start an embedded Ray cluster: {type(e).__name__}: {e}. "
                              "Fix: check free memory and /tmp space, or stop a stale cluster with `ray stop`.") from None
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
    return RayConnectError(
        f"Could not connect to the Ray cluster at {address!r} ({why}). Fix: start it with `ray start --head` or "
        "`ray up cluster.yaml`, check the address (e.g. 'auto' on a cluster node, 'ray://HEAD:10001' from "
        "outside), or drop --address / RAY_ADDRESS / ray.address to run on an embedded local cluster.")


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
