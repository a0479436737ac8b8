"""Pre-trained encoders out of trainer checkpoints: HF model folders (`d2v export-hf`) and
representations of files (`d2v encode`)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from d2v_train import checkpoint
from d2v_train.config import TrainConfig
from d2v_train.models.objectives import build_model
from pipelines.storage import Location

# modality -> (module of the converter, d2v->HF state function, HF config function, model_type, class,
# HF->d2v state function, HF config -> d2v model config): export-hf here, `d2v import hf` (imports.py)
HF_ADAPTERS = {
    "speech": ("d2v_train.models.hf", "to_hf", "hf_audio_config", "data2vec-audio", "Data2VecAudioModel",
               "from_hf", "config_from_hf_audio"),
    "vision": ("d2v_train.models.hf_vision", "to_hf_vision", "hf_vision_config", "data2vec-vision",
               "Data2VecVisionModel", "from_hf_vision", "config_from_hf_vision"),
    "text": ("d2v_train.models.hf_text", "to_hf_text", "hf_text_config", "data2vec-text", "Data2VecTextModel",
             "from_hf_text", "config_from_hf_text"),
}


def load_model(url: str) -> tuple[TrainConfig, nn.Module, str]:
    """The model of a checkpoint: `url` is one checkpoint folder or a run's checkpoint folder
    (its newest complete checkpoint is used)."""
    folder = checkpoint.resolve(url)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint at {url}")
    fs, root = Location(folder).filesystem()
    config_path = f"{root.rstrip('/')}/{checkpoint.CONFIG_FILE}"
    if not fs.exists(config_path):
        raise FileNotFoundError(f"{folder} has no {checkpoint.CONFIG_FILE}: not written by d2v's trainer")
    cfg = TrainConfig.model_validate_json(fs.cat_file(config_path))
    model = build_model(cfg.model)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # one process reading a checkpoint is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        checkpoint.load(state, folder)
    model.load_state_dict(state["model"])
    return cfg, model.eval(), folder


def export_hf(url: str, out_dir: str, *, remote_code: bool = False) -> Path:
    """config.json + model.safetensors that `from_pretrained` of the matching HF class loads; for an
    encoder HF has no class for (data2vec 2.0), or with `remote_code`, a folder with its own
    modeling file for `trust_remote_code=True` (export_remote.py)."""
    from importlib import import_module

    from safetensors.torch import save_file

    cfg, model, folder = load_model(url)
    module_name, to_hf_name, config_name, model_type, architecture, *_ = HF_ADAPTERS[cfg.model.modality]
    module = import_module(module_name)
    try:
        if remote_code:
            raise ValueError("asked for")
        hf_config = {**getattr(module, config_name)(cfg.model), "model_type": model_type,
                     "architectures": [architecture]}
    except ValueError as why:  # an architecture HF's classes cannot express
        from d2v_train.export_remote import export_remote_code

        if not remote_code:
            print(f"HF's {architecture} cannot hold this encoder ({why}): writing it with its own modeling file; "
                  "load it with AutoModel.from_pretrained(DIR, trust_remote_code=True)")
        return export_remote_code(cfg, model, Path(out_dir), folder)
    hf_state = getattr(module, to_hf_name)(model.student.state_dict())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"))
    (out / "d2v_checkpoint.txt").write_text(f"{folder}\n")
    return out


@torch.no_grad()
def encode(url: str, inputs: list[str], *, layer: int | None = None) -> list[np.ndarray]:
    """(T, D) representations per input file: the final output by default, or block `layer`'s
    output (1..layers, HF's hidden_states[layer]); inputs normalised as in pre-training."""
    cfg, model, _ = load_model(url)
    layers = cfg.model.encoder.layers
    if layer is not None and not 1 <= layer <= layers:
        raise ValueError(f"--layer {layer}: the encoder has blocks 1..{layers}")
    outputs = []
    for path in inputs:
        try:
            batch = _batch(cfg, path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file of another kind or damaged: say which one
            raise ValueError(f"{path}: cannot be read as {cfg.model.modality} input "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
        x_BTD, padding_BT = model.student.embed(batch)
        result = model.student(x_BTD, padding_BT, return_from=None if layer is None else layer - 1, target="block")
        hidden = result.x_BTD if layer is None else result.layers[0]
        outputs.append(hidden[0].float().numpy())
    return outputs


def _batch(cfg: TrainConfig, path: str) -> dict:
    from d2v_train.data.modalities import MODALITIES

    fs, file_path = Location(path).filesystem()
    return MODALITIES[cfg.model.modality].single_input(fs.cat_file(file_path), path, cfg.model, cfg.data.urls[0])
