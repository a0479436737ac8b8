"""Image classification on a vision dataset's labels -> top-1 and top-5 (fractions of the eval split).

`image-probe`: the encoder frozen; a logistic regression on standardised mean-pooled patch
features (CLS left out), extracted once with evaluation transforms and fitted on the cache.
`image-finetune`: encoder + mean pool + LayerNorm + linear head trained end to end (BEiT's recipe:
layer-wise LR decay, label smoothing, AdamW, cosine schedule), then scored with evaluation transforms.

Defaults of the options left out:
  image-probe     --steps 300 AdamW updates of the probe (full batch, or random mini-batches of
                  16384 features on larger splits), --lr 1e-2 (cosine to 0), --weight-decay 0,
                  --batch-size 64 images per feature-extraction batch per rank.
  image-finetune  --steps 200, --lr 5e-4 (10% warm-up, then cosine to 1%), --batch-size 32 per rank,
                  --weight-decay 0.05 (none on biases, norms and other 1-D parameters).
--steps 0 is allowed: it scores the untrained head (the probe's zero weights rank classes by index).
The baseline is the trivial predictor: the train split's classes by frequency, the same for every image.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, closing

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2v_train.config import OptimConfig
from d2v_train.data.loader import StreamingLoader
from d2v_train.data.plan import BatchPolicy
from d2v_train.distributed import World
from d2v_train.eval import finetune, labelled, runtime
from d2v_train.eval.config import ImageEvalConfig
from d2v_train.eval.metrics import topk_correct
from d2v_train.models.encoder import Encoder
from pipelines.inspection import read_dataset
from pipelines.storage import Location
from schemas.evaluation import DataRef, EvalResult, LabelledSubset

PROBE_DEFAULTS = {"steps": 300, "lr": 1e-2, "batch_size": 64, "weight_decay": 0.0}
FINETUNE_DEFAULTS = {"steps": 200, "lr": 5e-4, "batch_size": 32, "weight_decay": 0.05}
PROBE_BATCH = 16_384  # features per probe update; smaller splits are fitted full batch
HEAD_INIT_SCALE = 1e-3  # BEiT: a near-zero head leaves the pre-trained features undisturbed at first
KS = (1, 5)


def evaluate(cfg: ImageEvalConfig, world: World, backbone) -> EvalResult:
    if backbone.modality != "vision":
        raise ValueError(f"{cfg.task} needs a vision encoder; the checkpoint's model is {backbone.modality}")
    image_size = _image_size(cfg, backbone.model.frontend)
    classes = _check_dataset(cfg)
    if cfg.task == "image-probe":
        return _probe(cfg, world, backbone, image_size, classes)
    if cfg.task == "image-finetune":
        return _finetune(cfg, world, backbone, image_size, classes)
    raise ValueError(f"unknown image task {cfg.task!r}")


def _options(cfg: ImageEvalConfig, defaults: dict) -> tuple:
    """(steps, lr, batch_size, weight_decay): the user's, or the task's defaults where left out."""
    return tuple(defaults[name] if getattr(cfg, name) is None else getattr(cfg, name) for name in defaults)


def _image_size(cfg: ImageEvalConfig, frontend) -> int:
    size = cfg.image_size or frontend.image_size
    if size != frontend.image_size:
        raise ValueError(f"--image-size {size}: the model takes {frontend.image_size} px images "
                         f"({frontend.patch_size} px patches); leave the option out to use it")
    return size


def _check_dataset(cfg) -> int:
    """The number of classes, after checking the dataset is a labelled vision one with both splits."""
    dataset, _, _ = read_dataset(Location(cfg.data))
    if dataset.modality != "vision":
        raise ValueError(f"--data {cfg.data} holds a {dataset.modality} dataset; image tasks need a vision one")
    for option, split in (("--train-split", cfg.train_split), ("--eval-split", cfg.eval_split)):
        if split not in dataset.splits:
            raise ValueError(f"{option} {split!r}: the dataset has splits {', '.join(sorted(dataset.splits))}")
    if not dataset.classes:
        raise ValueError(f"--data {cfg.data} names no classes: image tasks need labelled images")
    return len(dataset.classes)


def _loader(cfg: ImageEvalConfig, world: World, split: str, batch_size: int, image_size: int, *, train: bool) -> StreamingLoader:
    """Training: random crops, shuffled, the tail dropped. Evaluation: centre crops in dataset order,
    the tail padded (padding batches are skipped) so every image is scored exactly once."""
    policy = BatchPolicy(batch_size=batch_size, shuffle=train, tail="drop" if train else "pad")
    loader = StreamingLoader(Location(cfg.data), split, policy, rank=world.rank, world_size=world.size,
                             seed=cfg.seed, train=train, workers=cfg.workers, image_size=image_size,
                             image_transform=cfg.image_transform())
    labels = loader.index.columns["label"]
    if len(labels) == 0 or (labels < 0).any():
        loader.close()
        problem = "is empty" if len(labels) == 0 else "has unlabelled images"
        raise ValueError(f"split {split!r} of {cfg.data} {problem}")
    return loader


def _split_loaders(stack: ExitStack, cfg: ImageEvalConfig, world: World, batch_size: int, image_size: int, *,
                   train: bool) -> tuple[StreamingLoader, StreamingLoader]:
    """The train split's loader (fine-tuning transforms if `train`) and the eval split's, closed with `stack`."""
    return (stack.enter_context(closing(_loader(cfg, world, cfg.train_split, batch_size, image_size, train=train))),
            stack.enter_context(closing(_loader(cfg, world, cfg.eval_split, batch_size, image_size, train=False))))


def labelled_subset(cfg: ImageEvalConfig, loader: StreamingLoader) -> labelled.Subset:
    """The train split's class-balanced budget (--labels-per-class / --label-fraction), applied to
    the loader; neither given: the whole split (fraction 1)."""
    per_class, fraction = cfg.labels_per_class, cfg.label_fraction
    if per_class is None and fraction is None:
        fraction = 1.0
    subset = labelled.class_balanced(loader.index.columns["label"], cfg.subset_seed, per_class=per_class,
                                     fraction=fraction)
    loader.restrict(subset.rows)
    return subset


def pooled_features(encoder: Encoder, image_BCHW: torch.Tensor) -> torch.Tensor:
    """The mean of the final output's patch tokens (CLS left out): (B, D)."""
    x_BTD, padding_BT = encoder.embed({"image": image_BCHW})
    return encoder(x_BTD, padding_BT).x_BTD[:, 1:].mean(dim=1)


