"""Where a tiny-speech update's time goes: data2vec v1 against data2vec 2.0 by clones and batch size.

One process, one thread, the same generated spoken corpus and loader as bench_data2vec2.py. For
each `data.max_tokens` the loader's first batches are timed through a whole update (forward,
backward, AdamW step, EMA update of the teacher) for v1 (`speech_tiny`) and v2
(`speech_v2_tiny` with M clones per sample), interleaved, best of `--repeats`. A *view* is one
masked copy the student learns from: v1 has one per sample, v2 M.

Why: data2vec 2.0 saves compute by giving each sample M cheap masked views (the student encodes
only the kept frames) so that a batch needs fewer distinct samples, whose CNN and teacher passes
cost the most at Base size. This table shows what an update costs here, at tiny size on a CPU,
against the views and samples it learns from.

    .venv/bin/python benchmarks/bench_data2vec2_cost.py [--max-tokens 160000 80000 48000] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data2vec2 import TRAIN, build_corpus  # noqa: E402
from timing import best_seconds  # noqa: E402

from d2v_train.config import TrainConfig  # noqa: E402
from d2v_train.data.loader import StreamingLoader  # noqa: E402
from d2v_train.data.plan import BatchPolicy  # noqa: E402
from d2v_train.models.config import ModelConfig  # noqa: E402
from d2v_train.models.objectives import build_model  # noqa: E402

CLONES = (1, 2, 4, 8)


def first_batches(data: Path, max_tokens: int, count: int) -> list[dict]:
    policy = BatchPolicy(max_tokens=max_tokens, min_sample_size=16_000, max_sample_size=48_000)
    loader = StreamingLoader(str(data), TRAIN, policy, workers=1)
    batches = iter(loader)
    try:
        return [next(batches) for _ in range(count)]
    finally:
        batches.close()
        loader.close()


def preset(name: str, clones: int | None = None) -> ModelConfig:
    tree = TrainConfig._preset(name)
    if clones is not None:
        tree["data2vec2"]["clones"] = clones
    return ModelConfig.model_validate(tree)


def update_fn(cfg: ModelConfig, batches: list[dict]):
    """One call = one update per batch, as the trainer makes it (without FSDP and the loader)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    teacher = model.make_teacher()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        for batch in batches:
            model(batch, teacher).loss_sum.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            teacher.update(model.student, 0.999)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[160_000, 80_000, 48_000])
    parser.add_argument("--batches", type=int, default=6, help="batches timed per run")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_d2v2_cost_") as tmp:
        data = build_corpus(Path(tmp), 40, 8, (4, 8))
        for max_tokens in args.max_tokens:
            batches = first_batches(data, max_tokens, args.batches)
            samples = sum(len(b["keys"]) for b in batches) / len(batches)
            variants = {"v1": (preset("speech_tiny"), 1)}
            variants |= {f"v2 M={m}": (preset("speech_v2_tiny", m), m) for m in CLONES}
            fns = {name: update_fn(cfg, batches) for name, (cfg, _) in variants.items()}
            best = best_seconds(fns, args.repeats, warm_up=True)
            v1_ms = 1000 * best["v1"] / len(batches)
            for name, (_, views) in variants.items():
                ms = 1000 * best[name] / len(batches)
                rows.append({"max_tokens": max_tokens, "samples_per_batch": samples, "variant": name,
                             "ms_per_update": ms, "vs_v1": ms / v1_ms, "views_per_update": samples * views,
                             "ms_per_view": ms / (samples * views)})

    print(f"machine: {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, 1 thread")
    print(f"{'max_tokens':>10} {'samples':>7} {'variant':<8} {'ms/update':>9} {'vs v1':>6} {'views':>6} "
          f"{'ms/view':>7}")
    for r in rows:
        print(f"{r['max_tokens']:>10} {r['samples_per_batch']:>7.2f} {r['variant']:<8} {r['ms_per_update']:>9.1f} "
              f"{r['vs_v1']:>6.2f} {r['views_per_update']:>6.1f} {r['ms_per_view']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
