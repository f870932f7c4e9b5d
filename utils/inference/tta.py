"""Test-time augmentation for detectors: predictions on the image at 3 scales (one flipped), merged.

Every augmented prediction is mapped back to the original frame before NMS sees the union, so NMS does the
merging. (YOLOv5 additionally drops a few grid cells at the extreme scales; we keep them all.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALES = (1.0, 0.83, 0.67)
FLIP_LR = (False, True, False)


def scale_image(images: torch.Tensor, ratio: float, stride: int = 32) -> torch.Tensor:
    """Resize by ``ratio`` and pad right/bottom to a multiple of ``stride`` with ImageNet-mean grey."""
    if ratio == 1.0:
        return images
    h, w = images.shape[2:]
    size = (int(h * ratio), int(w * ratio))
    resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    ph, pw = (math.ceil(x / stride) * stride for x in size)
    return F.pad(resized, [0, pw - size[1], 0, ph - size[0]], value=0.447)


@torch.no_grad()
def augmented_inference(model: torch.nn.Module, images: torch.Tensor, stride: int = 32) -> torch.Tensor:
    """(bs, N_total, 5+nc) decoded predictions of all augmented passes in original-image pixels."""
    width = images.shape[3]
    outputs = []
    for scale, flip in zip(SCALES, FLIP_LR):
        x = images.flip(3) if flip else images
        pred = model(scale_image(x, scale, stride))[0].clone()
        pred[..., :4] /= scale
        if flip:
            pred[..., 0] = width - pred[..., 0]
        outputs.append(pred)
    return torch.cat(outputs, 1)