def majority_baseline(train_labels_N: np.ndarray, eval_labels_M: np.ndarray, classes: int) -> dict[str, float]:
    """Top-k of always answering the train split's k most frequent classes (ties: lower index first)."""
    counts_C = np.bincount(train_labels_N, minlength=classes).astype(np.float64)
    hits = topk_correct(np.broadcast_to(counts_C, (len(eval_labels_M), classes)), eval_labels_M, KS)
    return _fractions(hits, len(eval_labels_M))


def _fractions(hits: dict[int, int], total: int) -> dict[str, float]:
    return {f"top{k}": hits[k] / total if total else 0.0 for k in KS}


def _data_ref(cfg: ImageEvalConfig, train_loader: StreamingLoader, scored: int, subset: labelled.Subset | None) -> DataRef:
    return DataRef(url=Location(cfg.data).public_url(), train_split=cfg.train_split, eval_split=cfg.eval_split,
                   train_samples=len(train_loader.index), eval_samples=scored,
                   labelled=None if subset is None else LabelledSubset(
                       budget=subset.budget, samples=subset.samples, classes=subset.groups, seed=cfg.subset_seed,
                       keys_sha256=labelled.fingerprint(train_loader.index.columns["key"])))


def _label(cfg: ImageEvalConfig, backbone) -> str:
    return cfg.label if cfg.label is not None else backbone.label


# -- the linear probe -------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: Encoder, loader: StreamingLoader, world: World,
                     dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, features) of this rank's share of the split: each rank encodes its share and keeps
    it. Features are never gathered (a 768-wide float32 feature of each of ImageNet's 1.28 M
    training images is 3.9 GB, on every rank); the probe is fitted data-parallel on the shares."""
    labels, features = [], []
    for batch in loader:
        if batch["padding"]:
            continue
        features.append(pooled_features(encoder, batch["image"].to(world.device)).float().cpu().numpy())
        labels.append(batch["label"].numpy())
    return (np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(features) if features else np.zeros((0, dim), np.float32))


def standardisation(x_ND: np.ndarray, world: World) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std (+1e-6) of every feature over all ranks' rows, from summed moments."""
    d = x_ND.shape[1]
    x64 = x_ND.astype(np.float64)
    totals = np.array(runtime.sum_across([float(len(x_ND)), *x64.sum(0), *(x64 ** 2).sum(0)], world))
    n = max(totals[0], 1.0)
    mean_D = totals[1: 1 + d] / n
    var_D = np.maximum(totals[1 + d:] / n - mean_D ** 2, 0.0)
    return mean_D.astype(np.float32), (np.sqrt(var_D) + 1e-6).astype(np.float32)


