"""data2vec 2.0: multi-mask bookkeeping, positions, decoder and the objective, against hand computations."""

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from d2v_train.models import data2vec2 as objective
from d2v_train.models import load_config
from d2v_train.models.config import DecoderConfig, ModelConfig, MultiMaskConfig
from d2v_train.models.data2vec import build_encoder
from d2v_train.models.decoder import ConvDecoder
from d2v_train.models.multimask import (
    clone,
    draw_clone_masks,
    gather_kept,
    keep_index,
    restore,
)
from d2v_train.models.objectives import build_model
from d2v_train.models.positions import alibi_bias, alibi_slopes, sincos_2d
from d2v_train.models.targets import build_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPEECH = load_config(CONFIGS / "speech_v2_tiny.yaml")
VISION = load_config(CONFIGS / "vision_v2_tiny.yaml")
TEXT = load_config(CONFIGS / "text_v2_tiny.yaml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def speech_batch(lengths=(16000, 12000, 16000), seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    padding = torch.arange(L)[None] >= torch.tensor(lengths)[:, None]
    source = torch.randn(len(lengths), L, generator=g).masked_fill(padding, 0.0)
    return {"source": source, "padding_mask": padding, "keys": [f"s{i}" for i in range(len(lengths))]}


def text_batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, TEXT.frontend.vocab_size, (3, 24), generator=g)
    tokens[:, 0], tokens[:, -1] = 0, 2
    tokens[1, 15:], tokens[1, 14] = 1, 2  # a shorter row, padded
    return {"tokens": tokens, "target_tokens": tokens, "padding_mask": tokens.eq(1), "keys": ["a", "b", "c"]}


def vision_batch():
    g = torch.Generator().manual_seed(2)
    return {"image": torch.randn(2, 3, 64, 64, generator=g), "keys": ["x", "y"]}


# -- bookkeeping ------------------------------------------------------------------------------------

def test_clone_puts_each_samples_copies_next_to_each_other():
    x = torch.arange(6.0).view(3, 2)
    assert clone(x, 2).tolist() == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]]
    assert clone(x, 1) is x


def test_keep_index_packs_kept_positions_in_order_and_restore_inverts_it():
    drop = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    kept = keep_index(drop)
    assert kept.index_NK.shape == (3, 5)
    assert kept.index_NK[0, :3].tolist() == [0, 2, 3] and kept.index_NK[1, :1].tolist() == [2]
    assert kept.padding_NK.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    x = torch.randn(3, 5, 4, requires_grad=True)
    x_NKD = gather_kept(x, kept)
    fill = torch.full((3, 5, 4), -7.0)
    back = restore(x_NKD, kept, fill)
    keep = ~drop
    assert torch.equal(back[keep], x[keep].detach()) and bool((back[drop] == -7.0).all())
    back.sum().backward()  # gradients reach exactly the kept inputs
    assert torch.equal(x.grad[..., 0], keep.float())


def test_1d_clone_masks_are_independent_exact_and_never_touch_padding_or_ends():
    cfg = MultiMaskConfig(kind="block_1d", mask_prob=0.5, block_size=5, mask_prob_adjust=0.05)
    rng = np.random.default_rng(0)
    mask = draw_clone_masks(cfg, [100, 60], 110, 4, rng)
    assert mask.shape == (8, 110) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [50] * 4 + [30] * 4  # exactly int(T * p) per clone
    assert not mask[:4, 100:].any() and not mask[4:, 60:].any()
    assert len({tuple(row.tolist()) for row in mask[:4]}) == 4  # clones differ
    text = MultiMaskConfig(kind="block_1d", mask_prob=0.48, block_size=1, mask_prob_adjust=0.0)
    tmask = draw_clone_masks(text, [24, 15], 24, 3, rng, skip_ends=True)
    assert not tmask[:, 0].any() and not tmask[:3, 23].any() and not tmask[3:, 14:].any()
    assert tmask.sum(1).tolist() == [int(22 * 0.48)] * 3 + [int(13 * 0.48)] * 3


def test_2d_clone_masks_keep_a_fifth_of_the_grid():
    cfg = VISION.data2vec2.mask
    mask = draw_clone_masks(cfg, [64, 64], 64, 8, np.random.default_rng(0), grid=(8, 8))
    assert mask.shape == (16, 64) and (mask.sum(1) == 64 - int(64 * 0.2)).all()
    with pytest.raises(ValueError, match="grid"):
        draw_clone_masks(cfg, [64], 64, 2, np.random.default_rng(0), grid=(4, 4))


# -- positions ----------------------------------------------------------------------------------------

