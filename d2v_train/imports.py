"""Released weights in: an HF data2vec model folder (`d2v import hf`) or a fairseq data2vec audio
checkpoint (`d2v import fairseq`) becomes a d2v checkpoint folder, so that every command that
takes a checkpoint (`d2v eval`, `d2v encode`, `d2v export-hf`, the trainer's `init.from`) takes it.

The checkpoint holds the model (the encoder from the file; the regression head, which released
encoders do not ship, freshly initialised with seed 0) and a train config whose model section
describes the architecture; `data.url` is the checkpoint folder itself, where a text model's
tokenizer is copied. Files are read as tensors and plain containers only: safetensors, or
`torch.load(weights_only=True)`; nothing else is unpickled.
"""
from __future__ import annotations

import io
import json
import re
from importlib import import_module

import torch

from d2v_train import checkpoint
from d2v_train.config import DataConfig, LoopConfig, TrainConfig
from d2v_train.export import HF_ADAPTERS
from d2v_train.models.config import ModelConfig
from d2v_train.models.objectives import build_model
from pipelines.storage import Location, join

IMPORT_FILE = "import.json"  # beside the checkpoint: where the weights came from
# HF model_type -> (adapter module, state function, config function), from export-hf's table
_HF = {model_type: (module, state, config) for module, _, _, model_type, _, state, config in HF_ADAPTERS.values()}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
# the wav2vec 2.0 / data2vec audio CNN: strides are not in the weights, kernels are
_STANDARD_CONV = {(10, 3, 3, 3, 3, 2, 2): (5, 2, 2, 2, 2, 2, 2)}