def _probe_batches(x_ND: torch.Tensor, y_N: torch.Tensor, size: int, seed: int, rank: int) -> Iterator[dict]:
    """This rank's rows of every update: all of them when the whole set is fitted at once (`size`
    None), else `size` random rows (their own generator per rank)."""
    n = len(y_N)
    if size is None or size >= n:
        while True:
            yield {"x": x_ND, "label": y_N}
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    while True:
        for idx in torch.randperm(n, generator=generator)[: n - n % max(size, 1)].view(-1, max(size, 1)):
            idx = idx.to(x_ND.device)
            yield {"x": x_ND[idx], "label": y_N[idx]}


def _probe(cfg: ImageEvalConfig, world: World, backbone, image_size: int, classes: int) -> EvalResult:
    steps, lr, batch_size, weight_decay = _options(cfg, PROBE_DEFAULTS)
    encoder, dim = backbone.encoder.eval().requires_grad_(False), backbone.model.encoder.dim
    with ExitStack() as stack:
        train_loader, eval_loader = _split_loaders(stack, cfg, world, batch_size, image_size, train=False)
        subset = labelled_subset(cfg, train_loader)
        runtime.log(world, f"image-probe: encoding {len(train_loader.index)} + {len(eval_loader.index)} images")
        train_y, train_x = extract_features(encoder, train_loader, world, dim)
        eval_y, eval_x = extract_features(encoder, eval_loader, world, dim)
        # the labels of every sample come from the indexes: no rank needs the others' features
        all_train_y = np.asarray(train_loader.index.columns["label"], dtype=np.int64)
        all_eval_y = np.asarray(eval_loader.index.columns["label"], dtype=np.int64)
    # standardised with the train split's statistics: one LR suits every checkpoint's feature scale
    mean_D, std_D = standardisation(train_x, world)
    device = world.device
    x_ND = torch.from_numpy((train_x - mean_D) / std_D).to(device)
    y_N = torch.from_numpy(train_y).to(device)
    total = len(all_train_y)
    # full batch when the set fits in one, else each rank's share of a PROBE_BATCH-row batch; the
    # loss is summed over a rank's rows and scaled so that the ranks' averaged gradient is the
    # gradient of the mean over all rows of the update
    mine = None if total <= PROBE_BATCH else max(1, round(PROBE_BATCH * len(train_y) / max(total, 1)))
    rows = total if mine is None else int(runtime.sum_across([float(mine)], world)[0])
    probe = nn.Linear(dim, classes).to(device)
    nn.init.zeros_(probe.weight)  # a convex problem: the zero start is as good as any, and deterministic
    nn.init.zeros_(probe.bias)
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8, schedule="cosine",
                        warmup=0.0, final_lr_scale=0.0)
    curve = finetune.fit(probe, _probe_batches(x_ND, y_N, mine, cfg.seed, world.rank),
                         lambda batch, step: F.cross_entropy(probe(batch["x"]), batch["label"], reduction="sum")
                         * (world.size / max(rows, 1)),
                         steps=steps, cfg=optim, world=world, log_every=cfg.log_every, what="image-probe")
    with torch.no_grad():
        logits_MC = probe(torch.from_numpy((eval_x - mean_D) / std_D).to(device)).cpu().numpy()
    local = topk_correct(logits_MC, eval_y, KS)
    summed = runtime.sum_across([float(local[k]) for k in KS] + [float(len(eval_y))], world)
    hits, scored = {k: int(v) for k, v in zip(KS, summed)}, int(summed[-1])
    held = [int(v) for v in runtime.gather_objects(len(train_y) + len(eval_y), world)]
    return EvalResult(
        task=cfg.task, label=_label(cfg, backbone), metrics=_fractions(hits, scored),
        baseline=majority_baseline(all_train_y, all_eval_y, classes), checkpoint=backbone.ref,
        data=_data_ref(cfg, train_loader, scored, subset), steps=steps, world_size=world.size, seed=cfg.seed,
        hyperparameters={"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "schedule": "cosine",
                         "probe_batch": min(PROBE_BATCH, total), "image_size": image_size,
                         "crop_pct": cfg.crop_pct, "features": "mean of final patch tokens, standardised", "classes": classes,
                         "features_per_rank": held},
        curve=curve,
    )


# -- full fine-tuning -------------------------------------------------------------------------
class ImageClassifier(nn.Module):
    """Encoder -> mean of the final patch tokens -> LayerNorm -> linear (data2vec/BEiT fine-tuning)."""

    def __init__(self, encoder: Encoder, dim: int, classes: int, eps: float = 1e-6):
        super().__init__()
        self.encoder = encoder
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():
            self.head.weight.mul_(HEAD_INIT_SCALE)
        nn.init.zeros_(self.head.bias)

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(pooled_features(self.encoder, image_BCHW)))


