"""The contracts between d2v's stages: Arrow schemas and the dataset manifest model.

Pure: imports nothing else of d2v and no torch, so every stage (Dask workers included) can use it.
"""
from schemas.arrow import (
    MODALITIES,
    index_schema,
    manifest_schema,
    rejects_schema,
)
from schemas.dataset import (
    SCHEMA_VERSION,
    Dataset,
    FrameGrid,
    MaskConfig,
    ShardInfo,
    SplitSummary,
    TokenizerRef,
)

__all__ = [
    "MODALITIES",
    "SCHEMA_VERSION",
    "Dataset",
    "FrameGrid",
    "MaskConfig",
    "ShardInfo",
    "SplitSummary",
    "TokenizerRef",
    "index_schema",
    "manifest_schema",
    "rejects_schema",
]
from schemas.evaluation import EVAL_SCHEMA_VERSION, TASKS, EvalResult  # noqa: E402

__all__ += ["EVAL_SCHEMA_VERSION", "TASKS", "EvalResult"]