def load_weights_file(data: bytes, where: str) -> dict:
    """A `.pt`/`.bin` file's contents: tensors and plain containers only."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler's refusals come in several types
        raise ValueError(f"{where} holds more than tensors and plain containers (e.g. fairseq's pickled "
                         f"cfg object), which d2v does not unpickle: {str(exc).splitlines()[0]}; save its "
                         "weights alone, e.g. torch.save({'model': checkpoint['model']}, 'weights.pt')") from None


def _hf_weights(fs, root: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    index = join(root, "model.safetensors.index.json")
    if fs.exists(join(root, "model.safetensors")):
        return load_safetensors(fs.cat_file(join(root, "model.safetensors")))
    if fs.exists(index):
        files = sorted(set(json.loads(fs.cat_file(index))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_safetensors(fs.cat_file(join(root, name))))
        return state
    if fs.exists(join(root, "pytorch_model.bin")):
        return load_weights_file(fs.cat_file(join(root, "pytorch_model.bin")), "pytorch_model.bin")
    raise FileNotFoundError(f"{root} has no model.safetensors (or its index) and no pytorch_model.bin")


def import_hf(src: str, out: str) -> str:
    """An HF `Data2Vec{Audio,Vision,Text}Model` (or `...For*`) folder -> a d2v checkpoint; its folder."""
    fs, root = Location(src).filesystem()
    config_path = join(root, "config.json")
    if not fs.exists(config_path):
        raise FileNotFoundError(f"{src} has no config.json: not an HF model folder")
    hf = json.loads(fs.cat_file(config_path))
    kind = hf.get("model_type")
    if kind not in _HF:
        raise ValueError(f"{src}: model_type {kind!r} is not one d2v imports ({', '.join(_HF)})")
    module_name, state_name, config_name = _HF[kind]
    module = import_module(module_name)
    model_cfg = getattr(module, config_name)(hf)
    state = getattr(module, state_name)(_hf_weights(fs, root))
    tokenizer = {name: fs.cat_file(join(root, name)) for name in _TOKENIZER_FILES if fs.exists(join(root, name))}
    return write_checkpoint(model_cfg, state, out, source={"kind": "hf", "from": Location(src).public_url(),
                                                           "model_type": kind}, tokenizer=tokenizer)


def import_fairseq(path: str, out: str, *, heads: int | None = None) -> str:
    """A fairseq data2vec audio checkpoint (its `model` state dict, read with weights_only) -> a d2v
    checkpoint. The architecture is read from the weights' shapes; the attention heads from the
    file's cfg where it is a plain dict, else `heads`, else dim / 64 (Base: 12, Large: 16)."""
    from d2v_train.models.hf import config_from_hf_audio, from_fairseq

    fs, file_path = Location(path).filesystem()
    found = load_weights_file(fs.cat_file(file_path), path)
    state = found.get("model", found) if isinstance(found, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict, or a dict whose 'model' is one")
    saved_heads = _cfg_value(found, "encoder_attention_heads")
    hf = _audio_config_from_shapes(state, heads or saved_heads, path)
    model_cfg = config_from_hf_audio(hf)
    return write_checkpoint(model_cfg, from_fairseq(state), out,
                            source={"kind": "fairseq", "from": Location(path).public_url()})


def _cfg_value(found, name: str):
    cfg = found.get("cfg") if isinstance(found, dict) else None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model.get(name) if isinstance(model, dict) else None


def _audio_config_from_shapes(state: dict, heads: int | None, where: str) -> dict:
    """An HF Data2VecAudioConfig's fields from a fairseq state dict's shapes."""
    def count(pattern: str) -> int:
        return len({m.group(1) for k in state if (m := re.match(pattern, k))})

    conv = [state[f"feature_extractor.conv_layers.{i}.0.weight"].shape
            for i in range(count(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight"))]
    kernels = tuple(int(s[2]) for s in conv)
    if kernels not in _STANDARD_CONV:
        raise ValueError(f"{where}: CNN kernels {kernels} are not wav2vec 2.0's; their strides cannot be "
                         "read from the weights")
    try:
        dim = int(state["post_extract_proj.weight"].shape[0])
        ffn = int(state["encoder.layers.0.fc1.weight"].shape[0])
        pos = [state[f"encoder.pos_conv.{i}.0.weight"].shape
               for i in range(count(r"encoder\.pos_conv\.(\d+)\.0\.weight"))]
    except KeyError as exc:
        raise ValueError(f"{where}: not a data2vec audio state dict (no {exc.args[0]})") from None
    if not pos:
        raise ValueError(f"{where}: not a data2vec audio state dict (no encoder.pos_conv layers)")
    heads = heads or dim // 64
    if dim % heads:
        raise ValueError(f"{where}: {heads} attention heads do not divide the width {dim}; give --heads")
    return {"hidden_size": dim, "num_hidden_layers": count(r"encoder\.layers\.(\d+)\."), "num_attention_heads": heads,
            "intermediate_size": ffn, "hidden_dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
            "layerdrop": 0.0, "layer_norm_eps": 1e-5, "feat_proj_dropout": 0.0,
            "conv_dim": [int(s[0]) for s in conv], "conv_kernel": list(kernels),
            "conv_stride": list(_STANDARD_CONV[kernels]),
            "conv_bias": "feature_extractor.conv_layers.0.0.bias" in state,
            # the positional convolution: (dim, dim / groups, kernel) per layer
            "num_conv_pos_embeddings": len(pos), "conv_pos_kernel_size": int(pos[0][2]),
            "num_conv_pos_embedding_groups": dim // int(pos[0][1])}


def write_checkpoint(model_cfg: ModelConfig, encoder_state: dict, out: str, *, source: dict,
                     tokenizer: dict[str, bytes] | None = None) -> str:
    """A d2v checkpoint at `out` (step 0) whose student encoder holds `encoder_state`."""
    torch.manual_seed(0)  # the parts released encoders do not ship (the regression head) are seeded
    model = build_model(model_cfg)
    missing, unexpected = model.student.load_state_dict(encoder_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the architecture read from the file: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    batch = {"max_tokens": 1_400_000} if model_cfg.modality == "speech" else {"batch_size": 32}
    cfg = TrainConfig(model=model_cfg, data=DataConfig(url=out, **batch), train=LoopConfig(max_steps=1), run_dir=out)
    fs, root = Location(out).filesystem()
    fs.makedirs(root, exist_ok=True)
    for name, data in (tokenizer or {}).items():
        fs.pipe_file(join(root, "tokenizer", name), data)
    folder = checkpoint.save({"model": model.state_dict()}, out, 0, 1, config_json=cfg.model_dump_json())
    fs.pipe_file(join(root, IMPORT_FILE), (json.dumps(source, indent=2, sort_keys=True) + "\n").encode())
    return folder