def test_alibi_slopes_and_bias():
    assert alibi_slopes(8).tolist() == pytest.approx([2.0 ** -i for i in range(1, 9)])
    assert alibi_slopes(4).tolist() == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625])
    assert alibi_slopes(6).tolist() == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])
    scale = torch.tensor([1.0, 2.0])
    full = alibi_bias(torch.arange(6)[None], scale)
    assert full.shape == (1, 2, 6, 6)
    assert full[0, 0, 1, 4].item() == pytest.approx(-3 * 2.0 ** -4)
    assert full[0, 1, 4, 1].item() == pytest.approx(-3 * 2 * 2.0 ** -8)
    assert torch.equal(full, full.transpose(2, 3)) and not full.diagonal(dim1=2, dim2=3).any()
    # on kept positions it is the full sequence's bias between those positions
    kept = torch.tensor([[0, 2, 5]])
    assert torch.equal(alibi_bias(kept, scale)[0], full[0][:, kept[0]][:, :, kept[0]])


def test_sincos_2d():
    emb = sincos_2d((3, 4), 16)
    assert emb.shape == (12, 16) and float(emb.abs().max()) <= 1.0
    assert len({tuple(r) for r in emb.tolist()}) == 12  # every patch its own code
    # the first half codes the row, the second the column: same row -> same first half
    assert torch.equal(emb[0, :8], emb[3, :8]) and not torch.equal(emb[0, 8:], emb[3, 8:])
    assert emb[0, :4].tolist() == [0.0] * 4 and emb[0, 4:8].tolist() == [1.0] * 4  # sin 0, cos 0
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d((2, 2), 10)


# -- decoder -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [None, (4, 6)])
def test_decoder_keeps_every_position_and_sees_only_its_neighbourhood(grid):
    cfg = DecoderConfig(dim=32, layers=2, kernel=3, groups=4)
    dec = ConvDecoder(cfg, 16, grid).eval()
    x = torch.randn(2, 24, 16)
    y = dec(x)
    assert y.shape == (2, 24, 16)
    x2 = x.clone()
    x2[0, 0] += 1.0  # two 3-wide layers reach 2 positions (grid: 2 rows/columns) away, no further
    changed = (dec(x2) - y).abs().sum(-1)[0] > 0
    if grid is None:
        assert changed.nonzero().flatten().tolist() == [0, 1, 2]
    else:
        rows, cols = torch.arange(24) // 6, torch.arange(24) % 6
        assert torch.equal(changed, (rows <= 2) & (cols <= 2))
    assert not (dec(x2) - y)[1].any()  # samples independent


# -- the objective --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, batch", [(SPEECH, speech_batch), (TEXT, text_batch), (VISION, vision_batch)],
                         ids=["speech", "text", "vision"])
def test_student_encodes_only_the_kept_positions(cfg, batch, monkeypatch):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    teacher = model.make_teacher()
    drawn = []
    real = model.draw_masks
    monkeypatch.setattr(model, "draw_masks", lambda *a: drawn.append(real(*a)) or drawn[-1])
    shapes = []
    model.student.transformer.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    teacher.module.transformer.register_forward_pre_hook(lambda m, args: shapes.append(("t", *args[0].shape)))
    b = batch()
    out = model(b, teacher)
    _, padding = model.student.embed(model.student.frontend.unmasked(b))
    B, T = padding.shape
    M, E = cfg.data2vec2.clones, model.student.frontend.extra_tokens
    (mask_NS,) = drawn
    kept_N = (~mask_NS & ~clone(padding[:, E:], M)).sum(1) + E
    assert shapes[0] == ("t", B, T, cfg.encoder.dim)  # the teacher: each sample once, in full
    assert shapes[1] == (B * M, int(kept_N.max()), cfg.encoder.dim)  # the student: kept positions only
    assert int(kept_N.min()) < T // 2 + E + 1  # and they are few
    assert out.count.item() == mask_NS.sum().item()  # one prediction per masked position
    out.loss_sum.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("decoder.") for n in grads) and any(n.startswith("student.transformer") for n in grads)
    mask_emb = getattr(model.student.frontend, "mask_emb", None)  # text has none: <mask> is a token
    assert mask_emb is None or not mask_emb.requires_grad  # masked positions are dropped, never embedded


def test_masked_content_cannot_reach_the_student():
    torch.manual_seed(0)
    enc = build_encoder(SPEECH).eval()
    x = torch.randn(2, 40, 64)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, 10:20] = True
    out, kept = enc.forward_kept(x, padding, mask)
    assert out.x_BTD.shape == (2, 30, 64) and kept.index_NK[0].tolist() == [*range(10), *range(20, 40)]
    x2 = x.clone()
    x2[:, 10:20] = torch.randn(2, 10, 64) * 100  # anything at the masked positions
    out2, _ = enc.forward_kept(x2, padding, mask)
    assert torch.equal(out.x_BTD, out2.x_BTD)
    x3 = x.clone()
    x3[:, 5] += 1.0  # a kept position does matter
    assert not torch.equal(enc.forward_kept(x3, padding, mask)[0].x_BTD, out.x_BTD)


