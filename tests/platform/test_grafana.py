"""The shipped Grafana dashboard: every query names metrics and labels the code exports, it installs where Ray's
dashboard provisions Grafana from, and (when Debian's `prometheus` is installed) every panel's PromQL returns
data from a real Prometheus scraping a short simulated run."""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from slmshift.platform import metrics
from slmshift.platform.grafana import DASHBOARD_FILE, dashboard, dashboard_dir, install_dashboard, panel_queries

# Labels Ray adds to every exported metric (besides the tag_keys the code declares).
RAY_LABELS = {"SessionName", "instance", "job", "Component", "NodeAddress", "Version", "WorkerId", "ray_io_cluster"}


def exported() -> dict[str, set[str]]:
    """Prometheus series name -> labels, read from the metric objects metrics.py declares (Counter gets _total,
    a Histogram _bucket/_sum/_count with `le` on buckets; Ray prefixes `ray_`)."""
    out: dict[str, set[str]] = {}
    tree = ast.parse(inspect.getsource(metrics))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Counter", "Histogram", "Gauge"):
            name = node.args[0].value
            kw = {k.arg: k.value for k in node.keywords}
            tags = set(eval(compile(ast.Expression(kw["tag_keys"]), "metrics", "eval"), vars(metrics))) \
                if "tag_keys" in kw else set()
            base = f"ray_{name}"
            if node.func.id == "Counter":
                out[base + "_total"] = tags
            elif node.func.id == "Histogram":
                out.update({base + "_bucket": tags | {"le"}, base + "_sum": tags, base + "_count": tags})
            else:
                out[base] = tags
    return out


_SERIES = re.compile(r"\b(ray_[a-z0-9_]+)\b")
_MATCHERS = re.compile(r"(ray_[a-z0-9_]+)\{([^}]*)\}")
_BY = re.compile(r"\bby \(([^)]*)\)")


def test_exported_names_parsed_from_the_code():
    names = exported()
    assert {"ray_slmshift_calls_total", "ray_slmshift_call_latency_s_bucket", "ray_slmshift_episodes_total",
            "ray_slmshift_engine_batch_size_sum", "ray_slmshift_cost_usd_total"} <= set(names)
    assert "policy" in names["ray_slmshift_calls_total"] and "le" in names["ray_slmshift_call_latency_s_bucket"]


def test_every_panel_query_uses_exported_metrics_and_labels():
    names, queries = exported(), panel_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        used = set(_SERIES.findall(expr))
        assert used, (title, expr)
        unknown = used - set(names)
        assert not unknown, f"panel {title!r} queries {unknown}, which the code does not export"
        for metric, body in _MATCHERS.findall(expr):
            labels = {m.split("=")[0].strip().rstrip("!~") for m in body.split(",") if m.strip()}
            assert labels <= names[metric] | RAY_LABELS, (title, metric, labels - names[metric])
        for group in _BY.findall(expr):
            labels = {g.strip() for g in group.split(",")}
            assert all(labels <= names[m] | RAY_LABELS for m in used), (title, labels)


def test_dashboard_covers_what_the_issue_asks_for():
    titles = " | ".join(t for t, _ in panel_queries()).lower()
    for what in ("slm share", "tokens", "cost per minute", "latency p50", "episodes", "success rate", "batch size"):
        assert what in titles, what
    dash = dashboard()
    assert dash["uid"] == "slmshift" and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "SessionName", "policy", "model"}
    used_vars = set(re.findall(r"\$(\w+)", json.dumps([e for _, e in panel_queries()])))
    assert used_vars <= set(variables) | {"__rate_interval"}, used_vars


def test_install_writes_into_the_session_dashboards_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("RAY_METRICS_OUTPUT_ROOT", raising=False)
    path = install_dashboard(tmp_path, wait_s=0)
    assert path == tmp_path / "metrics" / "grafana" / "dashboards" / DASHBOARD_FILE
    assert json.loads(path.read_text()) == dashboard()
    monkeypatch.setenv("RAY_METRICS_OUTPUT_ROOT", str(tmp_path / "root"))
    assert dashboard_dir(tmp_path) == tmp_path / "root" / "grafana" / "dashboards"
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path / "d"))
    assert install_dashboard(wait_s=0) == tmp_path / "d" / DASHBOARD_FILE


