"""The contracts: dataset.json validation, the frame grid rule, and the Arrow schemas."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas import SCHEMA_VERSION, Dataset, FrameGrid, index_schema, manifest_schema, rejects_schema


def _dataset(**changes) -> dict:
    base = {
        "modality": "speech", "source": "/corpus", "build": {}, "fingerprint": "f",
        "mask": {"kind": "span", "variants": 2, "seed": 0, "params": {"mask_prob": 0.65}},
        "source_items": 5, "samples": 3, "rejected": 2, "rejects_by_reason": {"empty_audio": 2},
        "splits": {"dev": {"samples": 3, "shards": 1, "bytes": 10, "seconds": 1.0}},
        "shards": [{"split": "dev", "name": "shards/dev-000000.tar", "index": "index/dev-000000.parquet",
                    "samples": 3, "bytes": 10, "sha256": "0" * 64}],
    }
    base.update(changes)
    return base


def test_a_valid_dataset_round_trips_through_json():
    dataset = Dataset.model_validate(_dataset())
    assert dataset.schema_version == SCHEMA_VERSION
    assert Dataset.from_json(dataset.to_json()) == dataset


@pytest.mark.parametrize("changes, message", [
    ({"rejected": 1, "rejects_by_reason": {"empty_audio": 1}}, "source_items"),
    ({"rejects_by_reason": {"empty_audio": 1}}, "rejects_by_reason"),
    ({"samples": 4, "source_items": 6}, "shard sample counts"),
    ({"schema_version": SCHEMA_VERSION + 1}, "schema version"),
    ({"colour": "blue"}, "colour"),
    ({"mask": {"kind": "zigzag", "variants": 2, "seed": 0}}, "mask.kind"),
])
def test_inconsistent_or_unknown_content_is_refused_naming_the_problem(changes, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        Dataset.model_validate(_dataset(**changes))


def test_frame_grid_matches_the_wav2vec2_cnn():
    grid = FrameGrid()
    assert grid.hop == 320
    assert grid.frames(399) == 0 and grid.frames(400) == 1
    assert grid.frames(16000) == 49 and grid.frames(320000) == 999
    # One more hop of samples is exactly one more frame: crops at multiples of 320 slice masks exactly.
    for n in (400, 12345, 160000):
        assert grid.frames(n + 320) == grid.frames(n) + 1


def test_every_modality_has_the_three_tables():
    for modality in ("speech", "vision", "text"):
        assert manifest_schema(modality).names[:4] == ["id", "split", "path", "bytes"]
        assert {"key", "sample_offset", "data_offset", "mask_offset", "mask_length"} <= set(index_schema(modality).names)
    assert {"id", "stage", "reason", "detail"} <= set(rejects_schema().names)
    with pytest.raises(ValueError, match="modality"):
        manifest_schema("smell")
