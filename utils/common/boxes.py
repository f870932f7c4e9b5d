"""Box geometry shared by the loss, validation, data pipeline and inference.

Conventions (YOLOv5 v7.0 compatible):
- ``xyxy``: corners ``x1, y1, x2, y2`` in pixels; ``xywh``: centre, width, height.
- Every function accepts ``torch.Tensor`` or ``np.ndarray`` unless stated, and never mutates its input
  except :func:`clip_boxes`, which clips in place because the callers (NMS outputs, label arrays) want that.
"""

from __future__ import annotations

import glob
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

Array = torch.Tensor | np.ndarray

# Largest image side NMS expects; class-aware NMS shifts each class by a multiple of it so boxes of
# different classes never overlap (same constant as YOLOv5 so results match).
_CLASS_OFFSET = 7680
_PER_CLASS_NMS_FROM = 1000  # boxes per image above which NMS runs class by class
_IOU_TYPES = ("iou", "giou", "diou", "ciou", "eiou")


def _copy(x: Array) -> Array:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: Array) -> Array:
    """Centre/size boxes -> corner boxes (last dim of size 4)."""
    y = _copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: Array) -> Array:
    """Corner boxes -> centre/size boxes (last dim of size 4)."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: Array, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Array:
    """Normalised centre/size labels -> pixel corners, adding letterbox/mosaic padding offsets."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: Array, w: float = 640, h: float = 640, clip: bool = False, eps: float = 0.0) -> Array:
    """Pixel corners -> normalised centre/size labels.

    ``clip`` first clips the corners to ``(h - eps, w - eps)`` so augmented boxes that left the image give
    labels inside [0, 1] (the label scanner rejects out-of-range values).
    """
    if clip:
        x = clip_boxes(_copy(x), (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes: Array, shape: Sequence[float]) -> Array:
    """Clip xyxy boxes IN PLACE to an image of ``shape = (height, width)``; returns ``boxes`` for chaining."""
    height, width = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, width)
        boxes[..., 1].clamp_(0, height)
        boxes[..., 2].clamp_(0, width)
        boxes[..., 3].clamp_(0, height)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, width)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, height)
    return boxes


