"""Localisation metrics (plugins/metrics/localisation.py) and object boxes (plugins/boxes.py).

(a) the scores on hand-made maps and masks (sklearn's ROC AUC as the independent reference);
(b) the pointing game's 15 px tolerance: a Euclidean disk at the original size, strict, as TorchRay;
(c) boxes: VOC XML (1-based inclusive), the JSON layout, Kaggle's CSV, scaling, discovery, the bundled photos;
(d) masks follow the model's preprocessing; (e) the metrics end to end: skipped samples are counted,
    an oracle map scores 1, the class-averaged pointing game, one-line errors, the plot, the CLI.
"""

from __future__ import annotations

import json
import math
from importlib import metadata

import numpy as np
import pytest
import torch
from PIL import Image

from harness.components import Attributor
from harness.data import Batch, Sample
from harness.errors import HarnessError
from harness.options import build_options
from harness.runner import MetricContext
from harness_plugins import boxes as B
from harness_plugins.datasets import SampleImages
from harness_plugins.metrics import localisation as L

from conftest import wrap_module


# -- (a) the scores ------------------------------------------------------------------------------------------
def test_relevance_mass_counts_the_positive_part_or_the_absolute_map():
    maps = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])
    mask = torch.tensor([[[True, False], [False, False]]])
    assert L.relevance_mass(maps, mask, "clip").item() == pytest.approx(1 / 4)
    assert L.relevance_mass(maps, mask, "abs").item() == pytest.approx(1 / 6)
    assert math.isnan(L.relevance_mass(-maps.abs(), mask, "clip").item())  # no positive relevance: undefined


def test_relevance_rank_takes_the_top_k_with_ties_by_index():
    maps = torch.tensor([[[5.0, 1.0, 5.0], [0.0, 5.0, 2.0]]])  # three tied maxima at flat 0, 2, 4
    mask = torch.tensor([[[False, False, True], [False, True, False]]])  # K = 2
    assert L.relevance_rank(maps, mask).item() == pytest.approx(1 / 2)  # top-2 = flat 0 and 2
    mask2 = torch.tensor([[[True, True, True], [True, False, False]]])  # K = 4: flat 0, 2, 4, 5
    assert L.relevance_rank(maps, mask2).item() == pytest.approx(2 / 4)


def test_roc_auc_equals_sklearn_with_ties_and_hand_cases():
    from sklearn.metrics import roc_auc_score

    gen = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (4, 6, 7), generator=gen).float()  # many ties
    masks = torch.rand(4, 6, 7, generator=gen) > 0.6
    got = L.roc_auc(maps, masks)
    for i in range(4):
        assert got[i].item() == pytest.approx(roc_auc_score(masks[i].flatten().numpy(), maps[i].flatten().numpy()))
    box = torch.zeros(1, 4, 4, dtype=torch.bool)
    box[0, 1:3, 1:3] = True
    assert L.roc_auc(box.float(), box).item() == 1.0
    assert L.roc_auc(-box.float(), box).item() == 0.0
    assert L.roc_auc(torch.ones(1, 4, 4), box).item() == 0.5
    assert math.isnan(L.roc_auc(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool)).item())


def test_pointing_takes_the_first_maximum_and_checks_the_region():
    maps = torch.zeros(2, 5, 6)
    maps[0, 1, 4] = maps[0, 3, 0] = 2.0  # tie: row-major first is (1, 4)
    maps[1, 4, 5] = 1.0
    points = L.argmax_points(maps)
    assert points.tolist() == [[1, 4], [4, 5]]
    region = torch.zeros(2, 5, 6, dtype=torch.bool)
    region[0, 1, 4] = True
    region[1, 0, 0] = True
    assert L.pointing_hits(points, region).tolist() == [True, False]


def test_smoothing_moves_the_maximum_to_the_mass():
    maps = torch.zeros(1, 40, 40)
    maps[0, 5, 5] = 1.0  # one spike
    maps[0, 25:35, 25:35] = 0.9  # a broad blob
    assert L.argmax_points(maps).tolist() == [[5, 5]]
    r, c = L.argmax_points(maps, smooth=0.05)[0].tolist()
    assert 25 <= r < 35 and 25 <= c < 35


