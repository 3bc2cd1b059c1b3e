"""LoRA training memory and step time by forward precision and activation checkpointing.

Each side runs `slmshift.train.finetune.lora_loop` in its own fresh process (so its peak RSS is its own) on the same
rows, steps, batch size and LoRA options; the sides differ only in `precision` (float32, or bfloat16 autocast) and
`activation_checkpointing` (on: recompute, off: keep). The baseline is the first side, float32 with checkpointing
on (the default before 2026-12-06). Rows default to MetaGPT-like long calls (a source file in the prompt, a test
file as target, ~700 tokens); `--curated` takes a real curated.parquet. Reports peak RSS and seconds per step (the
first step left out: allocator warm-up), each side's ratios to the baseline measured in the same run, and the
losses (bfloat16 must train as float32 does).

Run: .venv/bin/python bench/lora_memory.py [--steps 6] [--batch-size 8] [--max-length 512] [--rounds 1]
     [--sides float32:on,float32:off,bfloat16:on,bfloat16:off] [--curated RUN_DIR/convert/curated.parquet --cluster 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def long_curated(path: Path, rows: int) -> None:
    """Calls shaped like MetaGPT's QA engineer's: a module in the prompt, its unit tests as the target."""
    import pandas as pd

    out = []
    for i in range(rows):
        module = "\n".join(f"def step_{i}_{j}(values: list[int]) -> int:\n    return sum(v * {j} for v in values)"
                           for j in range(28))
        tests = "\n".join(f"def test_step_{i}_{j}():\n    assert step_{i}_{j}([1, 2]) == {3 * j}" for j in range(8))
        messages = [{"role": "system", "content": "You are a QA engineer. Write pytest tests for the module."},
                    {"role": "user", "content": f"Module:\n```python\n{module}\n```"}]
        out.append({"messages": json.dumps(messages), "target": f"```python\n{tests}\n```", "split": "train",
                    "cluster": 0})
    pd.DataFrame(out).to_parquet(path)


def child(args: argparse.Namespace) -> None:
    """One side: train, then print its step times and this process's peak RSS as JSON."""
    import pandas as pd
    import torch

    from slmshift.train.finetune import LoraOptions, lora_loop, setup_peft

    torch.set_num_threads(args.cpus)
    df = pd.read_parquet(args.curated)
    df = df[(df["cluster"] == args.cluster) & (df["split"] == "train")].head(args.batch_size * args.steps)
    precision, ckpt = args.child.split(":")
    options = LoraOptions(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                          precision=precision, activation_checkpointing=ckpt == "on")
    model, tok, dev = setup_peft(args.source, options, "cpu")
    batches = iter([{"messages": df["messages"].tolist()[i: i + args.batch_size],
                     "target": df["target"].tolist()[i: i + args.batch_size]}
                    for i in range(0, len(df), args.batch_size)] * args.steps)
    marks: list[float] = [time.perf_counter()]
    stats = lora_loop(model, tok, batches, options, dev, lambda *_: marks.append(time.perf_counter()))
    steps = [b - a for a, b in zip(marks, marks[1:])]
    print(json.dumps({"step_s": statistics.median(steps[1:] or steps), "tokens": stats["tokens"],
                      "loss_first": stats["train_loss_first"], "loss_last": stats["train_loss_last"],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--curated", type=Path, help="a real curated.parquet (default: synthetic MetaGPT-like rows)")
    ap.add_argument("--cluster", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate both sides this many times; medians reported")
    ap.add_argument("--source", default="packaged:smollm2-135m")
    ap.add_argument("--sides", default="float32:on,float32:off,bfloat16:on,bfloat16:off",
                    help="precision:checkpointing pairs, the first the baseline")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from slmshift.serve.sources import resolve_source

    resolve_source(args.source)  # convert the packaged model once, outside the measured processes
    if args.curated is None:
        args.curated = Path(tempfile.mkdtemp(prefix="slmshift-bench-mem-")) / "curated.parquet"
        long_curated(args.curated, args.batch_size * args.steps)
    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--max-length", str(args.max_length), "--curated", str(args.curated),
                   "--cluster", str(args.cluster), "--cpus", str(args.cpus), "--source", args.source]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in results.items()}
    print(f"\n[lora memory] {args.source}, {args.steps} steps x batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.cpus} CPUs, {args.rounds} round(s) (median); data: {args.curated}")
    base = med[sides[0]]
    for side in sides:
        m = med[side]
        print(f"  {side:14s}: peak RSS {m['peak_rss_gb']:5.2f} GB ({m['peak_rss_gb'] / base['peak_rss_gb']:.2f}x)   "
              f"{m['step_s']:6.2f} s/step ({m['step_s'] / base['step_s']:.2f}x)   {m['tokens'] / args.steps:6.0f} "
              f"tokens/step   loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}")
    print(f"  (ratios against {sides[0]}, measured in this run)")

if __name__ == "__main__":
    main()
