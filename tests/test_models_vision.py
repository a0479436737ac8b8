"""Vision encoder (data2vec v1 = BEiT): presets, exact parity with HF Data2VecVisionModel, state-dict
adapters, the objective against a hand computation, a short training run."""

import math
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from d2v_train.models import Data2Vec, build_encoder, ema_tau, load_config, save_config
from d2v_train.models.hf_vision import config_from_hf_vision, from_hf_vision, hf_vision_config, to_hf_vision
from d2v_train.models.loss import masked_std
from d2v_train.models.vision import relative_position_index
from pipelines.masking import compute_block_masks

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = load_config(CONFIGS / "vision_tiny.yaml")
P = TINY.frontend.grid[0] * TINY.frontend.grid[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(cfg=TINY, seed=0, **hf_overrides):
    """Random-weight HF model (zero-initialised tables and tokens perturbed, so that they matter)
    and a d2v encoder holding its weights through the adapter."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Data2VecVisionConfig(**{**hf_vision_config(cfg), **hf_overrides})
    hf = transformers.Data2VecVisionModel(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    enc = build_encoder(config_from_hf_vision(hf_cfg.to_dict()))
    enc.load_state_dict(from_hf_vision(hf.state_dict()), strict=True)
    return hf, enc


def _images(B=3, seed=1, size=64):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _masks(B=3, seed=2):
    return torch.from_numpy(compute_block_masks(B, np.random.default_rng(seed), grid=TINY.frontend.grid,
                                                num_masking_patches=39))


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vision_tiny", "vision_base", "vision_large"])
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.objective.loss_scale == 1.0 / cfg.encoder.dim  # the reference's mean over channels


def test_config_errors_name_the_field():
    with pytest.raises(pydantic.ValidationError, match="patch_size"):
        load_config(CONFIGS / "vision_tiny.yaml", {"frontend": {"patch_size": 7}})
    with pytest.raises(pydantic.ValidationError, match="frontend.speech.image_size"):
        load_config(CONFIGS / "vision_tiny.yaml", {"frontend": {"kind": "speech"}})
    with pytest.raises(pydantic.ValidationError, match="frontend.kind"):
        load_config(CONFIGS / "vision_tiny.yaml", {"modality": "speech"})
    with pytest.raises(ValueError, match="pre_ln"):
        build_encoder(load_config(CONFIGS / "vision_tiny.yaml", {"encoder": {"pre_ln": False}}))


def test_parameter_counts_match_hf():
    counts = {}
    for name in ("vision_base", "vision_large"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        with torch.device("meta"):
            ours = build_encoder(cfg)
            hf = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(**hf_vision_config(cfg)))
        counts[name] = sum(p.numel() for p in ours.parameters())
        assert counts[name] == sum(p.numel() for p in hf.parameters()), name
    assert counts["vision_base"] == 85_666_128


# -- HF parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mean_pooling", [False, True])
def test_hidden_states_match_hf_with_and_without_mask(mean_pooling):
    """``use_mean_pooling`` False: HF's ``layernorm`` is our final norm; True: no final norm."""
    hf, enc = _pair(use_mean_pooling=mean_pooling)
    hf.eval(), enc.eval()
    assert (enc.transformer.final_norm is None) == mean_pooling
    x, mask = _images(), _masks()
    for bool_masked_pos in (None, mask):
        with torch.no_grad():
            ref = hf(x, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
            x_BTD, pad_BT = enc.embed({"image": x})
            mask_BT = None if bool_masked_pos is None else enc.frontend.target_mask({"mask": bool_masked_pos})
            out = enc(x_BTD, pad_BT, mask_BT, return_from=0, target="block")
        assert (ref.last_hidden_state - out.x_BTD).abs().max() <= 1e-5
        for a, b in zip(ref.hidden_states[1:], out.layers, strict=True):
            assert (a - b).abs().max() <= 1e-5
    assert not torch.allclose(ref.last_hidden_state, hf(x).last_hidden_state)  # the mask mattered


def test_masked_training_gradients_match_hf():
    """Train mode without dropout or drop path, fp64: mask token, q/v biases, relative position
    table and layer scales get HF's gradients."""
    hf, enc = _pair(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    hf.double().train(), enc.double().train()
    x, mask = _images().double(), _masks()
    w = torch.randn(3, P + 1, TINY.encoder.dim, dtype=torch.float64)
    x_BTD, pad_BT = enc.embed({"image": x})
    (enc(x_BTD, pad_BT, enc.frontend.target_mask({"mask": mask})).x_BTD * w).sum().backward()
    (hf(x, bool_masked_pos=mask).last_hidden_state * w).sum().backward()
    ours = to_hf_vision({k: p.grad for k, p in enc.named_parameters()})
    for name, p in hf.named_parameters():
        assert torch.allclose(p.grad, ours[name], rtol=1e-9, atol=1e-9), name


def test_relative_position_index_matches_hf_on_a_non_square_grid():
    from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias

    for grid in ((3, 5), (4, 4)):
        ref = Data2VecVisionRelativePositionBias.generate_relative_position_index(grid)
        assert torch.equal(relative_position_index(grid), ref)


def test_state_dict_round_trip_is_strict_and_exact():
    hf, enc = _pair()
    back = transformers.Data2VecVisionModel(hf.config)
    back.load_state_dict(to_hf_vision(enc.state_dict()), strict=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert not any(k.endswith("key.bias") for k in back.state_dict())
    # a classification model's base model imports with its pooler and classifier dropped
    cls = transformers.Data2VecVisionForImageClassification(hf.config)
    enc.load_state_dict(from_hf_vision(cls.state_dict()), strict=True)
    with pytest.raises(ValueError, match="no d2v name"):
        from_hf_vision({"encoder.mystery.weight": torch.zeros(1)})


def test_export_loads_with_hf_from_pretrained(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    enc = build_encoder(TINY).eval()
    transformers.Data2VecVisionConfig(**hf_vision_config(TINY)).save_pretrained(tmp_path)
    save_file(to_hf_vision(enc.state_dict()), tmp_path / "model.safetensors")
    hf = transformers.Data2VecVisionModel.from_pretrained(tmp_path).eval()
    x = _images()
    with torch.no_grad():
        assert (hf(x).last_hidden_state - enc(*enc.embed({"image": x})).x_BTD).abs().max() <= 1e-5


def test_wrong_image_size_is_an_error():
    enc = build_encoder(TINY)
    with pytest.raises(ValueError, match="patch grid"):
        enc.embed({"image": _images(size=32)})


# -- the objective ------------------------------------------------------------------------------

def test_teacher_is_the_whole_encoder_but_the_mask_embedding():
    model = Data2Vec(TINY)
    teacher = model.make_teacher()
    names = {n for n, _ in teacher.module.named_parameters()}
    assert names == {n for n, _ in model.student.named_parameters()} - {"frontend.mask_emb"}
    assert "frontend.patch_embed.weight" in names and "transformer.final_norm.weight" in names


def test_objective_matches_hand_computation():
    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    teacher = model.make_teacher()
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {"image": _images(), "mask": _masks(), "label": torch.zeros(3, dtype=torch.long)}
    out = model(batch, teacher)

    obj, D = TINY.objective, TINY.encoder.dim
    t = teacher.module
    with torch.no_grad():
        x = torch.cat([t.frontend.cls_token.expand(3, 1, -1),
                       t.frontend.patch_embed(batch["image"]).flatten(2).transpose(1, 2)], dim=1)
        bias = t.frontend.rel_pos_bias()
        layers = []
        for blk in t.transformer.blocks:  # pre-LN with layer scale, by the formula
            x = x + blk.attn_scale * blk.attn(blk.attn_norm(x), bias)
            x = x + blk.ffn_scale * blk.ffn(blk.ffn_norm(x))
            layers.append(x)
        top = layers[-obj.top_k:]
        y = sum(F.layer_norm(l, (D,)) for l in top) / len(top)
        y = F.layer_norm(y, (D,))[:, 1:][batch["mask"]]  # patches only: CLS is never a target
    x_s, pad = model.student.embed(batch)
    mask_BT = F.pad(batch["mask"], (1, 0))
    pred = model.head(model.student(x_s, pad, mask_BT).x_BTD[mask_BT])
    hand = F.smooth_l1_loss(pred, y, beta=2.0, reduction="sum") / D
    assert out.count.item() == batch["mask"].sum().item()
    assert math.isclose(out.loss_sum.item(), hand.item(), rel_tol=1e-5)
    assert math.isclose(out.target_std.item(), masked_std(y).item(), rel_tol=1e-5)
    # as the reference's F.smooth_l1_loss(mean) per rank
    assert math.isclose((out.loss_sum / out.count).item(), F.smooth_l1_loss(pred, y, beta=2.0).item(), rel_tol=1e-5)

    out.loss_sum.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.student.frontend.mask_emb.grad is not None
    assert model.student.frontend.rel_pos_bias.table.grad is not None
    assert model.student.transformer.blocks[0].attn.qkv.q_bias.grad is not None


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, as the trainer makes on CPU."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_objective_runs_sharded_as_the_trainer_shards(one_rank_group):
    """Under FSDP2 a root gathers its parameters only around ``forward``: the teacher embeds
    images inside it (an ``embed`` call outside would meet sharded DTensor weights)."""
    from d2v_train.distributed import shard

    torch.manual_seed(0)
    model = Data2Vec(TINY)
    teacher = model.make_teacher()
    batch = {"image": _images(), "mask": _masks()}
    ref = model(batch, teacher).loss_sum.item()
    shard(model, list(model.student.transformer.blocks), dtype="fp32")
    shard(teacher, list(teacher.module.transformer.blocks), dtype="fp32", reshard_after_forward=True)
    out = model(batch, teacher)
    assert math.isclose(out.loss_sum.item(), ref, rel_tol=1e-5)
    out.loss_sum.backward()
    teacher.update(model.student, 0.5)


def test_tiny_model_learns_without_collapse():
    """200 steps on smooth random images (2x2 pixels upsampled: a patch is predictable from the
    visible ones) with BEiT block masks: the loss falls, targets and predictions keep their variance."""
    torch.manual_seed(0)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    cfg = load_config(CONFIGS / "vision_tiny.yaml", {"ema": {"tau0": 0.99, "tau_e": 0.999, "tau_n": 100}})
    model = Data2Vec(cfg)
    teacher = model.make_teacher()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    B, losses, target_std, pred_std = 8, [], [], []
    for step in range(200):
        image = F.interpolate(torch.randn(B, 3, 2, 2, generator=g), size=cfg.frontend.image_size,
                              mode="bicubic", align_corners=False)
        mask = compute_block_masks(B, rng, grid=cfg.frontend.grid, num_masking_patches=39)
        out = model({"image": image, "mask": torch.from_numpy(mask)}, teacher)
        loss = out.loss_sum / out.count
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        teacher.update(model.student, ema_tau(step, cfg.ema))
        losses.append(loss.item())
        target_std.append(out.target_std.item())
        pred_std.append(out.pred_std.item())
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    assert min(target_std[-50:]) > 0.5 and np.mean(pred_std[-20:]) > 0.3
