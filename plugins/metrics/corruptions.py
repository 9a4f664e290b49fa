"""Common corruptions (Hendrycks & Dietterich, ICLR 2019) applied on the fly to PIL images.

Two backends:

``imagecorruptions``
    The ``imagecorruptions`` module (PyPI ``imagecorruptions-imaug``, the maintained fork of
    bethgelab's ``imagecorruptions``; install with ``pip install 'harness[corruptions]'``): all 19
    corruptions (the 15 of ImageNet-C plus speckle_noise, gaussian_blur, spatter, saturate) with no
    downloads. It re-implements motion blur (ImageNet-C used ImageMagick), so its images are close
    to, but not the same as, the released ImageNet-C files.
``builtin``
    A numpy/scipy/scikit-image re-implementation of 11 corruptions with ImageNet-C's severity
    parameters: gaussian_noise, shot_noise, impulse_noise, speckle_noise, gaussian_blur,
    defocus_blur, brightness, contrast, saturate, jpeg_compression, pixelate. For quick runs and
    tests where the extra is not installed; its numbers are comparable with neither the released
    set nor the other backend.

Every corruption is seeded (numpy's global generator for ``imagecorruptions``, a local generator
for ``builtin``), so the same image, corruption, severity and seed give the same pixels.
"""

from __future__ import annotations

import inspect
import io
from typing import Callable

import numpy as np
from PIL import Image

from harness.errors import HarnessError

COMMON = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
"""The 15 corruptions of ImageNet-C's benchmark (mCE is defined over these)."""
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The 4 held-out ("validation") corruptions released with ImageNet-C."""
ALL = COMMON + EXTRA
SEVERITIES = (1, 2, 3, 4, 5)

ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
"""AlexNet's top-1 error on each ImageNet-C corruption, averaged over the 5 severities."""


# -- builtin subset ---------------------------------------------------------------------------------
def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return np.clip(_unit(x) + rng.normal(scale=sigma, size=x.shape), 0, 1) * 255


def _shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return np.clip(rng.poisson(_unit(x) * photons) / float(photons), 0, 1) * 255


def _impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    out = _unit(x)
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out * 255


def _speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    x = _unit(x)
    return np.clip(x + x * rng.normal(scale=sigma, size=x.shape), 0, 1) * 255


def _gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.filters import gaussian

    sigma = (1, 2, 3, 4, 6)[severity - 1]
    return np.clip(gaussian(_unit(x), sigma=sigma, channel_axis=-1), 0, 1) * 255


def _disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
    from scipy.ndimage import correlate1d

    half = max(8, radius)
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    size = 3 if radius <= 8 else 5  # a small Gaussian anti-aliasing the disk's edge
    taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * alias_blur**2))
    taps /= taps.sum()
    for axis in (0, 1):
        disk = correlate1d(disk, taps, axis=axis, mode="mirror")
    return disk


def _defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import correlate

    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    kernel = _disk_kernel(radius, alias)
    x = _unit(x)
    channels = [correlate(x[..., c], kernel, mode="mirror") for c in range(x.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0, 1) * 255


def _contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = _unit(x)
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * factor + means, 0, 1) * 255


def _hsv_shift(x: np.ndarray, channel: int, scale: float, shift: float) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(_unit(x))
    hsv[..., channel] = np.clip(hsv[..., channel] * scale + shift, 0, 1)
    return np.clip(hsv2rgb(hsv), 0, 1) * 255


def _brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _hsv_shift(x, 2, 1.0, (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1])


def _saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale, shift = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))[severity - 1]
    return _hsv_shift(x, 1, scale, shift)


def _jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    height, width = x.shape[:2]
    small = Image.fromarray(x).resize((max(1, int(width * factor)), max(1, int(height * factor))), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BOX))


BUILTIN: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
}


# -- backends ---------------------------------------------------------------------------------------
class Corruptor:
    """Applies named corruptions at a severity to uint8 RGB arrays, seeded."""

    name: str
    available: tuple[str, ...]

    def __call__(self, image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
        raise NotImplementedError


class BuiltinCorruptor(Corruptor):
    name = "builtin"
    available = tuple(c for c in ALL if c in BUILTIN)

    def __call__(self, image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.uint8(np.clip(BUILTIN[corruption](image, severity, rng), 0, 255))


class ImageCorruptionsCorruptor(Corruptor):
    name = "imagecorruptions"
    available = ALL

    def __init__(self) -> None:
        try:
            import imagecorruptions
        except Exception as exc:  # ImportError, or a broken install (the unmaintained 1.1.2 needs pkg_resources)
            raise HarnessError(
                "on-the-fly corruption needs the imagecorruptions module: pip install 'harness[corruptions]' "
                "(PyPI imagecorruptions-imaug), or use -o metric.backend=builtin (11 corruptions, "
                f"numpy re-implementation) [{type(exc).__name__}: {exc}]"
            ) from None
        self._corrupt = imagecorruptions.corrupt
        params = inspect.signature(imagecorruptions.corrupt).parameters
        self._takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.version = getattr(imagecorruptions, "__version__", None)

    def __call__(self, image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
        np.random.seed(seed % 2**32)
        kwargs = {"seed": seed % 2**32} if self._takes_kwargs and corruption in ("glass_blur", "impulse_noise") else {}
        return np.uint8(self._corrupt(image, severity=severity, corruption_name=corruption, **kwargs))


def corruptor(backend: str) -> Corruptor:
    """The corruption backend named ``backend`` (``imagecorruptions`` or ``builtin``)."""
    if backend == "builtin":
        return BuiltinCorruptor()
    if backend == "imagecorruptions":
        return ImageCorruptionsCorruptor()
    raise HarnessError(f"unknown corruption backend {backend!r}; use imagecorruptions or builtin")


def resolve_corruptions(spec: str | list[str], available: tuple[str, ...] = ALL) -> list[str]:
    """Names from ``all`` / ``common`` / ``extra`` (restricted to ``available``) or an explicit list."""
    if isinstance(spec, str):
        word = spec.strip()
        groups = {"all": ALL, "common": COMMON, "extra": EXTRA}
        if word in groups:
            return [c for c in groups[word] if c in available]
        names = [n.strip() for n in word.split(",") if n.strip()]
    else:
        names = list(spec)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise HarnessError(f"unknown corruption(s) {', '.join(unknown)}; known: all, common, extra, {', '.join(ALL)}")
    missing = [n for n in names if n not in available]
    if missing:
        raise HarnessError(f"corruption(s) {', '.join(missing)} not available here (available: {', '.join(available)})")
    if not names:
        raise HarnessError("no corruptions selected")
    return list(dict.fromkeys(names))


def imagenet_c_geometry(image: Image.Image, size: int = 224) -> Image.Image:
    """ImageNet-C's preprocessing before corrupting: resize the shorter side to size / 0.875, centre-crop ``size``."""
    short = int(round(size / 0.875))  # 256 for 224, as torchvision's Resize(256) + CenterCrop(224)
    width, height = image.size
    if width <= height:
        new_size = (short, int(short * height / width))
    else:
        new_size = (int(short * width / height), short)
    resized = image.resize(new_size, Image.Resampling.BILINEAR)
    width, height = resized.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return resized.crop((left, top, left + size, top + size))


def as_released(array: np.ndarray, jpeg_quality: int | None) -> Image.Image:
    """The corrupted array as a PIL image, JPEG-encoded at ``jpeg_quality`` (as the released files) unless None."""
    image = Image.fromarray(np.uint8(array)).convert("RGB")
    if jpeg_quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=jpeg_quality, optimize=True)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
