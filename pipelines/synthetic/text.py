"""Plain-text corpora: paragraphs with exotic scripts and odd files, optionally by topic."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipelines.synthetic.common import CorpusSpec, _rng, _Writer

_FILLER_WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
_TEXT_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "river city music history system language station island century village network theory garden"
).split()
_ACCENTED = "café naïve Zürich São façade jalapeño Ελλάδα Straße résumé Kraków".split()
_CJK = "東京 データ 学習 한국어 北京 音声".split()
_EMOJI = "😀 🚀 🎵 🌍 📚".split()


# Two topics of 24 words each. A topic corpus draws every document from one topic, so words of a
# topic share their contexts; a topic task labels sentences by topic and uses the first half of
# each topic's words in its train split and only the second half in its dev split: an encoder
# can only carry the labels over to the unseen words through what it learned from the corpus.
_TOPIC_WORDS = {
    "nature": ("river forest mountain garden flower meadow valley island ocean rain cloud tree "
               "lake stone desert field spring leaf moss wind shore hill snow grass").split(),
    "machines": ("engine motor wire circuit signal battery sensor metal robot laser cable pump "
                 "piston valve turbine gear switch screen server network radio rocket steel drill").split(),
}


def _topic_words(topic: str, half: str | None = None) -> list[str]:
    words = _TOPIC_WORDS[topic]
    return words if half is None else words[: len(words) // 2] if half == "seen" else words[len(words) // 2:]


def _topic_sentence(rng: np.random.Generator, topic: str, half: str | None = None, topic_share: float = 0.4) -> str:
    n = int(rng.integers(8, 16))
    pool = _topic_words(topic, half)
    words = [str(rng.choice(pool)) if rng.random() < topic_share else str(rng.choice(_FILLER_WORDS)) for _ in range(n)]
    if not any(w in pool for w in words):
        words[int(rng.integers(0, n))] = str(rng.choice(pool))
    return " ".join(words)


def _paragraph(rng: np.random.Generator, n_words: int, exotic: float = 0.08) -> str:
    words = []
    for _ in range(n_words):
        r = rng.random()
        if r < exotic / 2:
            pool = _ACCENTED
        elif r < exotic * 0.8:
            pool = _CJK
        elif r < exotic:
            pool = _EMOJI
        else:
            pool = _TEXT_WORDS
        word = str(rng.choice(pool))
        if len(words) > 2 and rng.random() < 0.08:
            words[-1] += "."
        if not words or words[-1].endswith("."):
            word = word[:1].upper() + word[1:]
        words.append(word)
    return " ".join(words) + "."


def make_text_corpus(
    root: str | os.PathLike,
    *,
    files: int = 2,
    docs_per_file: int = 6,
    seed: int = 0,
    paragraphs: tuple[int, int] = (1, 4),
    words_per_paragraph: tuple[int, int] = (5, 60),
    faults: bool = False,
    topics: bool = False,
) -> CorpusSpec:
    """Write `root/part-NNN.txt` in the RoBERTa raw format.

    One paragraph per line, documents separated by one blank line, UTF-8.
    The first document of each file mixes in accented, CJK and emoji words;
    the second is long (~10k characters, several 512-token BPE blocks) and
    ignores the paragraph/word ranges. With `faults`, the first file gets one
    extra document, in its middle, whose line holds the bytes `\\xff\\xfe`. With `topics`, every
    document after the first two is about one topic (sentences of filler and topic words, see
    `_TOPIC_WORDS`), alternating between the topics.
    """
    source = Path(root).absolute()
    out = _Writer(source)
    fault_map: dict[str, str] = {}
    for f in range(files):
        name = f"part-{f:03d}.txt"
        frng = _rng(seed, "text", name)
        docs: list[bytes] = []
        for d in range(docs_per_file):
            if d == 1:
                paras = [_paragraph(frng, 160) for _ in range(10)]
            elif topics and d > 1:
                topic = sorted(_TOPIC_WORDS)[(d + f) % len(_TOPIC_WORDS)]
                n_par = int(frng.integers(paragraphs[0], paragraphs[1] + 1))
                paras = [". ".join(_topic_sentence(frng, topic) for _ in range(int(frng.integers(2, 5)))) + "."
                         for _ in range(n_par)]
            else:
                n_par = int(frng.integers(paragraphs[0], paragraphs[1] + 1))
                lo, hi = words_per_paragraph
                paras = [_paragraph(frng, int(frng.integers(lo, hi + 1))) for _ in range(n_par)]
            if d == 0:
                paras[0] += f" {frng.choice(_ACCENTED)} {frng.choice(_CJK)} {frng.choice(_EMOJI)}"
            docs.append("\n".join(paras).encode("utf-8"))
        if faults and f == 0:
            at = len(docs) // 2
            head, tail = _paragraph(frng, 12).encode(), _paragraph(frng, 12).encode()
            docs.insert(at, head + b" \xff\xfe " + tail + b"\n" + _paragraph(frng, 20).encode())
            fault_map[f"{name}#{at}"] = "invalid_utf8"
        out.bytes(name, b"\n\n".join(docs) + b"\n")

    rejected = len(fault_map)
    accepted = files * docs_per_file
    return CorpusSpec(
        source=str(source),
        kind="text",
        files=out.sorted_files(),
        faults=fault_map,
        expected={
            "items": accepted + rejected,
            "documents": accepted + rejected,
            "accepted": accepted,
            "rejected": rejected,
            "invalid_utf8": rejected,
            "rejects_by_reason": {"invalid_utf8": rejected} if rejected else {},
            "splits": {"train": accepted},
        },
    )
