"""The science-bar table: MAE vs its baselines from RUN/evals.jsonl, with accuracy ratios.

    maepipe eval runs/fmnist_60min --data runs/fmnist-shards --knn --linear --finetune --baselines
    python benchmarks/fmnist_table.py runs/fmnist_60min     # markdown for benchmarks/RESULTS.md

For each protocol (kNN, linear, fine-tune) of the newest evaluated step, the MAE row is set side by
side with the baselines measured in the same `maepipe eval` call (same splits, same protocol), and
the ratio MAE / baseline is printed: > 1 means the pretrained encoder is better.
"""

from __future__ import annotations

import sys

from pipeline.eval.runs import read_jsonl


def table(rows: list[dict]) -> str:
    if not rows:
        raise SystemExit("no evals.jsonl rows: run `maepipe eval RUN --data DEST --knn --linear --finetune --baselines` first")
    step = max(r["step"] for r in rows)
    latest = [r for r in rows if r["step"] == step]
    lines = [f"Checkpoint step {step}; test split {latest[0]['test_split']} (n={latest[0]['test_samples']}).", "",
             "| protocol | encoder | top-1 % | train n | MAE / this | wall s |", "|---|---|---|---|---|---|"]
    for proto in ("knn", "linear", "finetune"):
        group = [r for r in latest if r["protocol"].split()[0] == proto]
        mae = next((r for r in group if r["encoder"] == "mae"), None)
        for r in sorted(group, key=lambda r: r["encoder"] != "mae"):
            ratio = f"{mae['top1'] / r['top1']:.3f}" if mae and r is not mae and r["top1"] else ""
            lines.append(f"| {r['protocol']} | {r['encoder']} | {100 * r['top1']:.2f} | {r['train_samples']} | "
                         f"{ratio} | {r['wall_s'] + r.get('feature_s', 0):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run = sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist_60min"
    print(table(read_jsonl(f"{run.rstrip('/')}/evals.jsonl")))
