"""Mask generation throughput on a shard-sized workload: vectorised vs the per-row loop.

Usage: python benchmarks/bench_masking.py [--json OUT] [--utterances 1000] [--variants 4]
"""

import argparse
import json
import platform

import numpy as np
from timing import best_seconds

from pipelines.masking import (
    compute_block_masks,
    compute_inverse_block_masks,
    compute_inverse_block_masks_1d,
    compute_span_masks,
    compute_token_masks,
    span_mask_reference,
)


def frames(num_samples):
    """wav2vec2 / data2vec feature CNN output length (50 Hz) of a 16 kHz waveform."""
    n = np.asarray(num_samples)
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        n = (n - kernel) // stride + 1
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--utterances", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=4, help="masks per utterance (K)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    T = frames((rng.uniform(5, 15, args.utterances) * 16000).astype(np.int64))
    rows = np.repeat(T, args.variants)
    B = rows.size

    def reference():
        for t in rows:
            span_mask_reference(int(t), 0.65, 10, rng)

    # first, in a fresh process: the vectorised call then pays page faults on new memory
    fresh = best_seconds({"span_vectorised": lambda: compute_span_masks(rows, 0.65, 10, rng)},
                         args.repeats)["span_vectorised"]
    results = best_seconds({
        "span_vectorised": lambda: compute_span_masks(rows, 0.65, 10, rng),
        "span_reference_loop": reference,
        "beit_block_2d": lambda: compute_block_masks(B, rng),
        "inverse_block_2d": lambda: compute_inverse_block_masks(B, rng),
        "inverse_block_1d": lambda: compute_inverse_block_masks_1d(rows, rng),
        "token_bert_512": lambda: compute_token_masks(np.full(B, 512), 0.15, rng),
    }, args.repeats)
    speedup = results["span_reference_loop"] / results["span_vectorised"]
    speedup_fresh = results["span_reference_loop"] / fresh

    print(f"workload: {args.utterances} utterances of 5-15 s x K={args.variants} = {B} rows, "
          f"T {T.min()}-{T.max()} frames (text: {B} blocks of 512)")
    print(f"{'masks':<22}{'ms / batch':>12}{'rows / s':>14}")
    for name, seconds in results.items():
        print(f"{name:<22}{seconds * 1e3:>12.2f}{B / seconds:>14,.0f}")
    print(f"{'span_vectorised_fresh':<22}{fresh * 1e3:>12.2f}{B / fresh:>14,.0f}"
          "   (fresh process: new memory is page-faulted in)")
    print(f"span speed-up, vectorised vs loop on the same rows: {speedup:.1f}x "
          f"({speedup_fresh:.1f}x against the fresh-process time)")

    if args.json:
        report = {
            "rows": B,
            "utterances": args.utterances,
            "variants": args.variants,
            "seconds_best_of": {k: round(v, 6) for k, v in results.items()},
            "rows_per_second": {k: round(B / v, 1) for k, v in results.items()},
            "span_speedup": round(speedup, 2),
            "span_vectorised_fresh_process_seconds": round(fresh, 6),
            "span_speedup_fresh_process": round(speedup_fresh, 2),
            "machine": {"python": platform.python_version(), "numpy": np.__version__,
                        "processor": platform.processor() or platform.machine()},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
