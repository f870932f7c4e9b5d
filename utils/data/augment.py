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

from utils.common.boxes import box_ioa, xywhn2xyxy

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


def warp_labels(labels: np.ndarray, matrix: np.ndarray, scale: float, out_w: int, out_h: int,
                perspective: bool = False) -> np.ndarray:
    """Map (n, 5) pixel-xyxy labels through ``matrix``, clip to the output, drop boxes that barely survive."""
    if not len(labels):
        return labels
    new = transform_boxes(labels[:, 1:5], matrix, perspective)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, out_w)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, out_h)
    keep = box_candidates(labels[:, 1:5].T * scale, new.T, area_thr=0.10)
    labels = labels[keep]
    labels[:, 1:5] = new[keep]
    return labels


def random_perspective(img: np.ndarray, labels: np.ndarray, degrees: float = 10, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10, perspective: float = 0.0,
                       border: tuple[int, int] = (0, 0), rng: np.random.Generator | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective of an image and its (n, 5) pixel-xyxy labels.

    ``border`` (negative for mosaics: -s/2) shrinks the output from the 2s canvas to s. Boxes are clipped to the
    output and filtered with :func:`box_candidates`, so boxes pushed out of view disappear.
    """
    rng = _rng(rng)
    out_h, out_w = img.shape[0] + border[0] * 2, img.shape[1] + border[1] * 2
    matrix, s = random_affine_matrix(img.shape[0], img.shape[1], out_h, out_w, degrees, translate, scale, shear,
                                     perspective, rng)
    if border[0] != 0 or border[1] != 0 or (matrix != np.eye(3)).any():
        if perspective:
            img = cv2.warpPerspective(img, matrix, dsize=(out_w, out_h), borderValue=GREY)
        else:
            img = cv2.warpAffine(img, matrix[:2], dsize=(out_w, out_h), borderValue=GREY)
    return img, warp_labels(labels, matrix, s, out_w, out_h, bool(perspective))


# --------------------------------------------------------------------------- colour
def augment_hsv(img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5,
                rng: np.random.Generator | None = None) -> None:
    """Random hue/saturation/value gains applied in place to a BGR uint8 image through 3 lookup tables.

    A single-channel (grey) image gets only the value table: a grey pixel has hue 0 and saturation 0, which the
    hue and saturation tables map to 0 again, and HSV -> BGR of (0, 0, v) is (v, v, v). So the result equals
    every channel of the 3-channel computation on the same pixels, for a third of the work and no conversion.
    """
    if not (hgain or sgain or vgain):
        return
    gains = _rng(rng).uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    x = np.arange(0, 256, dtype=gains.dtype)
    lut_val = np.clip(x * gains[2], 0, 255).astype(img.dtype)
    if img.ndim == 2:
        cv2.LUT(img, lut_val, dst=img)
        return
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    luts = np.stack((((x * gains[0]) % 180).astype(img.dtype), np.clip(x * gains[1], 0, 255).astype(img.dtype),
                     lut_val), 1)
    cv2.LUT(hsv, luts.reshape(256, 1, 3), dst=hsv)  # one table per channel, no split/merge
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)


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


def same_channels(images: list[np.ndarray]) -> list[np.ndarray]:
    """Grey (2-D) images expanded to BGR when any image is in colour, so they can share one canvas."""
    if all(im.ndim == images[0].ndim for im in images):
        return images
    return [cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) if im.ndim == 2 else im for im in images]


def place_labels(labels: list[np.ndarray], sizes: list[tuple[int, int]], placements: list[tuple[tuple, tuple]],
                 s: int) -> np.ndarray:
    """Normalised labels of the 4 tiles -> pixel xyxy on the 2s x 2s mosaic canvas (clipped to it), in one step."""
    all_labels = np.concatenate(labels, 0).astype(np.float32)
    if len(all_labels):
        per_tile = np.array([(w, h, dst[0] - src[0], dst[1] - src[1])
                             for (h, w), (dst, src) in zip(sizes, placements)], np.float32)
        w, h, padw, padh = np.repeat(per_tile, [len(lb) for lb in labels], 0).T
        all_labels[:, 1:] = xywhn2xyxy(all_labels[:, 1:], w, h, padw, padh)
    np.clip(all_labels[:, 1:], 0, 2 * s, out=all_labels[:, 1:])
    return all_labels


def paste_tiles(images: list[np.ndarray], placements: list[tuple[tuple, tuple]], s: int) -> np.ndarray:
    """v7.0's 2s x 2s grey canvas with each tile pasted in its rectangle."""
    canvas = np.full((s * 2, s * 2, *images[0].shape[2:]), 114, dtype=np.uint8)
    for img, (dst, src) in zip(images, placements):
        canvas[dst[1]:dst[3], dst[0]:dst[2]] = img[src[1]:src[3], src[0]:src[2]]
    return canvas


def _output_span(a: float, t: float, c0: int, c1: int, n: int) -> tuple[int, int]:
    """Output pixels [p0, p1) whose nearest canvas pixel under p = a*c + t lies in [c0, c1), clipped to [0, n)."""
    p0 = math.ceil(a * (c0 - 0.5) + t)
    p1 = math.ceil(a * (c1 - 0.5) + t)
    return min(max(p0, 0), n), min(max(p1, 0), n)


def warp_tiles(images: list[np.ndarray], placements: list[tuple[tuple, tuple]], matrix: np.ndarray,
               s: int) -> np.ndarray:
    """The s x s mosaic warped straight from the 4 tiles, without building the 2s x 2s canvas.

    Same pixels as :func:`paste_tiles` + ``cv2.warpAffine`` for a scale + translate ``matrix`` (the default
    hyp), to within one grey level of fixed-point rounding, except in a one-pixel band along the tile seams:
    each output pixel is sampled from the tile whose canvas rectangle holds its nearest canvas pixel, through
    the tile's placement composed with ``matrix``. Only the visible part of each tile is touched, and the
    2s canvas (4x the output's pixels) is never allocated, filled or read.
    """
    a, tx, ty = float(matrix[0, 0]), float(matrix[0, 2]), float(matrix[1, 2])
    out = np.full((s, s, *images[0].shape[2:]), 114, dtype=np.uint8)
    for img, (dst, src) in zip(images, placements):
        x0, x1 = _output_span(a, tx, dst[0], dst[2], s)
        y0, y1 = _output_span(a, ty, dst[1], dst[3], s)
        if x1 <= x0 or y1 <= y0:
            continue
        # tile pixel j sits at canvas j + (dst - src); the window starts at output (x0, y0)
        m = np.array([[a, 0.0, a * (dst[0] - src[0]) + tx - x0], [0.0, a, a * (dst[1] - src[1]) + ty - y0]])
        cv2.warpAffine(img, m, (x1 - x0, y1 - y0), dst=out[y0:y1, x0:x1], flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)  # written in place into the output's window
    return out


def mosaic4(images: list[np.ndarray], labels: list[np.ndarray], s: int, hyp: dict,
            rng: np.random.Generator | None = None, direct: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """4 images (long side s) with normalised labels -> one s x s mosaic with pixel-xyxy labels.

    Centre drawn in [s/2, 3s/2] on a 2s canvas, optional copy-paste, then the random affine with border -s/2.
    ``direct`` (used when the affine is a scale + translate and there is no copy-paste, as in every shipped
    hyp) warps the tiles straight into the output with :func:`warp_tiles`; otherwise v7.0's canvas is built and
    warped. Both consume the random stream identically and give the same labels.
    """
    rng = _rng(rng)
    images = same_channels(images)
    sizes = [im.shape[:2] for im in images]
    border = -s // 2
    yc, xc = (int(rng.uniform(-border, 2 * s + border)) for _ in range(2))
    placements = mosaic_placements(xc, yc, s, sizes)
    all_labels = place_labels(labels, sizes, placements, s)
    affine = {k: hyp.get(k, 0.0) for k in ("degrees", "translate", "scale", "shear", "perspective")}
    if direct and not (hyp.get("copy_paste", 0.0) or affine["degrees"] or affine["shear"] or affine["perspective"]):
        matrix, scale = random_affine_matrix(2 * s, 2 * s, s, s, rng=rng, **affine)  # scale + translate only
        return warp_tiles(images, placements, matrix, s), warp_labels(all_labels, matrix, scale, s, s)
    canvas = paste_tiles(images, placements, s)
    canvas, all_labels = copy_paste(canvas, all_labels, hyp.get("copy_paste", 0.0), rng)
    return random_perspective(canvas, all_labels, border=(border, border), rng=rng, **affine)


def mixup(img: np.ndarray, labels: np.ndarray, img2: np.ndarray, labels2: np.ndarray,
          rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) ratio (about 0.5) and keep the labels of both."""
    r = _rng(rng).beta(32.0, 32.0)
    img, img2 = same_channels([img, img2])
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
