"""Builds slmshift.json, the dashboard that ships (edit here, then `python -m slmshift.platform.grafana._build`).

Queries use Grafana's `$__rate_interval` and the dashboard variables `$SessionName`, `$policy`, `$model`.
"""

from __future__ import annotations

import json
from pathlib import Path

CALL = 'SessionName=~"$SessionName",policy=~"$policy",model=~"$model"'
ENG = 'SessionName=~"$SessionName",model=~"$model"'
EP = 'SessionName=~"$SessionName",policy=~"$policy"'
R = "$__rate_interval"
SLM = ',tier="slm"'
VALID = ',valid="True"'
SUCC = ',outcome="success"'


def rate(metric, flt, by, extra=""):
    return f"sum by ({by}) (rate({metric}{{{flt}{extra}}}[{R}]))"


def share(metric, flt, by, part):
    """part/all; a group with no 'part' series shows 0, not a gap ('or 0 * all')."""
    whole = rate(metric, flt, by)
    return f"({rate(metric, flt, by, part)} or 0 * {whole}) / {whole}"


def q(le, metric, flt, by):
    return f"histogram_quantile({le}, sum by (le, {by}) (rate({metric}_bucket{{{flt}}}[{R}])))"


panels_spec = [
    ("row", "Calls and routing"),
    ("Calls per second by policy and tier", "reqps", [
        (rate("ray_slmshift_calls_total", CALL, "policy, tier"), "{{policy}} {{tier}}")]),
    ("SLM share of calls by policy", "percentunit", [
        (share('ray_slmshift_calls_total', CALL, 'policy', SLM), "{{policy}}")]),
    ("Valid outputs by model and call kind", "percentunit", [
        (share('ray_slmshift_calls_total', CALL, 'model, call_kind', VALID), "{{model}} {{call_kind}}")]),
    ("Calls per second by model and call kind", "reqps", [
        (rate("ray_slmshift_calls_total", CALL, "model, call_kind"), "{{model}} {{call_kind}}")]),
    ("row", "Tokens and cost"),
    ("Tokens per second by model", "short", [
        (rate("ray_slmshift_tokens_in_total", CALL, "model"), "{{model}} in"),
        (rate("ray_slmshift_tokens_out_total", CALL, "model"), "{{model}} out")]),
    ("Cost per minute by policy (USD, declared prices)", "currencyUSD", [
        (f"60 * {rate('ray_slmshift_cost_usd_total', CALL, 'policy')}", "{{policy}}")]),
    ("Cost per 1k calls by policy (USD)", "currencyUSD", [
        (f"1000 * {rate('ray_slmshift_cost_usd_total', CALL, 'policy')} / {rate('ray_slmshift_calls_total', CALL, 'policy')}",
         "{{policy}}")]),
    ("row", "Latency"),
    ("Call latency p50 / p95 / p99 by model and call kind", "s", [
        (q(p, "ray_slmshift_call_latency_s", CALL, "model, call_kind"), f"p{int(p * 100)} {{{{model}}}} {{{{call_kind}}}}")
        for p in (0.5, 0.95, 0.99)]),
    ("Mean call latency by policy", "s", [
        (f"sum by (policy) (rate(ray_slmshift_call_latency_s_sum{{{CALL}}}[{R}])) / "
         f"sum by (policy) (rate(ray_slmshift_call_latency_s_count{{{CALL}}}[{R}]))", "{{policy}}")]),
    ("row", "Episodes"),
    ("Episodes per minute by policy and outcome", "short", [
        (f"60 * {rate('ray_slmshift_episodes_total', EP, 'scenario, policy, outcome')}", "{{scenario}} {{policy}} {{outcome}}")]),
    ("Episode success rate by scenario and policy", "percentunit", [
        (share('ray_slmshift_episodes_total', EP, 'scenario, policy', SUCC), "{{scenario}} {{policy}}")]),
    ("row", "Engines"),
    ("Engine batch size (mean, p95) by model", "short", [
        (f"sum by (model) (rate(ray_slmshift_engine_batch_size_sum{{{ENG}}}[{R}])) / "
         f"sum by (model) (rate(ray_slmshift_engine_batch_size_count{{{ENG}}}[{R}]))", "mean {{model}}"),
        (q(0.95, "ray_slmshift_engine_batch_size", ENG, "model"), "p95 {{model}}")]),
    ("Engine requests per second by model", "reqps", [
        (rate("ray_slmshift_engine_requests_total", ENG, "model, backend"), "{{model}} ({{backend}})")]),
    ("Engine time per batch p50 / p99 by model", "s", [
        (q(p, "ray_slmshift_engine_batch_latency_s", ENG, "model"), f"p{int(p * 100)} {{{{model}}}}") for p in (0.5, 0.99)]),
]


panels, y, x, pid = [], 0, 0, 1
for spec in panels_spec:
    if spec[0] == "row":
        if x:
            y, x = y + 8, 0
        panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": pid, "panels": [],
                       "title": spec[1], "type": "row"})
        y += 1
    else:
        title, unit, targets = spec
        panels.append({
            "datasource": "${datasource}", "gridPos": {"h": 8, "w": 12, "x": x, "y": y}, "id": pid, "title": title,
            "type": "timeseries",
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]},
                        "tooltip": {"mode": "multi"}},
            "targets": [{"expr": e, "legendFormat": l, "refId": chr(65 + i), "interval": ""}
                        for i, (e, l) in enumerate(targets)],
        })
        x = 12 - x
        if x == 0:
            y += 8
    pid += 1



def var(name, metric, label, desc, multi=True):
    return {"name": name, "label": label, "type": "query", "datasource": "${datasource}", "description": desc,
            "definition": f"label_values({metric}, {name})",
            "query": {"query": f"label_values({metric}, {name})", "refId": f"{name}-query"},
            "includeAll": True, "allValue": ".*", "multi": multi, "refresh": 2, "sort": 1, "hide": 0,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "regex": ""}



dash = {
    "title": "slmshift", "uid": "slmshift", "description": "slmshift runs: calls and SLM share per router policy, "
    "tokens, cost, latency per model and call kind, episodes and success rate, engine batching (ray_slmshift_* "
    "metrics). Shipped in slmshift/platform/grafana/slmshift.json.",
    "tags": ["slmshift", "ray"], "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": 27,
    "time": {"from": "now-30m", "to": "now"}, "timezone": "", "version": 1, "links": [],
    "annotations": {"list": [{"builtIn": 1, "datasource": "-- Grafana --", "enable": True, "hide": True,
                              "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                              "type": "dashboard"}]},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 0, "includeAll": False,
         "multi": False, "current": {}, "options": [], "regex": "", "label": "Data source",
         "description": "The Prometheus that scrapes the Ray nodes' metrics ports."},
        {**var("SessionName", "ray_slmshift_calls_total", "Ray session", "Ray session (one per ray.init / ray start)."),
         "multi": False},
        var("policy", "ray_slmshift_calls_total", "Router policy", "Router policy arms (experiment router.policies)."),
        var("model", "ray_slmshift_calls_total", "Model", "Models (experiment models[].name)."),
    ]},
    "panels": panels,
}



def build() -> dict:
    return dash


if __name__ == "__main__":
    out = Path(__file__).with_name("slmshift.json")
    out.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(panels)} panels)")
