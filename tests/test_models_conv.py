"""conv1d_via_2d: the training path of speech's positional conv and data2vec 2.0's 1-D decoder."""
from pathlib import Path

import pytest
import torch
from torch import nn

from d2v_train.models.conv import conv1d_via_2d


@pytest.mark.parametrize("kernel,groups,padding", [(19, 16, 9), (4, 4, 2), (7, 1, 3), (3, 8, 0)])
def test_it_computes_conv1d_with_the_same_gradients(kernel, groups, padding):
    torch.manual_seed(0)
    conv = nn.Conv1d(32, 32, kernel, padding=padding, groups=groups)
    x = torch.randn(3, 32, 41, requires_grad=True)
    ref = conv(x)
    grads_ref = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum(),
                                    (x, conv.weight, conv.bias))
    out = conv1d_via_2d(conv, x)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                (x, conv.weight, conv.bias))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_speech_positional_conv_agrees_between_training_and_eval_paths():
    from d2v_train.models.config import load_config
    from d2v_train.models.speech import _PositionalConv

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/speech_v2_tiny.yaml").frontend
    torch.manual_seed(0)
    pos = _PositionalConv(64, cfg)
    x = torch.randn(2, 30, 64)
    train_out = pos.train()(x)
    eval_out = pos.eval()(x)
    torch.testing.assert_close(train_out, eval_out, atol=1e-5, rtol=1e-5)
