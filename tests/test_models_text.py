"""Text encoder (data2vec text = RoBERTa): presets, exact parity with HF Data2VecTextModel, state-dict
adapters, the objective against a hand computation, a short training run."""

import math
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from d2v_train.models import Data2Vec, build_encoder, ema_tau, load_config, save_config
from d2v_train.models.hf_text import config_from_hf_text, from_hf_text, hf_text_config, to_hf_text
from d2v_train.models.loss import masked_std
from d2v_train.models.text import position_ids
from pipelines.masking import bert_replacements, compute_token_masks

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = load_config(CONFIGS / "text_tiny.yaml")
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4  # our trained tokenizers' special ids (RoBERTa's order)
SPECIALS = (BOS, PAD, EOS, UNK, MASK)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(cfg=TINY, seed=0, add_pooling_layer=False, **hf_overrides):
    """Random-weight HF model and a d2v encoder holding its weights (through the adapter)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Data2VecTextConfig(**{**hf_text_config(cfg), **hf_overrides})
    hf = transformers.Data2VecTextModel(hf_cfg, add_pooling_layer=add_pooling_layer)
    enc = build_encoder(config_from_hf_text(hf_cfg.to_dict()))
    enc.load_state_dict(from_hf_text(hf.state_dict()), strict=True)
    return hf, enc


def _batch(B=3, T=40, lengths=(40, 30, 11), seed=1, vocab=1000):
    """A collate_text-style batch: <s> ... </s>, padded, 15% masked with 80/10/10 replacement."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, T), PAD, dtype=np.int64)
    for b, n in enumerate(lengths):
        tokens[b, :n] = np.concatenate([[BOS], rng.integers(5, vocab, n - 2), [EOS]])
    mask = compute_token_masks(np.array(lengths), 0.15, rng, min_masks=2)
    mask = np.pad(mask, ((0, 0), (0, T - mask.shape[1])))
    student, target = bert_replacements(tokens, mask, rng, vocab_size=vocab, mask_token_id=MASK,
                                        special_ids=SPECIALS, return_targets=True)
    return {"tokens": torch.from_numpy(student), "target_tokens": torch.from_numpy(tokens),
            "mask": torch.from_numpy(mask), "target_mask": torch.from_numpy(target),
            "padding_mask": torch.from_numpy(tokens == PAD)}


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["text_tiny", "text_base", "text_large"])
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.frontend.max_tokens == 512


def test_config_errors_name_the_field():
    with pytest.raises(pydantic.ValidationError, match="pad_id"):
        load_config(CONFIGS / "text_tiny.yaml", {"frontend": {"pad_id": 1000}})
    with pytest.raises(pydantic.ValidationError, match="max_positions"):
        load_config(CONFIGS / "text_tiny.yaml", {"frontend": {"max_positions": 2}})
    with pytest.raises(pydantic.ValidationError, match="head"):
        load_config(CONFIGS / "text_tiny.yaml", {"objective": {"head": "mlp3"}})
    with pytest.raises(ValueError, match="post-LN"):
        build_encoder(load_config(CONFIGS / "text_tiny.yaml", {"encoder": {"pre_ln": True}}))


