"""GLUE-format classification tasks (SST-2, MRPC, CoLA layouts) over the text corpus's words."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipelines.synthetic.common import CorpusSpec, _rng, _Writer
from pipelines.synthetic.text import _FILLER_WORDS, _topic_sentence

# Two word lists from the text corpus's vocabulary (a tokenizer trained on make_text_corpus holds
# them as whole tokens); a sentence's class is the list it draws more words from.
_GOOD_WORDS = "river music garden island village city".split()
_BAD_WORDS = "history system language station network theory".split()
GLUE_TASKS = ("SST-2", "MRPC", "CoLA")


def _opinion(rng: np.random.Generator, good: bool) -> str:
    """Filler words with 2-3 words of one list and fewer of the other, in random places."""
    major = int(rng.integers(2, 4))
    minor = int(rng.integers(0, major))
    words = [str(w) for w in rng.choice(_FILLER_WORDS, size=int(rng.integers(4, 10)))]
    words += [str(w) for w in rng.choice(_GOOD_WORDS if good else _BAD_WORDS, size=major)]
    words += [str(w) for w in rng.choice(_BAD_WORDS if good else _GOOD_WORDS, size=minor)]
    return " ".join(words[i] for i in rng.permutation(len(words)))


def make_glue_task(root: str | os.PathLike, task: str = "SST-2", *, train: int = 200, dev: int = 40,
                   seed: int = 0, rule: str = "lists") -> CorpusSpec:
    """Write `root/TASK/train.tsv` and `dev.tsv` in the GLUE layout of `task`, with a learnable rule.

    SST-2 (`sentence<TAB>label`) and CoLA (headerless `source, label, *-or-empty, sentence`): label 1
    when the sentence draws more words from one word list than from another. MRPC (byte-order mark,
    `Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String`): Quality 1 when both sentences lean
    to the same list. Labels are drawn 50/50; `expected` holds rows and label counts per split.
    `rule="topic"` (SST-2 only): label 1 for a sentence about machines, 0 for nature (see
    `_TOPIC_WORDS`), with the train split's topic words disjoint from the dev split's.
    """
    if rule not in ("lists", "topic"):
        raise ValueError(f"rule {rule!r}: expected 'lists' or 'topic'")
    if rule == "topic" and task != "SST-2":
        raise ValueError("rule 'topic' writes SST-2 files only")
    if task not in GLUE_TASKS:
        raise ValueError(f"task {task!r}: expected one of {GLUE_TASKS}")
    source = Path(root).absolute() / task
    out = _Writer(source)
    expected: dict = {"splits": {}, "labels": {}}
    for split, rows in (("train", train), ("dev", dev)):
        rng = _rng(seed, "glue", task, split)
        lines, counts = [], {"0": 0, "1": 0}
        for n in range(rows):
            label = int(rng.random() < 0.5)
            counts[str(label)] += 1
            if task == "MRPC":
                first = bool(rng.random() < 0.5)
                second = first if label else not first
                ids = f"{1000 + 2 * n}\t{1001 + 2 * n}"
                lines.append(f"{label}\t{ids}\t{_opinion(rng, first)}\t{_opinion(rng, second)}")
            elif rule == "topic":
                topic = "machines" if label else "nature"
                lines.append(f"{_topic_sentence(rng, topic, 'seen' if split == 'train' else 'unseen')}\t{label}")
            elif task == "CoLA":
                lines.append(f"syn{n % 7:02d}\t{label}\t{'' if label else '*'}\t{_opinion(rng, bool(label))}")
            else:
                lines.append(f"{_opinion(rng, bool(label))}\t{label}")
        header = {"SST-2": "sentence\tlabel\n", "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n",
                  "CoLA": ""}[task]
        out.text(f"{split}.tsv", header + "".join(line + "\n" for line in lines))
        expected["splits"][split] = rows
        expected["labels"][split] = counts
    return CorpusSpec(source=str(source), kind="glue", files=out.sorted_files(), expected=expected)