# -- (b) the tolerance -------------------------------------------------------------------------------------
def test_tolerance_is_a_strict_euclidean_disk_around_the_box():
    mask = B.box_mask(80, 60, [(20, 20, 30, 30)], tolerance=15)  # box pixels 20..29
    plain = B.box_mask(80, 60, [(20, 20, 30, 30)])
    assert plain.sum() == 100 and plain[20:30, 20:30].all()
    assert mask[25, 29 + 14] and not mask[25, 29 + 15]  # 15 px away is a miss (distance < 15 hits)
    assert mask[25, 20 - 14] and not mask[25, 20 - 15]
    assert mask[29 + 10, 29 + 11] and not mask[29 + 11, 29 + 11]  # sqrt(221) < 15 < sqrt(242)
    torchray = np.zeros((60, 80), bool)  # TorchRay's test: any box pixel within the disk of the point
    ys, xs = np.nonzero(plain)
    for r in range(60):
        for c in range(80):
            torchray[r, c] = bool((((ys - r) ** 2 + (xs - c) ** 2) < 15**2).any())
    assert np.array_equal(mask, torchray)


# -- (c) boxes ------------------------------------------------------------------------------------------------
VOC = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
<object><name>n01440764</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
<object><name>n01440764</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
</annotation>"""


def test_voc_xml_is_one_based_inclusive(tmp_path):
    (tmp_path / "a.xml").write_text(VOC.format(w=50, h=60))
    found = B.parse_voc_xml(tmp_path / "a.xml")
    assert found.boxes == ((10.0, 20.0, 30.0, 40.0), (0.0, 0.0, 5.0, 5.0))
    assert (found.width, found.height) == (50, 60)
    assert found.scaled(100, 30) == ((20.0, 10.0, 60.0, 20.0), (0.0, 0.0, 10.0, 2.5))
    mask = B.box_mask(50, 60, found.boxes)
    assert mask[20:40, 10:30].all() and mask.sum() == 20 * 20 + 25  # xmin=11..xmax=30 -> columns 10..29
    (tmp_path / "bad.xml").write_text("<annotation><object><bndbox><xmin>x</xmin></bndbox></object></annotation>")
    with pytest.raises(HarnessError, match="not a number"):
        B.parse_voc_xml(tmp_path / "bad.xml")


def test_json_layout_and_its_errors(tmp_path):
    good = {"images": {"cats/a.jpg": {"width": 64, "height": 32, "boxes": [[1, 2, 10, 12]]}, "b.png": {"boxes": []}}}
    (tmp_path / "boxes.json").write_text(json.dumps(good))
    table = B.read_boxes_json(tmp_path / "boxes.json")
    assert table["cats/a.jpg"].boxes == ((1.0, 2.0, 10.0, 12.0),) and table["b.png"].boxes == ()
    for bad, message in (([], "must hold"), ({"images": {"x": {"boxes": [[1, 2, 3]]}}}, "four numbers"),
                         ({"images": {"x": {"boxes": [[5, 2, 3, 9]]}}}, "empty"),
                         ({"images": {"x": {"width": 0, "boxes": []}}}, "positive integer")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(HarnessError, match=message):
            B.read_boxes_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(HarnessError, match="cannot read"):
        B.read_boxes_json(tmp_path / "broken.json")


def test_kaggle_csv(tmp_path):
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 111 108 441 375 n01751748 1 1 10 10 \n")
    table = B.read_kaggle_csv(tmp_path / "LOC_val_solution.csv")
    assert table["ILSVRC2012_val_00000001"].boxes == ((110.0, 107.0, 441.0, 375.0), (0.0, 0.0, 10.0, 10.0))


def test_discovery_beside_kaggle_mirror_folder_json_and_csv(tmp_path):
    finder = B.BoxFinder()
    # an XML beside the image
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000007.xml").write_text(VOC.format(w=50, h=60))
    beside = Sample(id="ILSVRC2012_val_00000007.JPEG", path=str(tmp_path / "val" / "ILSVRC2012_val_00000007.JPEG"))
    assert finder.find(beside).boxes[0] == (10.0, 20.0, 30.0, 40.0)
    # Kaggle's mirrored Annotations folder
    data = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    notes = tmp_path / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    data.mkdir(parents=True)
    notes.mkdir(parents=True)
    (notes / "ILSVRC2012_val_00000008.xml").write_text(VOC.format(w=50, h=60))
    kaggle = Sample(id="ILSVRC2012_val_00000008.JPEG", path=str(data / "ILSVRC2012_val_00000008.JPEG"))
    assert finder.find(kaggle) is not None
    # boxes.json at the root of a folder dataset, ids with subfolders
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "boxes.json").write_text(json.dumps({"images": {"cats/a.jpg": {"boxes": [[0, 0, 4, 4]]}}}))
    assert finder.find(Sample(id="cats/a.jpg", path=str(root / "cats" / "a.jpg"))).boxes == ((0.0, 0.0, 4.0, 4.0),)
    assert finder.find(Sample(id="cats/b.jpg", path=str(root / "cats" / "b.jpg"))) is None
    # LOC_val_solution.csv beside a flat ImageNet folder
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000009,n01751748 2 2 8 8\n")
    assert finder.find(Sample(id="ILSVRC2012_val_00000009.JPEG", path=str(flat / "ILSVRC2012_val_00000009.JPEG"))) is not None
    # an explicit folder of XML files, searched below
    given = B.BoxFinder(str(tmp_path / "ILSVRC"))
    assert given.find(Sample(id="x/ILSVRC2012_val_00000008.JPEG", path="/elsewhere/x/ILSVRC2012_val_00000008.JPEG")) is not None


def test_bundled_photos_have_hand_drawn_boxes_and_astronaut_none():
    finder = B.BoxFinder()
    found = {s.id: finder.find(s) for s in SampleImages().samples()}
    assert found["astronaut"] is None
    for sid, (width, height) in {"chelsea": (451, 300), "coffee": (600, 400), "rocket": (640, 427)}.items():
        entry = found[sid]
        assert (entry.width, entry.height) == (width, height) and len(entry.boxes) == 1
        x0, y0, x1, y1 = entry.boxes[0]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert found["rocket"].boxes[0][2] - found["rocket"].boxes[0][0] < 40  # a thin rocket, not the towers
    impostor = Sample(id="chelsea", path="/somewhere/else/chelsea.png")  # same name, not the bundled file
    assert finder.find(impostor) is None


def test_metric_option_checks_the_boxes_path(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        build_options(L.LocalisationOptions, {"boxes": str(tmp_path / "missing")}, "metric")
    (tmp_path / "boxes.txt").write_text("")
    with pytest.raises(HarnessError, match=".json or a .csv"):
        build_options(L.LocalisationOptions, {"boxes": str(tmp_path / "boxes.txt")}, "metric")
    assert build_options(L.PointingGameOptions, {}, "metric").tolerance == 15


# -- (d) masks in the input frame ---------------------------------------------------------------------------
def test_masks_follow_the_preprocessing():
    model = wrap_module(torch.nn.Identity(), size=20)
    model.data_config.update(crop_pct=0.5, crop_mode="center")  # resize to 40 (a no-op here), centre crop 20
    image = Image.new("RGB", (40, 40))
    mask = B.input_masks(model, [image], [[(10, 10, 20, 20)]])[0]
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[:10, :10] = True  # the crop starts at (10, 10)
    assert torch.equal(mask, expected)
    squash = wrap_module(torch.nn.Identity(), size=16)  # squash 32 x 64 -> 16 x 16
    mask = B.input_masks(squash, [Image.new("RGB", (64, 32))], [[(0, 0, 32, 32)]])[0]
    assert mask[:, :8].all() and not mask[:, 8:].any()


# -- (e) the metrics ---------------------------------------------------------------------------------------
class Oracle(Attributor):
    """The object's mask itself (set per test), or its complement."""

    id = "oracle"
    masks: dict[str, torch.Tensor] = {}
    invert = False

    def attribute(self, model, inputs, target, seeds):
        maps = torch.stack([Oracle.masks[s] for s in seeds]).float()
        return 1 - maps if Oracle.invert else maps * (1 + torch.rand(maps.shape, generator=torch.Generator().manual_seed(0)))


