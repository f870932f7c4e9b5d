"""Detection augmentations with yolov5 v7.0 semantics, vectorised over boxes.

Label layout everywhere: float array (n, 5) = class, then box. Functions that work in pixels take ``x1 y1 x2 y2``
pixel boxes; the flips work on normalised ``cx cy w h`` (the layout ``__getitem__`` has when it flips).
Randomness comes from an explicit ``numpy.random.Generator`` so a data set can own its stream (seeded per
worker) instead of touching the global ``random``/``np.random`` state.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from utils.boxes import box_ioa, xywhn2xyxy

HYP_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr",
            "mosaic", "mixup", "copy_paste")
GREY = (114, 114, 114)
COPY_PASTE_IOA = 0.30


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


# --------------------------------------------------------------------------- geometry
def letterbox(img: np.ndarray, new_shape: int | tuple[int, int] = (640, 640), color: tuple[int, int, int] = GREY,
              auto: bool = True, scaleup: bool = True, stride: int = 32, scale_fill: bool = False,
              ) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio, then pad to ``new_shape`` (h, w); returns (img, (rw, rh), (dw, dh)).

    ``auto`` pads only to the next multiple of ``stride`` (minimum rectangle); ``scaleup=False`` never enlarges
    (val: better mAP on native resolution). The padding is split in halves; ``round(d -/+ 0.1)`` puts the odd
    pixel on the bottom/right, exactly as v7.0 so boxes line up with its results.
    """
    shape = img.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    ratio = r, r
    new_unpad = round(shape[1] * r), round(shape[0] * r)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scale_fill:
        dw, dh = 0.0, 0.0
        new_unpad = (new_shape[1], new_shape[0])
        ratio = new_shape[1] / shape[1], new_shape[0] / shape[0]
    dw /= 2
    dh /= 2
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, ratio, (dw, dh)


def box_candidates(box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Keep boxes (4, n) that stay > wh_thr px, keep > area_thr of their area and an aspect ratio < ar_thr."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_affine_matrix(height: int, width: int, out_h: int, out_w: int, degrees: float, translate: float,
                         scale: float, shear: float, perspective: float, rng: np.random.Generator,
                         ) -> tuple[np.ndarray, float]:
    """3x3 matrix = translate @ shear @ rotate/scale @ perspective @ centre (v7.0 order); also the scale."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -width / 2, -height / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, 2)
    rotate = np.eye(3)
    angle, s = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    rotate[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)
    shear_m = np.eye(3)
    shear_m[0, 1], shear_m[1, 0] = np.tan(rng.uniform(-shear, shear, 2) * math.pi / 180)
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    return move @ shear_m @ rotate @ persp @ centre, s


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, perspective: bool) -> np.ndarray:
    """Map (n, 4) xyxy boxes through a 3x3 matrix; the new box encloses the 4 transformed corners."""
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    corners = corners @ matrix.T
    xy = (corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]).reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    return np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)


def is_scale_translate(matrix: np.ndarray) -> bool:
    """True for x' = a*x + tx, y' = a*y + ty (the default hyp: no rotation, shear or perspective)."""
    return bool(matrix[0, 1] == 0 and matrix[1, 0] == 0 and matrix[2, 0] == 0 and matrix[2, 1] == 0
                and matrix[0, 0] == matrix[1, 1] > 0 and matrix[2, 2] == 1)


def _axis_span(a: float, t: float, n_src: int, n_dst: int) -> tuple[int, int, int, int, int, int] | None:
    """Source pixels [s0, s1) that land in [0, n_dst), their destination edges [d0, d1), the visible [v0, v1).

    With warpAffine's convention (pixel centres at integers) source pixel edge X maps to a * (X - 0.5) + t + 0.5.
    """
    s0 = max(0, math.floor((-t - 0.5) / a + 0.5))
    s1 = min(n_src, math.ceil((n_dst - t - 0.5) / a + 0.5))
    if s1 <= s0:
        return None
    d0, d1 = round(a * (s0 - 0.5) + t + 0.5), round(a * (s1 - 0.5) + t + 0.5)
    d1 = max(d1, d0 + 1)
    v0, v1 = max(d0, 0), min(d1, n_dst)
    return (s0, s1, d0, d1, v0, v1) if v1 > v0 else None


def warp_scale_translate(img: np.ndarray, matrix: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Same result as ``cv2.warpAffine`` for a pure scale + translation (within half a pixel), ~4x faster.

    Only the visible source crop is resized (separable SIMD resize) and pasted on a grey canvas; the boxes are
    still mapped through the exact matrix, so they stay aligned with the pixels to within half a pixel.
    """
    out = np.full((out_h, out_w, *img.shape[2:]), 114, dtype=img.dtype)
    a = float(matrix[0, 0])
    xs = _axis_span(a, float(matrix[0, 2]), img.shape[1], out_w)
    ys = _axis_span(a, float(matrix[1, 2]), img.shape[0], out_h)
    if xs is None or ys is None:
        return out
    (sx0, sx1, dx0, dx1, vx0, vx1), (sy0, sy1, dy0, dy1, vy0, vy1) = xs, ys
    # both crop edges land on rounded destination edges: <= 0.5 px off, like v7.0's own letterbox padding
    block = cv2.resize(img[sy0:sy1, sx0:sx1], (dx1 - dx0, dy1 - dy0), interpolation=cv2.INTER_LINEAR)
    out[vy0:vy1, vx0:vx1] = block[vy0 - dy0:vy1 - dy0, vx0 - dx0:vx1 - dx0]
    return out


