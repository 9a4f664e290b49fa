"""Plots (harness/plotting.py, harness/visuals.py, Metric.plot): `harness run --plot` and `harness plot`.

- `run --plot` writes curve.png and attributions.png under <out>/<run_id>/, lists them in the result
  file's `artifacts` (paths relative to the result file), and they are real PNGs;
- `harness plot RESULT` adds them to a result written without plots;
- visuals (image + attribution tensors for the overlays) are kept only for the first 4 samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from harness.visuals import VISUAL_SAMPLES, load_visuals

RUN = ("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", "random",
       "-o", "metric.steps=4", "--quiet")


def _only_result(out: Path) -> tuple[Path, dict]:
    (path,) = [p for p in out.glob("*.json")]
    return path, json.loads(path.read_text())


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width > 100 and height > 100
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 1  # something is drawn, not a blank canvas


def _check_artifacts(path: Path, result: dict) -> None:
    run_id = result["run_id"]
    assert set(result["artifacts"]) == {"curve", "attributions"}
    assert result["artifacts"]["curve"] == f"{run_id}/curve.png"
    assert result["artifacts"]["attributions"] == f"{run_id}/attributions.png"
    for relative in result["artifacts"].values():
        assert not Path(relative).is_absolute()
        target = path.parent / relative
        assert target.is_file()
        _check_png(target)


def test_run_with_plot_writes_and_records_pngs(cli, tmp_path):
    out = tmp_path / "out"
    res = cli(*RUN, "--limit", "1", "--out", str(out), "--plot")
    assert res.exit_code == 0, res.stderr
    path, result = _only_result(out)
    assert result["status"] == "ok"
    _check_artifacts(path, result)
    assert (out / result["run_id"] / "curve.png").is_file()
    # the result file still validates after the artifacts were added
    assert cli("validate", str(path)).exit_code == 0


def test_plot_command_adds_plots_to_an_existing_result(cli, tmp_path):
    out = tmp_path / "out"
    res = cli(*RUN, "--limit", "2", "--out", str(out))
    assert res.exit_code == 0, res.stderr
    path, before = _only_result(out)
    assert before["artifacts"] == {}
    assert not (out / before["run_id"] / "curve.png").exists()
    res = cli("plot", str(path))
    assert res.exit_code == 0, res.stderr
    _, after = _only_result(out)
    _check_artifacts(path, after)
    # nothing else in the result changed
    for key in ("run_id", "value", "stderr", "values", "metric", "attributor", "masker", "dataset"):
        assert after[key] == before[key]
    # plotting again is idempotent
    assert cli("plot", str(out)).exit_code == 0
    _, again = _only_result(out)
    assert again["artifacts"] == after["artifacts"]


def test_visuals_are_kept_for_the_first_four_samples_only(cli, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    names = [f"im{i}.png" for i in range(6)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(data / name)
    out = tmp_path / "out"
    # batches of 3: the first four samples span two batches, the last two are in the second one
    res = cli(*RUN, "--data", f"folder:{data}", "--batch-size", "3", "--out", str(out), "--plot")
    assert res.exit_code == 0, res.stderr
    path, result = _only_result(out)
    assert result["dataset"]["n_samples"] == 6
    visuals = load_visuals(out, result["run_id"])
    assert VISUAL_SAMPLES == 4
    assert sorted(visuals) == names[:4]
    assert len(list((out / result["run_id"] / "visuals").glob("*.safetensors"))) == 4
    for tensors in visuals.values():
        assert tensors["image"].shape == (3, 160, 160)  # test_resnet's input size, pixel space
        assert 0 <= float(tensors["image"].min()) and float(tensors["image"].max()) <= 1
        assert tensors["attribution"].shape == (160, 160)
    _check_artifacts(path, result)
