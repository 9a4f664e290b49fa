"""Datasets: the bundled ``samples`` photos, ``imagenet:PATH``, ``folder:PATH`` and ``imagefolder:PATH``."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import harness
from harness.components import Dataset, Options
from harness.data import IMAGE_SUFFIXES, Sample, image_files, printable
from harness.errors import HarnessError
from harness.progress import warn
from harness_plugins.class_mapping import read_mapping, shown

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


class ImageFolderOptions(Options):
    path: str
    classes: str = "sorted"
    """Class indices: ``sorted`` (position in the sorted class folders, as torchvision's ImageFolder),
    ``imagenet`` (folders are WordNet ids -> the standard ImageNet-1k index) or a mapping FILE."""


class ImageFolder(Dataset):
    """Labelled class folders in torchvision's ImageFolder layout (``imagefolder:PATH``): ``PATH/<class>/**/<image>``.

    The class index of a folder is its position in the sorted list of class folders, as torchvision's
    ``find_classes`` gives it (``-o dataset.classes=sorted``, the default), or the ImageNet-1k index of
    its WordNet id (``classes=imagenet``), or what a mapping file says (``classes=FILE``, see
    ``harness_plugins.class_mapping``). Ids are the relative paths (``cat/001.png``); samples come
    class by class in that sorted order. Hidden folders (``.name``) are no classes (torchvision counts
    them; a warning says when one holds images); a class folder without images keeps its index (as
    torchvision's ``allow_empty=True``) and is named in a warning; images directly in PATH are left
    out (with a warning). Where the labels come from is part of the run id (``classes_sha256``).
    """

    id: ClassVar[str] = "imagefolder"
    Options = ImageFolderOptions

    def samples(self) -> list[Sample]:
        root = _root(self.options.path, "imagefolder")
        folders = _class_folders(root)
        mapping = self._indices(root, folders)
        self._classes_sha256 = hashlib.sha256(json.dumps(mapping, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()
        found: list[Sample] = []
        empty: list[str] = []
        for name in folders:
            files = image_files(root / name)
            if not files:
                empty.append(name)
            found.extend(Sample(id=p.relative_to(root).as_posix(), path=str(p), label=mapping[name]) for p in files)
        if not found:
            raise HarnessError(f"imagefolder: the class folders of {root} hold no images")
        if empty:
            warn(f"imagefolder: {len(empty)} class folder(s) hold no image and keep their index: "
                 f"{', '.join(shown(n) for n in empty[:5])}{' ...' if len(empty) > 5 else ''}")
        return found

    def content_identity(self) -> dict[str, str]:
        """The digest of {class folder: index} (part of the run id: a mapping that changes labels changes the id)."""
        if not hasattr(self, "_classes_sha256"):
            self.samples()
        return {"classes_sha256": self._classes_sha256}

    def _indices(self, root: Path, folders: list[str]) -> dict[str, int]:
        """{class folder: class index} for the folders of ``root``, by ``-o dataset.classes``."""
        choice = self.options.classes
        if not choice.strip():
            raise HarnessError("imagefolder: -o dataset.classes is empty; use sorted, imagenet or a mapping FILE")
        if choice == "sorted":
            return {name: i for i, name in enumerate(folders)}
        if choice == "imagenet":
            index = {w: i for i, w in enumerate(imagenet_wnids())}
            source = "the ImageNet-1k WordNet ids (-o dataset.classes=imagenet)"
        else:
            index = read_mapping(choice)
            source = f"the class mapping {printable(choice)}"
        unknown = [name for name in folders if name not in index]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise HarnessError(
                f"imagefolder: class folder(s) {', '.join(shown(n) for n in unknown[:3])}{more} of {root} "
                f"are not in {source}"
            )
        return {name: index[name] for name in folders}


def _class_folders(root: Path) -> list[str]:
    """The class folder names of ``root``, sorted as torchvision's ``find_classes``, hidden ones left out."""
    try:
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except OSError as exc:
        raise HarnessError(f"imagefolder: cannot list {root}: {exc.strerror or type(exc).__name__}") from None
    for name in names:
        if name.startswith(".") and _holds_images(root / name):
            warn(f"imagefolder: hidden folder {shown(name)} is no class (its images are left out; "
                 "torchvision's ImageFolder would count it as a class and shift the indices)")
    folders = [n for n in names if not n.startswith(".")]
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not folders:
        raise HarnessError(
            f"imagefolder: {root} has no class folders (expected PATH/<class>/<image>"
            f"{'; for a flat folder of unlabelled images use --data folder:PATH' if loose else ''})"
        )
    if loose:
        warn(f"imagefolder: {len(loose)} image(s) directly in {root} belong to no class folder and are left out")
    return folders


def _holds_images(folder: Path) -> bool:
    """Whether any image file lies below ``folder`` (stops at the first)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))


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
        samples = [Sample(id=p.name, path=str(p), label=labels[p.stem]) for p in files]
        pairs = json.dumps([[s.id, s.label] for s in samples], separators=(",", ":"))
        self._labels_sha256 = hashlib.sha256(pairs.encode()).hexdigest()
        return samples

    def content_identity(self) -> dict[str, str]:
        """For the flat layout, the digest of the labels read from the ground-truth file (part of the run
        id: the labels are no image content); nothing for class folders (their names are in the ids)."""
        if not hasattr(self, "_labels_sha256"):
            self.samples()
        digest = getattr(self, "_labels_sha256", None)
        return {"labels_sha256": digest} if digest else {}


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
    register(ImageFolder)
    register(ImageNetVal)