def scale_boxes(
    img1_shape: Sequence[int],
    boxes: Array,
    img0_shape: Sequence[int],
    ratio_pad: Sequence | None = None,
) -> Array:
    """Map xyxy boxes from the letterboxed network input ``img1_shape`` back to the original ``img0_shape``.

    Undoes the letterbox resize: subtract the padding, divide by the resize gain, clip to the original image.
    ``ratio_pad = ((gain_h, gain_w), (pad_w, pad_h))`` as returned by the data loader overrides the
    recomputation (needed for rectangular validation batches where padding is not centred on one side).
    Modifies ``boxes`` in place, like v7.0, and returns it.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad_w = (img1_shape[1] - img0_shape[1] * gain) / 2
        pad_h = (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad_w, pad_h = ratio_pad[1][0], ratio_pad[1][1]
    boxes[..., [0, 2]] -= pad_w
    boxes[..., [1, 3]] -= pad_h
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


def box_iou(box1: Array, box2: Array) -> Array:
    """Pairwise IoU (N x M) of xyxy boxes, the same arithmetic as ``torchvision.ops.box_iou`` (no epsilon).

    Written out because importing torchvision's Python package costs ~2 s (see :func:`nms`). Takes tensors or
    NumPy arrays (validation matches each image's few boxes in NumPy, where small ops cost a tenth of torch's).
    """
    lib = torch if isinstance(box1, torch.Tensor) else np
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    top_left = lib.maximum(box1[:, None, :2], box2[:, :2])
    bottom_right = lib.minimum(box1[:, None, 2:], box2[:, 2:])
    inter = (bottom_right - top_left).clip(min=0).prod(2)
    if lib is torch:
        return inter / (area1[:, None] + area2 - inter)
    with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: NaN, as torchvision (never a match)
        return inter / (area1[:, None] + area2 - inter)


def _load_torchvision_kernels() -> None:
    """Make ``torch.ops.torchvision.*`` available, importing as little as possible.

    ``import torchvision`` pulls in ``torch._dynamo`` through ``torchvision.ops`` (~2 s on a small CPU, half of
    val.py's start-up). The compiled kernels live in torchvision's ``_C`` extension, which
    ``torch.ops.load_library`` registers on its own; the full import is the fallback if that file is not found.
    """
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.origin).parent if spec and spec.origin else None
    libraries = sorted(glob.glob(str(folder / "_C*.so")) + glob.glob(str(folder / "_C*.pyd"))) if folder else []
    if libraries:
        torch.ops.load_library(libraries[0])
    else:
        import torchvision  # noqa: F401


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Indices kept by torchvision's NMS kernel, highest score first (``torchvision.ops.nms`` without the import)."""
    if not hasattr(torch.ops.torchvision, "nms"):
        _load_torchvision_kernels()
    return torch.ops.torchvision.nms(boxes, scores, iou_thres)


def _nms_per_class(det: torch.Tensor, iou_thres: float, agnostic: bool) -> torch.Tensor:
    """Kept rows of score-sorted ``[x1, y1, x2, y2, conf, cls]`` detections, in score order.

    Boxes of different classes never suppress each other. Few boxes: one kernel call with boxes shifted apart
    per class (v7.0's trick). Many boxes (val at conf 0.001 has thousands per image): one call per class, as
    the kernel is quadratic in the box count; the rows are score-sorted, so sorted indices are score order.
    """
    if agnostic:
        return nms(det[:, :4], det[:, 4], iou_thres)
    if len(det) <= _PER_CLASS_NMS_FROM:
        return nms(det[:, :4] + det[:, 5:6] * _CLASS_OFFSET, det[:, 4], iou_thres)
    kept = []
    for c in det[:, 5].unique():
        rows = (det[:, 5] == c).nonzero().view(-1)
        kept.append(rows[nms(det[rows, :4], det[rows, 4], iou_thres)])
    return torch.cat(kept).sort().values


def _corners_and_sizes(box: torch.Tensor, xywh: bool, eps: float) -> tuple[torch.Tensor, ...]:
    """Return x1, y1, x2, y2, w, h of a box tensor, each with the last dim removed."""
    if xywh:
        cx, cy, w, h = box.unbind(-1)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, w, h
    x1, y1, x2, y2 = box.unbind(-1)
    # eps keeps the CIoU aspect term atan(w / h) finite for degenerate boxes (as v7.0 does).
    return x1, y1, x2, y2, x2 - x1, (y2 - y1).clamp(eps)


def bbox_iou(
    box1: torch.Tensor,
    box2: torch.Tensor,
    xywh: bool = True,
    iou_type: str = "iou",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Element-wise (broadcasting) IoU variants used as the box-regression target.

    Returns a similarity whose ``1 - value`` is the loss: plain IoU, GIoU, DIoU, CIoU (v7.0 math: the
    alpha trade-off weight carries no gradient) or EIoU (Zhang et al. 2021: the penalty is
    rho^2/c^2 + dw^2/cw^2 + dh^2/ch^2 with cw, ch the enclosing box size). Output shape is the broadcast
    shape of the inputs without the last dimension (v7.0 kept a trailing 1, which callers squeezed).
    """
    iou_type = iou_type.lower()
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"iou_type must be one of {_IOU_TYPES}, got {iou_type!r}")
    b1_x1, b1_y1, b1_x2, b1_y2, w1, h1 = _corners_and_sizes(box1, xywh, eps)
    b2_x1, b2_y1, b2_x2, b2_y2, w2, h2 = _corners_and_sizes(box2, xywh, eps)

    inter_w = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(0)
    inter_h = (torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)).clamp(0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if iou_type == "iou":
        return iou

    enclose_w = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)
    enclose_h = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)
    if iou_type == "giou":
        enclose_area = enclose_w * enclose_h + eps
        return iou - (enclose_area - union) / enclose_area

    diag2 = enclose_w**2 + enclose_h**2 + eps
    centre_dist2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    if iou_type == "diou":
        return iou - centre_dist2 / diag2
    if iou_type == "ciou":
        v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
        with torch.no_grad():
            # Rounding can push IoU of identical boxes a hair above 1, flipping the sign of the denominator
            # (alpha -> -inf); clamping changes nothing for IoU <= 1, where this is exactly v7.0's alpha.
            alpha = v / (v - iou.clamp(max=1.0) + (1 + eps))
        return iou - (centre_dist2 / diag2 + v * alpha)
    # eiou
    width_term = (w1 - w2) ** 2 / (enclose_w**2 + eps)
    height_term = (h1 - h2) ** 2 / (enclose_h**2 + eps)
    return iou - (centre_dist2 / diag2 + width_term + height_term)


def box_ioa(box1: Array, box2: Array, eps: float = 1e-7) -> Array:
    """Intersection over the area of ``box2`` (xyxy).

    Used by copy-paste / cutout augmentation to decide whether a pasted object hides an existing label.
    ``box1`` of shape (4,) gives shape (M,); shape (N, 4) gives (N, M).
    """
    lib = torch if isinstance(box1, torch.Tensor) else np
    single = box1.ndim == 1
    b1 = box1[None] if single else box1
    b1_x1, b1_y1, b1_x2, b1_y2 = (b1[:, k, None] for k in range(4))
    b2_x1, b2_y1, b2_x2, b2_y2 = (box2[None, :, k] for k in range(4))
    inter_w = (lib.minimum(b1_x2, b2_x2) - lib.maximum(b1_x1, b2_x1)).clip(0)
    inter_h = (lib.minimum(b1_y2, b2_y2) - lib.maximum(b1_y1, b2_y1)).clip(0)
    ioa = inter_w * inter_h / ((b2_x2 - b2_x1) * (b2_y2 - b2_y1) + eps)
    return ioa[0] if single else ioa


def _candidates_for_image(
    x: torch.Tensor, conf_thres: float, multi_label: bool, classes: Sequence[int] | None
) -> torch.Tensor:
    """One image's raw predictions (xywh, obj, cls...) -> rows (x1, y1, x2, y2, conf, cls) above threshold."""
    x = x[x[:, 4] > conf_thres]
    if not x.shape[0]:
        return x.new_zeros((0, 6))
    scores = x[:, 5:] * x[:, 4:5]  # class confidence = cls prob * objectness
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        box_idx, cls_idx = (scores > conf_thres).nonzero(as_tuple=True)
        det = torch.cat((box[box_idx], scores[box_idx, cls_idx, None], cls_idx[:, None].to(x.dtype)), 1)
    else:
        conf, cls_idx = scores.max(1, keepdim=True)
        det = torch.cat((box, conf, cls_idx.to(x.dtype)), 1)[conf.view(-1) > conf_thres]
    if classes is not None:
        wanted = torch.tensor(classes, device=det.device, dtype=det.dtype)
        det = det[(det[:, 5:6] == wanted).any(1)]
    return det


def non_max_suppression(
    prediction: torch.Tensor | Sequence[torch.Tensor],
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
) -> list[torch.Tensor]:
    """YOLOv5 v7.0 NMS on raw detector output ``bs x N x (5 + nc)`` (xywh, obj, class probs).

    Returns one ``n x 6`` tensor ``[x1, y1, x2, y2, conf, cls]`` per image, sorted by confidence.
    ``multi_label`` keeps every (box, class) pair above ``conf_thres`` (used for mAP, where it is worth a
    little recall); it is ignored for single-class models as in v7.0. A ``(inference, train_out)`` tuple, as
    returned by the model in eval mode, is accepted. Unlike v7.0 there is no wall-clock time limit, so
    results never depend on machine speed.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres and iou_thres must be in [0, 1], got {conf_thres}, {iou_thres}")
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    num_classes = prediction.shape[2] - 5
    multi_label = multi_label and num_classes > 1
    output = []
    for image_pred in prediction:
        det = _candidates_for_image(image_pred, conf_thres, multi_label, classes)
        if det.shape[0]:
            order = det[:, 4].argsort(descending=True, stable=True)[:max_nms]
            det = det[order]
            det = det[_nms_per_class(det, iou_thres, agnostic)[:max_det]]
        output.append(det)
    return output
