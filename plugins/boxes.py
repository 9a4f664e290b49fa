"""Bounding boxes of the labelled object, for the localisation metrics, and their masks in the model's input.

A box is ``[x0, y0, x1, y1]`` in pixels of the original image: it covers the pixel columns
``x0 <= c < x1`` and rows ``y0 <= r < y1`` (0-based, end exclusive: ``image[y0:y1, x0:x1]``). An image
may have several boxes (instances of its class); the object is their union.

Where boxes come from (the metric option ``boxes``, or found without it):

- the bundled ``samples`` photos: ``plugins/data/sample_boxes.json`` (drawn by hand; astronaut has none);
- ImageNet validation images: the released Pascal-VOC-style XML files (``ILSVRC2012_bbox_val_v3.tgz``),
  ``<stem>.xml`` beside the image or in Kaggle's mirrored ``.../Annotations/...`` folder, or Kaggle's
  ``LOC_val_solution.csv`` in the dataset folder or its parent; ``boxes=FOLDER`` searches a folder (and
  its subfolders) for ``<image stem>.xml``; ``boxes=FILE.csv`` reads a Kaggle-style CSV. VOC boxes are
  1-based and inclusive: ``xmin..xmax`` becomes ``[xmin - 1, ymin - 1, xmax, ymax]``;
- ``folder:`` datasets: a JSON file, ``boxes.json`` in the dataset folder or ``boxes=FILE.json``::

      {"images": {"<sample id: the path relative to the folder>":
                  {"width": 640, "height": 480, "boxes": [[x0, y0, x1, y1], ...]}}}

  (``width`` and ``height``, the size of the image the boxes were drawn on, are optional.)

When the annotated size (XML ``<size>``, JSON ``width``/``height``) differs from the image's, the boxes
are scaled to the image (a dataset stored resized). Masks in the model's input frame are made by
drawing the boxes as a white-on-black image of the original size and passing it through the model's
own preprocessing (resize, crop, interpolation), thresholded at one half: the boxes follow every
crop mode exactly as the pixels do.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from harness.errors import HarnessError

if TYPE_CHECKING:
    from PIL import Image

    from harness.data import Sample
    from harness.model import LoadedModel

Box = tuple[float, float, float, float]
BUNDLED_BOXES = Path(__file__).parent / "data" / "sample_boxes.json"


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image, the size of the image they were drawn on (None: unknown) and their file."""

    boxes: tuple[Box, ...]
    width: int | None = None
    height: int | None = None
    source: str = ""

    def scaled(self, width: int, height: int) -> tuple[Box, ...]:
        """The boxes in pixels of a ``width x height`` image (scaled when the annotated size differs)."""
        sx = width / self.width if self.width else 1.0
        sy = height / self.height if self.height else 1.0
        return tuple((x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in self.boxes)


def _box(values: Any, where: str) -> Box:
    if (not isinstance(values, (list, tuple)) or len(values) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise HarnessError(f"{where}: a box is [x0, y0, x1, y1] (four numbers), got {values!r}")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not (x0 < x1 and y0 < y1):
        raise HarnessError(f"{where}: box {values!r} is empty (x0 < x1 and y0 < y1 are needed)")
    return x0, y0, x1, y1


def parse_voc_xml(path: Path) -> ImageBoxes:
    """Every object's box in a Pascal-VOC / ImageNet annotation file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise HarnessError(f"boxes: cannot read {path}: {exc}") from None

    def number(node: Any, tag: str) -> float:
        text = node.findtext(tag)
        try:
            return float(text)
        except (TypeError, ValueError):
            raise HarnessError(f"boxes: {path}: <{tag}> is {text!r}, not a number") from None

    boxes = []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        xmin, ymin, xmax, ymax = (number(bnd, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(_box([xmin - 1, ymin - 1, xmax, ymax], str(path)))
    size = root.find("size")
    width = int(number(size, "width")) if size is not None and size.findtext("width") else None
    height = int(number(size, "height")) if size is not None and size.findtext("height") else None
    return ImageBoxes(tuple(boxes), width or None, height or None, str(path))


def read_boxes_json(path: Path) -> dict[str, ImageBoxes]:
    """The ``{"images": {id: {"width", "height", "boxes"}}}`` file described in this module's docstring."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"boxes: cannot read {path}: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, dict):
        raise HarnessError(f'boxes: {path} must hold {{"images": {{"<sample id>": {{"boxes": [[x0, y0, x1, y1], ...]}}}}}}')
    out = {}
    for key, entry in images.items():
        where = f"{path}: {key!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("boxes"), list):
            raise HarnessError(f'{where}: each image needs "boxes": [[x0, y0, x1, y1], ...]')
        size = []
        for name in ("width", "height"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise HarnessError(f"{where}: {name} must be a positive integer, got {value!r}")
            size.append(value)
        out[key] = ImageBoxes(tuple(_box(b, where) for b in entry["boxes"]), size[0], size[1], str(path))
    return out


def read_kaggle_csv(path: Path) -> dict[str, ImageBoxes]:
    """Kaggle's ``LOC_val_solution.csv``: ImageId -> boxes (``PredictionString``: wnid xmin ymin xmax ymax ...)."""
    out: dict[str, ImageBoxes] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for n, row in enumerate(csv.DictReader(handle), start=2):
                words = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or len(words) % 5:
                    raise HarnessError(f"boxes: {path} line {n}: expected ImageId and groups of 'wnid xmin ymin xmax ymax'")
                boxes = []
                for i in range(0, len(words), 5):
                    try:
                        xmin, ymin, xmax, ymax = (float(w) for w in words[i + 1 : i + 5])
                    except ValueError:
                        raise HarnessError(f"boxes: {path} line {n}: {' '.join(words[i:i + 5])!r} has a non-number") from None
                    boxes.append(_box([xmin - 1, ymin - 1, xmax, ymax], f"{path} line {n}"))
                out[row["ImageId"]] = ImageBoxes(tuple(boxes), None, None, str(path))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HarnessError(f"boxes: cannot read {path}: {exc}") from None
    return out


@lru_cache(maxsize=8)
def _json_cached(path: str, mtime_ns: int) -> dict[str, ImageBoxes]:
    return read_boxes_json(Path(path))


@lru_cache(maxsize=4)
def _csv_cached(path: str, mtime_ns: int) -> dict[str, ImageBoxes]:
    return read_kaggle_csv(Path(path))


def _load(path: Path, reader: Any) -> dict[str, ImageBoxes]:
    return reader(str(path), path.stat().st_mtime_ns)


class BoxFinder:
    """Looks up the boxes of samples: from ``source`` (a folder of XML files, a JSON or a CSV file) or,
    with ``source=None``, from the places listed in this module's docstring."""

    def __init__(self, source: str | None = None):
        self.source = source
        self._xml_index: dict[str, Path] | None = None
        if source is not None:
            path = Path(source).expanduser()
            if not path.exists():
                raise HarnessError(f"boxes: {source} does not exist (give a folder of .xml files, a .json or a .csv file)")
            if path.is_file() and path.suffix.lower() not in (".json", ".csv"):
                raise HarnessError(f"boxes: {source}: use a folder of .xml files, a .json or a .csv file")
            self.path = path

    def find(self, sample: "Sample") -> ImageBoxes | None:
        """The boxes of ``sample``, or None when it has none."""
        source = self.source_of(sample)
        if source is None:
            return None
        if source == BUNDLED_BOXES:
            return _bundled(sample)
        suffix = source.suffix.lower()
        if suffix == ".xml":
            return parse_voc_xml(source)
        if suffix == ".json":
            return _load(source, _json_cached).get(sample.id)
        return _load(source, _csv_cached).get(Path(sample.path).stem)

    def source_of(self, sample: "Sample") -> Path | None:
        """The file that holds ``sample``'s boxes (its content is part of the run id), or None."""
        if self.source is not None:
            if not self.path.is_dir():
                return self.path
            if self._xml_index is None:
                self._xml_index = {}
                for p in sorted(self.path.rglob("*.xml")):
                    self._xml_index.setdefault(p.stem, p)
            return self._xml_index.get(Path(sample.path).stem)
        path = Path(sample.path)
        if _bundled(sample) is not None:
            return BUNDLED_BOXES
        beside = path.with_suffix(".xml")
        if beside.is_file():
            return beside
        parts = list(path.parts)
        if "Data" in parts:  # Kaggle: ILSVRC/Data/CLS-LOC/val/x.JPEG -> ILSVRC/Annotations/CLS-LOC/val/x.xml
            i = len(parts) - 1 - parts[::-1].index("Data")
            mirrored = Path(*parts[:i], "Annotations", *parts[i + 1 :]).with_suffix(".xml")
            if mirrored.is_file():
                return mirrored
        root = dataset_root(sample)
        if (root / "boxes.json").is_file():
            return root / "boxes.json"
        for folder in (root, root.parent):
            if (folder / "LOC_val_solution.csv").is_file():
                return folder / "LOC_val_solution.csv"
        return None


def dataset_root(sample: "Sample") -> Path:
    """The dataset folder of ``sample``: its path without its id (ids are paths relative to the folder)."""
    path = Path(sample.path)
    depth = len(Path(sample.id).parts)
    if path.as_posix().endswith(sample.id) and 1 <= depth < len(path.parts):
        return path.parents[depth - 1]
    return path.parent


def _bundled(sample: "Sample") -> ImageBoxes | None:
    """The hand-drawn box of a bundled ``samples`` photo (scikit-image's data folder)."""
    table = _bundled_table()
    entry = table.get(sample.id)
    if entry is None:
        return None
    name, boxes = entry
    path = Path(sample.path)
    if path.name != name:
        return None
    import skimage.data

    try:
        if path.resolve() != (Path(skimage.data.__file__).parent / name).resolve():
            return None
    except OSError:
        return None
    return boxes


@lru_cache(maxsize=1)
def _bundled_table() -> dict[str, tuple[str, ImageBoxes]]:
    data = json.loads(BUNDLED_BOXES.read_text(encoding="utf-8"))
    boxes = read_boxes_json(BUNDLED_BOXES)
    return {key: (data["images"][key]["file"], boxes[key]) for key in boxes}


# -- masks in the model's input frame ------------------------------------------------------------------
def box_mask(width: int, height: int, boxes: Sequence[Box], tolerance: float = 0.0) -> np.ndarray:
    """(height, width) bool: the pixels in a box or, with ``tolerance`` > 0, whose centre is closer than
    ``tolerance`` pixels (Euclidean, strictly) to a pixel in a box (TorchRay's acceptance disk)."""
    cols = np.arange(width, dtype=np.float64)[None, :]
    rows = np.arange(height, dtype=np.float64)[:, None]
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        # the pixels whose centre (c + 0.5, r + 0.5) lies in [x0, x1) x [y0, y1)
        first_c, last_c = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5) - 1
        first_r, last_r = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5) - 1
        if last_c < first_c or last_r < first_r:
            continue
        dx = np.maximum(np.maximum(first_c - cols, cols - last_c), 0)
        dy = np.maximum(np.maximum(first_r - rows, rows - last_r), 0)
        if tolerance > 0:
            mask |= dx**2 + dy**2 < tolerance**2
        else:
            mask |= (dx == 0) & (dy == 0)
    return mask


def input_masks(model: "LoadedModel", images: Sequence["Image.Image"], boxes: Sequence[Sequence[Box]],
                tolerance: float = 0.0) -> torch.Tensor:
    """(N, H, W) bool masks of ``boxes`` (in pixels of each original image) in ``model``'s input frame:
    each drawn at the original size (dilated by ``tolerance`` pixels there), then preprocessed like the image."""
    from PIL import Image

    drawn = []
    for image, image_boxes in zip(images, boxes):
        width, height = image.size
        mask = box_mask(width, height, image_boxes, tolerance)
        drawn.append(Image.fromarray(np.repeat(mask[:, :, None], 3, axis=2).astype(np.uint8) * 255))
    pixels = model.denormalise(model.preprocess(drawn))
    return pixels[:, 0] > 0.5
