"""Encoders HF has no class for (data2vec 2.0: ALiBi speech, sin-cos vision positions, ...) out of
d2v: `d2v export-hf` writes them as a folder with its own modeling file, which transformers loads
with `trust_remote_code=True`, so the encoder is used without d2v installed.

`modeling_d2v.py` is d2v's encoder source (d2v_train/models: config, the Transformer, the three
front-ends) joined into one module, with a small `PreTrainedModel` around it; it needs torch,
pydantic and pyyaml beside transformers. The weights are the student encoder's, in
`model.safetensors` under `encoder.`; `config.json` holds d2v's model config.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

MODELING_FILE = "modeling_d2v.py"
# d2v_train/models modules the encoders need, in import order
_MODULES = ("config", "conv", "positions", "transformer", "multimask", "encoder", "speech", "vision", "text")
_OWN_IMPORTS = ("d2v_train", "pipelines", "__future__")

_WRAPPER = '''
# ---- the transformers classes
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

_BUILDERS = {"speech": lambda c: build_speech_encoder(c.frontend, c.encoder),
             "vision": lambda c: build_vision_encoder(c.frontend, c.encoder),
             "text": lambda c: build_text_encoder(c.frontend, c.encoder)}


class D2VConfig(PretrainedConfig):
    model_type = "d2v"

    def __init__(self, d2v_model: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.d2v_model = d2v_model or {}


class D2VEncoder(PreTrainedModel):
    """A d2v encoder. Inputs, as d2v's loader gives them: speech `input_values` (B, L) waveforms
    at 16 kHz normalised per utterance (zero mean, unit variance); vision `pixel_values`
    (B, 3, H, W) normalised with ImageNet's mean and std; text `input_ids` (B, T) of the
    pre-training tokenizer with <s> ... </s>. `attention_mask`: 1 = real, 0 = padding
    (speech: per sample; text: per token). Returns last_hidden_state (B, T, D) and, with
    output_hidden_states, every block's output."""

    config_class = D2VConfig
    base_model_prefix = "d2v"
    main_input_name = "input_values"

    def __init__(self, config: D2VConfig):
        super().__init__(config)
        self.model_cfg = ModelConfig.model_validate(config.d2v_model)
        self.encoder = _BUILDERS[self.model_cfg.modality](self.model_cfg)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    def forward(self, input_values=None, pixel_values=None, input_ids=None, attention_mask=None,
                output_hidden_states: bool = False, **_):
        modality = self.model_cfg.modality
        if modality == "speech":
            batch = {"source": input_values, "padding_mask": _padding(attention_mask, input_values)}
        elif modality == "vision":
            patches = (self.model_cfg.frontend.image_size // self.model_cfg.frontend.patch_size) ** 2
            batch = {"image": pixel_values, "mask": torch.zeros(pixel_values.shape[0], patches, dtype=torch.bool,
                                                                device=pixel_values.device)}
        else:
            padding = _padding(attention_mask, input_ids)
            batch = {"tokens": input_ids, "target_tokens": input_ids, "padding_mask": padding,
                     "mask": torch.zeros_like(padding), "target_mask": torch.zeros_like(padding)}
        x_BTD, padding_BT = self.encoder.embed(batch)
        layers = self.model_cfg.encoder.layers
        result = self.encoder(x_BTD, padding_BT, return_from=0 if output_hidden_states else None, target="block")
        hidden = (x_BTD, *result.layers) if output_hidden_states else None
        if output_hidden_states and len(result.layers) != layers:
            raise RuntimeError("the encoder returned an unexpected number of blocks")
        return BaseModelOutput(last_hidden_state=result.x_BTD, hidden_states=hidden)


def _padding(attention_mask, like):
    if attention_mask is None:
        return torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device)
    return attention_mask == 0
'''


def modeling_source() -> str:
    """d2v's encoder modules joined into one file (their imports of each other left out), and the
    transformers classes around them."""
    folder = Path(__file__).resolve().parent / "models"
    parts = ['"""A d2v encoder for transformers (trust_remote_code): written by `d2v export-hf` from d2v\'s\n'
             'encoder source. Needs torch, pydantic, pyyaml and transformers."""', "from __future__ import annotations"]
    for name in _MODULES:
        text = (folder / f"{name}.py").read_text()
        lines = text.splitlines()
        drop: set[int] = set()
        for node in ast.parse(text).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _OWN_IMPORTS:
                drop.update(range(node.lineno - 1, node.end_lineno))
        parts.append(f"# ---- d2v_train/models/{name}.py\n" + "\n".join(l for i, l in enumerate(lines) if i not in drop))
    parts.append(_WRAPPER)
    return "\n\n".join(parts) + "\n"


def export_remote_code(cfg, model, out: Path, folder: str) -> Path:
    """`out` with config.json (auto_map to modeling_d2v), model.safetensors and the modeling file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "d2v", "architectures": ["D2VEncoder"],
              "auto_map": {"AutoConfig": "modeling_d2v.D2VConfig", "AutoModel": "modeling_d2v.D2VEncoder"},
              "d2v_model": cfg.model.model_dump(mode="json")}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / MODELING_FILE).write_text(modeling_source())
    state = {f"encoder.{k}": v.detach().to(torch.float32).contiguous() for k, v in model.student.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "d2v_checkpoint.txt").write_text(f"{folder}\n")
    return out