def test_parameter_counts_match_hf():
    counts = {}
    for name in ("text_base", "text_large"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        with torch.device("meta"):
            ours = build_encoder(cfg)
            hf = transformers.Data2VecTextModel(transformers.Data2VecTextConfig(**hf_text_config(cfg)),
                                                add_pooling_layer=False)
        counts[name] = sum(p.numel() for p in ours.parameters())
        assert counts[name] == sum(p.numel() for p in hf.parameters()), name
    assert counts["text_base"] == 124_055_040  # RoBERTa-base without its pooler


# -- HF parity ----------------------------------------------------------------------------------

def test_hidden_states_match_hf_with_and_without_padding():
    hf, enc = _pair()
    hf.eval(), enc.eval()
    ffn_hf = []
    for layer in hf.encoder.layer:  # FFN output before dropout and the residual: the v1 target
        layer.output.dense.register_forward_hook(lambda m, i, o: ffn_hf.append(o))
    batch = _batch()
    tokens, pad = batch["target_tokens"], batch["padding_mask"]
    for padding in (None, pad):
        ffn_hf.clear()
        rows = slice(0, 1) if padding is None else slice(None)  # row 0 has no padding
        with torch.no_grad():
            ref = hf(tokens[rows], attention_mask=None if padding is None else (~padding).long(),
                     output_hidden_states=True)
            x_BTD, pad_BT = enc.embed({"tokens": tokens[rows], "padding_mask": padding})
            blocks = enc(x_BTD, pad_BT, return_from=0, target="block")
            ffn = enc(x_BTD, pad_BT, return_from=0, target="ffn")
        assert (ref.hidden_states[0] - x_BTD).abs().max() <= 1e-5
        assert (ref.last_hidden_state - blocks.x_BTD).abs().max() <= 1e-5
        for a, b in zip(ref.hidden_states[1:], blocks.layers, strict=True):
            assert (a - b).abs().max() <= 1e-5
        for a, b in zip(ffn_hf, ffn.layers, strict=True):
            assert (a - b).abs().max() <= 1e-5
    assert pad_BT[2].sum() == 29 and not pad_BT[0].any()


def test_training_gradients_match_hf():
    """Train mode without dropout, fp64, with padding: every gradient is HF's."""
    hf, enc = _pair(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf.double().train(), enc.double().train()
    batch = _batch()
    pad = batch["padding_mask"]
    w = torch.randn(*pad.shape, TINY.encoder.dim, dtype=torch.float64) * (~pad)[..., None]
    x_BTD, pad_BT = enc.embed(batch)
    (enc(x_BTD, pad_BT).x_BTD * w).sum().backward()
    (hf(batch["tokens"], attention_mask=(~pad).long()).last_hidden_state * w).sum().backward()
    ours = to_hf_text({k: p.grad for k, p in enc.named_parameters()})
    for name, p in hf.named_parameters():
        assert torch.allclose(p.grad, ours[name], rtol=1e-9, atol=1e-9), name


def test_position_ids_match_hf():
    from transformers.models.data2vec.modeling_data2vec_text import Data2VecTextEmbeddings

    tokens = _batch()["target_tokens"]
    ref = Data2VecTextEmbeddings.create_position_ids_from_input_ids(tokens, PAD)
    assert torch.equal(position_ids(tokens == PAD, PAD), ref)
    assert ref[0, 0] == PAD + 1


def test_state_dict_round_trip_is_strict_and_exact():
    hf, enc = _pair()
    back = transformers.Data2VecTextModel(hf.config, add_pooling_layer=False)
    back.load_state_dict(to_hf_text(enc.state_dict()), strict=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # the pooler and a task model's head are fine-tuning parts: dropped on import
    pooled = transformers.Data2VecTextModel(hf.config)
    enc.load_state_dict(from_hf_text(pooled.state_dict()), strict=True)
    mlm = transformers.Data2VecTextForMaskedLM(hf.config)
    enc.load_state_dict(from_hf_text(mlm.state_dict()), strict=True)
    with pytest.raises(ValueError, match="no d2v name"):
        from_hf_text({"encoder.mystery.weight": torch.zeros(1)})


def test_export_loads_with_hf_from_pretrained(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    enc = build_encoder(TINY).eval()
    transformers.Data2VecTextConfig(**hf_text_config(TINY)).save_pretrained(tmp_path)
    save_file(to_hf_text(enc.state_dict()), tmp_path / "model.safetensors")
    hf = transformers.Data2VecTextModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    batch = _batch()
    keep = ~batch["padding_mask"]
    with torch.no_grad():
        ours = enc(*enc.embed(batch)).x_BTD
        ref = hf(batch["tokens"], attention_mask=keep.long()).last_hidden_state
    assert (ref - ours)[keep].abs().max() <= 1e-5


def test_too_long_rows_are_an_error():
    enc = build_encoder(TINY)
    with pytest.raises(ValueError, match="positions for 512"):
        enc.embed({"tokens": torch.full((1, 513), 7)})


# -- the objective ------------------------------------------------------------------------------

def test_teacher_holds_only_the_transformer():
    model = Data2Vec(TINY)
    teacher = model.make_teacher()
    names = {n for n, _ in teacher.module.named_parameters()}
    assert names == {n for n, _ in model.student.transformer.named_parameters(prefix="transformer")}
    head = model.head  # fairseq's head_layers=2: hidden width 2 * dim
    assert [m.weight.shape for m in head if isinstance(m, torch.nn.Linear)] == [(128, 64), (64, 128)]


def test_objective_matches_hand_computation():
    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    teacher = model.make_teacher()
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    assert (batch["mask"] & ~batch["target_mask"]).any()  # random/kept positions exist and are not regressed
    out = model(batch, teacher)

    obj, D = TINY.objective, TINY.encoder.dim
    pad = batch["padding_mask"]
    with torch.no_grad():  # the teacher sees the original tokens through the student's embeddings
        fe = model.student.frontend
        pos = torch.cumsum(~pad, 1) * ~pad + PAD
        x = fe.layer_norm(fe.word_embeddings(batch["target_tokens"]) + fe.position_embeddings(pos)
                          + fe.token_type_embeddings.weight[0])
        layers = teacher(x, pad, return_from=TINY.encoder.layers - obj.top_k, target="ffn").layers
        y = (sum(F.layer_norm(l, (D,)) for l in layers) / len(layers))[batch["target_mask"]]
    x_s, pad_s = model.student.embed(batch)
    pred = model.head(model.student(x_s, pad_s).x_BTD[batch["target_mask"]])
    hand = F.smooth_l1_loss(pred, y, beta=4.0, reduction="sum")  # loss_scale 1
    assert out.count.item() == batch["target_mask"].sum().item()
    assert math.isclose(out.loss_sum.item(), hand.item(), rel_tol=1e-5)
    assert math.isclose(out.target_std.item(), masked_std(y).item(), rel_tol=1e-5)

    out.loss_sum.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.student.frontend.word_embeddings.weight.grad[MASK].abs().sum() > 0


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, as the trainer makes on CPU."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_objective_runs_sharded_as_the_trainer_shards(one_rank_group):
    """The teacher's input comes from the student's embeddings, inside the student's FSDP2 root."""
    from d2v_train.distributed import shard

    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    teacher = model.make_teacher()
    batch = _batch()
    ref = model(batch, teacher).loss_sum.item()
    shard(model, list(model.student.transformer.blocks), dtype="fp32")
    shard(teacher, list(teacher.module.transformer.blocks), dtype="fp32", reshard_after_forward=True)
    out = model(batch, teacher)
    assert math.isclose(out.loss_sum.item(), ref, rel_tol=1e-5)
    out.loss_sum.backward()
    teacher.update(model.student, 0.5)


def test_tiny_model_learns_without_collapse():
    """200 steps on sequences of a repeated random motif (a masked token is a copy of a visible one)
    with BERT masking and the preset's EMA: the loss falls, targets keep their variance. (A teacher
    10x faster, tau 0.99, collapses this tiny model within 200 steps for some seeds.)"""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = TINY
    model = Data2Vec(cfg)
    teacher = model.make_teacher()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    B, T, losses, target_std, pred_std = 8, 34, [], [], []
    for step in range(200):
        motif = rng.integers(5, cfg.frontend.vocab_size, (B, 3))
        lengths = rng.integers(T // 2, T + 1, B)
        tokens = np.full((B, T), PAD)
        for b, n in enumerate(lengths):
            tokens[b, :n] = np.concatenate([[BOS], np.tile(motif[b], T)[:n - 2], [EOS]])
        mask = compute_token_masks(lengths, 0.15, rng, min_masks=1)
        mask = np.pad(mask, ((0, 0), (0, T - mask.shape[1])))
        student, target = bert_replacements(tokens, mask, rng, vocab_size=cfg.frontend.vocab_size,
                                            mask_token_id=MASK, special_ids=SPECIALS, return_targets=True)
        batch = {"tokens": torch.from_numpy(student), "target_tokens": torch.from_numpy(tokens),
                 "target_mask": torch.from_numpy(target), "padding_mask": torch.from_numpy(tokens == PAD)}
        out = model(batch, teacher)
        loss = out.loss_sum / out.count
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        teacher.update(model.student, ema_tau(step, cfg.ema))
        losses.append(loss.item())
        target_std.append(out.target_std.item())
        pred_std.append(out.pred_std.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert min(target_std[-50:]) > 0.3 and np.mean(pred_std[-20:]) > 0.3
