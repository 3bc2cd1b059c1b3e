"""`slmshift convert`'s report: what the conversion measured (`ConvertReport`), as report.json and report.md and as
the rows the CLI prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmshift.platform.render import md_table
from slmshift.train.promotion import PROMOTION_RULE

__all__ = ["ConvertReport", "serve_bases", "serve_snippet", "CLUSTER_HEADER", "cluster_header", "cluster_rows", "teacher_note", "to_markdown",
           "write_report"]


@dataclass
class ConvertReport:
    run_dir: str
    out_dir: str
    counts: dict[str, int]
    scrub_counts: dict[str, int]
    clustering: dict[str, Any]
    clusters: list[dict[str, Any]]
    grading: str
    timings: dict[str, float]
    registry: str | None
    promotion_rule: str = PROMOTION_RULE
    selection_rule: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    local_dir: str = ""  # the working copy on this machine when out_dir is a URI (the registry's paths are in it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def promoted(self) -> list[dict[str, Any]]:
        return [c for c in self.clusters if c.get("promoted")]


def serve_bases(clusters: list[dict[str, Any]]) -> list[str]:
    """The base sources the promoted adapters were trained on, in cluster order (S4 chooses per cluster); without a
    promoted adapter, the first chosen base."""
    bases = list(dict.fromkeys(c["chosen_source"] for c in clusters if c.get("promoted") and c.get("chosen_source")))
    return bases or [next((c["chosen_source"] for c in clusters if c.get("chosen_source")), "packaged:smollm2-135m")]


def serve_snippet(registry_path: str, base_source: str | list[str], name: str = "slm-tuned") -> str:
    """The YAML that serves the promoted adapters in the next `slmshift run`: merge into an experiment YAML
    that keeps its LLM, which serves the calls of clusters without a promoted adapter. One model per base (S4 may
    choose a different base per cluster), each with the registry: it serves the adapters trained on its source,
    and the policy sends each cluster's calls to the model of its adapter's base."""
    bases = [base_source] if isinstance(base_source, str) else list(base_source)
    names = [name] + [f"{name}-{b.split(':')[-1].rstrip('/').split('/')[-1]}" for b in bases[1:]]
    models = "".join(
        f"  - name: {n}\n"
        "    tier: slm\n"
        "    backend: hf\n"
        f"    source: {b}\n"
        f"    registry: {registry_path}       # serves the promoted adapters trained on this source, by cluster label\n"
        "    resources: {num_cpus: 1}\n" for n, b in zip(names, bases))
    return (
        "models:                          # add to your experiment's models (keep the LLM)\n"
        + models +
        "router:\n"
        "  policies:\n"
        f"    - {{kind: adapters, name: tuned, registry: {registry_path}, slm_model: {name}, default: llm}}\n"
    )


def _pct(d: dict | None, key: str) -> str:
    return "-" if not d or d.get(key) is None else f"{d[key]:.2f}"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _interval(ci: dict | None) -> str:
    """The accuracy gain's interval with its sample size as tasks and calls (n counts tasks: see PROMOTION_RULE)."""
    if not ci:
        return "-"
    n = f"{ci['n']} tasks / {ci['calls']} calls" if "calls" in ci else f"{ci['n']} calls"  # older reports: calls
    return f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}], n={n}"


def _source(src: dict | None) -> str:
    """Where the zero-shot figure came from: collect's graded SLM answers, generated here, or both."""
    if not src:
        return "-"
    return " + ".join(f"{n} {k}" for k, n in (("collect", src.get("collect", 0)), ("generated", src.get("generated", 0)))
                      if n) or "-"


def cluster_rows(report: ConvertReport) -> list[list[str]]:
    """One row per cluster for the Markdown and terminal tables."""
    out = []
    for c in report.clusters:
        tr = c.get("train") or {}
        out.append([str(c["id"]), c["label"], str(c["size"]), c["role"], c["call_kind"],
                    f"{c['n_train']}/{c['n_val']}", c.get("chosen") or "-",
                    _pct(c.get("before"), "correct_rate"), _source(c.get("before_source")),
                    _pct(c.get("after"), "correct_rate"),
                    _interval(c.get("interval")),
                    _pct(c.get("before"), "valid_rate"), _pct(c.get("after"), "valid_rate"),
                    f"{_loss(tr.get('val_loss_base'))} -> {_loss(tr.get('val_loss_adapter'))}" if tr else "-",
                    "yes" if c.get("promoted") else "no", c.get("adapter_dir") or "-", c.get("status", "")])
    return out


