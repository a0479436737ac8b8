"""Byte-level BPE in the RoBERTa style, built on the `tokenizers` library.

Any byte sequence tokenizes (no unknown tokens) and decoding gives the text back exactly. The
special tokens are `<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`; their ids are always looked up,
since a loaded vocabulary may place them anywhere. Training is deterministic: merges tie-break
on pair ids, so the same documents give the same tokenizer.json bytes in any process, whatever
the thread count (checked by tests/test_text_source.py).
"""
from __future__ import annotations

import functools
import hashlib
import json
import posixpath
from collections.abc import Iterable

import fsspec
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS = (BOS, PAD, EOS, UNK, MASK)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MIN_FREQUENCY = 2  # as RoBERTa's byte-level BPE: a pair seen once is not worth a token


def _special_added_tokens() -> list[AddedToken]:
    # `<mask>` swallows the space before it, so "a <mask>" predicts the word with its space (RoBERTa).
    return [AddedToken(t, lstrip=t == MASK, special=True, normalized=False) for t in SPECIAL_TOKENS]


def _byte_level(model: models.BPE) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _finish(tokenizer: Tokenizer) -> Tokenizer:
    """Register the special tokens (appended when the vocabulary lacks them, as GPT-2's does)
    and wrap a single sequence in `<s> ... </s>` for users of the committed tokenizer.json."""
    tokenizer.add_special_tokens(_special_added_tokens())
    ids = special_ids(tokenizer)
    tokenizer.post_processor = processors.RobertaProcessing((EOS, ids["eos_id"]), (BOS, ids["bos_id"]),
                                                           add_prefix_space=False)
    return tokenizer


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens (specials and the 256 bytes included)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, show_progress=False,
        special_tokens=_special_added_tokens(), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer)
    return _finish(tokenizer)


def load_tokenizer(folder_or_url: str, storage_options: dict | None = None) -> Tokenizer:
    """A folder (any fsspec URL) with `tokenizer.json`, or RoBERTa/GPT-2 `vocab.json` + `merges.txt`."""
    fs, root = fsspec.core.url_to_fs(folder_or_url, **(storage_options or {}))
    root = root.rstrip("/")
    try:
        if fs.exists(posixpath.join(root, "tokenizer.json")):
            tokenizer = Tokenizer.from_str(fs.cat_file(posixpath.join(root, "tokenizer.json")).decode("utf-8"))
        elif fs.exists(posixpath.join(root, "vocab.json")) and fs.exists(posixpath.join(root, "merges.txt")):
            vocab = json.loads(fs.cat_file(posixpath.join(root, "vocab.json")))
            merges = _read_merges(fs.cat_file(posixpath.join(root, "merges.txt")).decode("utf-8"))
            tokenizer = _byte_level(models.BPE(vocab=vocab, merges=merges))
        else:
            raise ValueError(f"--tokenizer {folder_or_url}: expected tokenizer.json, "
                             "or vocab.json and merges.txt, in it")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--tokenizer {folder_or_url}: cannot read the tokenizer: {exc}") from exc
    return _finish(tokenizer)


def _read_merges(text: str) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merges.txt line {number}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"bos_id", "pad_id", "eos_id", "unk_id", "mask_id"}, looked up in the vocabulary."""
    ids = {}
    for name, token in zip(("bos_id", "pad_id", "eos_id", "unk_id", "mask_id"), SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"the tokenizer has no {token} token")
        ids[name] = found
    return ids


def to_str(tokenizer: Tokenizer) -> str:
    """tokenizer.json text: what a source carries to workers and what the dataset commits."""
    return tokenizer.to_str()


def sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4)
def for_corpus(tokenizer_json: str) -> Tokenizer:
    """The tokenizer rebuilt once per process for encoding corpus text.

    Special-token strings in the text (a literal "<s>" in a document) are encoded as plain
    text, never as control tokens, so a document decodes back to itself.
    """
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True
    return tokenizer


def vocab_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """`vocab.json` and `merges.txt` as RoBERTa ships them, for tools that want those files."""
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        return {}
    vocab = dict(sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "".join(m + "\n" for m in merges)).encode("utf-8"),
    }
