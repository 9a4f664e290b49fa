"""Datasets: the bundled samples, folder:PATH, imagenet:PATH (class folders, devkit, Kaggle), bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import UnreadableImage, image_files, load_rgb
from harness.errors import HarnessError
from harness.registry import get_registry


def dataset(id: str, path: str | Path | None = None):
    """An instance of a registered dataset, as `--data id[:path]` builds it."""
    cls = get_registry().get("dataset", id)
    return cls(cls.Options(path=str(path))) if path is not None else cls()


def write_image(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    fmt = "JPEG" if path.suffix.lower() in {".jpg", ".jpeg"} else "PNG"
    Image.fromarray(pixels).save(path, format=fmt)
    return path


# -- samples ---------------------------------------------------------------------------------------
def test_samples_are_the_four_bundled_photos():
    samples = dataset("samples").samples()
    assert [s.id for s in samples] == ["chelsea", "coffee", "rocket", "astronaut"]
    assert [s.label for s in samples] == [285, 967, 657, None]
    for s in samples:
        assert Path(s.path).is_file()
        assert load_rgb(s.path).mode == "RGB"


def test_samples_is_the_default_data(cli, tmp_path):
    result = cli("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--out", tmp_path,
                 "--device", "cpu", "-q")
    assert result.exit_code == 0, result
    [file] = tmp_path.glob("*.json")
    data = json.loads(file.read_text())
    assert data["dataset"]["id"] == "samples" and data["dataset"]["n_samples"] == 4
    assert data["values"]["n_labelled"] == 3


# -- folder:PATH -------------------------------------------------------------------------------------
def test_folder_lists_nested_images_sorted_by_relative_path(tmp_path):
    for name in ["b/2.png", "a/z.jpg", "a/sub/1.jpeg", "c.PNG", "a/sub/0.png"]:
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "labels.csv").write_text("x,y\n")
    (tmp_path / "a" / "empty_dir.png").mkdir()  # a folder with an image suffix is no image
    samples = dataset("folder", tmp_path).samples()
    assert [s.id for s in samples] == ["a/sub/0.png", "a/sub/1.jpeg", "a/z.jpg", "b/2.png", "c.PNG"]
    assert all(s.label is None for s in samples)
    assert [Path(s.path) for s in samples] == [tmp_path / s.id for s in samples]
    assert load_rgb(samples[0].path).size == (24, 16)


def test_folder_order_does_not_depend_on_creation_order(tmp_path):
    for name in ["z.png", "m.png", "a.png"]:
        write_image(tmp_path / "one" / name)
    for name in ["a.png", "z.png", "m.png"]:
        write_image(tmp_path / "two" / name)
    ids = lambda sub: [s.id for s in dataset("folder", tmp_path / sub).samples()]  # noqa: E731
    assert ids("one") == ids("two") == ["a.png", "m.png", "z.png"]


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(HarnessError, match="is not a folder"):
        dataset("folder", tmp_path / "missing").samples()


@pytest.mark.parametrize("contents", ["nothing", "non-images"])
def test_empty_folder_fails_the_run_with_one_line(cli, tmp_path, contents):
    empty = tmp_path / "empty"
    empty.mkdir()
    if contents == "non-images":
        (empty / "readme.md").write_text("hi")
    out = tmp_path / "out"
    result = cli("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--data", f"folder:{empty}",
                 "--out", out, "--device", "cpu", "-q")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no images" in lines[0], result.stderr
    assert not out.exists() or not list(out.glob("*.json"))


# -- imagenet:PATH, class folders ---------------------------------------------------------------------
def test_imagenet_class_folders_use_the_standard_class_index(tmp_path):
    write_image(tmp_path / "n15075141" / "last.JPEG")
    write_image(tmp_path / "n01440764" / "b.JPEG")
    write_image(tmp_path / "n01440764" / "a.JPEG")
    write_image(tmp_path / "n02119789" / "fox.JPEG")
    (tmp_path / "n01440764" / "readme.txt").write_text("x")
    samples = dataset("imagenet", tmp_path).samples()
    assert [(s.id, s.label) for s in samples] == [
        ("n01440764/a.JPEG", 0),
        ("n01440764/b.JPEG", 0),
        ("n02119789/fox.JPEG", 278),
        ("n15075141/last.JPEG", 999),
    ]


def test_imagenet_unknown_class_folder_is_an_error(tmp_path):
    write_image(tmp_path / "n01440764" / "a.JPEG")
    write_image(tmp_path / "n99999999" / "a.JPEG")
    with pytest.raises(HarnessError) as info:
        dataset("imagenet", tmp_path).samples()
    assert "n99999999" in str(info.value) and "\n" not in str(info.value)


def test_imagenet_folder_that_does_not_exist(tmp_path):
    with pytest.raises(HarnessError, match="is not a folder"):
        dataset("imagenet", tmp_path / "missing").samples()


# -- imagenet:PATH, the flat validation folder -----------------------------------------------------------
# Real devkit ILSVRC2012_IDs (not the sorted order): 1 = kit fox n02119789 (sorted index 278),
# 2 = English setter n02100735 (212), 449 = tench n01440764 (0), 490 = sea snake n01751748 (65).
LEAVES = [(1, "n02119789", "kit fox"), (2, "n02100735", "English setter"), (449, "n01440764", "tench"),
          (490, "n01751748", "sea snake")]
NON_LEAF = (1001, "n00001740", "entity")
GROUND_TRUTH = [490, 1, 449]  # images 1..3
EXPECTED = {"ILSVRC2012_val_00000001.JPEG": 65, "ILSVRC2012_val_00000002.JPEG": 278, "ILSVRC2012_val_00000003.JPEG": 0}


def write_meta_mat(path: Path) -> Path:
    """A devkit-like meta.mat: a 1-column struct array ``synsets`` with leaves and one non-leaf."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(float(i), w, words, f"gloss of {words}", 0.0, np.zeros((1, 0)), 0.0, 1300.0) for i, w, words in LEAVES]
    # a non-leaf whose WNID is no ImageNet-1k class: must be ignored
    rows.append((float(NON_LEAF[0]), NON_LEAF[1], NON_LEAF[2], "that which exists", 2.0, np.array([[1.0, 2.0]]),
                 18.0, 0.0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for name, value in zip(fields, row):
            synsets[i, 0][name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})
    return path


def write_flat_val(root: Path, n: int = 3) -> Path:
    for i in range(1, n + 1):
        write_image(root / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    return root


def test_devkit_meta_mat_maps_ilsvrc_ids_of_leaves(tmp_path):
    from harness_plugins.datasets import _devkit_ids

    mapping = _devkit_ids(write_meta_mat(tmp_path / "meta.mat"))
    assert mapping == {i: w for i, w, _ in LEAVES}
    assert NON_LEAF[0] not in mapping


def test_imagenet_flat_with_devkit_ground_truth(tmp_path):
    root = write_flat_val(tmp_path / "val")
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in GROUND_TRUTH))
    write_meta_mat(root / "meta.mat")
    samples = dataset("imagenet", root).samples()
    assert {s.id: s.label for s in samples} == EXPECTED
    assert [s.id for s in samples] == sorted(EXPECTED)


