"""Raw text in the RoBERTa format: UTF-8 files, one paragraph per line, blank lines between documents.

Inputs are files or folders (all files under a folder, sorted; hidden files skipped) on one
fsspec filesystem. The source's location is their deepest common folder and every manifest
`path` is relative to it. A document is a run of non-blank lines (a line of ASCII whitespace
is blank); its `doc_offset`/`doc_bytes` locate it in its file, so the builder re-reads exactly
those bytes. A document that is not valid UTF-8 is rejected (`invalid_utf8`), the rest of its
file is kept. Document ids are `{file-stem}-{n:06d}`, n counting every document of the file.

Each document is tokenized once at scan time (to count tokens) and again at build time; it is
cut into blocks of at most `block_size` tokens, `<s>` and `</s>` included, never crossing
documents. Manifest rows are blocks with ids `{doc_id}-{block:04d}`; `token_start` is where
the block's content starts among the document's tokens (specials not counted).

Splits are by document: "valid" when sha256(seed, doc_id) as a fraction of 2**64 is below
`valid_fraction`. "train" is never empty: if every document drew "valid", the one with the
largest draw stays in "train". With a positive fraction and at least two documents "valid" is
not empty either: if none drew it, the one with the smallest draw goes there. The rule depends
on the seed and the set of document ids only.
"""
from __future__ import annotations

import codecs
import collections
import functools
import hashlib
import logging
import math
import posixpath
import re
import time
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow.compute as pc

from pipelines import tokenizer as bpe
from pipelines.shards import npy_bytes
from pipelines.sources.base import Encoded, Reject, ScanResult, Source
from pipelines.storage import Location, StorageError, find_files, is_local
from schemas import TokenizerRef

log = logging.getLogger(__name__)

NPY_HEADER_BYTES = 128  # numpy's header of a 1-D array: a block's stored size is this + 4 bytes per token
_TOKENIZE_BATCH_BYTES = 4 << 20  # text per encode_batch call: bounds a worker's memory on huge files
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class _FileScan:
    path: str  # relative to the source location
    docs: list[tuple[str, int, int, int]]  # accepted: (doc_id, offset, bytes, content tokens or -1)
    rejects: list[Reject]


