"""Speech model cost: d2v's encoder vs HF Data2VecAudioModel (forward+backward, same config, same
run), and a full data2vec step (teacher forward + student forward/backward + EMA) relative to the
student's forward+backward alone (ideal 1.33: a forward is about a third of forward+backward).

Usage: python benchmarks/bench_models.py [--json OUT] [--batch 4] [--seconds 2.0] [--dim 256] [--layers 4]
       [--channels 128] [--repeats 7] [--threads N]
"""

import argparse
import json
import platform

import torch
from timing import best_seconds

from d2v_train.models import Data2Vec, ModelConfig, build_encoder
from d2v_train.models.hf import from_hf, hf_audio_config
from d2v_train.models.speech import conv_output_lengths


def bench_config(args) -> ModelConfig:
    """Base's architecture scaled down so that CPU runs take seconds (same CNN geometry)."""
    cnn = [(args.channels, 10, 5)] + [(args.channels, 3, 2)] * 4 + [(args.channels, 2, 2)] * 2
    return ModelConfig.model_validate({
        "encoder": {"dim": args.dim, "layers": args.layers, "heads": args.dim // 64, "ffn_dim": 4 * args.dim,
                    "layer_drop": 0.0},  # layer drop only adds timing noise
        "frontend": {"conv_layers": cnn},
        "objective": {"top_k": min(8, args.layers)},
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0, help="audio per utterance")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--channels", type=int, default=128, help="CNN channels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Data2VecAudioConfig, Data2VecAudioModel

    torch.manual_seed(0)
    cfg = bench_config(args)
    B, L = args.batch, int(args.seconds * 16000)
    T = int(conv_output_lengths(L, cfg.frontend.conv_layers))
    source = torch.randn(B, L)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # ~50% in spans of 10, as data2vec's masks
        for s in torch.randperm(T - 10)[: T // 20].tolist():
            mask[b, s:s + 10] = True
    batch = {"source": source, "padding_mask": torch.zeros(B, L, dtype=torch.bool), "mask": mask}

    hf = Data2VecAudioModel(Data2VecAudioConfig(**hf_audio_config(cfg))).train()
    enc = build_encoder(cfg).train()
    enc.load_state_dict(from_hf(hf.state_dict()))

    def d2v_encoder():
        x, pad = enc.embed(batch)
        enc(x, pad, mask).x_BTD.square().mean().backward()

    def hf_encoder():
        hf(source, mask_time_indices=mask).last_hidden_state.square().mean().backward()

    model = Data2Vec(cfg).train()
    teacher = model.make_teacher()

    def student_only():
        x, pad = model.student.embed(batch)
        pred = model.head(model.student(x, pad, mask).x_BTD[mask])
        pred.float().square().sum().backward()

    def data2vec_step():
        out = model(batch, teacher)
        (out.loss_sum / out.count).backward()
        teacher.update(model.student, 0.999)

    def ema_only():
        teacher.update(model.student, 0.999)

    results = best_seconds({"d2v_encoder": d2v_encoder, "hf_encoder": hf_encoder, "student_only": student_only,
                            "data2vec_step": data2vec_step, "ema_update": ema_only}, args.repeats, warm_up=True)
    ratio_hf = results["d2v_encoder"] / results["hf_encoder"]
    ratio_step = results["data2vec_step"] / results["student_only"]
    frames = B * T

    print(f"config: dim {args.dim}, {args.layers} layers, CNN {args.channels} ch; batch {B} x {args.seconds} s "
          f"({T} frames each); {torch.get_num_threads()} threads; fp32, train mode")
    print(f"{'forward+backward':<34}{'ms':>10}{'frames / s':>14}")
    for name, seconds in results.items():
        print(f"{name:<34}{seconds * 1e3:>10.2f}{frames / seconds:>14,.0f}")
    print(f"d2v encoder / HF Data2VecAudioModel: {ratio_hf:.2f} (target <= 1.0)")
    print(f"data2vec step / student alone: {ratio_step:.2f} (ideal 1.33, target <= 1.45)")

    if args.json:
        report = {
            "config": vars(args) | {"frames_per_utterance": T},
            "seconds_best_of": {k: round(v, 6) for k, v in results.items()},
            "d2v_over_hf": round(ratio_hf, 3),
            "step_over_student": round(ratio_step, 3),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine()},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