# ---- live: a real Prometheus scraping a short simulated run ---------------------------------------------------

EXPERIMENT = """\
experiment: {{name: grafana-check, seed: 0, storage: {storage}}}
models:
  - name: teacher
    tier: llm
    backend: simulated
    params: 7.0e10
    resources: {{num_cpus: 0}}
    price: {{input_per_m: 3.0, output_per_m: 15.0}}
    profile: {{accuracy: {{default: 0.9}}, latency_base_s: 0.15, latency_jitter: 0.5}}
  - name: small
    tier: slm
    backend: simulated
    params: 1.35e8
    resources: {{num_cpus: 0}}
    price: {{input_per_m: 0.01, output_per_m: 0.02}}
    profile: {{accuracy: {{default: 0.6}}, latency_base_s: 0.05, latency_jitter: 0.5}}
router:
  policies:
    - {{kind: llm, name: all-llm}}
    - {{kind: call_kind, name: intent-on-slm, map: {{intent: slm, function_call: llm}}}}
scenarios:
  - kind: operator
    episodes: 24
    teams: 2
    concurrency: 4
    options: {{categories: [simple, multiple]}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _promql(expr: str) -> str:
    """Grafana's variables as 'All', its rate interval as one that spans the whole short run."""
    return expr.replace("$__rate_interval", "2m").replace("$SessionName", ".*").replace("$policy", ".*") \
        .replace("$model", ".*")


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="Debian's `prometheus` is not on PATH (apt-get install -y prometheus)")
def test_every_panel_query_returns_data_from_prometheus(tmp_path, monkeypatch):
    import ray

    import slmshift.scenarios  # noqa: F401
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.runner import run_experiment

    metrics_port, prom_port = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    # Ray exports every 10 s by default; a short run needs a finer grain to show rates
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(EXPERIMENT.format(storage=tmp_path / "runs"))
    cfg = load_config(cfg_path, scenario_options())
    assert not ray.is_initialized(), "this test starts its own Ray (with a fixed metrics port)"
    try:
        # A new local cluster even when a `ray start` one runs on this machine (plain ray.init() would join it);
        # the runner then uses this Ray as it would the embedded one.
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 object_store_memory=200 * 1024**2, _metrics_export_port=metrics_port, namespace="slmshift")
        result = run_experiment(cfg, keep_ray=True)
        installed = install_dashboard()  # the session's folder, as a user's run would
        assert installed.is_file() and (installed.parent / "default_grafana_dashboard.json").is_file()
        episodes = 2 * 24  # two policy arms

        def scraped() -> float:
            res = _get(f"{api}/query?query=" + urllib.parse.quote("sum(ray_slmshift_episodes_total)"))["data"]["result"]
            return float(res[0]["value"][1]) if res else 0.0

        deadline = time.monotonic() + 60
        while scraped() < episodes and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)  # a few more scrapes at the final values
        print(f"\nscraped episodes: {scraped():.0f} of {episodes}; run: {result.run_dir}")
        failures, results = [], {}
        for title, expr in panel_queries():
            body = _get(f"{api}/query?query=" + urllib.parse.quote(_promql(expr)))
            series = body["data"]["result"] if body.get("status") == "success" else []
            values = [float(s["value"][1]) for s in series]
            finite = [v for v in values if math.isfinite(v)]
            results[title] = results.get(title, 0) + len(finite)
            if not finite:
                failures.append(f"{title}: {expr} -> {body}")
            elif "share" in title.lower() or "rate" in title.lower() and "success" in title.lower():
                assert all(0 <= v <= 1 for v in finite), (title, values)
        print("finite series per panel:", results)
        assert not failures, "\n".join(failures)
        for var in ("SessionName", "policy", "model"):
            vals = _get(f"{api}/label/{var}/values?match[]=ray_slmshift_calls_total")["data"]
            assert vals, var
        assert set(_get(f"{api}/label/policy/values?match[]=ray_slmshift_calls_total")["data"]) == \
            {"all-llm", "intent-on-slm"}
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        prom.terminate()
        prom.wait(timeout=30)


def test_shipped_json_is_what_the_builder_makes():
    """slmshift.json is generated by grafana/_build.py: edit the builder, then regenerate."""
    from slmshift.platform.grafana._build import build

    assert dashboard() == build(), "run: python -m slmshift.platform.grafana._build"