@dataclass(frozen=True)
class TextSource(Source):
    location: Location
    inputs: tuple[str, ...]  # files or folders, relative to `location` ("." is the location itself)
    vocab_size: int | None = None  # train a tokenizer of this size at scan time
    tokenizer_json: str | None = field(default=None, repr=False)  # given, or filled by scan when trained
    block_size: int = 512
    valid_fraction: float = 0.01
    mask_prob: float = 0.15
    mask_span: int = 1
    seed: int = 0
    modality: str = "text"
    files: tuple[str, ...] = ()  # filled by scan, recorded in dataset.json

    @classmethod
    def create(cls, files: tuple[Location, ...], *, vocab_size: int | None = None,
               tokenizer_dir: str | Location | None = None, block_size: int = 512, valid_fraction: float = 0.01,
               mask_prob: float = 0.15, mask_span: int = 1, seed: int = 0) -> TextSource:
        """Check the options, find the inputs' common folder and load a given tokenizer."""
        if (vocab_size is None) == (tokenizer_dir is None):
            raise ValueError("text: give either --vocab-size (train a tokenizer) or --tokenizer (a folder), "
                             + ("not both" if vocab_size is not None else "one of them is needed"))
        if vocab_size is not None and vocab_size < bpe.MIN_VOCAB_SIZE:
            raise ValueError(f"--vocab-size {vocab_size} is too small: at least {bpe.MIN_VOCAB_SIZE} "
                             "(256 bytes + 5 special tokens)")
        if block_size < 3:
            raise ValueError(f"--block-size {block_size}: a block needs <s>, </s> and at least one token")
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"--valid-fraction {valid_fraction}: expected 0 <= fraction < 1")
        if not 0 <= mask_prob <= 1:
            raise ValueError(f"--mask-prob {mask_prob}: expected a probability")
        if mask_span < 1:
            raise ValueError(f"--mask-span {mask_span}: expected at least 1")
        location, inputs = _common_location(tuple(files))
        tokenizer_json = None
        if tokenizer_dir is not None:
            if isinstance(tokenizer_dir, Location):
                tokenizer_url, options = tokenizer_dir.url, tokenizer_dir.storage_options
            else:
                same_fs = Location(tokenizer_dir).protocol == location.protocol
                tokenizer_url, options = tokenizer_dir, location.storage_options if same_fs else {}
            tokenizer_json = bpe.to_str(bpe.load_tokenizer(tokenizer_url, options))
        return cls(location, inputs, vocab_size, tokenizer_json, block_size, valid_fraction, mask_prob, mask_span, seed)

    # -- what the builder records -------------------------------------------------------------
    @property
    def tokenizer_sha256(self) -> str:
        return bpe.sha256(self._tokenizer_json())

    def _tokenizer_json(self) -> str:
        assert self.tokenizer_json is not None, "the tokenizer is trained by scan(): scan first"
        return self.tokenizer_json

    def build_params(self) -> dict:
        return {
            "files": list(self.files), "vocab_size": self.vocab_size, "tokenizer_sha256": self.tokenizer_sha256,
            "tokenizer": "trained" if self.vocab_size is not None else "given", "block_size": self.block_size,
            "valid_fraction": self.valid_fraction, "split_seed": self.seed,
            "mask_prob": self.mask_prob, "mask_span": self.mask_span,
        }

    def mask_spec(self) -> tuple[str, dict]:
        return "token", {"mask_prob": self.mask_prob, "span_length": self.mask_span, "exclude_ends": True}

    def dataset_fields(self) -> dict:
        tokenizer = bpe.for_corpus(self._tokenizer_json())
        return {"tokenizer": TokenizerRef(
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), sha256=self.tokenizer_sha256,
            block_size=self.block_size, **bpe.special_ids(tokenizer),
        )}

    def extra_files(self) -> dict[str, bytes]:
        folder = TokenizerRef.model_fields["path"].default
        text = self._tokenizer_json()
        files = {f"{folder}/tokenizer.json": text.encode("utf-8")}
        files.update({f"{folder}/{name}": data for name, data in bpe.vocab_files(bpe.for_corpus(text)).items()})
        return files

    def counts(self, manifest) -> dict[str, int]:
        return {"documents": pc.count_distinct(manifest.column("doc_id")).as_py()}

    # -- scan ---------------------------------------------------------------------------------
    def scan(self, runner) -> ScanResult:
        fs, root = self.location.filesystem()
        files = _list_files(fs, root, self.inputs)
        learned = replace(self, files=tuple(files))
        keys = _file_keys(files)
        items = [(path, keys[path]) for path in files]
        started = time.monotonic()
        scans = runner.map(_scan_file, items, location=self.location, tokenizer_json=self.tokenizer_json)
        if self.tokenizer_json is None and any(s.docs for s in scans):
            # Training needs every document in one place: the driver streams them to the trainer.
            trained = bpe.train_bpe(_accepted_texts(fs, root, scans), self.vocab_size)
            log.info("trained a byte-level BPE of %d tokens in %.1fs", trained.get_vocab_size(),
                     time.monotonic() - started)
            learned = replace(learned, tokenizer_json=bpe.to_str(trained))  # shipped to the workers with the source
            started = time.monotonic()
            scans = runner.map(_scan_file, items, location=self.location, tokenizer_json=learned.tokenizer_json)
        rejects = [r for s in scans for r in s.rejects]
        docs = [(s.path, doc) for s in scans for doc in s.docs]
        splits = assign_splits([doc[0] for _, doc in docs], self.valid_fraction, self.seed)
        content = self.block_size - 2
        rows = []
        for path, (doc_id, offset, size, tokens) in docs:
            for block in range(math.ceil(tokens / content)):
                start = block * content
                length = min(content, tokens - start) + 2
                rows.append({
                    "id": f"{doc_id}-{block:04d}", "split": splits[doc_id], "path": path,
                    "bytes": NPY_HEADER_BYTES + 4 * length, "doc_id": doc_id, "block": block, "doc_offset": offset,
                    "doc_bytes": size, "token_start": start, "num_tokens": length,
                })
        tokens = sum(doc[3] for _, doc in docs)
        log.info("tokenized %d documents of %d files: %d tokens (%.0f tokens/s)", len(docs), len(files), tokens,
                 tokens / max(time.monotonic() - started, 1e-9))
        return ScanResult(self.manifest_table(rows), rejects, learned)

    # -- build --------------------------------------------------------------------------------
    def encode(self, fs, root: str, row: dict) -> Encoded | Reject:
        text = self._tokenizer_json()
        tokens = _document_tokens(fs, posixpath.join(root, row["path"]), row["doc_offset"], row["doc_bytes"], text)
        if isinstance(tokens, tuple):
            reason, detail = tokens
            return Reject(row["id"], row["split"], row["path"], "build", reason, f"{row['path']}: {detail}")
        start, length = row["token_start"], row["num_tokens"]
        if start + length - 2 > tokens.size:
            return Reject(row["id"], row["split"], row["path"], "build", "changed_document",
                          f"{row['path']}: document {row['doc_id']} has {tokens.size} tokens now, fewer than "
                          "at scan time; the file changed during the build")
        bos, eos = _ends(text)
        block = np.empty(length, dtype=np.int32)
        block[0], block[-1] = bos, eos
        block[1:-1] = tokens[start:start + length - 2]
        meta = {"key": row["id"], "split": row["split"], "doc_id": row["doc_id"], "block": row["block"],
                "num_tokens": length}
        index = {"num_tokens": length, "doc_id": row["doc_id"], "block": row["block"]}
        return Encoded(row["id"], npy_bytes(block), meta, length, index, tokens=length)


