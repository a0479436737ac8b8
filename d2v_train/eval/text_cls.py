"""`d2v eval text-cls`: RoBERTa's GLUE recipe on the pre-trained text encoder.

Examples become `<s> A </s>` or `<s> A </s></s> B </s>` with the pre-training tokenizer; a
classification head on the first token's output (RobertaClassificationHead) and the whole encoder
are fine-tuned with AdamW (betas 0.9/0.98, eps 1e-6), 6% linear warm-up then a cosine decay to 0
(RoBERTa decays linearly; the shared schedules have no linear one). Defaults when the options are
omitted: --steps 200, --batch-size 16 per rank, --lr 2e-5 (RoBERTa's) for encoders of width 256
and more, 1e-3 for the narrower CPU presets, which barely move from random at 2e-5 in 200 updates
(--weight-decay 0.1, --max-length 512, capped at the model's positions).
Every rank draws its batches from the same seeded permutation per epoch (rank r takes batches
r, r+W, ...) and the eval split is scored once across ranks (rank r takes examples r, r+W, ...).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.config import OptimConfig
from d2v_train.distributed import World
from d2v_train.eval import glue, labelled, runtime
from d2v_train.eval.config import TextClsConfig
from d2v_train.eval.finetune import fit
from d2v_train.models.encoder import Encoder
from pipelines.storage import Location
from pipelines.tokenizer import load_tokenizer, special_ids
from schemas.evaluation import DataRef, EvalResult, LabelledSubset

DEFAULT_STEPS, DEFAULT_LR, DEFAULT_BATCH_SIZE = 200, 2e-5, 16
SMALL_WIDTH, SMALL_LR = 256, 1e-3  # the CPU presets' learning rate (BENCHMARKS.md, label efficiency)
WARMUP = 0.06  # RoBERTa's GLUE fine-tuning
HEAD_DROPOUT = 0.1


class ClassificationHead(nn.Module):
    """RoBERTa's head on the first token (<s>): dropout, dense, tanh, dropout, linear."""

    def __init__(self, dim: int, classes: int, dropout: float = HEAD_DROPOUT):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, classes)
        for linear in (self.dense, self.out_proj):
            nn.init.normal_(linear.weight, std=0.02)  # BERT init, as the encoder's
            nn.init.zeros_(linear.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """-> logits_BC."""
        x_BD = self.dropout(x_BTD[:, 0])
        x_BD = self.dropout(torch.tanh(self.dense(x_BD)))
        return self.out_proj(x_BD)


class SequenceClassifier(nn.Module):
    """The encoder and its head as one module, so fine-tuning updates and averages both."""

    def __init__(self, encoder: Encoder, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(encoder.frontend.word_embeddings.embedding_dim, classes)

    def forward(self, tokens_BT: torch.Tensor, padding_BT: torch.Tensor) -> torch.Tensor:
        x_BTD, padding_BT = self.encoder.embed({"tokens": tokens_BT, "padding_mask": padding_BT})
        return self.head(self.encoder(x_BTD, padding_BT).x_BTD)


class Tokens:
    """Examples as token ids in RoBERTa's layout, cut to `max_length` (<s> and </s> included):
    pairs lose tokens from the longer text first, as HF tokenizers' default."""

    def __init__(self, tokenizer, pad_id: int, max_length: int, pairs: bool):
        ids = special_ids(tokenizer)
        self.bos, self.eos, self.pad = ids["bos_id"], ids["eos_id"], pad_id
        self.budget = max_length - (4 if pairs else 2)
        if self.budget < 2:
            raise ValueError(f"--max-length {max_length}: leaves no room for the text "
                             f"({4 if pairs else 2} special tokens per example)")
        self.tokenizer, self.pairs = tokenizer, pairs

    def encode(self, examples: list[glue.Example]) -> list[list[int]]:
        texts_a = [e.text_a for e in examples]
        ids_a = [e.ids for e in self.tokenizer.encode_batch(texts_a, add_special_tokens=False)]
        if not self.pairs:
            return [[self.bos, *a[: self.budget], self.eos] for a in ids_a]
        ids_b = [e.ids for e in self.tokenizer.encode_batch([e.text_b for e in examples], add_special_tokens=False)]
        out = []
        for a, b in zip(ids_a, ids_b):
            keep_a, keep_b = longest_first(len(a), len(b), self.budget)
            out.append([self.bos, *a[:keep_a], self.eos, self.eos, *b[:keep_b], self.eos])
        return out

    def batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_BT padded with pad_id, padding_BT True = padded)."""
        width = max(len(r) for r in rows)
        tokens_BT = torch.full((len(rows), width), self.pad, dtype=torch.long)
        padding_BT = torch.ones((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            tokens_BT[i, : len(row)] = torch.tensor(row)
            padding_BT[i, : len(row)] = False
        return tokens_BT, padding_BT


def longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each text when their sum must fit `budget`: a token comes off the longer text
    until they fit (ties: off the second), in closed form."""
    if len_a + len_b <= budget:
        return len_a, len_b
    keep_b = min(len_b, max(budget // 2, budget - len_a))
    return min(len_a, budget - keep_b), keep_b


def train_batches(samples: int, batch_size: int, seed: int, world: World) -> Iterator[np.ndarray]:
    """Index batches without end: epoch e is a permutation seeded by (seed, e) cut into batches,
    and rank r takes the batches r, r+W, ... of that stream (epochs run on into each other)."""
    counter = itertools.count()
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(samples)
        for start in range(0, samples, batch_size):
            if next(counter) % world.size == world.rank:
                yield order[start: start + batch_size]


def _tokenizer(cfg: TextClsConfig, backbone):
    url = cfg.tokenizer
    if url is None:
        if backbone.dataset_url is None:
            raise ValueError("text-cls needs the pre-training tokenizer: pass --tokenizer (a folder with "
                             "tokenizer.json) for a model without a pre-training dataset")
        url = f"{backbone.dataset_url.rstrip('/')}/tokenizer"
    try:
        tokenizer = load_tokenizer(url)
    except ValueError as exc:
        raise ValueError(f"{exc} (the tokenizer of pre-training; pass --tokenizer to use another)") from None
    tokenizer.encode_special_tokens = True  # "<s>" in a sentence is text, as in the pre-training corpus
    return tokenizer, url


def _check_vocabulary(tokenizer, frontend) -> None:
    pad_id = special_ids(tokenizer)["pad_id"]
    if pad_id != frontend.pad_id:
        raise ValueError(f"the tokenizer's <pad> is id {pad_id} but the model's pad_id is {frontend.pad_id}: "
                         "not the tokenizer the model was pre-trained with")
    if tokenizer.get_vocab_size() > frontend.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model embeds "
                         f"{frontend.vocab_size}: not the tokenizer the model was pre-trained with")


@torch.no_grad()
def confusion_counts(model: SequenceClassifier, rows: list[list[int]], labels_N: np.ndarray, tokens: Tokens,
                     classes: int, batch_size: int, device: torch.device) -> np.ndarray:
    """(true, predicted) counts of `rows` (this rank's share)."""
    model.eval()
    confusion_CC = np.zeros((classes, classes), dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        tokens_BT, padding_BT = tokens.batch(rows[start: start + batch_size])
        predicted_B = model(tokens_BT.to(device), padding_BT.to(device)).argmax(-1).cpu().numpy()
        np.add.at(confusion_CC, (labels_N[start: start + batch_size], predicted_B), 1)
    return confusion_CC


def evaluate(cfg: TextClsConfig, world: World, backbone) -> EvalResult:
    if backbone.modality != "text":
        raise ValueError(f"text-cls needs a text encoder; {backbone.ref.url} is {backbone.modality}")
    steps = DEFAULT_STEPS if cfg.steps is None else cfg.steps
    lr = cfg.lr if cfg.lr is not None else SMALL_LR if backbone.model.encoder.dim < SMALL_WIDTH else DEFAULT_LR
    batch_size = DEFAULT_BATCH_SIZE if cfg.batch_size is None else cfg.batch_size
    data = glue.load_glue(cfg.data, cfg.train_split, cfg.eval_split, cfg.glue_task)
    subset = labelled.label_balanced(data.train_y, cfg.train_limit, cfg.subset_seed)
    if subset.budget != "all":  # the labelled-data budget, balanced over labels
        data.train = [data.train[i] for i in subset.rows]
        data.train_y = data.train_y[subset.rows]
    tokenizer, tokenizer_url = _tokenizer(cfg, backbone)
    frontend = backbone.model.frontend
    _check_vocabulary(tokenizer, frontend)
    max_length = min(cfg.max_length, frontend.max_tokens)
    tokens = Tokens(tokenizer, frontend.pad_id, max_length, data.pairs)
    classes = len(data.labels)

    torch.manual_seed(cfg.seed)  # every rank (and a one-process run) starts from the same head
    model = SequenceClassifier(backbone.encoder, classes).to(world.device)
    torch.manual_seed(cfg.seed + 1 + world.rank)  # dropout masks differ between ranks, as their data does
    runtime.log(world, f"text-cls: {data.task.name}, {len(data.train)} train / {len(data.eval)} eval examples, "
                       f"{classes} classes {list(data.labels)}, {steps} updates")

    train_rows = tokens.encode(data.train)
    train_y = torch.from_numpy(data.train_y)

    def batches():
        for index in train_batches(len(train_rows), batch_size, cfg.seed, world):
            tokens_BT, padding_BT = tokens.batch([train_rows[i] for i in index])
            yield {"tokens": tokens_BT.to(world.device), "padding_mask": padding_BT.to(world.device),
                   "labels": train_y[index].to(world.device)}

    def loss_fn(batch: dict, step: int) -> torch.Tensor:
        return F.cross_entropy(model(batch["tokens"], batch["padding_mask"]), batch["labels"])

    optim = OptimConfig(lr=lr, weight_decay=cfg.weight_decay, schedule="cosine", warmup=WARMUP, final_lr_scale=0.0)
    curve = fit(model, batches(), loss_fn, steps=steps, cfg=optim, world=world, log_every=cfg.log_every,
                what="text-cls")

    mine = np.arange(world.rank, len(data.eval), world.size)
    local = confusion_counts(model, tokens.encode([data.eval[i] for i in mine]) if mine.size else [],
                             data.eval_y[mine], tokens, classes, batch_size, world.device)
    confusion_CC = np.rint(np.array(runtime.sum_across(local.ravel().tolist(), world))).astype(np.int64)
    confusion_CC = confusion_CC.reshape(classes, classes)
    majority = int(np.bincount(data.train_y, minlength=classes).argmax())  # ties: the first label
    baseline_CC = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(baseline_CC, (data.eval_y, majority), 1)

    return EvalResult(
        task="text-cls", label=cfg.label or backbone.label, metrics=glue.scores(confusion_CC),
        baseline=glue.scores(baseline_CC), checkpoint=backbone.ref,
        data=DataRef(url=Location(cfg.data).public_url(), train_split=cfg.train_split, eval_split=cfg.eval_split,
                     train_samples=len(data.train), eval_samples=int(confusion_CC.sum()),
                     labelled=None if subset is None else LabelledSubset(
                         budget=subset.budget, samples=subset.samples, classes=subset.groups, seed=cfg.subset_seed,
                         keys_sha256=labelled.fingerprint(subset.rows.tolist()))),
        steps=steps, world_size=world.size, seed=cfg.seed,
        hyperparameters={"glue_task": data.task.name, "headline": data.task.headline, "labels": list(data.labels),
                         "lr": lr, "batch_size": batch_size, "weight_decay": cfg.weight_decay,
                         "max_length": max_length, "schedule": "cosine", "warmup": WARMUP,
                         "head_dropout": HEAD_DROPOUT, "tokenizer": Location(tokenizer_url).public_url()},
        curve=curve)
