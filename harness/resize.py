"""OpenCV's ``INTER_LINEAR`` resize of 8-bit images, reproduced bit for bit without OpenCV.

Published explanation code (SAG, I-GOS, RISE) feeds its models ``cv2.resize(img, (224, 224))``: a
squash resize with half-pixel centres, no antialiasing, and OpenCV's fixed-point arithmetic
(weights in 11 bits; the vertical pass of the vectorised kernel that x86 builds run rounds in two
steps). timm's default pipeline (PIL bilinear with antialiasing) gives a visibly different input, so
a published run can only be repeated with this resize. Exactly 2x reductions take OpenCV's
``INTER_AREA`` path (the mean of each 2 x 2 block), as ``cv2.resize`` does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["opencv_linear_resize"]

_BITS = 11
_SCALE = 1 << _BITS  # INTER_RESIZE_COEF_SCALE


def _taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left index, right index, int16 weight pairs) of every output position along one axis.

    Outside the image OpenCV clips the indices on both axes but resets the weights to (1, 0) only
    horizontally (``clamp_weights``); vertically the two weights stay and both read the edge row."""
    scale = src / dst
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    frac = (f - i.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low = i < 0
        frac[low], i[low] = 0.0, 0
        high = i >= src - 1
        frac[high], i[high] = 0.0, src - 1
    weights = np.stack([(np.float32(1) - frac) * _SCALE, frac * _SCALE], axis=1)
    weights = np.rint(weights).astype(np.int64)  # saturate_cast<short>: round half to even
    return np.clip(i, 0, src - 1), np.clip(i + 1, 0, src - 1), weights


def opencv_linear_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (``INTER_LINEAR``) for a uint8 (H, W) or (H, W, C) array."""
    if image.dtype != np.uint8:
        raise TypeError(f"opencv_linear_resize takes uint8 images, got {image.dtype}")
    squeeze = image.ndim == 2
    src = image[..., None] if squeeze else image
    src_h, src_w = src.shape[:2]
    if (src_w, src_h) == (width, height):
        out = src.copy()
    elif src_w == 2 * width and src_h == 2 * height:
        blocks = src.reshape(height, 2, width, 2, -1).astype(np.int64).sum(axis=(1, 3))
        out = ((blocks + 2) >> 2).astype(np.uint8)
    else:
        x0, x1, a = _taps(src_w, width, clamp_weights=True)
        y0, y1, b = _taps(src_h, height, clamp_weights=False)
        s = src.astype(np.int64)
        rows = s[:, x0] * a[:, 0, None] + s[:, x1] * a[:, 1, None]  # (src_h, width, C), scale 2^11
        top, bottom = rows[y0] >> 4, rows[y1] >> 4  # the vector kernel packs to int16 first
        b0, b1 = b[:, 0, None, None], b[:, 1, None, None]
        value = ((top * b0) >> 16) + ((bottom * b1) >> 16)
        out = np.clip((value + 2) >> 2, 0, 255).astype(np.uint8)
    return out[..., 0] if squeeze else out
