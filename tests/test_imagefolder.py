"""``imagefolder:PATH`` (plugins/datasets.py, plugins/class_mapping.py): torchvision's ImageFolder
layout and class order, the class-index mappings (``-o dataset.classes=sorted|imagenet|FILE``), every
bad input as one line, the mapping in the run id, and labels reaching accuracy and robustness."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _labelled import SOURCES, make_labelled_folder
from conftest import run_cli

CAT, ESPRESSO = "n02124075", "n07920052"  # Egyptian cat (285), espresso (967)


def _image(path: Path, seed: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def _dataset(root: Path, classes: str | None = None):
    from harness_plugins.datasets import ImageFolder

    options = {"path": str(root)} if classes is None else {"path": str(root), "classes": classes}
    return ImageFolder(ImageFolder.Options(**options))


def _torchvision(root: Path):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), allow_empty=True)


def _pairs(samples) -> set[tuple[str, int]]:
    return {(s.id, s.label) for s in samples}


# -- layout and class order ----------------------------------------------------------------------
def test_class_indices_and_samples_equal_torchvision(tmp_path, capsys):
    root = tmp_path / "data"
    names = ["b/1.png", "B/0.jpg", "a b/x.png", "a/sub/deep.png", "a/z.jpg", "c10/0.png", "c2/0.png", "_x/0.png", "9/0.png"]
    for i, name in enumerate(names):
        _image(root / name, seed=i)
    (root / "empty").mkdir()  # a class without images keeps its index (torchvision's allow_empty=True)
    (root / "a" / "notes.txt").write_text("not an image")
    _image(root / "loose.png")  # directly in the root: no class (torchvision ignores it too)
    samples = _dataset(root).samples()
    reference = _torchvision(root)
    assert sorted(reference.class_to_idx) == ["9", "B", "_x", "a", "a b", "b", "c10", "c2", "empty"]
    expected = {(Path(p).relative_to(root).as_posix(), label) for p, label in reference.samples}
    assert _pairs(samples) == expected
    assert {s.id for s in samples} >= {"a/sub/deep.png", "a b/x.png"}  # posix relative paths, nested files too
    labels = [s.label for s in samples]
    assert labels == sorted(labels)  # class by class, in the sorted folder order
    assert all(Path(s.path).is_file() for s in samples)
    err = capsys.readouterr().err
    assert "1 class folder(s) hold no image and keep their index: 'empty'" in err
    assert "1 image(s) directly in" in err and "left out" in err


def test_hidden_folders_are_no_classes(tmp_path, capsys):
    root = tmp_path / "data"
    _image(root / "a" / "0.png")
    _image(root / "b" / "0.png")
    _image(root / ".ipynb_checkpoints" / "0.png")
    (root / ".git").mkdir()  # hidden, no images: ignored without a word
    samples = _dataset(root).samples()
    assert _pairs(samples) == {("a/0.png", 0), ("b/0.png", 1)}
    err = capsys.readouterr().err
    assert "hidden folder '.ipynb_checkpoints' is no class" in err and ".git" not in err
    # torchvision counts hidden folders as classes (the documented difference): its indices shift
    assert _torchvision(root).class_to_idx == {".git": 0, ".ipynb_checkpoints": 1, "a": 2, "b": 3}


def test_made_labelled_folder(tmp_path):
    root = make_labelled_folder(tmp_path / "made", classes=3, per_class=4, size=32, seed=1)
    samples = _dataset(root).samples()
    assert [s.label for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert _torchvision(root).classes == [name.rsplit(".", 1)[0] for name in SOURCES[:3]]
    assert {Path(s.path).suffix for s in samples} == {".png", ".jpg"}
    assert all(Image.open(s.path).size == (32, 32) for s in samples)
    again = make_labelled_folder(tmp_path / "again", classes=3, per_class=4, size=32, seed=1)
    for s in samples:
        assert (again / s.id).read_bytes() == Path(s.path).read_bytes()
    # separable: on the default set, leave-one-out nearest class mean on 8x8 thumbnails gets every image right
    samples = _dataset(make_labelled_folder(tmp_path / "default")).samples()
    assert len(samples) == 24 and Image.open(samples[0].path).size == (64, 64)
    x = np.stack([np.asarray(Image.open(s.path).convert("RGB").resize((8, 8)), dtype=np.float64).ravel() for s in samples])
    y = np.array([s.label for s in samples])
    for k in range(len(y)):
        keep = np.arange(len(y)) != k
        means = np.stack([x[keep & (y == c)].mean(0) for c in range(3)])
        assert np.argmin(((means - x[k]) ** 2).sum(1)) == y[k]


# -- class-index mappings ------------------------------------------------------------------------
def test_classes_imagenet_gives_imagenet_indices(tmp_path):
    root = tmp_path / "data"
    _image(root / CAT / "0.png")
    _image(root / ESPRESSO / "0.png")
    assert _pairs(_dataset(root, "imagenet").samples()) == {(f"{CAT}/0.png", 285), (f"{ESPRESSO}/0.png", 967)}
    assert _pairs(_dataset(root).samples()) == {(f"{CAT}/0.png", 0), (f"{ESPRESSO}/0.png", 1)}


@pytest.mark.parametrize("name, text", [
    ("map.json", '{"cat": 285, "dog": 7, "unused": 3}'),
    ("map.csv", '\ufeffcat,285\n\n"dog", 7 \nunused,3\n'),
    ("map.txt", "cat 285\ndog\t7\nunused 3\n"),
])
def test_mapping_files(tmp_path, name, text):
    root = tmp_path / "data"
    _image(root / "cat" / "0.png")
    _image(root / "dog" / "0.png")
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert _pairs(_dataset(root, str(tmp_path / name)).samples()) == {("cat/0.png", 285), ("dog/0.png", 7)}


def test_text_mapping_takes_folder_names_with_spaces(tmp_path):
    root = tmp_path / "data"
    _image(root / "tabby cat" / "0.png")
    (tmp_path / "map.txt").write_text("tabby cat   281\n", encoding="utf-8")
    assert _pairs(_dataset(root, str(tmp_path / "map.txt")).samples()) == {("tabby cat/0.png", 281)}


# -- bad input: one line, non-zero exit ----------------------------------------------------------
BAD_MAPPINGS = [
    ("latin1.json", "café".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("broken.json", b'{"a": 0,', "is not valid JSON"),
    ("list.json", b'[["a", 0], ["b", 1]]', "must hold a JSON object"),
    ("string.json", b'{"a": "0", "b": 1}', 'the index of folder \'a\' must be a whole number from 0 to 999999, got "0"'),
    ("float.json", b'{"a": 1.5, "b": 0}', "got 1.5"),
    ("bool.json", b'{"a": true, "b": 0}', "got true"),
    ("null.json", b'{"a": null, "b": 0}', "got null"),
    ("nan.json", b'{"a": NaN, "b": 0}', "got NaN"),
    ("negative.json", b'{"a": -1, "b": 0}', "got -1"),
    ("large.json", b'{"a": 1000000, "b": 0}', "got 1000000"),
    ("digits.json", b'{"a": ' + b"9" * 5000 + b"}", "a number in it is too long"),
    ("deep.json", b"[" * 100_000, "it is nested too deeply"),
    ("twice.json", b'{"a": 0, "a": 1, "b": 2}', "folder 'a' is named twice"),
    ("same.json", b'{"a": 5, "b": 5}', "folders 'a' and 'b' both have index 5"),
    ("slash.json", b'{"a/b": 0, "a": 1, "b": 2}', "'a/b' is no folder name"),
    ("empty.json", b"{}", "has no entries"),
    ("three.csv", b"a,0,x\nb,1\n", "line 1: expected two fields FOLDER,INDEX, got 3"),
    ("header.csv", b"folder,index\na,0\nb,1\n", "got 'index' (mapping files have no header line)"),
    ("minus.csv", b"a,0\nb,-1\n", "line 2: the index of folder 'b' must be a whole number from 0 to 999999, got '-1'"),
    ("plus.csv", b"a,+1\nb,0\n", "got '+1'"),
    ("decimal.csv", b"a,1.0\nb,0\n", "got '1.0'"),
    ("arabic.csv", "a,\u0663\nb,0\n".encode(), "got '\u0663'"),
    ("nul.csv", b"a\x00,0\nb,1\n", "is no folder name"),
    ("same.csv", b"a,1\nb,1\n", "folders 'a' and 'b' both have index 1"),
    ("blank.csv", b"\n\n", "has no entries"),
    ("one.txt", b"a 0\nb\n", "line 2: expected FOLDER INDEX, got 'b'"),
    ("escape.txt", b"a 0\n\x1b[31mb x\n", "line 2: the index of folder '\\x1b[31mb' must be"),  # escaped, not raw
    ("missing.txt", b"a 0\n", "class folder(s) 'b' of"),
]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two") / "data"
    _image(root / "a" / "0.png")
    _image(root / "b" / "0.png", seed=1)
    return root


def _one_line_error(tmp_path: Path, data: str, *options: str) -> str:
    args = ["run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--data", data,
            "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    for option in options:
        args += ["-o", option]
    res = run_cli(*args)
    assert res.exit_code == 2 and "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.json"))
    return lines[0]


@pytest.mark.parametrize("name, content, expected", BAD_MAPPINGS, ids=[c[0] for c in BAD_MAPPINGS])
def test_bad_mapping_file_is_one_line(tmp_path, two_classes, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    line = _one_line_error(tmp_path, f"imagefolder:{two_classes}", f"dataset.classes={path}")
    assert expected in line and "imagefolder:" in line and "\x1b" not in line


def test_unreadable_mappings_are_one_line(tmp_path, two_classes):
    data = f"imagefolder:{two_classes}"
    assert "does not exist" in _one_line_error(tmp_path, data, f"dataset.classes={tmp_path / 'nope.json'}")
    assert "did you mean -o dataset.classes=imagenet?" in _one_line_error(tmp_path, data, "dataset.classes=imagnet")
    assert "is not a regular file" in _one_line_error(tmp_path, data, f"dataset.classes={tmp_path}")
    os.mkfifo(tmp_path / "fifo.json")  # would block a naive reader
    assert "is not a regular file" in _one_line_error(tmp_path, data, f"dataset.classes={tmp_path / 'fifo.json'}")
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(16 * 1024 * 1024 + 1)
    assert "is larger than 16 MB" in _one_line_error(tmp_path, data, f"dataset.classes={big}")
    if os.geteuid() != 0:
        locked = tmp_path / "locked.json"
        locked.write_text('{"a": 0, "b": 1}')
        locked.chmod(0)
        assert "cannot read class mapping" in _one_line_error(tmp_path, data, f"dataset.classes={locked}")


def test_bad_options_and_folders_are_one_line(tmp_path, two_classes):
    data = f"imagefolder:{two_classes}"
    assert "dataset.classes is empty" in _one_line_error(tmp_path, data, "dataset.classes=")
    assert "option dataset.classes" in _one_line_error(tmp_path, data, "dataset.classes=3")
    assert "unknown option dataset.class " in _one_line_error(tmp_path, data, "dataset.class=imagenet")
    assert "not in the ImageNet-1k WordNet ids" in _one_line_error(tmp_path, data, "dataset.classes=imagenet")
    assert "is not a folder" in _one_line_error(tmp_path, f"imagefolder:{tmp_path / 'nowhere'}")
    assert "the path after ':' is empty" in _one_line_error(tmp_path, "imagefolder:")
    flat = tmp_path / "flat"
    _image(flat / "0.png")
    assert "has no class folders" in _one_line_error(tmp_path, f"imagefolder:{flat}") and "folder:PATH" in \
        _one_line_error(tmp_path, f"imagefolder:{flat}")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    assert "hold no images" in _one_line_error(tmp_path, f"imagefolder:{tmp_path / 'hollow'}")


# -- run identity --------------------------------------------------------------------------------
def _run_id(root: Path, *options: str) -> tuple[str, dict]:
    from harness.runner import RunConfig, resolve

    run = resolve(RunConfig(models=["test_resnet"], metric="accuracy", data=f"imagefolder:{root}", random_init=True,
                            options=list(options)))
    return run.run_id, run.identity


def test_the_mapping_is_part_of_the_run_id(tmp_path, two_classes):
    mapping = tmp_path / "map.json"
    mapping.write_text('{"a": 0, "b": 1}')
    first, identity = _run_id(two_classes, f"dataset.classes={mapping}")
    assert "classes_sha256" in identity["dataset"]
    assert _run_id(two_classes, f"dataset.classes={mapping}")[0] == first  # stable
    mapping.write_text('{"a": 1, "b": 0}')  # same file, same sample ids and images, other labels
    swapped, _ = _run_id(two_classes, f"dataset.classes={mapping}")
    assert swapped != first
    mapping.write_text('{"a": 0, "b": 1, "c": 2}')  # an entry for no folder changes no label
    assert _run_id(two_classes, f"dataset.classes={mapping}")[0] == first


def test_an_empty_class_folder_shifting_sorted_indices_changes_the_run_id(tmp_path):
    root = tmp_path / "data"
    _image(root / "b" / "0.png")
    _image(root / "c" / "0.png")
    before, identity = _run_id(root)
    (root / "a").mkdir()  # no image: the sample ids stay, but b and c move to 1 and 2
    after, identity_after = _run_id(root)
    assert identity["dataset"]["sample_ids_sha256"] == identity_after["dataset"]["sample_ids_sha256"]
    assert identity["dataset"]["samples_sha256"] == identity_after["dataset"]["samples_sha256"]
    assert before != after


# -- labels reach accuracy and robustness --------------------------------------------------------
def _result(tmp_path: Path, *args: str) -> tuple[dict, list[dict]]:
    res = run_cli("run", *args, "--out", str(tmp_path), "--device", "cpu", "--batch-size", "4", "--quiet")
    assert res.exit_code == 0, res.stderr
    (path,) = tmp_path.glob("*.json")
    lines = Path(str(path)[: -len(".json")] + ".samples.jsonl").read_text().splitlines()
    return json.loads(path.read_text()), [json.loads(line) for line in lines]


def test_accuracy_counts_the_folder_labels(tmp_path):
    root = make_labelled_folder(tmp_path / "data", classes=3, per_class=4, size=32)
    result, lines = _result(tmp_path / "out", "--model", "test_resnet", "--random-init", "--metric", "accuracy",
                            "--data", f"imagefolder:{root}")
    assert result["dataset"]["id"] == f"imagefolder:{root}" and result["dataset"]["n_samples"] == 12
    assert result["values"]["n_labelled"] == 12
    assert [line["label"] for line in lines] == [0] * 4 + [1] * 4 + [2] * 4
    top1 = [int(line["prediction"] == line["label"]) for line in lines]
    assert result["value"] == pytest.approx(np.mean(top1))


@pytest.fixture(scope="module")
def imagenet_photos(tmp_path_factory):
    """chelsea and coffee in their ImageNet class folders (EfficientNet-Lite0 gets both right)."""
    import skimage.data

    photos = Path(skimage.data.__file__).parent
    root = tmp_path_factory.mktemp("inet") / "data"
    for wnid, name in ((CAT, "chelsea.png"), (ESPRESSO, "coffee.png")):
        (root / wnid).mkdir(parents=True)
        shutil.copy(photos / name, root / wnid / name)
    return root


def test_accuracy_with_imagenet_indices(tmp_path, imagenet_photos):
    model = ("--model", "efficientnet_lite0", "--metric", "accuracy", "--data", f"imagefolder:{imagenet_photos}")
    result, lines = _result(tmp_path / "imagenet", *model, "-o", "dataset.classes=imagenet")
    assert [line["label"] for line in lines] == [285, 967] and [line["prediction"] for line in lines] == [285, 967]
    assert result["value"] == 1.0 and result["values"]["n_labelled"] == 2
    assert result["dataset"]["options"] == {"classes": "imagenet"}
    result, lines = _result(tmp_path / "sorted", *model)  # positional indices 0 and 1: both wrong for the model
    assert [line["label"] for line in lines] == [0, 1] and result["value"] == 0.0


def test_robustness_uses_the_folder_labels(tmp_path, imagenet_photos):
    result, lines = _result(tmp_path, "--model", "efficientnet_lite0", "--metric", "robustness",
                            "--data", f"imagefolder:{imagenet_photos}", "-o", "dataset.classes=imagenet",
                            "-o", "metric.backend=builtin", "-o", "metric.corruptions=contrast", "-o", "metric.severities=[1]")
    assert [line["label"] for line in lines] == [285, 967]
    assert result["values"]["clean_accuracy"] == 1.0


def test_leaderboard_keeps_runs_with_other_mappings_apart(tmp_path):
    """The same images under two class mappings are two sample sets, never one table."""
    root = make_labelled_folder(tmp_path / "data", classes=2, per_class=2, size=32)
    mapping = tmp_path / "swap.json"
    mapping.write_text(json.dumps({name: i for i, name in enumerate(sorted(p.name for p in root.iterdir())[::-1])}))
    out = tmp_path / "out"
    for options in ((), ("-o", f"dataset.classes={mapping}")):
        res = run_cli("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--data",
                      f"imagefolder:{root}", *options, "--out", str(out), "--batch-size", "4", "--quiet")
        assert res.exit_code == 0, res.stderr
    results = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(results) == 2 and all("classes_sha256" in r["dataset"]["content_identity"] for r in results)
    board = run_cli("leaderboard", str(out), "--format", "json")
    assert board.exit_code == 0, board.stderr
    data = json.loads(board.stdout)
    tables = data["tables"] if isinstance(data, dict) and "tables" in data else data
    assert len(tables) == 2