def corpus_files(location: Location) -> list[Location]:
    """The .txt files under a folder (any depth, sorted), or the one file `location` names."""
    fs, root = location.filesystem()
    files = sorted(fs.glob(f"{root.rstrip('/')}/**/*.txt")) if fs.isdir(root) else [root]
    if not files:
        raise ValueError(f"source: no .txt files under {location.url}")
    protocol = location.protocol
    return [Location(f if protocol in ("file", "") else f"{protocol}://{f}") for f in files]


def assign_splits(doc_ids: list[str], valid_fraction: float, seed: int) -> dict[str, str]:
    """doc_id -> "train" | "valid" (the rule is in the module docstring)."""
    draws = {}
    for doc_id in doc_ids:
        digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
        draws[doc_id] = int.from_bytes(digest[:8], "big") / 2**64
    valid = {d for d, u in draws.items() if u < valid_fraction}
    if valid_fraction > 0 and len(draws) >= 2 and not valid:
        valid = {min(draws, key=lambda d: (draws[d], d))}
    if valid and len(valid) == len(draws):
        valid.discard(max(draws, key=lambda d: (draws[d], d)))
    return {d: "valid" if d in valid else "train" for d in doc_ids}


def document_spans(data: bytes) -> list[tuple[int, int]]:
    """(offset, bytes) of each document: a run of non-blank lines, without its final newline."""
    spans = []
    start = end = None
    position = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    for line in data[position:].split(b"\n"):
        if line.strip():
            if start is None:
                start = position
            end = position + len(line.rstrip(b"\r"))
        elif start is not None:
            spans.append((start, end - start))
            start = None
        position += len(line) + 1
    if start is not None:
        spans.append((start, end - start))
    return spans


def _common_location(inputs: tuple[Location, ...]) -> tuple[Location, tuple[str, ...]]:
    """The deepest folder holding every input, and each input relative to it."""
    if not inputs:
        raise ValueError("text: give at least one input file or folder")
    first = inputs[0]
    for other in inputs[1:]:
        if other.protocol != first.protocol or other.storage_options != first.storage_options:
            raise ValueError(f"text inputs must share one filesystem and its options: "
                             f"{first.public_url()} and {other.public_url()} do not")
    fs, _ = first.filesystem()
    paths, folders = [], []
    for location in inputs:
        _, path = location.filesystem()
        try:
            folder = fs.isdir(path)
            found = folder or fs.isfile(path)
        except Exception as exc:  # noqa: BLE001 - any backend error means the same to the user
            raise StorageError(f"cannot read text input {location.public_url()}: {exc}") from exc
        if not found:
            raise StorageError(f"text input {location.public_url()} does not exist")
        paths.append(path)
        folders.append(path if folder else posixpath.dirname(path))
    try:
        root = posixpath.commonpath(folders)
    except ValueError:
        root = ""
    if not root:
        raise ValueError("text inputs must share a folder (e.g. one bucket): "
                         + ", ".join(location.public_url() for location in inputs))
    url = root if is_local(fs) else fs.unstrip_protocol(root)
    return Location(url, first.storage_options), tuple(posixpath.relpath(p, root) for p in paths)


def _list_files(fs, root: str, inputs: tuple[str, ...]) -> list[str]:
    files = set()
    for relative in inputs:
        path = posixpath.normpath(posixpath.join(root, relative))
        found = list(find_files(fs, path)) if fs.isdir(path) else [path]
        for name in found:
            if not any(part.startswith(".") for part in posixpath.relpath(name, path).split("/") if part != "."):
                files.add(posixpath.relpath(name, root))
    return sorted(files)


