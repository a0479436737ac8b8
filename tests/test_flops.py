"""The MFU estimate's FLOPs formulas against torch's FlopCounterMode on the real models' training
step (student forward and backward, teacher forward), for every modality and both variants."""
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

from d2v_train.flops import peak_flops, step_flops
from d2v_train.models import load_config
from d2v_train.models.objectives import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv_backward(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Each gradient asked for (input, weight) costs one forward: torch 2.13's own formula ignores
    `groups` (a grouped conv's backward counted as a dense one's)."""
    output_mask = args[-1]
    return sum(output_mask[:2]) * conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=False)


# what FlopCounterMode counts wrong or not at all on CPU
CORRECTIONS = {
    torch.ops.aten.convolution_backward: _conv_backward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def _batch(modality: str, model) -> dict:
    g = torch.Generator().manual_seed(0)
    if modality == "speech":
        batch = {"source": torch.randn(3, 16000, generator=g), "padding_mask": torch.zeros(3, 16000, dtype=torch.bool)}
    elif modality == "vision":
        size = model.cfg.frontend.image_size
        batch = {"image": torch.randn(2, 3, size, size, generator=g)}
    else:
        tokens = torch.randint(5, 100, (3, 24), generator=g)
        batch = {"tokens": tokens, "target_tokens": tokens, "padding_mask": torch.zeros(3, 24, dtype=torch.bool)}
    batch["keys"] = [f"k{i}" for i in range(len(next(iter(batch.values()))))]
    if model.cfg.variant == "data2vec":
        _, padding_BT = model.student.embed(batch)
        B, T = padding_BT.shape
        T -= 1 if modality == "vision" else 0  # the stored mask has no CLS
        mask = torch.rand(B, T, generator=g) < 0.5
        batch["target_mask" if modality == "text" else "mask"] = mask
    return batch


@pytest.mark.parametrize("preset", ["speech_tiny", "vision_tiny", "text_tiny", "speech_v2_tiny", "vision_v2_tiny",
                                    "text_v2_tiny"])
def test_the_step_formula_matches_torchs_flop_counter(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    teacher = model.make_teacher()
    batch = _batch(cfg.modality, model)
    with FlopCounterMode(display=False, custom_mapping=CORRECTIONS) as counter:
        model(batch, teacher).loss_sum.backward()
    measured = counter.get_total_flops()
    estimated = step_flops(cfg, batch).train
    # v2's kept positions are estimated from mask_prob; the drawn masks vary around it
    assert estimated == pytest.approx(measured, rel=0.05 if cfg.variant == "data2vec" else 0.1), \
        (estimated, measured)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("cpu") is None and peak_flops(None) is None