def layer_depth(name: str, layers: int) -> int:
    """0 for the patch embedding, CLS and mask tokens; i + 1 for block i; layers + 1 for the rest
    (final norm, head) and for the relative position bias, which every block shares (BEiT does alike)."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if "rel_pos_bias" in parts:
        return layers + 1
    if "frontend" in parts:
        return 0
    return layers + 1


def layer_decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], layers: int, decay: float,
                       weight_decay: float) -> list[dict]:
    """AdamW groups, each with an "lr_scale" of decay^(layers + 1 - depth): the head learns at the
    full LR, block i at decay^(layers - i), the embeddings at decay^(layers + 1). 1-D parameters
    (biases, norms, tokens) get no weight decay."""
    if not 0 < decay <= 1:
        raise ValueError(f"--layer-decay {decay}: expected a value in (0, 1] (1 disables it)")
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        depth, exempt = layer_depth(name, layers), parameter.ndim <= 1
        group = groups.setdefault((depth, exempt), {"params": [], "weight_decay": 0.0 if exempt else weight_decay,
                                                    "lr_scale": decay ** (layers + 1 - depth)})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


@torch.no_grad()
def score(model: nn.Module, loader: StreamingLoader, world: World) -> tuple[dict[int, int], int]:
    """Top-k hits and images scored, summed over ranks (padding batches skipped: each image once)."""
    model.eval()
    hits, total = dict.fromkeys(KS, 0), 0
    for batch in loader:
        if batch["padding"]:
            continue
        logits_BC = model(batch["image"].to(world.device)).float().cpu().numpy()
        for k, n in topk_correct(logits_BC, batch["label"].numpy(), KS).items():
            hits[k] += n
        total += len(batch["keys"])
    summed = runtime.sum_across([*(hits[k] for k in KS), total], world)
    return {k: int(v) for k, v in zip(KS, summed)}, int(summed[-1])


def _finetune(cfg: ImageEvalConfig, world: World, backbone, image_size: int, classes: int) -> EvalResult:
    steps, lr, batch_size, weight_decay = _options(cfg, FINETUNE_DEFAULTS)
    enc = backbone.model.encoder
    torch.manual_seed(cfg.seed)  # every rank builds the same head
    model = ImageClassifier(backbone.encoder.requires_grad_(True), enc.dim, classes, enc.layer_norm_eps)
    model.to(world.device)
    groups = layer_decay_groups(model.named_parameters(), enc.layers, cfg.layer_decay, weight_decay)
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8, schedule="cosine",
                        warmup=0.1, final_lr_scale=0.01)
    with ExitStack() as stack:
        train_loader, eval_loader = _split_loaders(stack, cfg, world, batch_size, image_size, train=True)
        subset = labelled_subset(cfg, train_loader)
        if subset.samples < batch_size * world.size:  # a few labels: full batches
            batch_size = max(1, subset.samples // world.size)
            train_loader.policy = BatchPolicy(batch_size=batch_size, shuffle=True, tail="drop")
            runtime.log(world, f"image-finetune: {subset.samples} labelled images: batches of {batch_size} per rank")
        batches = stack.enter_context(closing(finetune.forever(train_loader)))  # closing stops its threads
        def loss(batch: dict, step: int) -> torch.Tensor:
            logits_BC = model(batch["image"].to(world.device))
            return F.cross_entropy(logits_BC, batch["label"].to(world.device), label_smoothing=cfg.label_smoothing)

        curve = finetune.fit(model, batches, loss, steps=steps, cfg=optim, world=world, log_every=cfg.log_every,
                             what="image-finetune", groups=groups)
        hits, scored = score(model, eval_loader, world)
    train_labels = train_loader.index.columns["label"]
    return EvalResult(
        task=cfg.task, label=_label(cfg, backbone), metrics=_fractions(hits, scored),
        baseline=majority_baseline(train_labels, eval_loader.index.columns["label"], classes),
        checkpoint=backbone.ref, data=_data_ref(cfg, train_loader, scored, subset), steps=steps, world_size=world.size,
        seed=cfg.seed,
        hyperparameters={"lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                         "global_batch": batch_size * world.size, "layer_decay": cfg.layer_decay,
                         "label_smoothing": cfg.label_smoothing, "schedule": "cosine", "warmup": optim.warmup,
                         "betas": list(optim.betas), "image_size": image_size, "classes": classes,
                         "crop_scale": list(cfg.crop_scale), "hflip": cfg.hflip, "crop_pct": cfg.crop_pct},
        curve=curve,
    )
