"""Small synthetic corpora in the exact on-disk layouts of the real sources.

The shard builders are tested, and `d2v demo` runs, against these instead of
downloads. Each generator writes a local folder in the layout the real corpus
extracts to, optionally with one of each known kind of bad item, and returns a
`CorpusSpec` whose `expected` counts are what a correct builder must report.
Output is byte-identical for a given seed (fixed encoder parameters, seeds
derived from names with a stable hash), and no network is used. Write into an
empty or new `root`: files from an earlier run with other parameters stay.
"""

from __future__ import annotations

from pipelines.synthetic.common import JPEG_QUALITY, SAMPLE_RATE, CorpusSpec
from pipelines.synthetic.glue import GLUE_TASKS, make_glue_task
from pipelines.synthetic.speech import ACCEPTED_FAULTS, LETTERS, _voice, _voiced_letter, make_librispeech
from pipelines.synthetic.text import _TOPIC_WORDS, make_text_corpus
from pipelines.synthetic.vision import (
    FILLER_TILES,
    WORD_TILES,
    WORDS_PER_FAMILY,
    _word_patterns,
    _words_image,
    make_imagenet,
)

__all__ = ["ACCEPTED_FAULTS", "CorpusSpec", "make_librispeech", "make_imagenet", "make_text_corpus", "make_glue_task", "GLUE_TASKS",
           "SAMPLE_RATE", "JPEG_QUALITY", "LETTERS", "FILLER_TILES", "WORD_TILES", "WORDS_PER_FAMILY",
           "_TOPIC_WORDS", "_voice", "_voiced_letter", "_word_patterns", "_words_image"]
