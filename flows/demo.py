"""`d2v demo MODALITY`: the whole road on a small generated corpus, with embedded defaults.

A corpus in the real layout (with one item of each known fault) is generated under `--out`, then
the Prefect flow `pretrain` runs in this process: shards built on a local Dask cluster, tiny
pre-training (the trainer as a subprocess), evaluation of the pre-trained and a random encoder,
and the report. Without PREFECT_API_URL, Prefect starts a temporary local server for the run.
"""
from __future__ import annotations

import os

from pipelines import synthetic

# What each demo generates and how long it trains: sized for a 2-core machine.
DEMO = {
    # 400 unlabelled utterances (about 10 min) to pre-train on, 120 labelled ones (about 3 min) to
    # draw the budgets from, 40 of other speakers to score; letter tones learn in 800 fine-tuning
    # updates (the first 400 the classifier alone), which keeps the demo within 10 minutes
    "speech": {"max_steps": 2000, "shard_size": "4MB", "splits": ["train-other-500", "train-clean-100", "dev-clean"],
               "eval_budgets": ["1m", "all"], "eval_seeds": 3, "eval_steps": 800,
               "eval_args": ["--freeze-transformer-steps", "400"]},
    # 800 unlabelled mosaics of visual words to pre-train on, 16 labelled ones per class showing half
    # of each class's words, 16 per class to score showing only the other half
    # (a crop or a mirror would change their words: pictures are used whole, as stored)
    "vision": {"max_steps": 1000, "shard_size": "4MB", "splits": ["unlabeled", "train", "val"],
               "eval_budgets": ["2", "all"], "eval_seeds": 3,
               "train_overrides": ["data.batch_size=32", "data.crop_scale=[1.0,1.0]", "data.hflip=0"],
               "eval_args": ["--crop-pct", "1"]},
    # 400 documents, each about one of two topics, to pre-train on; a GLUE-format SST-2 task that
    # labels sentences by topic, whose dev sentences use only topic words its train split never shows
    "text": {"max_steps": 600, "shard_size": "4MB", "vocab_size": 1000, "eval_budgets": ["16", "64", "all"],
             "eval_seeds": 3, "train_overrides": ["data.batch_size=16"], "eval_args": ["--batch-size", "16"]},
}


def _speech_corpus(root: str) -> tuple[str, dict]:
    spec = synthetic.make_librispeech(root, {"train-other-500": 400, "train-clean-100": 120, "dev-clean": 40},
                                      seed=0, spoken=True, words=(2, 4), speakers=4, faults=True)
    return spec.source, {}


def _vision_corpus(root: str) -> tuple[str, dict]:
    spec = synthetic.make_imagenet(root, layout="imagefolder", classes=4, train_per_class=16, val_per_class=16,
                                   unlabelled=800, seed=0, faults=True, learnable="words")
    return spec.source, {}


def _text_corpus(root: str) -> tuple[str, dict]:
    spec = synthetic.make_text_corpus(os.path.join(root, "corpus"), files=4, docs_per_file=100, seed=0, faults=True,
                                      topics=True)
    synthetic.make_glue_task(os.path.join(root, "glue"), "SST-2", train=200, dev=100, seed=0, rule="topic")
    return spec.source, {"eval_data": os.path.join(root, "glue", "SST-2")}


CORPORA = {"speech": _speech_corpus, "vision": _vision_corpus, "text": _text_corpus}


def make_corpus(modality: str, root: str) -> tuple[str, dict]:
    """The generated corpus's root, and the flow parameters it needs beyond DEMO's."""
    return CORPORA[modality](root)


def run_flow(modality: str, out: str, *, workers: int = 2, variant: str = "data2vec", seed: int = 0,
             output: str | None = None):
    """Generate the corpus under `out`/corpus and run the flow into `output` (default `out`/MODALITY);
    returns the flow run's final state. `seed` seeds the build, pre-training and the curve's runs."""
    out = os.path.abspath(out)
    source, extra = make_corpus(modality, os.path.join(out, "corpus", modality))
    print(f"generated a {modality} corpus at {source} (with one item of each known fault)", flush=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server's first start in a fresh venv compiles Prefect's server modules and
    # migrates its database: well over Prefect's default 20 s on two cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.pretrain import pretrain

    return pretrain(modality=modality, source=source, output=output or os.path.join(out, modality), preset="tiny",
                    variant=variant, build_workers=workers, mask_variants=4, seed=seed, **DEMO[modality], **extra,
                    return_state=True)


def run_demo(modality: str, out: str, *, workers: int = 2, variant: str = "data2vec") -> int:
    output = os.path.join(os.path.abspath(out), modality)
    state = run_flow(modality, out, workers=workers, variant=variant)
    if not state.is_completed():
        print(f"error: the pretrain flow ended {state.name}: {state.message}", flush=True)
        return 1
    result = state.result()
    print(f"\nshards and dataset.json: {output}/dataset ({result['dataset']['samples']} samples, "
          f"{result['dataset']['rejected']} rejected)")
    print(f"checkpoints:             {output}/run/checkpoints (step {result['training']['step']})")
    print(f"metrics:                 {output}/run/metrics.jsonl, {output}/run/training.png")
    print(f"evaluation results:      {output}/eval")
    print(f"report:                  {result['report']}")
    for gain in result["gains"]:
        print(f"\n{gain[0].upper()}{gain[1:]}.")
    return 0
