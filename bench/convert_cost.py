"""One cluster's conversion cost (S4 + S5 + grading) before and after issue 22's changes, on the same rows, in one run.

`slmshift convert` runs twice on RUN_DIR's log (a run with SLM shadows, e.g. a loop's collect run under
`LOOP_DIR/iter-1/`), training only the largest cluster (`max_clusters: 1`). S2 and S3 are seeded, so both arms see
the same clusters, the same train/held-out split and the same rows:

- **before**, the conversion as issue 22 found it: S4 generates every held-out call (`reuse_collected` off), held-out
  grading on the static scheduler in batches of 16, each waiting for its slowest row (`eval_scheduler: static`),
  40 LoRA steps, rows batched in random order (no length buckets), float32 with activation checkpointing on, the
  val loss on every held-out row;
- **after**, today's defaults: S4 takes collect's own graded SLM answers for the calls they cover, grading submits
  every held-out call at once to the continuous scheduler, steps sized by the cluster's rows and tokens, batches of
  rows of similar length, bf16 autocast where the CPU does bf16 natively and activations kept where they fit
  (`lora.precision`, `lora.activation_checkpointing`: auto), the val loss (a diagnostic) on a sample of
  `lora.val_loss_rows` held-out rows.

Each arm also prints where S5's wall went (`s5_phases_s`): start-up (Ray Data, Ray Train's controller and worker),
the worker's set-up (model load), the steps, the val loss.

What the "before" arm cannot reproduce: rows over `max_length` then lost their start (now their middle); a cluster
whose rows fit (the small profile's intents do) is unaffected.

Prints each arm's S4 and S5+grading wall time, their ratio (target: after <= 1/4 of before), and each arm's held-out
gain with its task-bootstrap interval (target: no drop). S2/S3 are timed too but are the same work in both arms.

A third arm, **fast**, is "after" at a higher learning rate over fewer passes (`--fast-lr`, `--fast-epochs`), or
without LoRA dropout (`--fast-dropout 0`: its masks were ~13% of a step's CPU time on 2 cores): the tokens LoRA
spends are most of the cost, so `--arms after,fast` asks whether they buy the gain.

Run: .venv/bin/python bench/convert_cost.py RUN_DIR [--call-kind design] [--batch-size 8] [--arms before,after]
     [--out /tmp/convert-cost]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as hf replicas get: spinning threads crawl on busy shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def arm(run_dir: str, out: Path, name: str, batch_size: int, seed: int, candidate: str,
        fast: dict | None = None, call_kind: str | None = None) -> dict:
    from slmshift.train.convert import ConvertOptions, convert

    before = name == "before"
    d = ConvertOptions()
    lora = d.lora.model_copy(update={"batch_size": batch_size, "seed": seed,
                                     **({"steps": 40, "bucket_by_length": False, "val_loss_rows": 10 ** 6,
                                         "precision": "float32", "activation_checkpointing": True}
                                        if before else {}),
                                     **(fast if name == "fast" else {})})
    opts = d.model_copy(update={"max_clusters": 1, "progress": False, "lora": lora, "candidates": [candidate],
                                "curate": d.curate.model_copy(update={"seed": seed, **(
                                    {"call_kinds": [call_kind]} if call_kind else {})}),
                                "cluster": d.cluster.model_copy(update={"seed": seed}),
                                **({"reuse_collected": False, "eval_scheduler": "static"} if before else {})})
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = convert(run_dir, str(out), opts)
    wall = time.perf_counter() - t0
    trained = [c for c in report.clusters if c.get("train")]
    c = trained[0] if trained else {}
    ci = c.get("interval") or {}
    return {"arm": name, "lr": lora.learning_rate, "epochs": lora.epochs, "cluster": c.get("label"),
            "train_rows": c.get("n_train"), "held_out_calls": c.get("n_val"),
            "steps": (c.get("train") or {}).get("steps"), "precision": (c.get("train") or {}).get("precision"),
            "activation_checkpointing": (c.get("train") or {}).get("activation_checkpointing"),
            "s5_phases_s": {k: round((c.get("train") or {}).get(k) or 0, 1)
                            for k in ("wall_s", "start_s", "setup_s", "train_s", "val_loss_s")},
            "s4_from_collect": (c.get("before_source") or {}).get("collect"),
            "s2_s3_s": round(report.timings.get("curate_s", 0) + report.timings.get("cluster_s", 0), 1),
            "s4_s": round(report.timings.get("select_s", 0), 1),
            "s5_and_grading_s": round(report.timings.get("train_eval_s", 0), 1), "wall_s": round(wall, 1),
            "accuracy_before": (c.get("before") or {}).get("correct_rate"),
            "accuracy_after": (c.get("after") or {}).get("correct_rate"),
            "gain": ci.get("diff"), "gain_ci": [ci.get("low"), ci.get("high")], "tasks": ci.get("n"),
            "promoted": c.get("promoted")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a run with SLM shadows (e.g. LOOP_DIR/iter-1/<collect run>)")
    ap.add_argument("--batch-size", type=int, default=8, help="LoRA rows per step (the small profile's 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidate", default="smollm2-135m", help="the SLM (a registered name or a model dir)")
    ap.add_argument("--out", default="/tmp/convert-cost")
    ap.add_argument("--arms", default="before,after", help="arms in order, the first the baseline: before, after, "
                    "fast (after with --fast-lr and --fast-epochs: fewer tokens at a higher learning rate)")
    ap.add_argument("--call-kind", help="convert only this call kind's calls (e.g. design): S4 and S5 then cost one "
                    "task's cluster, not every cluster's S4 beside one cluster's training; pick one the base SLM "
                    "does not already ace, or the gain has no room")
    ap.add_argument("--fast-lr", type=float, default=1e-3)
    ap.add_argument("--fast-epochs", type=float, default=1.0)
    ap.add_argument("--fast-dropout", type=float, default=None, help="the fast arm's LoRA dropout (default: "
                    "the after arm's)")
    args = ap.parse_args()
    print(f"started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {args.run_dir}", flush=True)
    fast = {"learning_rate": args.fast_lr, "epochs": args.fast_epochs,
            **({"dropout": args.fast_dropout} if args.fast_dropout is not None else {})}
    rows = []
    for name in args.arms.split(","):
        rows.append(arm(args.run_dir, Path(args.out) / name, name, args.batch_size, args.seed, args.candidate, fast,
                        args.call_kind))
        print(json.dumps(rows[-1]), flush=True)
    b = rows[0]
    cost_b = b["s4_s"] + b["s5_and_grading_s"]
    for a in rows[1:]:
        cost_a = a["s4_s"] + a["s5_and_grading_s"]
        print(f"S4 + S5 + grading: {a['arm']} / {b['arm']} = {cost_a / cost_b:.2f}x ({cost_a:.0f} s vs {cost_b:.0f} s; "
              "target <= 0.25x)")
        print(f"  S4 {a['s4_s'] / max(b['s4_s'], 1e-9):.2f}x, S5 + grading "
              f"{a['s5_and_grading_s'] / max(b['s5_and_grading_s'], 1e-9):.2f}x")
        print(f"held-out gain: {b['arm']} {b['gain']} {b['gain_ci']} vs {a['arm']} {a['gain']} {a['gain_ci']}")


if __name__ == "__main__":
    main()