def test_each_clone_regresses_its_own_samples_targets_at_its_masked_positions(monkeypatch):
    """Batch targets repeated M times line up with the clones: each captured target row is the
    teacher's target for that clone's sample, computed on the sample alone."""
    torch.manual_seed(0)
    model = build_model(SPEECH).train()
    teacher = model.make_teacher()
    seen, drawn = {}, []
    real_draw, real_loss = model.draw_masks, objective.regression_loss
    monkeypatch.setattr(model, "draw_masks", lambda *a: drawn.append(real_draw(*a)) or drawn[-1])

    def capture(pred, target, cfg):
        seen.setdefault("pairs", []).append((pred.detach(), target))
        return real_loss(pred, target, cfg)

    monkeypatch.setattr(objective, "regression_loss", capture)
    # equal lengths: the positional conv (as fairseq's and HF's) lets padding reach the last real
    # frames from its second layer on, so a padded row's targets differ from the sample's alone
    batch = speech_batch((16000, 16000, 16000))
    model(batch, teacher)
    (mask_NS,) = drawn
    _, y_ND = seen["pairs"][0]
    M, rows = SPEECH.data2vec2.clones, []
    for b in range(3):  # the teacher on sample b alone
        x, pad = model.student.embed({"source": batch["source"][b:b + 1]})
        layers = teacher(x.detach(), pad, return_from=SPEECH.encoder.layers - SPEECH.objective.top_k,
                         target=SPEECH.objective.target).layers
        y_TD = build_targets(layers, pad, SPEECH.objective)[0]
        for m in range(M):
            rows.append(y_TD[mask_NS[b * M + m, :y_TD.shape[0]]])
    torch.testing.assert_close(y_ND, torch.cat(rows), rtol=1e-4, atol=1e-4)


def test_images_add_the_cls_loss():
    torch.manual_seed(0)
    model = build_model(VISION).train()
    teacher = model.make_teacher()
    batch = vision_batch()
    torch.manual_seed(5)
    with_cls = model(batch, teacher)
    no_cls = build_model(VISION.model_copy(update={"data2vec2": VISION.data2vec2.model_copy(update={"cls_loss": 0.0})}))
    no_cls.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    without = no_cls.train()(batch, teacher)
    assert with_cls.count == without.count and with_cls.loss_sum > without.loss_sum


def test_the_v2_encoder_runs_unmasked_for_evaluation():
    torch.manual_seed(0)
    for cfg, batch in [(SPEECH, speech_batch()), (VISION, vision_batch()), (TEXT, text_batch())]:
        enc = build_encoder(cfg).eval()
        out = enc(batch)
        assert out.x_BTD.shape[0] == len(batch["keys"]) and torch.isfinite(out.x_BTD).all()


# -- config ---------------------------------------------------------------------------------------------

def test_variant_data2vec2_fills_in_the_modalitys_release_settings():
    cfg = ModelConfig.model_validate({"modality": "text", "variant": "data2vec2", "frontend": {"vocab_size": 100},
                                      "data2vec2": {"clones": 2}})
    assert cfg.data2vec2.clones == 2 and cfg.data2vec2.decoder.kernel == 9 and cfg.data2vec2.mask.mask_prob == 0.48
    vision = {"modality": "vision", "variant": "data2vec2", "encoder": {"pre_ln": True, "final_ln": True},
              "frontend": {}}
    with pytest.raises(ValidationError, match="sincos"):
        ModelConfig.model_validate(vision)
    cfg = ModelConfig.model_validate({**vision, "frontend": {"kind": "vision", "positions": "sincos"}})
    assert cfg.data2vec2.clones == 16 and cfg.data2vec2.cls_loss == 0.01
    with pytest.raises(ValidationError, match="variant is data2vec"):
        ModelConfig.model_validate({"data2vec2": {"clones": 2}})
    with pytest.raises(ValidationError, match="only images"):
        ModelConfig.model_validate({"variant": "data2vec2", "data2vec2": {"cls_loss": 0.1}})
    with pytest.raises(ValidationError, match="groups"):
        ModelConfig.model_validate({"variant": "data2vec2", "data2vec2": {"decoder": {"dim": 30, "groups": 16}}})


def test_hf_export_refuses_what_hf_data2vec_cannot_hold():
    from d2v_train.models.hf import hf_audio_config
    from d2v_train.models.hf_vision import hf_vision_config

    with pytest.raises(ValueError, match="ALiBi"):
        hf_audio_config(SPEECH)
    with pytest.raises(ValueError, match="sin-cos"):
        hf_vision_config(VISION)


def test_sincos_positions_need_a_width_divisible_by_4():
    vision = {"modality": "vision", "encoder": {"dim": 66, "heads": 6, "pre_ln": True, "final_ln": True},
              "frontend": {"kind": "vision", "positions": "sincos"}}
    with pytest.raises(ValidationError, match="encoder.dim: the 2-D sin-cos positions need a multiple of 4"):
        ModelConfig.model_validate(vision)
