"""The text source: documents, rejects, blocks, the tokenizer, splits and a full build."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import tokenizer as bpe
from pipelines.build import BuildOptions, EmptyCorpusError, build_dataset
from pipelines.cluster import Runner
from pipelines.plan import ShardSize
from pipelines.sources.base import Reject
from pipelines.sources.text import TextSource, assign_splits, document_spans
from pipelines.storage import Location
from pipelines.synthetic import make_text_corpus
from schemas.dataset import DATASET_JSON

REPO = Path(__file__).resolve().parents[1]
VOCAB = 600
BLOCK = 128  # small, so the long documents of the synthetic corpus span several blocks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("text"), files=2, docs_per_file=6, seed=0, faults=True)


@pytest.fixture(scope="module")
def scanned(corpus):
    scan = TextSource.create(tuple(Location(f) for f in corpus.files), vocab_size=VOCAB, block_size=BLOCK).scan(Runner())
    return scan.source, scan


def _documents(corpus) -> dict[str, str]:
    """doc_id -> text of every valid document, found independently of the source."""
    docs = {}
    for path in corpus.files:
        data = Path(path).read_bytes()
        for n, doc in enumerate(data.rstrip(b"\n").split(b"\n\n")):
            try:
                docs[f"{Path(path).stem}-{n:06d}"] = doc.decode("utf-8")
            except UnicodeDecodeError:
                pass
    return docs


def _encode_all(source, manifest):
    fs, root = source.location.filesystem()
    out = [source.encode(fs, root, row) for row in manifest.to_pylist()]
    assert not [e for e in out if isinstance(e, Reject)]
    return out


def _tokens(encoded) -> np.ndarray:
    return np.load(io.BytesIO(encoded.data), allow_pickle=False)


def test_document_spans_split_at_blank_lines():
    data = b"\xef\xbb\xbfa\nb\r\n\r\n  \n\nc d\n \t\ne\n"
    spans = document_spans(data)
    assert [data[o:o + n] for o, n in spans] == [b"a\nb", b"c d", b"e"]
    assert document_spans(b"") == document_spans(b"\n \n\n") == []


def test_scan_documents_and_invalid_utf8(corpus, scanned):
    source, scan = scanned
    manifest = scan.manifest
    expected = _documents(corpus)
    assert len(expected) == corpus.expected["accepted"]
    assert set(manifest.column("doc_id").to_pylist()) == set(expected)
    assert source.counts(manifest) == {"documents": corpus.expected["accepted"]}
    assert all("." not in key and "/" not in key for key in manifest.column("id").to_pylist())

    (reject,) = scan.rejects
    bad_file, bad_doc = next(iter(corpus.faults)).split("#")
    assert (reject.reason, reject.path, reject.id) == ("invalid_utf8", bad_file, f"part-000-{int(bad_doc):06d}")
    offset = Path(corpus.source, bad_file).read_bytes().index(b"\xff\xfe")
    assert bad_file in reject.detail and f"at byte {offset} of the file" in reject.detail
    kept = {d for d in expected if d.startswith("part-000-")}
    assert min(kept) < reject.id < max(kept)  # documents before and after the bad one are kept


def test_blocks_hold_whole_documents(corpus, scanned):
    source, scan = scanned
    tokenizer = bpe.for_corpus(source.tokenizer_json)
    ids = bpe.special_ids(tokenizer)
    rows = scan.manifest.to_pylist()
    encoded = _encode_all(source, scan.manifest)
    content: dict[str, list[tuple[int, list[int]]]] = {}
    for row, sample in zip(rows, encoded):
        tokens = _tokens(sample)
        assert tokens.dtype == np.int32 and tokens.size == row["num_tokens"] == sample.mask_length <= BLOCK
        assert tokens[0] == ids["bos_id"] and tokens[-1] == ids["eos_id"]
        assert row["id"] == f"{row['doc_id']}-{row['block']:04d}" == sample.key
        content.setdefault(row["doc_id"], []).append((row["block"], tokens[1:-1].tolist()))
    documents = _documents(corpus)
    for doc_id, blocks in content.items():
        joined = [t for _, part in sorted(blocks) for t in part]
        assert [b for b, _ in sorted(blocks)] == list(range(len(blocks)))
        assert joined == tokenizer.encode(documents[doc_id], add_special_tokens=False).ids
        assert tokenizer.decode(joined) == documents[doc_id]  # byte-level: the text comes back exactly
        assert all(len(part) == BLOCK - 2 for _, part in sorted(blocks)[:-1])
    assert max(len(b) for b in content.values()) >= 3  # the long documents span several blocks


def test_special_token_text_round_trips(scanned):
    tokenizer = bpe.for_corpus(scanned[0].tokenizer_json)
    text = "A <s> and <mask> in text, </s> too. café 東京 😀\r\n  spaces"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert not set(ids) & set(bpe.special_ids(tokenizer).values())
    assert tokenizer.decode(ids) == text


_TRAIN = """
import hashlib, sys
from pipelines.sources.text import document_spans
from pipelines.tokenizer import to_str, train_bpe
docs = []
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    for o, n in document_spans(data):
        try:
            docs.append(data[o:o + n].decode("utf-8"))
        except UnicodeDecodeError:
            pass
