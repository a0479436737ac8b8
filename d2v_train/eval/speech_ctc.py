"""`d2v eval speech-ctc`: CTC fine-tuning on transcribed speech shards, then greedy WER and CER
(and with --lm, those of a beam search with a word n-gram LM beside them, as the paper decodes).

The recipe of DATA2VEC.md section 6: a linear letter classifier on the encoder, the CNN feature
encoder frozen, span masking of time steps (mask embedding) and channels while fine-tuning, a
tri-stage LR (10% / 40% / 50%), and only the classifier trained for the first updates.
Defaults (RECIPES, by encoder width): Base-size encoders 1000 updates at peak LR 5e-5, the CPU
presets 800 at 3e-3 with the classifier alone for the first half; no weight decay; dropout as
fairseq fine-tunes data2vec audio (none on activations' inputs and attention, 0.1 on FFN
activations, layer drop 0.05). Evaluation batches hold whole utterances
(padded, never cropped), so every transcribed utterance of the split is scored once.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.config import OptimConfig
from d2v_train.data.loader import StreamingLoader
from d2v_train.data.plan import BatchPolicy
from d2v_train.distributed import World
from d2v_train.eval import ctc, finetune, labelled, runtime
from d2v_train.eval.backbone import Backbone
from d2v_train.eval.config import SpeechCTCConfig
from d2v_train.eval.metrics import ErrorCounts, error_counts
from d2v_train.models.speech import frame_padding_mask
from pipelines.masking import compute_span_masks
from schemas.evaluation import DataRef, EvalResult, LabelledSubset

# Fine-tuning recipes by encoder width, for the options left out. BASE: fairseq's data2vec audio
# fine-tuning of Base/Large models. SMALL (the CPU presets, narrower than 256): a small encoder on
# minutes of labels needs a far higher LR, gentler masking and more updates; on speech of varied
# voices a random encoder stays at the all-blank baseline after 800 updates (and with the
# Transformer frozen for half of them) and leaves it by 2,400; BENCHMARKS.md, "Label efficiency",
# has the sweeps. Both were chosen so that neither a pre-trained nor a random encoder stays at the
# all-blank baseline.
RECIPES = {
    "small": {"steps": 2400, "lr": 3e-3, "freeze_share": 0.0, "max_tokens": 200_000, "mask_prob": 0.2,
              "mask_channel_prob": 0.0},
    "base": {"steps": 1000, "lr": 5e-5, "freeze_share": 0.1, "max_tokens": 1_600_000, "mask_prob": 0.65,
             "mask_channel_prob": 0.1},
}
SMALL_WIDTH = 256


def recipe_for(dim: int) -> tuple[str, dict]:
    name = "small" if dim < SMALL_WIDTH else "base"
    return name, RECIPES[name]


def with_recipe(cfg: SpeechCTCConfig, dim: int) -> tuple[SpeechCTCConfig, str]:
    """`cfg` with the options left out (None) taken from the encoder's recipe, and the recipe's name."""
    name, recipe = recipe_for(dim)
    update = {option: recipe[option] for option in ("steps", "lr", "max_tokens", "mask_prob", "mask_channel_prob")
              if getattr(cfg, option) is None}
    steps = update.get("steps", cfg.steps)
    if cfg.freeze_transformer_steps is None:
        update["freeze_transformer_steps"] = int(steps * recipe["freeze_share"])
    return cfg.model_copy(update=update), name


class CTCModel(nn.Module):
    """The speech encoder with a character classifier on every frame (the vocabulary's size)."""

    def __init__(self, backbone: Backbone, train_feature_encoder: bool = False, vocab: ctc.Vocabulary | None = None):
        super().__init__()
        self.encoder = backbone.encoder
        self.vocab = vocab or ctc.Vocabulary()
        self.classifier = nn.Linear(backbone.model.encoder.dim, len(vocab))
        self.train_feature_encoder = train_feature_encoder
        for p in self.encoder.frontend.feature_extractor.parameters():
            p.requires_grad_(train_feature_encoder)

    def forward(self, batch: dict, *, time_mask_BT=None, channel_mask_BD=None,
                encoder_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_BTV, frame padding_BT with True = padded). Masks are drawn by the caller
        from the frame counts, which `frames` gives before any compute."""
        fe = self.encoder.frontend
        with torch.set_grad_enabled(encoder_grad and self.train_feature_encoder and torch.is_grad_enabled()):
            features_BTC = fe.feature_extractor(batch["source"])
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            x_BTD = fe.feature_projection(features_BTC)
            padding_BT = frame_padding_mask(batch["padding_mask"], x_BTD.shape[1], fe.conv_geometry)
            if channel_mask_BD is not None:
                x_BTD = x_BTD.masked_fill(channel_mask_BD[:, None, :], 0.0)
            if time_mask_BT is not None:
                time_mask_BT = time_mask_BT & ~padding_BT
            x_BTD = self.encoder(x_BTD, padding_BT, time_mask_BT).x_BTD
        return self.classifier(x_BTD), padding_BT

    def frames(self, batch: dict) -> np.ndarray:
        """Frames per row, from the sample counts (the CNN's output-length rule)."""
        from d2v_train.models.speech import conv_output_lengths

        samples_B = (~batch["padding_mask"]).sum(-1)
        return conv_output_lengths(samples_B.cpu(), self.encoder.frontend.conv_geometry).numpy()


def draw_time_masks(frames_B: np.ndarray, prob: float, length: int, rng: np.random.Generator) -> np.ndarray | None:
    """Span masks over each row's frames; rows shorter than two spans stay unmasked (a short
    utterance masked whole leaves CTC nothing to align)."""
    if prob <= 0 or frames_B.size == 0:
        return None
    usable_B = frames_B >= 2 * length
    if not usable_B.any():
        return None
    lengths_B = np.where(usable_B, frames_B, frames_B[usable_B].max())
    mask_BT = compute_span_masks(lengths_B, prob, length, rng)
    mask_BT[~usable_B] = False
    T = int(frames_B.max())
    out_BT = np.zeros((frames_B.size, T), dtype=bool)
    out_BT[:, : min(T, mask_BT.shape[1])] = mask_BT[:, :T]
    return out_BT


def draw_channel_masks(batch_size: int, dim: int, prob: float, length: int,
                       rng: np.random.Generator) -> np.ndarray | None:
    """Span masks over feature channels, the same channels zeroed at every frame of a row."""
    if prob <= 0:
        return None
    length = max(1, min(length, dim // 4))
    return compute_span_masks(np.full(batch_size, dim), prob, length, rng, min_masks=0)


def _transcribed(batches, stats: dict, vocab: ctc.Vocabulary):
    """Training batches without untranscribed rows (they have nothing to align); label ids attached."""
    for batch in batches:
        rows = [i for i, text in enumerate(batch.get("transcripts") or []) if text]
        if not rows:
            continue
        if len(rows) < len(batch["keys"]):
            index = torch.tensor(rows)
            samples = int((~batch["padding_mask"][index]).sum(-1).max())
            batch = {"source": batch["source"][index, :samples], "padding_mask": batch["padding_mask"][index, :samples],
                     "transcripts": [batch["transcripts"][i] for i in rows]}
        labels = []
        for text in batch["transcripts"]:
            ids, dropped = vocab.encode(text)
            stats["dropped_characters"] += dropped
            labels.append(ids)
        batch["labels"] = labels
        yield batch


def _check_splits(cfg: SpeechCTCConfig) -> None:
    """Both splits exist, before any fine-tuning."""
    from pipelines.inspection import read_dataset
    from pipelines.storage import Location

    dataset, _, _ = read_dataset(Location(cfg.data))
    for option, split in (("--train-split", cfg.train_split), ("--eval-split", cfg.eval_split)):
        if split not in dataset.splits:
            raise ValueError(f"{option} {split!r}: the dataset has splits {', '.join(sorted(dataset.splits))}")


def evaluate(cfg: SpeechCTCConfig, world: World, backbone: Backbone) -> EvalResult:
    if backbone.modality != "speech":
        raise ValueError(f"speech-ctc needs a speech encoder; the checkpoint's is {backbone.modality}")
    _check_splits(cfg)
    if cfg.lm:
        from d2v_train.eval.lm import check_lm

        check_lm(cfg.lm)
    cfg, recipe = with_recipe(cfg, backbone.model.encoder.dim)
    steps, freeze_steps = cfg.steps, cfg.freeze_transformer_steps
    optim = OptimConfig(lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, schedule="tri_stage",
                      warmup=0.1, hold=0.4, final_lr_scale=0.05)
    finetune.set_dropout(backbone.encoder, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                         activation_dropout=cfg.activation_dropout, layer_drop=cfg.layer_drop)
    train_loader = StreamingLoader(cfg.data, cfg.train_split,
                                   BatchPolicy(max_tokens=cfg.max_tokens, shuffle=True, crop=False, tail="drop"),
                                   rank=world.rank, world_size=world.size, seed=cfg.seed, train=True,
                                   workers=cfg.workers)
    if train_loader.index.modality != "speech":
        train_loader.close()
        raise ValueError(f"{cfg.data} holds {train_loader.index.modality} shards, not speech")
    transcripts = train_loader.index.columns.get("transcript")
    train_samples = 0 if transcripts is None else int(sum(1 for t in transcripts if t))
    if steps and not train_samples:
        train_loader.close()
        raise ValueError(f"split {cfg.train_split!r} of {cfg.data} has no transcribed utterances to fine-tune on")
    try:
        subset = labelled_subset(train_loader.index, cfg.labelled, cfg.subset_seed) if train_samples else None
    except ValueError:
        train_loader.close()
        raise
    if subset is not None:
        train_loader.restrict(subset.rows)
        train_samples = subset.samples
        runtime.log(world, f"speech-ctc: labelled budget {subset.budget}: {subset.samples} utterances, "
                           f"{subset.seconds / 60:.1f} min, {subset.groups} speakers")
    # the same on every rank: the labelled transcripts are
    vocab = ctc.Vocabulary.named(cfg.vocab, [t for t in train_loader.index.columns.get("transcript") or [] if t])
    model = CTCModel(backbone, cfg.train_feature_encoder, vocab).to(world.device)
    torch.manual_seed(cfg.seed)  # the classifier starts alike on every rank
    model.classifier.reset_parameters()
    stats = {"dropped_characters": 0}
    rng = np.random.default_rng([cfg.seed, world.rank, 17])

    def loss_fn(batch: dict, step: int) -> torch.Tensor:
        batch = {k: (v.to(world.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        frames_B = model.frames(batch)
        time_mask = draw_time_masks(frames_B, cfg.mask_prob, cfg.mask_length, rng)
        channel_mask = draw_channel_masks(len(frames_B), backbone.model.encoder.dim, cfg.mask_channel_prob,
                                          cfg.mask_channel_length, rng)
        logits_BTV, padding_BT = model(
            batch, time_mask_BT=None if time_mask is None else torch.from_numpy(time_mask).to(world.device),
            channel_mask_BD=None if channel_mask is None else torch.from_numpy(channel_mask).to(world.device),
            encoder_grad=step >= freeze_steps)
        targets = [torch.tensor(ids, dtype=torch.long) for ids in batch["labels"]]
        log_probs_TBV = F.log_softmax(logits_BTV.float(), dim=-1).transpose(0, 1)
        loss = F.ctc_loss(log_probs_TBV, torch.cat(targets).to(world.device), (~padding_BT).sum(-1),
                          torch.tensor([len(t) for t in targets]), blank=ctc.BLANK, reduction="sum",
                          zero_infinity=True)
        return loss / max(1, sum(len(t) for t in targets))  # per target letter: batch-size independent

    try:
        curve = finetune.fit(model, _transcribed(finetune.forever(train_loader), stats, vocab), loss_fn, steps=steps,
                             cfg=optim, world=world, log_every=cfg.log_every, what="CTC fine-tune") if steps else []
    finally:
        train_loader.close()
    counts, baseline_counts, scored, skipped, lm_counts = score(model, cfg, world)
    with_lm = {} if lm_counts is None else {"wer_lm": lm_counts.wer, "cer_lm": lm_counts.cer}
    dropped = int(runtime.sum_across([stats["dropped_characters"]], world)[0])
    return EvalResult(
        task="speech-ctc", label=cfg.label or backbone.label,
        metrics={"wer": counts.wer, "cer": counts.cer, **with_lm},
        baseline={"wer": baseline_counts.wer, "cer": baseline_counts.cer},
        checkpoint=backbone.ref,
        data=DataRef(url=cfg.data, train_split=cfg.train_split, eval_split=cfg.eval_split,
                     train_samples=train_samples, eval_samples=scored,
                     labelled=None if subset is None else LabelledSubset(
                         budget=subset.budget, samples=subset.samples, seconds=round(subset.seconds, 3),
                         speakers=subset.groups, seed=cfg.subset_seed,
                         keys_sha256=labelled.fingerprint(train_loader.index.columns["key"]))),
        steps=steps, world_size=world.size, seed=cfg.seed, curve=curve,
        hyperparameters={"recipe": recipe, "lr": optim.lr, "schedule": "tri_stage 10/40/50", "max_tokens": cfg.max_tokens,
                         "mask_prob": cfg.mask_prob, "mask_length": cfg.mask_length,
                         "mask_channel_prob": cfg.mask_channel_prob,
                         "mask_channel_length": min(cfg.mask_channel_length, backbone.model.encoder.dim // 4),
                         "freeze_transformer_steps": freeze_steps,
                         "train_feature_encoder": cfg.train_feature_encoder,
                         "decoding": "greedy" if lm_counts is None else "greedy, and beam search with the LM",
                         **({} if lm_counts is None else {"lm": cfg.lm, "lm_weight": cfg.lm_weight,
                                                         "word_score": cfg.word_score, "beam": cfg.beam}),
                         "vocab": cfg.vocab, "vocabulary": "".join(vocab.symbols[2:]),
                         "dropout": cfg.dropout, "activation_dropout": cfg.activation_dropout,
                         "layer_drop": cfg.layer_drop,
                         "untranscribed_eval_utterances": skipped, "dropped_characters": dropped,
                         "word_edits": counts.word_edits, "words": counts.words,
                         "char_edits": counts.char_edits, "chars": counts.chars},
    )


def labelled_subset(index, budget_text: str, seed: int) -> labelled.Subset:
    """The transcribed utterances a budget draws ('all': every one of them)."""
    budget = labelled.Budget.parse(budget_text)
    transcripts = index.columns.get("transcript")
    eligible = np.array([bool(t) for t in transcripts], dtype=bool) if transcripts is not None \
        else np.zeros(len(index), dtype=bool)
    speakers = index.columns.get("speaker")
    if speakers is None:  # LibriSpeech keys lead with the speaker
        speakers = np.array([str(k).split("-")[0] for k in index.columns["key"]], dtype=object)
    seconds = index.lengths / float(index.dataset.frame_grid.sample_rate if index.dataset.frame_grid else 16_000)
    try:
        return labelled.speaker_balanced(speakers, seconds, eligible, budget, seed)
    except ValueError as exc:
        raise ValueError(f"split {index.split!r}: {exc}") from None


def eval_policy(max_tokens: int) -> BatchPolicy:
    """Whole utterances in dataset order, padded to the longest of a batch (never cropped, none
    left out); ranks' missing tail batches are flagged repeats, which scoring skips."""
    return BatchPolicy(max_tokens=max_tokens, shuffle=False, crop=False, tail="pad")


@torch.no_grad()
def score(model: CTCModel, cfg: SpeechCTCConfig,
          world: World) -> tuple[ErrorCounts, ErrorCounts, int, int, ErrorCounts | None]:
    """Greedy transcripts of every utterance of the eval split, scored across ranks: (model
    counts, all-blank counts, utterances scored, untranscribed utterances left out, and with
    --lm the counts of the LM beam search, else None)."""
    decoder = None
    if cfg.lm:
        from d2v_train.eval.lm import BeamDecoder

        decoder = BeamDecoder(model.vocab.symbols, cfg.lm, lm_weight=cfg.lm_weight, word_score=cfg.word_score,
                              beam=cfg.beam)
    with_lm: list[str] = []
    loader = StreamingLoader(cfg.data, cfg.eval_split, eval_policy(cfg.eval_max_tokens or cfg.max_tokens), rank=world.rank, world_size=world.size,
                             seed=cfg.seed, train=False, workers=cfg.workers)
    model.eval()
    references, hypotheses, skipped = [], [], 0
    try:
        for batch in loader:
            if batch["padding"]:
                continue  # a repeat that only evens out the ranks' batch counts
            batch = {k: (v.to(world.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            logits_BTV, padding_BT = model(batch)
            best_BT = logits_BTV.argmax(-1).cpu().numpy()
            frames_B = (~padding_BT).sum(-1).cpu().numpy()
            log_probs_BTV = F.log_softmax(logits_BTV.float(), dim=-1).cpu().numpy() if decoder else None
            for b, (text, best_T, frames) in enumerate(zip(batch.get("transcripts") or [None] * len(frames_B),
                                                          best_BT, frames_B)):
                if not text:
                    skipped += 1
                    continue
                references.append(model.vocab.reference(text))
                hypotheses.append(model.vocab.greedy_decode(best_T[:frames]))
                if decoder is not None:
                    with_lm.append(decoder.decode(log_probs_BTV[b, :frames]))
    finally:
        loader.close()
    model.train()
    local = error_counts(references, hypotheses)
    blank = error_counts(references, [""] * len(references))
    lm = error_counts(references, with_lm) if decoder is not None else ErrorCounts()
    totals = runtime.sum_across(local.as_list() + blank.as_list() + [len(references), skipped] + lm.as_list(), world)
    ints = [int(v) for v in totals]
    return (ErrorCounts(*ints[0:4]), ErrorCounts(*ints[4:8]), ints[8], ints[9],
            ErrorCounts(*ints[10:14]) if decoder is not None else None)