def _samples_batch(model):
    dataset = SampleImages()
    samples = dataset.samples()
    images = [dataset.load(s) for s in samples]
    finder = B.BoxFinder()
    seeds = list(range(len(samples)))
    Oracle.masks = {}
    for seed, s, img in zip(seeds, samples, images):
        found = finder.find(s)
        Oracle.masks[seed] = (B.input_masks(model, [img], [found.scaled(*img.size)])[0] if found
                              else torch.zeros(model.input_size[1:], dtype=torch.bool))
    return Batch(samples=samples, images=images, seeds=seeds)


@pytest.fixture(scope="module")
def photo_model():
    model = wrap_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1000)), size=32)
    model.data_config.update(crop_pct=1.0, crop_mode="squash")  # the whole photo: no box covers all of it
    with torch.no_grad():
        model.module(torch.zeros(1, 3, 32, 32))
    return model


@pytest.mark.parametrize("cls", [L.PointingGame, L.RelevanceMass, L.RelevanceRank, L.LocalisationAUC])
def test_oracle_map_scores_one_its_complement_low_and_the_astronaut_is_skipped(cls, photo_model, tmp_path):
    batch = _samples_batch(photo_model)
    ctx = MetricContext(models=[photo_model], attributor=Oracle(), masker=None, seed=0, batch_size=4, out_dir=tmp_path,
                        run_id="loc", visual_ids=frozenset(s.id for s in batch.samples))
    metric = cls()
    Oracle.invert = False
    records = metric.evaluate(batch, ctx)
    assert [r["values"]["box"] for r in records] == ["ok", "ok", "ok", "missing"]
    assert [r["values"]["target"] for r in records[:3]] == [285, 967, 657]  # the labels, not predictions
    assert records[3]["values"][metric.key] is None
    assert all(r["values"][metric.key] == pytest.approx(1.0) for r in records[:3])
    with_ids = [{**r, "sample_id": s.id} for r, s in zip(records, batch.samples)]
    summary = metric.summarize(with_ids, ctx)
    assert summary.value == pytest.approx(1.0)
    assert summary.values["n_without_box"] == 1 and summary.values["n_scored"] == 3
    Oracle.invert = True
    inverted = metric.evaluate(batch, ctx)
    assert all(r["values"][metric.key] < 0.2 for r in inverted[1:3])  # coffee, rocket (chelsea's box is most of the photo)
    result = type("R", (), {"run_id": "loc", "attributor": None, "value": summary.value})()
    assert metric.plot(result, with_ids, tmp_path) == {"boxes": "loc/boxes.png"}
    assert (tmp_path / "loc" / "boxes.png").stat().st_size > 0


