"""The per-modality objects of each stage cover the same modalities: sources (pipelines), data
(d2v_train.data.modalities), the flow's stages (flows.modalities); a new modality missing from one
of them fails here, naming it."""
from __future__ import annotations

import argparse

import pytest

from schemas import MODALITIES


def test_every_stage_knows_every_modality():
    from d2v_train.data.modalities import MODALITIES as DATA
    from d2v_train.eval.tasks import TASKS
    from flows.modalities import FLOW_MODALITIES
    from pipelines.sources.registry import BY_MODALITY

    assert set(BY_MODALITY) == set(DATA) == set(FLOW_MODALITIES) == set(MODALITIES)
    for name, kind in FLOW_MODALITIES.items():
        assert kind.name == name and kind.eval_task in TASKS


def test_the_build_command_offers_exactly_the_registered_sources():
    from pipelines.cli import add_parser
    from pipelines.sources.registry import SOURCES

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    data = next(a for a in parser._subparsers._group_actions[0].choices["data"]._actions
                if isinstance(a, argparse._SubParsersAction))
    build = next(a for a in data.choices["build"]._actions if isinstance(a, argparse._SubParsersAction))
    assert set(build.choices) == set(SOURCES)


def test_the_registry_makes_each_source_with_its_options_checked(tmp_path):
    from pipelines.sources.registry import make_source
    from pipelines.storage import Location

    speech = make_source("librispeech", [Location(str(tmp_path))], subsets=("dev-clean",), mask_length=5)
    assert speech.modality == "speech" and speech.subsets == ("dev-clean",) and speech.mask_length == 5
    vision = make_source("imagenet", [Location(str(tmp_path))], splits=("train",), image_size=64, patch_size=8)
    assert vision.modality == "vision" and vision.grid == (8, 8)
    with pytest.raises(ValueError, match="--subsets: name at least one subset"):
        make_source("librispeech", [Location(str(tmp_path))], subsets=())
    with pytest.raises(ValueError, match="--image-size 60 is not a multiple of --patch-size 8"):
        make_source("imagenet", [Location(str(tmp_path))], image_size=60, patch_size=8)


def test_the_stream_plan_of_each_modality():
    from d2v_train.data.modalities import MODALITIES as DATA

    speech = DATA["speech"].stream_policy(max_tokens=None, batch_size=None, train=True, tail="drop")
    assert speech.max_tokens == 1_400_000 and speech.crop and speech.shuffle
    scored = DATA["speech"].stream_policy(max_tokens=None, batch_size=4, train=False, tail="pad")
    assert scored.batch_size == 4 and not scored.crop and not scored.shuffle and scored.tail == "pad"
    with pytest.raises(ValueError, match="--batch-size: speech training batches are planned by --max-tokens"):
        DATA["speech"].stream_policy(max_tokens=None, batch_size=4, train=True, tail="drop")
    assert DATA["vision"].stream_policy(max_tokens=None, batch_size=None, train=True, tail="drop").batch_size == 32
    with pytest.raises(ValueError, match="--max-tokens applies to speech"):
        DATA["text"].stream_policy(max_tokens=100, batch_size=None, train=True, tail="drop")