def test_imagenet_flat_finds_the_devkit_next_to_the_folder(tmp_path):
    root = write_flat_val(tmp_path / "val")
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    write_meta_mat(data / "meta.mat")
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, GROUND_TRUTH)) + "\n")
    assert {s.id: s.label for s in dataset("imagenet", root).samples()} == EXPECTED


def test_imagenet_flat_with_kaggle_solution(tmp_path):
    root = write_flat_val(tmp_path / "val")
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n02119789 10 20 30 40 n02119789 5 6 7 8 \n"
        "ILSVRC2012_val_00000001,n01751748 1 2 3 4\n"
        "ILSVRC2012_val_00000003,n01440764 1 2 3 4\n"
    )
    assert {s.id: s.label for s in dataset("imagenet", root).samples()} == EXPECTED


def test_imagenet_flat_without_ground_truth(tmp_path):
    root = write_flat_val(tmp_path / "val")
    with pytest.raises(HarnessError) as info:
        dataset("imagenet", root).samples()
    assert "ground truth" in str(info.value) and "meta.mat" in str(info.value)


def test_imagenet_flat_with_an_image_the_ground_truth_lacks(tmp_path):
    root = write_flat_val(tmp_path / "val", n=4)
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, GROUND_TRUTH)))
    write_meta_mat(root / "meta.mat")
    with pytest.raises(HarnessError, match="ILSVRC2012_val_00000004.JPEG"):
        dataset("imagenet", root).samples()