print(hashlib.sha256(to_str(train_bpe(docs, 600)).encode()).hexdigest())
"""


def test_tokenizer_is_deterministic_across_processes(corpus, scanned):
    source, _ = scanned
    again = TextSource.create(tuple(Location(f) for f in corpus.files), vocab_size=VOCAB, block_size=BLOCK)
    assert again.scan(Runner()).source.tokenizer_json == source.tokenizer_json
    digests = set()
    for threads, parallel in (("1", "false"), ("2", "true"), ("4", "true")):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAYON_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": parallel}
        result = subprocess.run([sys.executable, "-c", _TRAIN, *corpus.files], env=env, cwd=REPO,
                                capture_output=True, text=True, check=True)
        digests.add(result.stdout.strip())
    assert digests == {source.tokenizer_sha256}


def test_vocab_and_merges_give_the_same_ids(tmp_path, corpus, scanned):
    source, scan = scanned
    trained = bpe.for_corpus(source.tokenizer_json)
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    for name, data in bpe.vocab_files(trained).items():
        (roberta / name).write_bytes(data)
    loaded = bpe.load_tokenizer(str(roberta))
    assert bpe.special_ids(loaded) == bpe.special_ids(trained)
    for text in _documents(corpus).values():
        assert loaded.encode(text, add_special_tokens=False).ids == trained.encode(text, add_special_tokens=False).ids
    full = tmp_path / "full"
    full.mkdir()
    (full / "tokenizer.json").write_text(source.tokenizer_json)
    given = TextSource.create(tuple(Location(f) for f in corpus.files), tokenizer_dir=str(full), block_size=BLOCK)
    assert given.scan(Runner()).manifest.equals(scan.manifest)
    with pytest.raises(ValueError, match="tokenizer.json, or vocab.json and merges.txt"):
        bpe.load_tokenizer(str(tmp_path / "nothing"))


def test_options_are_checked(corpus):
    files = (Location(corpus.files[0]),)
    with pytest.raises(ValueError, match="--vocab-size"):
        TextSource.create(files)
    with pytest.raises(ValueError, match="not both"):
        TextSource.create(files, vocab_size=VOCAB, tokenizer_dir=corpus.source)
    with pytest.raises(ValueError, match="too small"):
        TextSource.create(files, vocab_size=100)
    with pytest.raises(ValueError, match="--block-size"):
        TextSource.create(files, vocab_size=VOCAB, block_size=2)


def test_splits_are_deterministic_by_document():
    ids = [f"doc-{i:06d}" for i in range(20000)]
    splits = assign_splits(ids, 0.05, seed=0)
    assert splits == assign_splits(list(reversed(ids)), 0.05, seed=0)
    assert 0.045 < sum(s == "valid" for s in splits.values()) / len(ids) < 0.055
    assert splits != assign_splits(ids, 0.05, seed=1)
    # tiny corpora: neither split left empty once there are two documents; 0 means no valid split
    assert sorted(assign_splits(ids[:2], 0.01, seed=0).values()) == ["train", "valid"]
    assert sorted(assign_splits(ids[:2], 0.99, seed=0).values()) == ["train", "valid"]
    assert assign_splits(ids[:1], 0.5, seed=0) == {ids[0]: "train"}
    assert set(assign_splits(ids[:50], 0.0, seed=0).values()) == {"train"}


def test_folders_and_shared_stems(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "wiki.train.txt").write_text("one two\nthree\n\nfour five\n")
    (tmp_path / "in" / ".hidden").write_text("not a document\n")
    scan = TextSource.create((Location(str(tmp_path / "in")),), vocab_size=300, valid_fraction=0.0).scan(Runner())
    source = scan.source
    assert source.files == ("a/wiki.train.txt", "b/wiki.train.txt") and source.location.url == str(tmp_path / "in")
    ids = scan.manifest.column("id").to_pylist()
    assert len(set(ids)) == len(ids) == 4 and all("." not in i and "/" not in i for i in ids)


def _read_webdataset(url: str) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(url, shardshuffle=False))


def test_build_end_to_end(tmp_path, corpus):
    source = TextSource.create(tuple(Location(f) for f in corpus.files), vocab_size=VOCAB, block_size=BLOCK)
    out = tmp_path / "out"
    dataset = build_dataset(source, Location(str(out)), BuildOptions(ShardSize.parse("40"), mask_variants=3),
                            workers=0, echo=lambda *_: None)
    assert dataset.source_items == dataset.samples + dataset.rejected
    assert dataset.rejects_by_reason == {"invalid_utf8": 1}
    assert dataset.counts == {"documents": corpus.expected["accepted"]}
    assert set(dataset.splits) == {"train", "valid"} and all(s.tokens for s in dataset.splits.values())
    ref = dataset.tokenizer
    assert ref.sha256 == bpe.sha256((out / "tokenizer" / "tokenizer.json").read_text())
    assert (ref.bos_id, ref.eos_id, ref.block_size) == (0, 2, BLOCK)
    assert bpe.load_tokenizer(str(out / "tokenizer")).get_vocab_size() == ref.vocab_size
    assert sorted(os.listdir(out / "tokenizer")) == ["merges.txt", "tokenizer.json", "vocab.json"]

    tokens_seen = 0
    for shard in dataset.shards:
        samples = _read_webdataset(str(out / shard.name))
        index = pq.read_table(out / shard.index, use_threads=False).to_pylist()
        assert [s["__key__"] for s in samples] == [r["key"] for r in index] and len(samples) == shard.samples
        for sample, row in zip(samples, index):
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            mask = np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False)
            meta = json.loads(sample["json"])
            assert mask.dtype == bool and mask.shape == (3, tokens.size) == (3, row["mask_length"])
            assert not mask[:, 0].any() and not mask[:, -1].any() and mask.any()
            assert meta["num_tokens"] == row["num_tokens"] == tokens.size and meta["key"] == sample["__key__"]
            tokens_seen += tokens.size
    assert tokens_seen == sum(s.tokens for s in dataset.splits.values())

    again = build_dataset(source, Location(str(out)), BuildOptions(ShardSize.parse("40"), mask_variants=3),
                          workers=0, echo=lambda *_: None)
    assert again.fingerprint == dataset.fingerprint and again.shards == dataset.shards


@pytest.mark.parametrize("content", [b"\n\n  \n", b"only \xff bad\n\nalso \xc3 bad\n"])
def test_empty_corpus_commits_nothing(tmp_path, content):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part.txt").write_bytes(content)
    source = TextSource.create((Location(str(tmp_path / "in" / "part.txt")),), vocab_size=VOCAB)
    with pytest.raises(EmptyCorpusError, match="no usable text items"):
        build_dataset(source, Location(str(tmp_path / "out")), workers=0, echo=lambda *_: None)
    assert not (tmp_path / "out" / DATASET_JSON).exists()


def test_a_file_changed_after_the_scan_is_rejected_at_build(tmp_path, corpus):
    copy = tmp_path / "part-001.txt"
    copy.write_bytes(Path(corpus.files[1]).read_bytes())
    scan = TextSource.create((Location(str(copy)),), vocab_size=VOCAB, block_size=BLOCK).scan(Runner())
    source, rows = scan.source, scan.manifest.to_pylist()
    copy.write_bytes(copy.read_bytes()[: len(copy.read_bytes()) // 2])
    fs, root = source.location.filesystem()
    outcomes = [source.encode(fs, root, row) for row in rows]
    rejected = [o for o in outcomes if isinstance(o, Reject)]
    assert rejected and {r.reason for r in rejected} <= {"changed_document", "invalid_utf8"}
    assert all(r.stage == "build" and r.path == "part-001.txt" for r in rejected)


@pytest.mark.dask
@pytest.mark.slow
def test_dask_workers_build_the_same_shards(tmp_path, corpus):
    def build(out, workers):
        source = TextSource.create(tuple(Location(f) for f in corpus.files), vocab_size=VOCAB, block_size=BLOCK)
        return build_dataset(source, Location(str(tmp_path / out)), BuildOptions(ShardSize.parse("40")),
                             workers=workers, echo=lambda *_: None)

    local, dask = build("local", 0), build("dask", 2)
    assert dask.fingerprint == local.fingerprint and dask.shards == local.shards and dask.tokenizer == local.tokenizer
