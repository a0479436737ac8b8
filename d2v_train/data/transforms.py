"""The picture transforms a loader applies, as one validated value: the trainer's config, the image
tasks' options and the loader share its defaults and its checks. No heavy imports: the CLI and the
config read it at start-up."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ImageTransform"]


@dataclass(frozen=True)
class ImageTransform:
    """How a loader turns stored pictures into model inputs. The defaults are ImageNet's; pictures
    whose content sits on the patch grid (the generated visual-word mosaics) want
    ``crop_scale=(1, 1)``, ``hflip=0`` and ``crop_pct=1``: a crop or a mirror would change them."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # training: RandomResizedCrop's range of area fractions
    hflip: float = 0.5  # training: probability of a horizontal flip
    crop_pct: float = 224 / 256  # evaluation: centre crop / resized shorter side

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale {self.crop_scale}: need 0 < min <= max <= 1")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip {self.hflip}: a probability in [0, 1]")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct {self.crop_pct}: need 0 < crop_pct <= 1")

    def eval_resize(self, size: int) -> int:
        """The shorter side evaluation resizes to before its centre crop of ``size``."""
        return max(size, round(size / self.crop_pct))