CLUSTER_HEADER = ["id", "label", "size", "role", "call kind", "train/val", "SLM", "acc before", "before from",
                  "acc after",
                  "acc diff [95% CI, task bootstrap]", "valid before", "valid after", "val loss", "promoted", "adapter",
                  "why"]


def cluster_header(report: ConvertReport) -> list[str]:
    """CLUSTER_HEADER, its 'acc' columns named 'agreement' where every held-out call was graded by agreement with the
    logged answer (no scenario could grade it: gateway traffic), never as accuracy."""
    if not _by_agreement(report):
        return CLUSTER_HEADER
    return [h.replace("acc ", "agreement ", 1) if h.startswith("acc ") else h for h in CLUSTER_HEADER]


def _by_agreement(report: ConvertReport) -> bool:
    from slmshift.train.evaluate import AGREEMENT

    kinds = {part.split(":")[0].strip() for part in (report.grading or "").split(",") if part.strip()}
    return kinds == {AGREEMENT}


def teacher_note(run_dir: str) -> list[str]:
    """The run's declared teachers (simulated profiles, workload-file teachers), labelled as every report labels
    them."""
    from slmshift.train.routing.report import teacher_lines
    from slmshift.train.routing.tune import teacher_profile

    lines = teacher_lines(teacher_profile(run_dir))
    return ["\n".join(lines).strip()] if lines else []


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(md_table(header, rows))


def to_markdown(report: ConvertReport) -> str:
    base = serve_bases(report.clusters)
    parts = [
        f"# slmshift conversion report: {Path(report.run_dir).name}",
        f"Run: `{report.run_dir}`  Output: `{report.out_dir}`"
        + (f" (working copy on the machine that converted: `{report.local_dir}`; the paths below are in it)"
           if report.local_dir else ""),
        f"Held-out grading: {report.grading} (scenario = the scenario's own checker, correctness; agreement = "
        "agreement with the logged answer where no scenario can grade a call offline, e.g. gateway traffic: tool "
        "calls and JSON compared as parsed values, text by token F1 >= 0.8; see train/evaluate.py). "
        + ("Every figure below is **agreement** with the teacher's logged answers, not correctness."
           if _by_agreement(report) else ""),
        *teacher_note(report.run_dir),
        "## Clusters (S3) and their SLMs (S4, S5)",
        _md_table(cluster_header(report), cluster_rows(report)),
        f"Promotion rule: {report.promotion_rule}. Selection rule: {report.selection_rule}.",
        "## Curation (S2)",
        _md_table(["step", "rows"], [[k, str(v)] for k, v in report.counts.items()]),
        "Scrubbed (replacements per kind):",
        _md_table(["kind", "count"], [[k, str(v)] for k, v in report.scrub_counts.items()]),
        "## Clustering",
        f"{report.clustering['criterion']}. Best cosine silhouette of each group k-means could split: "
        + (", ".join(f"{k}: {v}" for k, v in report.clustering["silhouette"].items()) or "none") + ".",
        "Purity by call kind (share of the cluster's calls of its kind; 1.00 by construction): "
        + ", ".join(f"{c['label']} {c.get('call_kind_share', 1.0):.2f}" for c in report.clusters) + ".",
    ]
    for c in report.clusters:
        if c.get("selection"):
            parts.append(f"### Candidates for cluster {c['id']} ({c['label']})")
            parts.append(_md_table(["candidate", "params", "licence", "memory MB", "context",
                                    "agreement" if _by_agreement(report) else "accuracy", "valid",
                                    "cost USD", "score", "chosen"],
                                   [[r["candidate"], f"{r['params']:.3g}", r["license"], f"{r['memory_mb']:.0f}",
                                     str(r["context_length"]), f"{r['accuracy']:.2f}", f"{r['valid_rate']:.2f}",
                                     f"{r['cost_usd']:.3g}", f"{r['score']:.3g}", "yes" if r["chosen"] else ""]
                                    for r in c["selection"]]))
            if c.get("excluded"):
                parts.append("Not measured (S4's gates): " + "; ".join(f"{n}: {w}" for n, w in c["excluded"].items()))
    parts.append("## Timings (s)")
    parts.append(_md_table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in report.timings.items()]))
    if report.registry:
        parts.append("## Serve the adapters")
        parts.append(f"{len(report.promoted)} adapter(s) promoted in `{report.registry}`. Add to an experiment YAML:")
        parts.append("```yaml\n" + serve_snippet(report.registry, base) + "```")
    return "\n\n".join(parts) + "\n"


def write_report(report: ConvertReport, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    (out / "report.md").write_text(to_markdown(report))
