"""The synthetic corpora have the real layouts, the faults they claim, and counts that match the disk."""

import csv
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from pipelines.synthetic import ACCEPTED_FAULTS, make_imagenet, make_librispeech, make_text_corpus

SUBSETS = {"train-clean-100": 7, "dev-clean": 3}


def _tree(source: str) -> dict[str, bytes]:
    root = Path(source)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rel(spec) -> set[str]:
    return {Path(f).relative_to(spec.source).as_posix() for f in spec.files}


# --------------------------------------------------------------------------- speech


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return make_librispeech(tmp_path_factory.mktemp("ls"), SUBSETS, faults=True)


def _classify_speech(source: str):
    """A small reference reader: the verdict for every source item, as a builder should give it."""
    root = Path(source)
    transcripts = {}
    for trans in root.glob("*/*/*/*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt, _ = line.split(" ", 1)
            transcripts[utt] = trans.parent
    verdicts = {}
    for flac in root.glob("*/*/*/*.flac"):
        subset, utt = flac.relative_to(root).parts[0], flac.stem
        if flac.stat().st_size == 0:
            reason = "empty_audio"
        else:
            info = sf.info(flac)
            try:
                reason = None if len(sf.read(flac, dtype="int16")[0]) == info.frames else "truncated_audio"
            except sf.LibsndfileError:
                reason = "truncated_audio"
            if reason is None and info.samplerate != 16000:
                reason = "resampled"
            elif reason is None and info.channels != 1:
                reason = "downmixed"
        if reason is None and utt not in transcripts:
            reason = "untranscribed"
        verdicts[utt] = (subset, reason)
    for utt, folder in transcripts.items():
        if not (folder / f"{utt}.flac").exists():
            verdicts[utt] = (folder.relative_to(root).parts[0], "missing_audio")
    return verdicts


def test_librispeech_layout(speech):
    assert Path(speech.source).name == "LibriSpeech"
    assert {p.name for p in Path(speech.source).iterdir() if p.is_dir()} == set(SUBSETS)
    rels = _rel(speech)
    assert {"SPEAKERS.TXT", "CHAPTERS.TXT"} <= rels
    for rel in rels - {"SPEAKERS.TXT", "CHAPTERS.TXT"}:
        m = re.fullmatch(r"([a-z0-9-]+)/(\d+)/(\d+)/(\d+)-(\d+)(-\d{4}\.flac|\.trans\.txt)", rel)
        assert m, rel
        assert m[1] in SUBSETS and m[2] == m[4] and m[3] == m[5], rel
        assert not m[2].startswith("0") and not m[3].startswith("0")
    for trans in Path(speech.source).glob("*/*/*/*.trans.txt"):
        text = trans.read_text()
        assert text.endswith("\n")
        prefix = trans.name.removesuffix(".trans.txt")
        for line in text.splitlines():
            assert re.fullmatch(rf"{prefix}-\d{{4}} [A-Z']+( [A-Z']+)*", line), line
            assert line == line.upper()


def test_speaker_and_chapter_ids_are_unique_across_subsets(speech):
    seen = {}
    for chapter in Path(speech.source).glob("*/*/*"):
        subset, speaker, chap = chapter.relative_to(speech.source).parts
        assert seen.setdefault(chap, subset) == subset
        assert seen.setdefault("spk" + speaker, subset) == subset


def test_flac_headers_and_faults(speech):
    faults = {Path(speech.source, rel): reason for rel, reason in speech.faults.items()}
    for flac in Path(speech.source).rglob("*.flac"):
        reason = faults.get(flac)
        if reason == "empty_audio":
            assert flac.stat().st_size == 0
            with pytest.raises(sf.LibsndfileError, match="Format not recognised"):
                sf.info(flac)
            continue
        info = sf.info(flac)
        assert info.format == "FLAC" and info.subtype == "PCM_16"
        assert info.samplerate == (8000 if reason == "resampled" else 16000)
        assert info.channels == (2 if reason == "downmixed" else 1)
        if reason == "truncated_audio":
            # the header survives and still promises every frame; decoding fails part way
            assert info.frames >= 16000
            with pytest.raises(sf.LibsndfileError, match="lost sync"):
                sf.read(flac)
        else:
            audio, _ = sf.read(flac, dtype="int16")
            assert len(audio) == info.frames and 2.0 <= info.duration <= 6.0
            assert abs(audio).max() > 1000
            assert flac.stat().st_size < 0.9 * info.frames * 2 * info.channels  # compresses like audio
    (missing,) = [rel for rel, reason in speech.faults.items() if reason == "missing_audio"]
    assert not Path(speech.source, missing).exists()


def test_speech_expected_counts_match_disk(speech):
    verdicts = _classify_speech(speech.source)
    exp = speech.expected
    reasons = [r for _, r in verdicts.values()]
    assert exp["items"] == len(verdicts) == exp["accepted"] + exp["rejected"]
    rejects = {r: reasons.count(r) for r in set(reasons) - {None, *ACCEPTED_FAULTS}}
    assert exp["rejects_by_reason"] == rejects == {r: 1 for r in ("truncated_audio", "empty_audio", "missing_audio")}
    assert exp["untranscribed"] == reasons.count("untranscribed") == 1
    assert exp["converted"] == {r: reasons.count(r) for r in ("resampled", "downmixed")} == {"resampled": 1,
                                                                                            "downmixed": 1}
    accepted = {s: 0 for s in SUBSETS}
    for subset, reason in verdicts.values():
        accepted[subset] += reason in (None, *ACCEPTED_FAULTS)
    assert exp["splits"] == accepted == {"train-clean-100": 10, "dev-clean": 3}
    assert {Path(speech.source, r).stem for r in speech.faults} <= set(verdicts)


def test_speech_without_faults_is_all_good(tmp_path):
    spec = make_librispeech(tmp_path, {"dev-clean": 5}, seed=3, speakers=1, chapters_per_speaker=3)
    assert spec.faults == {} and spec.expected["rejects_by_reason"] == {}
    assert spec.expected == {
        "items": 5,
        "accepted": 5,
        "rejected": 0,
        "rejects_by_reason": {},
        "untranscribed": 0,
            "converted": {},
        "splits": {"dev-clean": 5},
    }
    verdicts = _classify_speech(spec.source)
    assert len(verdicts) == 5 and all(r is None for _, r in verdicts.values())


# --------------------------------------------------------------------------- vision


@pytest.fixture(scope="module", params=["ilsvrc", "imagefolder"])
def vision(request, tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp(request.param), layout=request.param, faults=True)


def _csv_rows(source: str) -> dict[str, str]:
    with open(Path(source, "LOC_val_solution.csv"), newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["ImageId", "PredictionString"]
        return {image_id: pred for image_id, pred in reader}


def _classify_image(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
            return None if img.format == "JPEG" and img.mode == "RGB" else "converted"
    except OSError:  # UnidentifiedImageError included
        return "undecodable_image"


def test_imagenet_layout(vision):
    classes = vision.expected["classes"]
    assert classes == sorted(classes) and len(classes) == 3
    assert all(re.fullmatch(r"n0\d{7}", w) for w in classes)
    rels = _rel(vision)
    if vision.kind == "imagenet-ilsvrc":
        train = r"ILSVRC/Data/CLS-LOC/train/(n\d{8})/(n\d{8})_\d+\.JPEG"
        val = r"ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_\d{8}\.JPEG"
        mapping = Path(vision.source, "LOC_synset_mapping.txt").read_text().splitlines()
        file_order = [line.split(" ", 1)[0] for line in mapping]
        assert sorted(file_order) == classes and file_order != classes
        assert all(re.fullmatch(r"n\d{8} [\w ]+, [\w ]+", line) for line in mapping)
        rels -= {"LOC_synset_mapping.txt", "LOC_val_solution.csv"}
    else:
        train = r"train/(n\d{8})/(n\d{8})_\d+\.JPEG"
        val = r"val/(n\d{8})/ILSVRC2012_val_\d{8}\.JPEG"
        assert not Path(vision.source, "LOC_val_solution.csv").exists()
    for rel in rels:
        m = re.fullmatch(train, rel) or re.fullmatch(val, rel)
        assert m, rel
        assert all(g in classes for g in m.groups())
        assert m.re.pattern != train or m[1] == m[2]


def test_val_csv_rows(tmp_path):
    vision = make_imagenet(tmp_path, seed=4, classes=5, val_per_class=3, faults=True)
    rows = _csv_rows(vision.source)
    assert list(rows) != sorted(rows)  # as in the real file
    for image_id, pred in rows.items():
        tokens = pred.split()
        assert len(tokens) % 5 == 0 and len({tokens[i] for i in range(0, len(tokens), 5)}) == 1
        assert tokens[0] in vision.expected["classes"]
        for i in range(0, len(tokens), 5):
            x1, y1, x2, y2 = map(int, tokens[i + 1 : i + 5])
            assert 0 <= x1 < x2 and 0 <= y1 < y2
        path = Path(vision.source, "ILSVRC/Data/CLS-LOC/val", image_id + ".JPEG")
        if path.exists():
            with Image.open(path) as img:
                assert max(x2 for x2 in map(int, tokens[3::5])) < img.width
                assert max(y2 for y2 in map(int, tokens[4::5])) < img.height


def test_image_faults_are_what_they_claim(vision):
    by_kind = {}
    for rel, reason in vision.faults.items():
        path = Path(vision.source, rel)
        assert path.suffix == ".JPEG"
        if reason == "missing_image":
            assert not path.exists()
            continue
        if reason == "missing_label":
            with Image.open(path) as img:
                img.load()
            continue
        assert "train" in Path(rel).parts
        try:
            with Image.open(path) as img:
                kind = (img.format, img.mode)
                img.verify()  # passes even on the truncated JPEG: builders must decode fully
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
                assert rgb.mode == "RGB" and rgb.size == img.size
        except UnidentifiedImageError:
            kind = "unidentified"
        except OSError as exc:
            assert "image file is truncated" in str(exc)
            kind = "truncated"
        by_kind[kind] = reason
    assert by_kind == {
        ("PNG", "RGB"): "converted",
        ("JPEG", "CMYK"): "converted",
        ("JPEG", "L"): "converted",
        "truncated": "undecodable_image",
        "unidentified": "undecodable_image",
    }


def test_vision_expected_counts_match_disk(vision):
    exp = vision.expected
    counts: dict[str, int] = {}
    splits = {"train": 0, "val": 0}
    ilsvrc = vision.kind == "imagenet-ilsvrc"
    rows = _csv_rows(vision.source) if ilsvrc else {}
    images = list(Path(vision.source).rglob("*.JPEG"))
    for path in images:
        split = "train" if "train" in path.parts else "val"
        verdict = _classify_image(path)
        if verdict is None or verdict == "converted":
            if ilsvrc and split == "val" and path.stem not in rows:
                verdict = "missing_label"
            elif ilsvrc and split == "val":
                assert rows[path.stem].split()[0] in exp["classes"]
        counts[verdict] = counts.get(verdict, 0) + 1
        splits[split] += verdict in (None, "converted")
    names = {p.stem for p in images}
    missing = sum(image_id not in names for image_id in rows)
    if missing:
        counts["missing_image"] = missing
    items = len(images) + missing
    rejects = {k: v for k, v in counts.items() if k not in (None, "converted")}
    assert exp["items"] == items == exp["accepted"] + exp["rejected"]
    assert exp["rejects_by_reason"] == rejects
    expected_rejects = {"undecodable_image": 2} | ({"missing_label": 1, "missing_image": 1} if ilsvrc else {})
    assert rejects == expected_rejects
    assert exp["converted"] == counts["converted"] == 3
    assert exp["splits"] == splits == {"train": 15, "val": 6}


# --------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("text"), faults=True)


def test_text_format_and_counts(text):
    assert sorted(_rel(text)) == ["part-000.txt", "part-001.txt"]
    valid, invalid = [], []
    for name in sorted(_rel(text)):
        data = Path(text.source, name).read_bytes()
        assert data.endswith(b"\n") and not data.endswith(b"\n\n") and b"\n\n\n" not in data
        for i, doc in enumerate(data.rstrip(b"\n").split(b"\n\n")):
            assert doc and all(line.strip() for line in doc.split(b"\n"))
            try:
                valid.append(doc.decode("utf-8"))
            except UnicodeDecodeError:
                assert b"\xff\xfe" in doc and text.faults == {f"{name}#{i}": "invalid_utf8"}
                assert 0 < i and name == "part-000.txt"
                invalid.append(doc)
    exp = text.expected
    assert exp["documents"] == exp["items"] == len(valid) + len(invalid) == 13
    assert exp["accepted"] == len(valid) == exp["splits"]["train"] == 12
    assert exp["invalid_utf8"] == exp["rejected"] == len(invalid) == 1
    assert exp["rejects_by_reason"] == {"invalid_utf8": 1}
    joined = "\n".join(valid)
    assert re.search(r"[éïüãçñßλ]", joined) and re.search(r"[\u3040-\u9fff\uac00-\ud7af]", joined)
    assert re.search(r"[\U0001F300-\U0001FAFF]", joined)
    assert sum(len(d) > 6000 for d in valid) >= 2  # several 512-token blocks each


def test_text_without_faults_is_valid_utf8(tmp_path):
    spec = make_text_corpus(tmp_path, files=1, docs_per_file=3, seed=5)
    Path(spec.files[0]).read_bytes().decode("utf-8")
    assert spec.faults == {} and spec.expected["rejected"] == 0 and spec.expected["accepted"] == 3


# --------------------------------------------------------------------------- all


GENERATORS = {
    "speech": lambda root, seed: make_librispeech(root, {"dev-clean": 3}, seed=seed, faults=True),
    "ilsvrc": lambda root, seed: make_imagenet(root, seed=seed, faults=True),
    "imagefolder": lambda root, seed: make_imagenet(root, layout="imagefolder", seed=seed, faults=True),
    "text": lambda root, seed: make_text_corpus(root, seed=seed, faults=True),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_per_seed(name, tmp_path):
    make = GENERATORS[name]
    a, b, c = (make(tmp_path / d, seed) for d, seed in (("a", 7), ("b", 7), ("c", 8)))
    tree_a, tree_b, tree_c = _tree(a.source), _tree(b.source), _tree(c.source)
    assert tree_a == tree_b and a.expected == b.expected and a.faults == b.faults
    assert set(tree_a) == _rel(a)  # `files` lists exactly what is on disk
    same = {k for k in tree_a if tree_c.get(k) == tree_a[k]}
    assert len(same) <= 1, same  # only content-free files (e.g. the empty FLAC) may coincide


def test_tiny_corpora_are_fast(tmp_path):
    start = time.perf_counter()
    make_librispeech(tmp_path / "ls", {"train-clean-100": 8, "dev-clean": 4}, faults=True)
    make_imagenet(tmp_path / "in", faults=True)
    make_imagenet(tmp_path / "if", layout="imagefolder", faults=True)
    make_text_corpus(tmp_path / "tx", faults=True)
    assert time.perf_counter() - start < 2.0


def test_visual_words_show_half_of_a_family_per_labelled_split():
    from pipelines.synthetic import FILLER_TILES, WORD_TILES, WORDS_PER_FAMILY, _word_patterns, _words_image

    families = 4
    patterns = _word_patterns(families).reshape(families * WORDS_PER_FAMILY + FILLER_TILES, -1)
    unit = patterns / np.linalg.norm(patterns, axis=1, keepdims=True)

    def words_of(img):  # the nearest pattern of each tile (brightness-free: cosine)
        cells = np.asarray(img, dtype=np.float64).reshape(WORD_TILES, 4, 2, WORD_TILES, 4, 2, 3).mean(axis=(2, 5))
        tiles = cells.transpose(0, 2, 1, 3, 4).reshape(WORD_TILES * WORD_TILES, -1)
        return set((tiles @ unit.T).argmax(axis=1).tolist())

    fillers = set(range(families * WORDS_PER_FAMILY, len(patterns)))
    first, half = 2 * WORDS_PER_FAMILY, WORDS_PER_FAMILY // 2
    rng = np.random.default_rng(0)
    seen = words_of(_words_image(rng, 2, families, "seen"))
    unseen = words_of(_words_image(rng, 2, families, "unseen"))
    pool = words_of(_words_image(rng, 2, families, None))
    assert seen - fillers and seen - fillers <= set(range(first, first + half))
    assert unseen - fillers and unseen - fillers <= set(range(first + half, first + WORDS_PER_FAMILY))
    assert pool - fillers <= set(range(first, first + WORDS_PER_FAMILY)) and len(pool - fillers) > half


def test_voices_change_pitch_and_rate_but_not_the_letters(tmp_path):
    """Each speaker of `voices=True` has a pitch of its own; a letter keeps its spectral envelope
    across voices (closer to itself from another voice than to another letter from the same one)."""
    from pipelines.synthetic import LETTERS, SAMPLE_RATE, _voice, _voiced_letter

    spec = make_librispeech(str(tmp_path / "a"), {"train-other-500": 8}, seed=1, spoken=True, voices=True,
                                      speakers=4, words=(2, 3))
    again = make_librispeech(str(tmp_path / "b"), {"train-other-500": 8}, seed=1, spoken=True, voices=True,
                                       speakers=4, words=(2, 3))
    assert [Path(f).read_bytes() for f in spec.files] == [Path(f).read_bytes() for f in again.files]

    def pitch(path):  # autocorrelation over the loudest 100 ms
        audio, sr = sf.read(path)
        start = int(np.argmax(np.convolve(audio ** 2, np.ones(1600), "valid")))
        seg = audio[start:start + 1600]
        corr = np.correlate(seg, seg, "full")[1599:]
        return sr / (int(np.argmax(corr[40:200])) + 40)

    by_speaker = {}
    for f in spec.files:
        if f.endswith(".flac"):
            by_speaker.setdefault(Path(f).parts[-3], []).append(pitch(f))
    medians = sorted(float(np.median(v)) for v in by_speaker.values())
    assert len(medians) == 4 and medians[-1] / medians[0] > 1.3

    # a letter is recognisable in a voice never heard: nearest neighbour over the letters of 3 voices
    # (log band energies, each voice's mean removed) names the letters of a fourth
    rng = np.random.default_rng(0)
    edges = np.geomspace(100, 7600, 33)

    def bands(letter, voice):
        wave = _voiced_letter(rng, letter, voice, 1600, SAMPLE_RATE)
        power = np.abs(np.fft.rfft(wave * np.hanning(wave.size))) ** 2
        f = np.fft.rfftfreq(wave.size, 1 / SAMPLE_RATE)
        return np.log([power[(f >= lo) & (f < hi)].sum() + 1e-6 for lo, hi in zip(edges[:-1], edges[1:])])

    voices = [_voice(np.random.default_rng(s)) for s in range(4)]
    feats = np.array([[bands(letter, v) for letter in range(len(LETTERS))] for v in voices])
    feats -= feats.mean(axis=1, keepdims=True)
    known = feats[:3].reshape(-1, feats.shape[-1])
    nearest = ((feats[3][:, None] - known[None]) ** 2).sum(-1).argmin(1) % len(LETTERS)
    assert (nearest == np.arange(len(LETTERS))).mean() >= 0.8
    assert len({round(v["f0"]) for v in voices}) == 4
    with pytest.raises(ValueError, match="voices=True needs spoken=True"):
        make_librispeech(str(tmp_path / "c"), {"dev-clean": 1}, voices=True)


def test_speakers_per_subset(tmp_path):
    spec = make_librispeech(str(tmp_path / "a"), {"train-other-500": 6, "dev-clean": 2},
                            speakers={"train-other-500": 3, "dev-clean": 1}, chapters_per_speaker=1)
    root = Path(spec.source)
    assert len(list((root / "train-other-500").iterdir())) == 3 and len(list((root / "dev-clean").iterdir())) == 1
    assert spec.expected["splits"] == {"train-other-500": 6, "dev-clean": 2}
    with pytest.raises(ValueError, match="speakers: no such subset: dev-other"):
        make_librispeech(str(tmp_path / "b"), {"dev-clean": 1}, speakers={"dev-clean": 1, "dev-other": 1})
    with pytest.raises(ValueError, match="at least one speaker per subset"):
        make_librispeech(str(tmp_path / "c"), {"dev-clean": 1, "test-clean": 1}, speakers={"dev-clean": 1})
