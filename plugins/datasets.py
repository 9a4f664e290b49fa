"""Datasets: the bundled ``samples`` photos, ``imagenet:PATH`` and ``folder:PATH``."""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import harness
from harness.components import Dataset, Options
from harness.data import Sample, image_files
from harness.errors import HarnessError

WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k synset ids in the standard (sorted) class-index order."""
    import timm.data

    return list(timm.data.ImageNetInfo().label_names())


class SampleImages(Dataset):
    """Public-domain / CC0 photos from scikit-image's data folder, with ImageNet labels.

    chelsea (CC0, Stefan van der Walt) -> 285 Egyptian cat; coffee (CC0, Rachel Michetti) -> 967
    espresso; rocket (public domain, SpaceX) -> 657 missile; astronaut (public domain, NASA) -> no
    ImageNet-1k class (label null: used by attribution metrics, not counted by accuracy).
    """

    id: ClassVar[str] = "samples"
    PHOTOS: ClassVar[tuple[tuple[str, int | None], ...]] = (
        ("chelsea.png", 285),
        ("coffee.png", 967),
        ("rocket.jpg", 657),
        ("astronaut.png", None),
    )

    def samples(self) -> list[Sample]:
        import skimage.data

        root = Path(skimage.data.__file__).parent
        return [Sample(id=name.rsplit(".", 1)[0], path=str(root / name), label=label) for name, label in self.PHOTOS]


class PathOptions(Options):
    path: str


def _root(path: str, dataset: str) -> Path:
    if not path.strip():
        raise HarnessError(f"{dataset}: give the folder, e.g. --data {dataset}:PATH (the path is empty)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HarnessError(f"{dataset}: {root} is not a folder")
    return root


class FolderImages(Dataset):
    """Every image below a folder (``folder:PATH``), unlabelled; ids are the relative paths."""

    id: ClassVar[str] = "folder"
    Options = PathOptions

    def samples(self) -> list[Sample]:
        root = _root(self.options.path, "folder")
        return [Sample(id=p.relative_to(root).as_posix(), path=str(p)) for p in image_files(root)]


class ImageNetVal(Dataset):
    """ImageNet validation images (``imagenet:PATH``).

    Layouts: class folders named by WordNet id (``n01440764/*.JPEG``; labels follow the standard
    sorted-synset order even when only some classes are present), or the flat folder of
    ``ILSVRC2012_val_*.JPEG`` with the official ``ILSVRC2012_validation_ground_truth.txt`` and the
    devkit's ``meta.mat`` (in the folder or a ``ILSVRC2012_devkit_t12/data`` next to it), or Kaggle's
    ``LOC_val_solution.csv``.
    """

    id: ClassVar[str] = "imagenet"
    Options = PathOptions

    def samples(self) -> list[Sample]:
        root = _root(self.options.path, "imagenet")
        classes = sorted(p for p in root.iterdir() if p.is_dir() and WNID.match(p.name))
        if classes:
            index = {w: i for i, w in enumerate(imagenet_wnids())}
            unknown = [c.name for c in classes if c.name not in index]
            if unknown:
                raise HarnessError(f"imagenet: {root} has folders that are no ImageNet-1k class: {', '.join(unknown[:3])}")
            return [
                Sample(id=p.relative_to(root).as_posix(), path=str(p), label=index[c.name])
                for c in classes
                for p in image_files(c)
            ]
        files = image_files(root)
        labels = _flat_labels(root)
        missing = [p.name for p in files if p.stem not in labels]
        if missing:
            raise HarnessError(f"imagenet: no ground truth for {len(missing)} image(s), e.g. {missing[0]}")
        return [Sample(id=p.name, path=str(p), label=labels[p.stem]) for p in files]


def _flat_labels(root: Path) -> dict[str, int]:
    """Image stem -> class index for the flat validation layout."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}

    def class_of(wnid: str, where: str) -> int:
        if wnid not in index:
            raise HarnessError(f"imagenet: {where} names {wnid!r}, which is no ImageNet-1k class")
        return index[wnid]

    kaggle = _find(root, "LOC_val_solution.csv")
    if kaggle is not None:
        with open(kaggle, newline="") as handle:
            labels = {}
            for n, row in enumerate(csv.DictReader(handle), start=2):
                words = (row.get("PredictionString") or "").split()
                if not words or not row.get("ImageId"):
                    raise HarnessError(f"imagenet: {kaggle} line {n} has no ImageId or PredictionString")
                labels[row["ImageId"]] = class_of(words[0], f"{kaggle} line {n}")
            return labels
    truth = _find(root, "ILSVRC2012_validation_ground_truth.txt")
    meta = _find(root, "meta.mat")
    if truth is None or meta is None:
        raise HarnessError(
            f"imagenet: {root} has no class folders and no ground truth; put "
            "ILSVRC2012_validation_ground_truth.txt and the devkit's meta.mat (or LOC_val_solution.csv) there"
        )
    ilsvrc_to_wnid = _devkit_ids(meta)
    labels = {}
    for n, word in enumerate(truth.read_text().split(), start=1):
        try:
            ilsvrc_id = int(word)
        except ValueError:
            raise HarnessError(f"imagenet: {truth} line {n}: {word!r} is not a class number") from None
        if ilsvrc_id not in ilsvrc_to_wnid:
            raise HarnessError(f"imagenet: {truth} line {n}: ILSVRC2012_ID {ilsvrc_id} is not a leaf class in {meta}")
        labels[f"ILSVRC2012_val_{n:08d}"] = class_of(ilsvrc_to_wnid[ilsvrc_id], f"{meta}")
    return labels


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "ILSVRC2012_devkit_t12" / "data", root.parent / "ILSVRC2012_devkit_t12" / "data"):
        if (folder / name).is_file():
            return folder / name
    return None


def _devkit_ids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WordNet id from the devkit's meta.mat (leaf synsets only)."""
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {
        int(s["ILSVRC2012_ID"]): str(s["WNID"])
        for s in synsets
        if int(s["num_children"]) == 0
    }


@harness.hookimpl
def register_datasets(register):
    register(SampleImages)
    register(FolderImages)
    register(ImageNetVal)