@pytest.mark.parametrize("source", ["kaggle-unknown-wnid", "devkit-non-leaf-id", "devkit-unknown-id"])
def test_imagenet_ground_truth_naming_no_class_is_a_harness_error(tmp_path, source):
    """A ground-truth entry that names no ImageNet-1k class is the user's data problem: one clear line."""
    root = write_flat_val(tmp_path / "val", n=1)
    if source == "kaggle-unknown-wnid":
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n99999999 1 2 3 4\n")
    else:
        write_meta_mat(root / "meta.mat")
        bad_id = NON_LEAF[0] if source == "devkit-non-leaf-id" else 1500
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text(f"{bad_id}\n")
    with pytest.raises(HarnessError) as info:
        dataset("imagenet", root).samples()
    assert "\n" not in str(info.value)


def test_imagenet_flat_run_scores_against_the_ground_truth(cli, tmp_path):
    root = write_flat_val(tmp_path / "val")
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, GROUND_TRUTH)))
    write_meta_mat(root / "meta.mat")
    out = tmp_path / "out"
    result = cli("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--data",
                 f"imagenet:{root}", "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 0, result
    [samples_file] = out.glob("*.samples.jsonl")
    records = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert {r["sample_id"]: r["label"] for r in records} == EXPECTED


# -- unreadable images ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images")
    write_image(root / "a_good.png", size=(40, 30), seed=1)
    jpeg = write_image(root / "b_truncated.jpg", size=(64, 64), seed=2)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    write_image(root / "c_good.jpg", size=(30, 40), seed=3)
    (root / "x.png").write_text("this is text, not a PNG")
    return root


def test_load_rgb_rejects_bad_files(bad_folder):
    for name in ["b_truncated.jpg", "x.png"]:
        with pytest.raises(UnreadableImage) as info:
            load_rgb(bad_folder / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    assert load_rgb(bad_folder / "a_good.png").size == (40, 30)
    assert [p.name for p in image_files(bad_folder)] == ["a_good.png", "b_truncated.jpg", "c_good.jpg", "x.png"]


def _insertion(cli, data: Path, out: Path, *extra: str):
    return cli("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--data", f"folder:{data}",
               "-o", "metric.steps=4", "--batch-size", "4", "--out", out, "--device", "cpu", "-q", *extra)


def test_bad_images_are_skipped_with_one_warning_each(cli, bad_folder, tmp_path):
    out = tmp_path / "out"
    result = _insertion(cli, bad_folder, out)
    assert result.exit_code == 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert all(line.startswith("harness: warning:") for line in lines)
    assert "b_truncated.jpg" in lines[0] and "x.png" in lines[1]
    [file] = out.glob("*.json")
    data = json.loads(file.read_text())
    assert data["status"] == "ok" and data["dataset"]["n_samples"] == 2
    [samples_file] = out.glob("*.samples.jsonl")
    ids = [json.loads(line)["sample_id"] for line in samples_file.read_text().splitlines()]
    assert ids == ["a_good.png", "c_good.jpg"]


def test_bad_image_stops_the_run_when_asked(cli, bad_folder, tmp_path):
    out = tmp_path / "out"
    result = _insertion(cli, bad_folder, out, "--on-bad-image", "stop")
    assert result.exit_code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("harness: error:") and "b_truncated.jpg" in lines[0]
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.json"))


def test_only_bad_images_is_an_error(cli, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.png").write_text("text")
    out = tmp_path / "out"
    result = _insertion(cli, root, out)
    assert result.exit_code == 2, result
    assert "unreadable" in result.stderr.strip().splitlines()[-1]
    assert not list(out.glob("*.json"))


def test_imagenet_flat_ground_truth_is_part_of_the_run_id(tmp_path):
    """The same images with another ground-truth file are another run (labels are no image content)."""
    from harness.runner import RunConfig, resolve

    root = write_flat_val(tmp_path / "val")
    solution = root / "LOC_val_solution.csv"
    rows = ["ILSVRC2012_val_00000001,n01751748 1 2 3 4", "ILSVRC2012_val_00000002,n02119789 1 2 3 4",
            "ILSVRC2012_val_00000003,n01440764 1 2 3 4"]

    def run_id() -> str:
        config = RunConfig(models=["test_resnet"], metric="accuracy", data=f"imagenet:{root}", random_init=True)
        return resolve(config).run_id

    solution.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    first = run_id()
    assert run_id() == first
    rows[0] = "ILSVRC2012_val_00000001,n01440764 1 2 3 4"
    solution.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    assert run_id() != first
    folders = tmp_path / "folders"
    write_image(folders / "n01440764" / "a.JPEG", seed=1)
    assert dataset("imagenet", folders).content_identity() == {}  # class folders: labels are in the ids
