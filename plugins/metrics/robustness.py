"""Robustness to common corruptions (ImageNet-C; the FAN paper's protocol) and the ``imagenet-c`` dataset.

Two sources of corrupted images:

- ``--data imagenet-c:PATH``: the released ImageNet-C folder ``<root>/<corruption>/<severity>/<wnid>/
  <image>`` (Hendrycks & Dietterich 2019). Sample ids keep that layout
  (``gaussian_noise/3/n01440764/ILSVRC2012_val_00000293.JPEG``), so the metric groups by them. The
  clean images for the clean accuracy come from ``<root>/clean/<wnid>/<image>`` (the layout of FAN's
  README) or from ``-o dataset.clean=PATH`` (any ImageNet validation folder ``imagenet:PATH`` reads).
  These are the benchmark's numbers.
- any other dataset: every image is corrupted on the fly, in the same run as its clean evaluation,
  with each selected corruption at each selected severity. The image is first brought to ImageNet-C's
  geometry (shorter side 256, centre crop 224), corrupted, and JPEG-encoded at quality 85 as the
  released files were; then the model's own preprocessing applies. On-the-fly numbers are NOT the
  released benchmark: the ``imagecorruptions`` package re-implements some corruptions (motion blur,
  and frost/snow/spatter details), and the ``builtin`` backend has only 11 of the 19.

Reported (``values``): accuracy per corruption and severity; per-corruption mean; the clean accuracy
of the same run; the headline mean accuracy over the evaluated corruptions (each corruption the mean
of its severities); ``mean_accuracy_15`` / ``mean_accuracy_19`` over ImageNet-C's 15 benchmark
corruptions / all 19 (null unless all were evaluated); corruption errors ``CE_c = sum_s err(c, s) /
sum_s err_AlexNet(c, s)`` (AlexNet's errors averaged over the 5 severities, so with all 5 severities
this is ``mean_s err(c, s) / alexnet_c``) and ``mce`` = their mean over the 15 (null unless all 15);
the retention rate ``R = corrupted accuracy / clean accuracy`` (headline, and over the 15 / 19); and,
on the fly, ``consistency``: how often the corrupted prediction equals the clean one (unlabelled
images count here too).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

import harness
from harness.components import Dataset, Metric, Options, Summary
from harness.data import Sample
from harness.errors import HarnessError
from harness.stats import mean_stderr
from harness_plugins.metrics.corruptions import (
    ALEXNET_ERRORS,
    ALL,
    COMMON,
    SEVERITIES,
    Corruptor,
    as_released,
    corruptor,
    imagenet_c_geometry,
    resolve_corruptions,
)

CLEAN = "clean"
CITATION = (
    "Hendrycks & Dietterich, Benchmarking Neural Network Robustness to Common Corruptions and Perturbations, "
    "ICLR 2019; Zhou et al., Understanding The Robustness in Vision Transformers, ICML 2022"
)


def parse_condition(sample_id: str) -> tuple[str, int] | None:
    """(corruption, severity) of an ImageNet-C sample id, (``clean``, 0) for a clean one, else None."""
    parts = sample_id.split("/")
    if len(parts) >= 2 and parts[0] == CLEAN:
        return CLEAN, 0
    if len(parts) >= 3 and parts[0] in ALL and parts[1].isdigit() and int(parts[1]) in SEVERITIES:
        return parts[0], int(parts[1])
    return None


def _check_severities(values: list[int]) -> list[int]:
    bad = [v for v in values if v not in SEVERITIES]
    if bad or not values:
        raise ValueError(f"severities must be a non-empty list of 1..5, got {values}")
    return sorted(set(values))


def _check_corruptions(value: str | list[str]) -> str | list[str]:
    try:
        resolve_corruptions(value)
    except HarnessError as exc:
        raise ValueError(str(exc)) from None
    return value


# -- pure summary ------------------------------------------------------------------------------------
def corruption_summary(
    accuracy: dict[str, dict[int, float]], clean_accuracy: float | None
) -> dict[str, Any]:
    """Aggregate accuracies ``{corruption: {severity: acc}}`` (and the clean accuracy) into the report.

    Each corruption counts once (the mean over its severities); ``mce`` and the 15/19 means need
    every corruption of their set, else they are None.
    """
    per_corruption = {c: float(np.mean([accuracy[c][s] for s in sorted(accuracy[c])])) for c in accuracy if accuracy[c]}
    if not per_corruption:
        raise HarnessError("robustness: no corrupted image was evaluated")
    mean_all = float(np.mean(list(per_corruption.values())))

    def mean_over(names: tuple[str, ...]) -> float | None:
        return float(np.mean([per_corruption[c] for c in names])) if all(c in per_corruption for c in names) else None

    mean15, mean19 = mean_over(COMMON), mean_over(ALL)
    ce = {c: (1.0 - per_corruption[c]) / ALEXNET_ERRORS[c] for c in COMMON if c in per_corruption}
    mce = float(np.mean([ce[c] for c in COMMON])) if len(ce) == len(COMMON) else None

    def ratio(value: float | None) -> float | None:
        if value is None or clean_accuracy is None or clean_accuracy == 0:
            return None
        return value / clean_accuracy

    return {
        "accuracy": {c: {str(s): accuracy[c][s] for s in sorted(accuracy[c])} for c in accuracy},
        "corruption_accuracy": per_corruption,
        "mean_accuracy": mean_all,
        "mean_accuracy_15": mean15,
        "mean_accuracy_19": mean19,
        "clean_accuracy": clean_accuracy,
        "retention": ratio(mean_all),
        "retention_15": ratio(mean15),
        "retention_19": ratio(mean19),
        "ce": ce,
        "mce": mce,
        "corruptions": [c for c in ALL if c in accuracy],
        "severities": sorted({s for c in accuracy for s in accuracy[c]}),
    }


# -- the metric --------------------------------------------------------------------------------------
class RobustnessOptions(Options):
    corruptions: str | list[str] = "all"
    """On the fly: ``all``, ``common`` (the 15), ``extra`` (the 4), or names (list or comma-separated)."""
    severities: list[int] = Field(default_factory=lambda: list(SEVERITIES))
    """On the fly: the severities applied (1-5)."""
    backend: Literal["imagecorruptions", "builtin"] = "imagecorruptions"
    """On the fly: the imagecorruptions package (extra `corruptions`, all 19) or the builtin subset (11)."""
    corrupt_size: int = Field(224, ge=32)
    """On the fly: the centre crop (after resizing the shorter side to size / 0.875) that is corrupted."""
    jpeg_quality: int | None = Field(85, ge=1, le=100)
    """On the fly: JPEG quality of the corrupted image, as the released files (null: no re-encoding)."""

    @field_validator("severities")
    @classmethod
    def _valid_severities(cls, value: list[int]) -> list[int]:
        return _check_severities(value)

    @field_validator("corruptions")
    @classmethod
    def _valid_corruptions(cls, value: str | list[str]) -> str | list[str]:
        return _check_corruptions(value)


class Robustness(Metric):
    """Accuracy under common corruptions (ImageNet-C or on the fly): per corruption/severity, mCE, retention."""

    id: ClassVar[str] = "robustness"
    higher_is_better: ClassVar[bool] = True
    citation: ClassVar[str] = CITATION
    Options = RobustnessOptions

    def __init__(self, options: RobustnessOptions | None = None):
        super().__init__(options)
        self._corruptor: Corruptor | None = None
        self._conditions: list[tuple[str, int]] | None = None

    def conditions(self) -> list[tuple[str, int]]:
        """The (corruption, severity) pairs applied on the fly, in order."""
        if self._conditions is None:
            from harness_plugins.metrics.corruptions import BuiltinCorruptor

            available = BuiltinCorruptor.available if self.options.backend == "builtin" else ALL
            names = resolve_corruptions(self.options.corruptions, available)
            self._conditions = [(c, s) for c in names for s in self.options.severities]
        return self._conditions

    def _corrupt(self, image: Any, seed: int) -> list[Any]:
        if not hasattr(image, "convert"):
            from harness.errors import HarnessError

            raise HarnessError("robustness corrupts photos (PIL images): give it a dataset id or path, not preprocessed tensors")
        if self._corruptor is None:
            self._corruptor = corruptor(self.options.backend)
        base = np.asarray(imagenet_c_geometry(image.convert("RGB"), self.options.corrupt_size))
        out = []
        for name, severity in self.conditions():
            condition_seed = (seed + 1_000_003 * (ALL.index(name) + 1) + 7_919 * severity) % 2**63
            out.append(as_released(self._corruptor(base, name, severity, condition_seed), self.options.jpeg_quality))
        return out

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        records: list[dict[str, Any] | None] = [None] * len(batch)
        released = [i for i, s in enumerate(batch.samples) if parse_condition(s.id) is not None]
        if released:
            inputs = model.preprocess([batch.images[i] for i in released])
            predictions = model.logits(inputs).argmax(1).tolist()
            for i, pred in zip(released, predictions):
                corruption, severity = parse_condition(batch.samples[i].id)  # type: ignore[misc]
                records[i] = {"prediction": int(pred), "values": {"corruption": corruption, "severity": severity}}
        fly = [i for i in range(len(batch)) if records[i] is None]
        if fly:
            names = [f"{c}/{s}" for c, s in self.conditions()]
            clean = model.logits(model.preprocess([batch.images[i] for i in fly])).argmax(1).tolist()
            for i, clean_pred in zip(fly, clean):
                variants = self._corrupt(batch.images[i], batch.seeds[i])
                preds = model.logits(model.preprocess(variants)).argmax(1).tolist()
                records[i] = {
                    "prediction": int(clean_pred),
                    "values": {"corruption": "on_the_fly", "predictions": dict(zip(names, map(int, preds)))},
                }
        return records  # type: ignore[return-value]

    def summarize(self, records, ctx) -> Summary:
        hits: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        clean_hits: list[int] = []
        per_image: list[float] = []
        agree: list[int] = []
        for r in records:
            values, label = r["values"], r.get("label")
            if values.get("corruption") == "on_the_fly":
                clean_pred = r["prediction"]
                image_hits = []
                for key, pred in values["predictions"].items():
                    name, severity = key.rsplit("/", 1)
                    agree.append(int(pred == clean_pred))
                    if label is not None:
                        hits[name][int(severity)].append(int(pred == label))
                        image_hits.append(int(pred == label))
                if label is not None:
                    clean_hits.append(int(clean_pred == label))
                    per_image.append(float(np.mean(image_hits)) if image_hits else float("nan"))
            elif label is not None:
                correct = int(r["prediction"] == label)
                if values["corruption"] == CLEAN:
                    clean_hits.append(correct)
                else:
                    hits[values["corruption"]][int(values["severity"])].append(correct)
                    per_image.append(float(correct))
        if not hits:
            raise HarnessError("robustness needs labelled samples; this dataset has no labels for its corrupted images")
        accuracy = {c: {s: float(np.mean(v)) for s, v in sev.items()} for c, sev in hits.items()}
        clean_accuracy = float(np.mean(clean_hits)) if clean_hits else None
        report = corruption_summary(accuracy, clean_accuracy)
        report["n"] = {c: {str(s): len(v) for s, v in sorted(sev.items())} for c, sev in hits.items()}
        report["n_clean"] = len(clean_hits)
        report["consistency"] = float(np.mean(agree)) if agree else None
        report["source"] = "on_the_fly" if agree else "dataset"
        if agree:
            report["backend"] = self.options.backend
            report["note"] = "corrupted on the fly: not the released ImageNet-C benchmark"
        if report["severities"] != list(SEVERITIES) and report["ce"]:
            report["ce_note"] = "AlexNet constants average all 5 severities; with fewer, CE and mCE are approximations"
        if clean_accuracy is None:
            report["retention_note"] = (
                "no clean images: put them in <root>/clean/<wnid>/ or pass -o dataset.clean=PATH"
            )
        elif clean_accuracy == 0:
            report["retention_note"] = "clean accuracy is 0: retention is undefined"
        _, stderr = mean_stderr([v for v in per_image if v == v])
        return Summary(value=report["mean_accuracy"], stderr=stderr, values=report)

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.plotting import pyplot

        accuracy = result.values.get("accuracy") or {}
        if not accuracy:
            return {}
        names = [c for c in ALL if c in accuracy]
        severities = sorted({int(s) for c in names for s in accuracy[c]})
        grid = np.full((len(names), len(severities)), np.nan)
        for i, name in enumerate(names):
            for j, severity in enumerate(severities):
                grid[i, j] = accuracy[name].get(str(severity), np.nan)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(4.2 + 0.5 * len(severities), 1.2 + 0.32 * len(names)), dpi=120)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(names)):
            for j in range(len(severities)):
                if grid[i, j] == grid[i, j]:
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(severities)), [str(s) for s in severities])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("severity")
        clean = result.values.get("clean_accuracy")
        mce = result.values.get("mce")
        extra = (f", clean {clean:.3f}" if clean is not None else "") + (f", mCE {mce:.3f}" if mce is not None else "")
        ax.set_title(f"{result.models[0].id}: corrupted top-1 {result.value:.3f}{extra}", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.05)
        fig.tight_layout()
        folder = Path(out_dir) / result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "robustness.png")
        plt.close(fig)
        return {"robustness": f"{result.run_id}/robustness.png"}


# -- the dataset -------------------------------------------------------------------------------------
class ImageNetCOptions(Options):
    path: str
    corruptions: str | list[str] = "all"
    """Which corruption folders to read: ``all``, ``common``, ``extra``, or names."""
    severities: list[int] = Field(default_factory=lambda: list(SEVERITIES))
    clean: str | None = None
    """An ImageNet validation folder (any layout ``imagenet:PATH`` reads) for the clean accuracy; unset: ``<root>/clean`` if present."""

    @field_validator("severities")
    @classmethod
    def _valid_severities(cls, value: list[int]) -> list[int]:
        return _check_severities(value)

    @field_validator("corruptions")
    @classmethod
    def _valid_corruptions(cls, value: str | list[str]) -> str | list[str]:
        return _check_corruptions(value)


def _images_below(folder: Path) -> list[tuple[str, str]]:
    """(wnid/file, absolute path) of the images in the class folders of ``folder``."""
    from harness.data import IMAGE_SUFFIXES

    found = []
    with os.scandir(folder) as classes:
        for cls in classes:
            if not cls.is_dir():
                continue
            with os.scandir(cls.path) as files:
                for f in files:
                    if f.is_file() and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES:
                        found.append((f"{cls.name}/{f.name}", f.path))
    return found


class ImageNetC(Dataset):
    """ImageNet-C in its released layout (``imagenet-c:PATH``): ``<corruption>/<severity>/<wnid>/<image>``.

    Sample ids are the relative paths (``gaussian_noise/3/n01440764/x.JPEG``), clean ones
    ``clean/<id>``; samples are ordered image by image (each image's clean version, then its
    corruptions and severities), so ``--limit`` keeps whole images.
    """

    id: ClassVar[str] = "imagenet-c"
    Options = ImageNetCOptions

    def samples(self) -> list[Sample]:
        from harness_plugins.datasets import ImageNetVal, WNID, imagenet_wnids

        root = Path(self.options.path).expanduser()
        if not root.is_dir():
            raise HarnessError(f"imagenet-c: {root} is not a folder")
        explicit = not (isinstance(self.options.corruptions, str) and self.options.corruptions.strip() in ("all", "common", "extra"))
        present = tuple(c for c in ALL if (root / c).is_dir())
        if not present:
            raise HarnessError(
                f"imagenet-c: {root} has no corruption folders (expected <root>/<corruption>/<severity>/<wnid>/<image>, "
                f"corruptions: {', '.join(ALL)})"
            )
        wanted = resolve_corruptions(self.options.corruptions, present if not explicit else ALL)
        missing = [c for c in wanted if c not in present]
        if missing:
            raise HarnessError(f"imagenet-c: {root} has no folder for {', '.join(missing)}")
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        order = {c: k for k, c in enumerate(ALL)}
        entries: list[tuple[str, int, int, Sample]] = []
        for corruption in wanted:
            for severity in self.options.severities:
                folder = root / corruption / str(severity)
                if not folder.is_dir():
                    continue
                for rel, path in _images_below(folder):
                    wnid = rel.split("/", 1)[0]
                    if not WNID.match(wnid) or wnid not in index:
                        raise HarnessError(f"imagenet-c: {folder / wnid} is no ImageNet-1k class folder")
                    sample = Sample(id=f"{corruption}/{severity}/{rel}", path=path, label=index[wnid])
                    entries.append((rel.rsplit("/", 1)[-1], 1 + order[corruption], severity, sample))
        if not entries:
            raise HarnessError(f"imagenet-c: no images under {root} for the selected corruptions and severities")
        if self.options.clean is not None:
            clean_samples = ImageNetVal(ImageNetVal.Options(path=self.options.clean)).samples()
        elif (root / CLEAN).is_dir():
            clean_samples = ImageNetVal(ImageNetVal.Options(path=str(root / CLEAN))).samples()
        else:
            clean_samples = []
        for s in clean_samples:
            entries.append((s.id.rsplit("/", 1)[-1], 0, 0, Sample(id=f"{CLEAN}/{s.id}", path=s.path, label=s.label)))
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        return [e[3] for e in entries]


@harness.hookimpl
def register_metrics(register):
    register(Robustness)


@harness.hookimpl
def register_datasets(register):
    register(ImageNetC)
