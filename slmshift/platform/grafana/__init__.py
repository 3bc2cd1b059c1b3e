"""The slmshift Grafana dashboard (`slmshift.json`, shipped as package data) and where Ray's dashboard looks for it.

Ray's dashboard (`ray/dashboard/modules/metrics/metrics_head.py`) writes Grafana provisioning files at start-up:
`<session dir>/metrics/grafana/provisioning/dashboards/default.yml` points Grafana's file provider at
`<session dir>/metrics/grafana/dashboards` (or `$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR`; the root moves with
`$RAY_METRICS_OUTPUT_ROOT`), where Ray puts its own dashboards. A JSON placed there appears in Grafana's "Ray"
folder when Grafana is started with `--config <session dir>/metrics/grafana/grafana.ini`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from slmshift.platform.errors import SlmshiftError

__all__ = ["DASHBOARD_FILE", "dashboard", "dashboard_dir", "install_dashboard", "panel_queries"]

DASHBOARD_FILE = "slmshift_grafana_dashboard.json"
# Ray's own dashboard JSON: written when Ray's metrics module has set the folder up (and wiped the old one).
_RAY_MARKER = "default_grafana_dashboard.json"


def _source() -> Path:
    return Path(str(resources.files(__name__).joinpath("slmshift.json")))


def dashboard() -> dict:
    """The dashboard as a dict (Grafana's dashboard JSON model)."""
    return json.loads(_source().read_text(encoding="utf-8"))


def panel_queries(dash: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel."""
    dash = dash if dash is not None else dashboard()
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", []) if t.get("expr")]
    return out


def dashboard_dir(session_dir: str | os.PathLike | None = None) -> Path:
    """The folder Ray's dashboard provisions Grafana dashboards from, resolved as Ray 2.60 does.

    Args:
        session_dir: the Ray session directory (default: the connected session's, on this machine).
    """
    if os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"):
        return Path(os.environ["RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"])
    if os.environ.get("RAY_METRICS_OUTPUT_ROOT"):
        return Path(os.environ["RAY_METRICS_OUTPUT_ROOT"]) / "grafana" / "dashboards"
    if session_dir is None:
        import ray

        if not ray.is_initialized():
            raise SlmshiftError("install_dashboard needs a Ray session: call it after ray.init, or pass session_dir "
                                "(e.g. /tmp/ray/session_latest).")
        ctx = ray.get_runtime_context()
        session_dir = Path(ctx.get_temp_dir()) / ctx.get_session_name()
    return Path(session_dir) / "metrics" / "grafana" / "dashboards"


def install_dashboard(session_dir: str | os.PathLike | None = None, wait_s: float = 10.0) -> Path:
    """Copy the slmshift dashboard where Ray's dashboard points Grafana; returns the file written.

    Only the head node's session folder counts (that is where Ray writes grafana.ini); from a machine that is
    not the head, copy `slmshift/platform/grafana/slmshift.json` into Grafana by hand instead.

    Args:
        session_dir: the Ray session directory (default: the connected session's).
        wait_s: Ray's metrics module clears the folder when it starts, which may be just after `ray.init`
            returns: wait up to this long for Ray's own dashboard file before writing ours beside it.
    """
    target = dashboard_dir(session_dir)
    deadline = time.monotonic() + wait_s
    while not (target / _RAY_MARKER).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{DASHBOARD_FILE}.tmp"
    shutil.copyfile(_source(), tmp)
    os.replace(tmp, target / DASHBOARD_FILE)  # Grafana polls the folder: never let it read half a file
    return target / DASHBOARD_FILE