def random_perspective(img: np.ndarray, labels: np.ndarray, degrees: float = 10, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10, perspective: float = 0.0,
                       border: tuple[int, int] = (0, 0), rng: np.random.Generator | None = None,
                       fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective of an image and its (n, 5) pixel-xyxy labels.

    ``border`` (negative for mosaics: -s/2) shrinks the output from the 2s canvas to s. Boxes are clipped to the
    output and filtered with :func:`box_candidates`, so boxes pushed out of view disappear. ``fast`` uses
    :func:`warp_scale_translate` instead of ``cv2.warpAffine`` when the matrix is a pure scale + translation.
    """
    rng = _rng(rng)
    out_h, out_w = img.shape[0] + border[0] * 2, img.shape[1] + border[1] * 2
    matrix, s = random_affine_matrix(img.shape[0], img.shape[1], out_h, out_w, degrees, translate, scale, shear,
                                     perspective, rng)
    if border[0] != 0 or border[1] != 0 or (matrix != np.eye(3)).any():
        if perspective:
            img = cv2.warpPerspective(img, matrix, dsize=(out_w, out_h), borderValue=GREY)
        elif fast and is_scale_translate(matrix):
            img = warp_scale_translate(img, matrix, out_w, out_h)
        else:
            img = cv2.warpAffine(img, matrix[:2], dsize=(out_w, out_h), borderValue=GREY)
    if len(labels):
        new = transform_boxes(labels[:, 1:5], matrix, bool(perspective))
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, out_w)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, out_h)
        keep = box_candidates(labels[:, 1:5].T * s, new.T, area_thr=0.10)
        labels = labels[keep]
        labels[:, 1:5] = new[keep]
    return img, labels


# --------------------------------------------------------------------------- colour
def augment_hsv(img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5,
                rng: np.random.Generator | None = None) -> None:
    """Random hue/saturation/value gains applied in place to a BGR uint8 image through 3 lookup tables."""
    if not (hgain or sgain or vgain):
        return
    gains = _rng(rng).uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=gains.dtype)
    lut_hue = ((x * gains[0]) % 180).astype(img.dtype)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(img.dtype)
    lut_val = np.clip(x * gains[2], 0, 255).astype(img.dtype)
    merged = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(merged, cv2.COLOR_HSV2BGR, dst=img)


# --------------------------------------------------------------------------- flips (normalised cx cy w h)
def flip_lr(img: np.ndarray, labels: np.ndarray, fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; normalised centre x -> 1 - x. cv2.flip keeps the result contiguous (no strided view)."""
    labels = labels.copy()
    labels[:, 1] = 1 - labels[:, 1]
    return (cv2.flip(img, 1) if fast else np.fliplr(img)), labels


def flip_ud(img: np.ndarray, labels: np.ndarray, fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mirror up-down; normalised centre y -> 1 - y."""
    labels = labels.copy()
    labels[:, 2] = 1 - labels[:, 2]
    return (cv2.flip(img, 0) if fast else np.flipud(img)), labels


# --------------------------------------------------------------------------- multi-image
def mosaic_placements(xc: int, yc: int, s: int, sizes: list[tuple[int, int]]) -> list[tuple[tuple, tuple]]:
    """Canvas and source rectangles (x1, y1, x2, y2) of 4 images of sizes (h, w) around the centre (xc, yc).

    Order: top-left, top-right, bottom-left, bottom-right; each image touches the centre with one corner and is
    cut where it leaves the 2s x 2s canvas.
    """
    rects = []
    for i, (h, w) in enumerate(sizes):
        if i == 0:
            dst = max(xc - w, 0), max(yc - h, 0), xc, yc
            src = w - (dst[2] - dst[0]), h - (dst[3] - dst[1]), w, h
        elif i == 1:
            dst = xc, max(yc - h, 0), min(xc + w, s * 2), yc
            src = 0, h - (dst[3] - dst[1]), min(w, dst[2] - dst[0]), h
        elif i == 2:
            dst = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
            src = w - (dst[2] - dst[0]), 0, w, min(dst[3] - dst[1], h)
        else:
            dst = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
            src = 0, 0, min(w, dst[2] - dst[0]), min(dst[3] - dst[1], h)
        rects.append((dst, src))
    return rects


def mosaic4(images: list[np.ndarray], labels: list[np.ndarray], s: int, hyp: dict,
            rng: np.random.Generator | None = None, fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """4 images (long side s) with normalised labels -> one s x s mosaic with pixel-xyxy labels.

    Centre drawn in [s/2, 3s/2] on a 2s canvas, optional copy-paste, then random_perspective with border -s/2.
    """
    rng = _rng(rng)
    border = -s // 2
    yc, xc = (int(rng.uniform(-border, 2 * s + border)) for _ in range(2))
    canvas = np.full((s * 2, s * 2, images[0].shape[2]), 114, dtype=np.uint8)
    placed = []
    for img, lab, (dst, src) in zip(images, labels, mosaic_placements(xc, yc, s, [im.shape[:2] for im in images])):
        canvas[dst[1]:dst[3], dst[0]:dst[2]] = img[src[1]:src[3], src[0]:src[2]]
        lab = lab.copy()
        if len(lab):
            h, w = img.shape[:2]
            lab[:, 1:] = xywhn2xyxy(lab[:, 1:], w, h, dst[0] - src[0], dst[1] - src[1])
        placed.append(lab)
    all_labels = np.concatenate(placed, 0) if placed else np.zeros((0, 5), np.float32)
    np.clip(all_labels[:, 1:], 0, 2 * s, out=all_labels[:, 1:])
    canvas, all_labels = copy_paste(canvas, all_labels, hyp.get("copy_paste", 0.0), rng)
    return random_perspective(canvas, all_labels, degrees=hyp.get("degrees", 0.0),
                              translate=hyp.get("translate", 0.0), scale=hyp.get("scale", 0.0),
                              shear=hyp.get("shear", 0.0), perspective=hyp.get("perspective", 0.0),
                              border=(border, border), rng=rng, fast=fast)


def mixup(img: np.ndarray, labels: np.ndarray, img2: np.ndarray, labels2: np.ndarray,
          rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) ratio (about 0.5) and keep the labels of both."""
    r = _rng(rng).beta(32.0, 32.0)
    blended = (img * r + img2 * (1 - r)).astype(np.uint8)
    return blended, np.concatenate((labels, labels2), 0)


def rectangles_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean (h, w) mask covering integer pixel boxes, built with a 2-D difference array (no per-box loop)."""
    diff = np.zeros((height + 1, width + 1), dtype=np.int32)
    b = boxes.astype(np.int64)
    np.add.at(diff, (b[:, 1], b[:, 0]), 1)
    np.add.at(diff, (b[:, 1], b[:, 2]), -1)
    np.add.at(diff, (b[:, 3], b[:, 0]), -1)
    np.add.at(diff, (b[:, 3], b[:, 2]), 1)
    return diff.cumsum(0).cumsum(1)[:height, :width] > 0


def copy_paste(img: np.ndarray, labels: np.ndarray, p: float = 0.5,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Box-only copy-paste: paste horizontally flipped copies of ``round(p * n)`` random boxes.

    v7.0 copies segment-shaped objects; with boxes only, the pasted object is the whole box region. A chosen
    box (x1, y1, x2, y2) is mirrored to (w - x2, y1, w - x1, y2) and filled with the mirrored pixels of the
    original region, but only if the mirrored box covers every existing box by less than 30% of that box's area
    (ioa < 0.30, as v7.0). Candidates are tested against the existing boxes only (not against each other), so
    all of them are decided in one vectorised step. Labels are pixel xyxy; ``img`` is modified in place.
    """
    n = len(labels)
    if not p or not n:
        return img, labels
    rng = _rng(rng)
    h, w = img.shape[:2]
    chosen = rng.choice(n, size=round(p * n), replace=False)
    mirrored = labels[chosen].copy()
    mirrored[:, [1, 3]] = w - labels[chosen][:, [3, 1]]
    free = (box_ioa(mirrored[:, 1:5], labels[:, 1:5]) < COPY_PASTE_IOA).all(1)
    mirrored = mirrored[free]
    if not len(mirrored):
        return img, labels
    pixels = np.round(mirrored[:, 1:5]).clip(0, [w, h, w, h])
    mask = rectangles_mask(pixels, h, w)
    img[mask] = img[:, ::-1][mask]
    return img, np.concatenate((labels, mirrored), 0)
