"""ImageNet-layout corpora: random pictures, class shapes, or visual-word mosaics."""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.synthetic.common import JPEG_QUALITY, CorpusSpec, _rng, _Writer

_CLASS_WORDS = "tench goldfinch heron lynx otter kite magpie badger ferret lemur puffin ibis".split()
_LATIN_WORDS = "Tinca Carduelis Ardea Lynx Lutra Milvus Pica Meles Mustela Lemur Fratercula Threskiornis".split()


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB picture with a gradient, a few filled shapes and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = c0 + (c1 - c0) * ramp[..., None]
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _class_image(rng: np.random.Generator, width: int, height: int, label: int, classes: int) -> Image.Image:
    """A picture whose class shows everywhere, so crops of any part keep it: a jittered hue of its
    own over the whole picture, and its own shape (ellipse, box, triangle, cross) across the middle;
    a small random shape and noise are distractors. Downstream probes then have something to learn."""
    import colorsys

    hue = (label + rng.uniform(-0.25, 0.25)) / classes % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.55, 0.9))) * 255
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height) / 2.0  # in [-1, 1]
    base = rgb * (1.0 + 0.15 * ramp[..., None])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    r = min(width, height) * rng.uniform(0.25, 0.4)
    ink = tuple(int(v) for v in rgb * rng.uniform(0.3, 0.5))  # the same hue, darker: the middle keeps the class
    kind = label % 4
    if kind == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif kind == 1:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=ink)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=ink)
    sx, sy = int(rng.integers(0, width)), int(rng.integers(0, height))
    side = max(2, int(min(width, height) * rng.uniform(0.05, 0.15)))
    draw.rectangle((sx, sy, sx + side, sy + side), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


# Visual words: pictures are 8x8 mosaics of tiles, each tile one "word" (a 4x4 pattern of colours).
# Every class (family) has WORDS_PER_FAMILY words of its own, and all classes share FILLER_TILES
# filler words, as text's topics share function words. The labelled `train` split uses only the first
# half of each family's words, `val` only the second half, and the `unlabeled` pool all of them:
# nothing in a val picture looks like the train pictures of its class, so only what an encoder
# learned from the pool (which words share pictures) carries the labels over, as topic words
# do for text. Patterns are drawn at random, so nothing visual tells the families apart.
WORD_TILES, WORDS_PER_FAMILY, FILLER_TILES = 8, 12, 8


@lru_cache(maxsize=8)
def _word_patterns(families: int) -> np.ndarray:
    """(families * WORDS_PER_FAMILY + FILLER_TILES, 4, 4, 3) random 4x4 colour patterns, one per word,
    the same for every corpus (drawn once, read-only)."""
    patterns = np.random.default_rng(20261203).uniform(20, 235, (families * WORDS_PER_FAMILY + FILLER_TILES, 4, 4, 3))
    patterns.flags.writeable = False
    return patterns


def _words_image(rng: np.random.Generator, label: int, families: int, half: str | None,
                 family_share: float = 0.4, size: int = 64) -> Image.Image:
    """A WORD_TILES x WORD_TILES mosaic: each tile a word of the picture's family (of `half`:
    "seen", "unseen" or None for all) with probability `family_share`, else a filler word."""
    patterns = _word_patterns(families)
    first = label * WORDS_PER_FAMILY
    words = np.arange(first, first + WORDS_PER_FAMILY)
    if half is not None:
        words = words[: WORDS_PER_FAMILY // 2] if half == "seen" else words[WORDS_PER_FAMILY // 2:]
    fillers = np.arange(families * WORDS_PER_FAMILY, len(patterns))
    n = WORD_TILES * WORD_TILES
    chosen = np.where(rng.random(n) < family_share, rng.choice(words, n), rng.choice(fillers, n))
    if not np.isin(chosen, words).any():
        chosen[int(rng.integers(0, n))] = rng.choice(words)
    tiles = patterns[chosen] * rng.uniform(0.9, 1.1, (n, 1, 1, 1))  # each tile a little lighter or darker
    cell = size // WORD_TILES // 4
    grid = tiles.reshape(WORD_TILES, WORD_TILES, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(WORD_TILES * 4,
                                                                                            WORD_TILES * 4, 3)
    pixels = np.repeat(np.repeat(grid, cell, 0), cell, 1)
    pixels = pixels + rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _boxes(rng: np.random.Generator, wnid: str, width: int, height: int) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        x1, x2 = sorted(rng.choice(width, 2, replace=False).tolist())
        y1, y2 = sorted(rng.choice(height, 2, replace=False).tolist())
        parts.append(f"{wnid} {x1} {y1} {x2} {y2}")
    return " ".join(parts) + " "  # the Kaggle file ends each PredictionString with a space


def make_imagenet(
    root: str | os.PathLike,
    *,
    layout: str = "ilsvrc",
    classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    seed: int = 0,
    size_range: tuple[int, int] = (40, 96),
    faults: bool = False,
    learnable: bool | str = False,
    unlabelled: int = 0,
) -> CorpusSpec:
    """Write an ImageNet-style tree: Kaggle `ilsvrc` layout or torchvision `imagefolder`.

    `learnable`: each picture shows its class (a hue and a shape of its own, jittered), so a
    linear probe on a small encoder can beat chance; `learnable="words"`: 64 px mosaics of visual
    words (see `WORD_TILES`), where only pre-training on the `unlabelled` pictures of an
    `unlabeled/` split folder (imagefolder layout) links train's words to val's; otherwise
    pictures are unrelated to labels.

    `ilsvrc`: `ILSVRC/Data/CLS-LOC/train/WNID/WNID_N.JPEG`, flat
    `ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_NNNNNNNN.JPEG` labelled by
    `LOC_val_solution.csv`, and `LOC_synset_mapping.txt` in an unsorted order
    (label indices follow the sorted wnids, so a reader that keeps file order is
    caught). `imagefolder`: `train/WNID/*.JPEG` and `val/WNID/*.JPEG`.
    With `faults`, train also gets a PNG, a CMYK JPEG and a grayscale JPEG (all
    accepted after conversion to RGB), a truncated JPEG and random bytes, all
    named `.JPEG`; `ilsvrc` val also gets an image without a CSV row and a CSV
    row without an image.
    """
    if layout not in ("ilsvrc", "imagefolder"):
        raise ValueError(f"layout must be 'ilsvrc' or 'imagefolder', not {layout!r}")
    if unlabelled and layout != "imagefolder":
        raise ValueError("unlabelled pictures need layout='imagefolder' (an unlabeled/ split folder)")
    if classes < 1:
        raise ValueError("need at least one class")
    source = Path(root).absolute()
    out = _Writer(source)
    rng = _rng(seed, "imagenet", layout)
    wnids = [f"n0{v:07d}" for v in rng.choice(10_000_000, size=classes, replace=False)]
    ordered = sorted(wnids)
    file_order = list(rng.permutation(wnids))
    if classes > 1 and file_order == ordered:
        file_order[0], file_order[1] = file_order[1], file_order[0]

    base = "ILSVRC/Data/CLS-LOC/" if layout == "ilsvrc" else ""
    lo, hi = size_range
    fault_map: dict[str, str] = {}

    def picture(key: str, minimum: int = 0, wnid: str | None = None) -> Image.Image:
        irng = _rng(seed, key)
        w, h = (max(int(v), minimum) for v in irng.integers(lo, hi + 1, 2))
        if learnable == "words":
            label = ordered.index(wnid) if wnid in ordered else int(irng.integers(0, classes))
            half = None if key.startswith("unlabeled/") else "unseen" if "val/" in key else "seen"
            return _words_image(irng, label, classes, half)
        if learnable and wnid in ordered:
            return _class_image(irng, w, h, ordered.index(wnid), classes)
        return _image(irng, w, h)

    for wnid in ordered:
        numbers = _rng(seed, "train", wnid).choice(100_000, size=train_per_class, replace=False)
        for n in sorted(numbers.tolist()):
            rel = f"{base}train/{wnid}/{wnid}_{n}.JPEG"
            out.bytes(rel, _encode(picture(rel, wnid=wnid)))

    if faults:
        frng = _rng(seed, "train-faults")
        kinds = ["png", "cmyk", "gray", "truncated", "random"]
        numbers = frng.choice(np.arange(100_000, 200_000), size=len(kinds), replace=False)
        for i, (kind, n) in enumerate(zip(kinds, numbers.tolist())):
            wnid = ordered[i % classes]
            rel = f"{base}train/{wnid}/{wnid}_{n}.JPEG"
            if kind == "random":
                # a fixed non-magic prefix so no decoder (e.g. headerless TGA) claims the noise
                data = b"\x13\x37\xc0\xde" + frng.bytes(2048)
                fault_map[rel] = "undecodable_image"
            else:
                img = picture(rel, minimum=64, wnid=wnid)  # big enough that half the file ends inside scan data
                if kind == "png":
                    data = _encode(img, "PNG")
                elif kind == "cmyk":
                    data = _encode(img.convert("CMYK"))
                elif kind == "gray":
                    data = _encode(img.convert("L"))
                else:
                    full = _encode(img)
                    data = full[: len(full) // 2]
                fault_map[rel] = "undecodable_image" if kind == "truncated" else "converted"
            out.bytes(rel, data)

    n_val = classes * val_per_class
    val_labels = [w for w in ordered for _ in range(val_per_class)]
    val_labels = [val_labels[i] for i in rng.permutation(n_val)]
    rows = []
    if layout == "ilsvrc":
        # real ids are dense 1..N; the two faults take random places in that range
        extra = ["missing_label", "missing_image"] if faults else []
        ids = rng.permutation(n_val + len(extra)) + 1
        for label, vid in zip(val_labels + extra, ids.tolist()):
            name = f"ILSVRC2012_val_{vid:08d}"
            rel = f"{base}val/{name}.JPEG"
            img = picture(rel, wnid=label)  # the two fault rows are no wnid: unrelated pictures
            if label == "missing_image":
                fault_map[rel] = label
                rows.append((name, _boxes(_rng(seed, name), ordered[0], *img.size)))
                continue
            out.bytes(rel, _encode(img))
            if label == "missing_label":
                fault_map[rel] = label
            else:
                rows.append((name, _boxes(_rng(seed, name), label, *img.size)))
        order = rng.permutation(len(rows))  # the Kaggle CSV is not sorted by id
        csv_lines = "".join(f"{rows[i][0]},{rows[i][1]}\n" for i in order)
        out.text("LOC_val_solution.csv", "ImageId,PredictionString\n" + csv_lines)
        mapping = []
        for wnid in file_order:
            k = int(wnid[1:]) % len(_CLASS_WORDS)
            mapping.append(f"{wnid} {_CLASS_WORDS[k]}, {_LATIN_WORDS[k]} {_CLASS_WORDS[(k + 5) % len(_CLASS_WORDS)]}\n")
        out.text("LOC_synset_mapping.txt", "".join(mapping))
    else:
        for i, label in enumerate(val_labels):
            rel = f"val/{label}/ILSVRC2012_val_{i + 1:08d}.JPEG"
            out.bytes(rel, _encode(picture(rel, wnid=label)))

    for n in range(unlabelled):  # flat in the split folder: no class
        rel = f"unlabeled/u{n:06d}.JPEG"
        out.bytes(rel, _encode(picture(rel)))

    rejects: dict[str, int] = {}
    for reason in fault_map.values():
        if reason != "converted":
            rejects[reason] = rejects.get(reason, 0) + 1
    converted = sum(r == "converted" for r in fault_map.values())
    splits = {"train": classes * train_per_class + converted, "val": n_val}
    if unlabelled:
        splits["unlabeled"] = unlabelled
    accepted = sum(splits.values())
    rejected = sum(rejects.values())
    return CorpusSpec(
        source=str(source),
        kind=f"imagenet-{layout}",
        files=out.sorted_files(),
        faults=fault_map,
        expected={
            "items": accepted + rejected,
            "accepted": accepted,
            "rejected": rejected,
            "rejects_by_reason": rejects,
            "converted": converted,
            "classes": ordered,
            "splits": splits,
        },
    )