def test_cropped_box_and_no_box_at_all(tmp_path):
    model = wrap_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 20 * 20, 5)), size=20)
    model.data_config.update(crop_pct=0.5, crop_mode="center")
    (tmp_path / "boxes.json").write_text(json.dumps({"images": {"a.png": {"boxes": [[0, 0, 5, 5]]}}}))  # outside the crop
    images = [Image.new("RGB", (40, 40)), Image.new("RGB", (40, 40))]
    batch = Batch(samples=[Sample("a.png", str(tmp_path / "a.png")), Sample("b.png", str(tmp_path / "b.png"))],
                  images=images, seeds=[0, 1])
    ctx = MetricContext(models=[model], attributor=Oracle(), masker=None, seed=0, batch_size=4, out_dir=tmp_path, run_id="x")
    metric = L.RelevanceMass()
    records = metric.evaluate(batch, ctx)
    assert [r["values"]["box"] for r in records] == ["cropped", "missing"]
    with pytest.raises(HarnessError, match="1 without a box, 1 with the box cropped away"):
        metric.summarize([{**r, "sample_id": s.id} for r, s in zip(records, batch.samples)], ctx)


def test_pointing_game_averages_over_classes_by_default():
    records = [{"sample_id": str(i), "values": {"box": "ok", "target": t, "hit": h}}
               for i, (t, h) in enumerate([(1, 1.0), (1, 1.0), (1, 0.0), (2, 0.0)])]
    summary = L.PointingGame().summarize(records, None)
    assert summary.value == pytest.approx((2 / 3 + 0) / 2)
    assert summary.values["image_mean"] == 0.5 and summary.values["n_classes"] == 2
    assert L.PointingGame(L.PointingGameOptions(average="images")).summarize(records, None).value == 0.5


