"""Does pre-training pay off? The label-efficiency curves of the three demos, pre-trained against random.

For each modality the demo's own corpus, flow and parameters (`flows/demo.py`: generated data,
shards, tiny pre-training, `d2v eval curve` at the demo's budgets with 3 fine-tuning seeds, the
random encoder fine-tuned alike), once per pre-training seed (`--pretrain-seeds`). Reported per
modality and budget: the random and pre-trained metric (mean ± standard deviation over every
fine-tuning seed of every pre-training run), their ratio or difference, and the targets' effective
rank at the end of pre-training (how many of the 64 directions the teacher's targets still span).

    .venv/bin/python benchmarks/bench_learning.py [--modalities speech,vision,text] [--pretrain-seeds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # the flow launches the trainer by its path in the repository


def last_target_rank(run_dir: Path) -> float | None:
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]).get("target_rank") if lines else None


def summarise(modality: str, curves: list[dict], ranks: list, took: list[float]) -> list[dict]:
    """One row per budget: random and pre-trained over every fine-tuning seed of every pre-training run."""
    metric = curves[0]["metric"]
    rows = []
    for budget in dict.fromkeys(p["budget"] for c in curves for p in c["points"]):
        values = {kind: [v for c in curves for p in c["points"] if p["budget"] == budget
                         and p["random"] == (kind == "random") for v in p["values"]]
                  for kind in ("random", "pretrained")}
        mean = {k: statistics.fmean(v) for k, v in values.items()}
        spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        known = [r for r in ranks if r is not None]
        rows.append({"modality": modality, "metric": metric, "budget": budget,
                     "amount": next(p["amount"] for c in curves for p in c["points"] if p["budget"] == budget),
                     "random": mean["random"], "random_spread": spread["random"],
                     "pretrained": mean["pretrained"], "pretrained_spread": spread["pretrained"],
                     "ratio": mean["pretrained"] / mean["random"] if mean["random"] else None,
                     "points": mean["pretrained"] - mean["random"], "runs": len(values["pretrained"]),
                     "target_rank": statistics.fmean(known) if known else None, "flow_s": statistics.fmean(took)})
    return rows


def print_table(rows: list[dict], started: float) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
          f"total {time.monotonic() - started:.0f} s\n")
    print("| modality | budget | labelled | random | pre-trained | pre-trained / random | points | runs | "
          "target rank | flow |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['modality']} ({r['metric']}) | {r['budget']} | {r['amount']:.1f} | "
              f"{100 * r['random']:.1f} ± {100 * r['random_spread']:.1f} | "
              f"{100 * r['pretrained']:.1f} ± {100 * r['pretrained_spread']:.1f} | {r['ratio']:.2f} | "
              f"{100 * r['points']:+.1f} | {r['runs']} | "
              f"{'–' if r['target_rank'] is None else format(r['target_rank'], '.1f')} | {r['flow_s']:.0f} s |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modalities", default="speech,vision,text")
    parser.add_argument("--pretrain-seeds", type=int, default=1, help="pre-training runs per modality (seeds 0..N-1)")
    parser.add_argument("--out", default="/tmp/bench_learning")
    args = parser.parse_args()
    from flows.demo import run_flow

    out = Path(args.out)
    rows, started = [], time.monotonic()
    for modality in [m.strip() for m in args.modalities.split(",") if m.strip()]:
        curves, ranks, took = [], [], []
        for seed in range(args.pretrain_seeds):
            output = out / f"{modality}-seed{seed}"
            t0 = time.monotonic()
            state = run_flow(modality, str(out), seed=seed, output=str(output))
            if not state.is_completed():
                print(f"{modality} seed {seed}: the flow ended {state.name}: {state.message}", file=sys.stderr)
                return 1
            took.append(time.monotonic() - t0)
            curves.append(json.loads((output / "report" / "curve.json").read_text()))
            ranks.append(last_target_rank(output / "run"))
        rows += summarise(modality, curves, ranks, took)
    print_table(rows, started)
    (out / "bench_learning.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
