"""`d2v serve`: the deployments `pretrain/speech`, `pretrain/vision` and `pretrain/text`, executed
by this process (`prefect deployment run pretrain/speech --param source=... --param output=...`)."""
from __future__ import annotations

from flows.pretrain import pretrain

MODALITIES = ("speech", "vision", "text")


def deployments(modalities=MODALITIES):
    """One deployment per modality; its modality is a default the caller can still see and change."""
    return [pretrain.to_deployment(name=m, parameters={"modality": m}, tags=["d2v", m],
                                   description=f"data2vec {m} pre-training: build shards, pre-train, evaluate, report")
            for m in modalities]


def serve(modalities=MODALITIES, limit: int | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted (they are paused then)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(modalities), limit=limit)