def _file_keys(files: list[str]) -> dict[str, str]:
    """File -> document-id prefix: its stem made key-safe; stems shared by several files get a
    hash of the path so ids stay unique."""
    stems = {f: _UNSAFE_KEY.sub("_", posixpath.splitext(posixpath.basename(f))[0]).strip("_") or "file" for f in files}
    shared = collections.Counter(stems.values())
    return {f: s if shared[s] == 1 else f"{s}_{zlib.crc32(f.encode('utf-8')):08x}" for f, s in stems.items()}


def _scan_file(item: tuple[str, str], location: Location, tokenizer_json: str | None) -> _FileScan:
    """Split one file into documents, reject those that are not UTF-8 and count the tokens of
    the rest (-1 when there is no tokenizer yet)."""
    path, key = item
    fs, root = location.filesystem()
    try:
        data = fs.cat_file(posixpath.join(root, path))
    except Exception as exc:  # noqa: BLE001
        return _FileScan(path, [], [Reject(key, None, path, "scan", "unreadable_file", f"cannot read {path}: {exc}")])
    docs, texts, rejects = [], [], []
    for number, (offset, size) in enumerate(document_spans(data)):
        doc_id = f"{key}-{number:06d}"
        try:
            texts.append(data[offset:offset + size].decode("utf-8"))
        except UnicodeDecodeError as exc:
            rejects.append(Reject(doc_id, None, path, "scan", "invalid_utf8",
                                  f"{path}: document {number} (bytes {offset}-{offset + size}) is not UTF-8: "
                                  f"{exc.reason} at byte {offset + exc.start} of the file"))
            continue
        docs.append((doc_id, offset, size, -1))
    if tokenizer_json is not None:
        counted = list(zip(docs, _token_counts(bpe.for_corpus(tokenizer_json), texts)))
        docs = [(doc_id, offset, size, n) for (doc_id, offset, size, _), n in counted if n > 0]
        # Only a tokenizer that drops characters (not byte-level BPE) can leave a document empty.
        rejects += [Reject(doc_id, None, path, "scan", "empty_document", f"{path}: document {doc_id} has no tokens")
                    for (doc_id, _, _, _), n in counted if n == 0]
    return _FileScan(path, docs, rejects)


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: tokenizers >= 0.21, no offsets
    counts: list[int] = []
    batch: list[str] = []
    size = 0
    for text in texts + [None]:
        if text is None or size >= _TOKENIZE_BATCH_BYTES:
            counts += [len(e.ids) for e in encode(batch, add_special_tokens=False)]
            batch, size = [], 0
        if text is not None:
            batch.append(text)
            size += len(text)
    return counts


def _accepted_texts(fs, root: str, scans: list[_FileScan]):
    for scan in scans:
        if scan.docs:
            data = fs.cat_file(posixpath.join(root, scan.path))
            for _, offset, size, _ in scan.docs:
                yield data[offset:offset + size].decode("utf-8")


@functools.lru_cache(maxsize=4)
def _ends(tokenizer_json: str) -> tuple[int, int]:
    ids = bpe.special_ids(bpe.for_corpus(tokenizer_json))
    return ids["bos_id"], ids["eos_id"]


# Shards are shuffled, so blocks of one document rarely come in a row, but several blocks of a
# long document often share a shard: a few recent documents per process save re-tokenizing them.
_RECENT: collections.OrderedDict = collections.OrderedDict()
_RECENT_DOCUMENTS = 16


def _document_tokens(fs, path: str, offset: int, size: int, tokenizer_json: str) -> np.ndarray | tuple[str, str]:
    """The content tokens of one document, or (reason, detail) when it cannot be used."""
    key = (tokenizer_json, fs.protocol, path, offset, size)
    if key in _RECENT:
        _RECENT.move_to_end(key)
        return _RECENT[key]
    try:
        data = fs.cat_file(path, start=offset, end=offset + size)
    except Exception as exc:  # noqa: BLE001
        return "unreadable_file", f"cannot read bytes {offset}-{offset + size}: {exc}"
    if len(data) != size:
        return "changed_document", f"bytes {offset}-{offset + size} are past the end of the file: it changed"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "invalid_utf8", f"bytes {offset}-{offset + size} are no longer UTF-8 ({exc.reason}): the file changed"
    tokens = np.asarray(bpe.for_corpus(tokenizer_json).encode(text, add_special_tokens=False).ids, dtype=np.int32)
    _RECENT[key] = tokens
    while len(_RECENT) > _RECENT_DOCUMENTS:
        _RECENT.popitem(last=False)
    return tokens