def test_directions_and_citations():
    for cls in (L.PointingGame, L.RelevanceMass, L.RelevanceRank, L.LocalisationAUC):
        assert cls.higher_is_better is True and cls.citation and cls.needs_attributor


def _with_entry_points(monkeypatch, *modules: str):
    """Register new bundled modules until pyproject lists them."""
    from harness import plugins

    original = plugins.metadata.entry_points
    installed = {ep.value for ep in original(group="harness")}
    extra = [metadata.EntryPoint(name=m.rsplit(".", 1)[1], value=m, group="harness") for m in modules if m not in installed]

    def entry_points(**kwargs):
        found = original(**kwargs)
        return [*found, *extra] if kwargs.get("group") == "harness" else found

    monkeypatch.setattr(plugins.metadata, "entry_points", entry_points)


def test_cli_pointing_game_on_the_samples(cli, tmp_path, fresh_registry, monkeypatch):
    _with_entry_points(monkeypatch, "harness_plugins.metrics.localisation")
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "pointing_game", "--out", str(tmp_path),
              "--quiet", "--plot")
    assert res.exit_code == 0, res.stderr
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["metric"]["higher_is_better"] is True
    assert result["values"]["n_without_box"] == 1 and result["values"]["n_scored"] == 3
    assert "(n=3 of 4)" in res.stdout  # the printed line counts the scored samples, not the astronaut
    assert "boxes" in result["artifacts"]
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "relevance_mass", "-o",
              f"metric.boxes={tmp_path / 'nope.json'}", "--out", str(tmp_path), "--quiet")
    assert res.exit_code != 0 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_the_boxes_content_is_part_of_the_run_id(tmp_path):
    """Other boxes for the same images are another run (resume never mixes them); a boxes file no sample
    uses changes nothing."""
    import shutil
    from pathlib import Path

    import skimage.data

    from harness.runner import RunConfig, resolve

    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(Path(skimage.data.__file__).parent / "chelsea.png", root / "cat.png")
    boxes = root / "boxes.json"

    def run_id(*options: str) -> tuple[str, dict]:
        run = resolve(RunConfig(models=["test_resnet"], metric="relevance_mass", attributor="saliency",
                                data=f"folder:{root}", random_init=True, options=list(options)))
        return run.run_id, run.identity["metric"]

    boxes.write_text(json.dumps({"images": {"cat.png": {"boxes": [[10, 10, 200, 200]]}}}))
    first, entry = run_id()
    assert "boxes_sha256" in entry and run_id()[0] == first
    boxes.write_text(json.dumps({"images": {"cat.png": {"boxes": [[10, 10, 100, 100]]}}}))
    moved, _ = run_id()
    assert moved != first
    given = tmp_path / "given.json"  # the same boxes given explicitly: the same content digest
    given.write_text(boxes.read_text())
    assert run_id(f"metric.boxes={given}")[1]["boxes_sha256"] == run_id()[1]["boxes_sha256"]
    boxes.unlink()  # no boxes at all: still a defined identity
    assert run_id()[1]["boxes_sha256"] not in (entry["boxes_sha256"], None)
