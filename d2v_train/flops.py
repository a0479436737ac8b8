"""The model FLOPs of a pre-training step, by formula per modality, for an MFU estimate.

Counted as MFU counts do (PaLM, appendix B): 2 FLOPs per multiply-add of every matmul and
convolution, attention's two T x T products included; norms, activations, embeddings' lookups
and the loss left out. Shapes are the padded batch's (what the hardware computes). A training
step = the student's forward and backward (3x its forward; the first convolution's input needs
no gradient: 2x) + the teacher's forward. data2vec 2.0's student encodes only the kept positions
of each clone, estimated from `mask.mask_prob` (the masks are drawn inside the model); speech's
positional convolution runs on every clone in full.

`tests/test_flops.py` holds each formula against torch's FlopCounterMode on the real models.
"""
from __future__ import annotations

from dataclasses import dataclass

from d2v_train.models.config import ModelConfig, TransformerConfig

# Dense bf16/fp16 tensor-core peaks in FLOP/s (no sparsity), for MFU where the device is known.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
    "V100": 125e12, "T4": 65e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """The dense half-precision peak of a GPU named like torch.cuda.get_device_name, else None."""
    if not device_name:
        return None
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):  # L40S before L4
        if name in device_name.upper():
            return peak
    return None


def transformer_flops(enc: TransformerConfig, sequences: int, tokens: int) -> float:
    """Forward FLOPs of the blocks over `sequences` of `tokens` positions each."""
    d, f = enc.dim, enc.ffn_dim
    per_token = 2 * (4 * d * d + 2 * d * f)  # qkv (3 d^2) + output (d^2), fc1 + fc2
    attention = 2 * 2 * tokens * tokens * d  # q k^T and the weighted sum of values
    return enc.layers * sequences * (tokens * per_token + attention)


@dataclass(frozen=True)
class StepFlops:
    student: float  # forward
    teacher: float  # forward
    first_conv: float  # forward FLOPs of the student's first convolution (no input gradient)

    @property
    def train(self) -> float:
        """Forward + backward of the student, forward of the teacher."""
        return 3 * self.student - self.first_conv + self.teacher


def step_flops(cfg: ModelConfig, batch: dict) -> StepFlops:
    """The FLOPs of one training batch of `cfg`'s model (the loader's batch for its modality)."""
    enc, fe = cfg.encoder, cfg.frontend
    d = enc.dim
    if cfg.modality == "speech":
        B, length = batch["source"].shape
        convs, channels_in, first = 0.0, 1, None
        for channels, kernel, stride in fe.conv_layers:
            length = (length - kernel) // stride + 1
            layer = 2 * B * length * channels * channels_in * kernel
            first = layer if first is None else first
            convs, channels_in = convs + layer, channels
        T = length
        embed_student = convs + 2 * B * T * channels_in * d  # feature encoder + projection
        positions = fe.pos_conv_layers * 2 * B * T * d * (d // fe.pos_conv_groups) * fe.pos_conv_kernel
        embed_teacher, first_conv = positions, first  # the teacher reuses the student's features
        # data2vec 2.0 runs the positional conv on every clone (masked frames included)
        embed_student += positions * (cfg.data2vec2.clones if cfg.variant == "data2vec2" else 1)
    elif cfg.modality == "vision":
        B = batch["image"].shape[0]
        rows, cols = fe.grid
        T = rows * cols + 1  # patches and CLS
        embed_student = embed_teacher = first_conv = 2 * B * rows * cols * fe.channels * fe.patch_size ** 2 * d
    else:
        B, T = batch["tokens"].shape
        embed_student = embed_teacher = first_conv = 0.0  # lookups
    teacher = embed_teacher + transformer_flops(enc, B, T)
    if cfg.variant == "data2vec":
        mask = batch.get("target_mask", batch.get("mask"))  # text regresses only its <mask> positions
        masked = int(mask.sum()) if mask is not None else B * T
        head = 2 * masked * (d * d if cfg.objective.head == "linear" else 4 * d * d)
        return StepFlops(student=embed_student + transformer_flops(enc, B, T) + head, teacher=teacher,
                         first_conv=first_conv)
    v2 = cfg.data2vec2
    extra = 1 if cfg.modality == "vision" else 0
    content = T - extra
    kept = extra + round(content * (1 - v2.mask.mask_prob))
    dec = v2.decoder
    N = B * v2.clones
    kernel_area = dec.kernel ** (2 if cfg.modality == "vision" else 1)
    decoder = sum(2 * N * content * (d if i == 0 else dec.dim) * (dec.dim // dec.groups) * kernel_area
                  for i in range(dec.layers)) + 2 * N * content * dec.dim * d
    student = embed_student + transformer_flops(enc, N, kept) + decoder
    return StepFlops(student=student, teacher=teacher, first_conv=first_conv)
