"""`--attributor maps:PATH`: maps computed elsewhere, by sample id (folders of .npy / .safetensors,
one .safetensors keyed by id), shape checks, one-line errors, the maps' digest in the run identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import HarnessError

RUN = ("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--limit", "2",
       "-o", "metric.steps=4", "--batch-size", "2", "--memory-format", "contiguous", "--quiet")
IDS = ("chelsea", "coffee")


def _result(folder: Path) -> tuple[dict, list[dict]]:
    (path,) = [p for p in Path(folder).glob("*.json") if not p.name.endswith(".verification.json")]
    result = json.loads(path.read_text())
    lines = [json.loads(line) for line in path.with_name(f"{result['run_id']}.samples.jsonl").read_text().splitlines()]
    return result, lines


def _aucs(lines: list[dict]) -> list[float]:
    return [line["values"]["auc"] for line in lines]


@pytest.fixture(scope="module")
def saliency(tmp_path_factory):
    """The saliency run's per-sample AUCs, and the same saliency maps computed outside the run."""
    from conftest import run_cli

    from harness.data import Batch
    from harness.execution import ExecutionMode
    from harness.model import load_model
    from harness.registry import get_registry
    from harness_plugins.attributors.gradients import Saliency
    from harness_plugins.datasets import SampleImages

    out = tmp_path_factory.mktemp("saliency")
    res = run_cli(*RUN, "--attributor", "saliency", "--out", out)
    assert res.exit_code == 0, res.stderr
    result, lines = _result(out)
    model = load_model(get_registry().model_spec("test_resnet"), random_init=True, seed=0,
                       execution=ExecutionMode(memory_format="contiguous"), batch_size=2)
    dataset = SampleImages()
    samples = dataset.samples()[:2]
    inputs = Batch(samples, [dataset.load(s) for s in samples], [0, 0]).inputs(model)
    target = model.logits(inputs).argmax(1)
    maps = Saliency().attribute(model, inputs, target, [0, 0])
    return {"aucs": _aucs(lines), "maps": {s.id: maps[i].numpy() for i, s in enumerate(samples)}, "result": result}


def _run_maps(cli, where, out, *extra):
    res = cli(*RUN, "--attributor", f"maps:{where}", "--out", out, *extra)
    return res


def test_folder_of_npy_files_gives_the_saliency_numbers(cli, tmp_path, saliency):
    folder = tmp_path / "maps"
    folder.mkdir()
    for sample_id, values in saliency["maps"].items():
        np.save(folder / f"{sample_id}.npy", values)
    res = _run_maps(cli, folder, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    result, lines = _result(tmp_path / "out")
    assert _aucs(lines) == saliency["aucs"]
    assert result["attributor"]["id"] == "maps" and result["attributor"]["options"]["path"] == str(folder)
    assert len(result["attributor"]["maps_sha256"]) == 64
    assert result["provenance"]["attribution_cache"] is None  # stored maps are not cached again


def test_folder_of_safetensors_files_with_channels(cli, tmp_path, saliency):
    from safetensors.torch import save_file

    folder = tmp_path / "maps"
    folder.mkdir()
    for sample_id, values in saliency["maps"].items():
        per_channel = torch.from_numpy(values / 2).expand(2, -1, -1).contiguous()  # (C, H, W): summed over C
        save_file({"attribution": per_channel}, str(folder / f"{sample_id}.safetensors"))
    res = _run_maps(cli, folder, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert _aucs(_result(tmp_path / "out")[1]) == pytest.approx(saliency["aucs"], abs=1e-6)


def test_one_safetensors_file_keyed_by_sample_id(cli, tmp_path, saliency):
    from safetensors.torch import save_file

    file = tmp_path / "maps.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in saliency["maps"].items()} | {"other": torch.zeros(2, 2)}, str(file))
    res = _run_maps(cli, file, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert _aucs(_result(tmp_path / "out")[1]) == saliency["aucs"]


def test_the_maps_digest_is_the_run_identity(cli, tmp_path, saliency):
    folder = tmp_path / "maps"
    folder.mkdir()
    for sample_id, values in saliency["maps"].items():
        np.save(folder / f"{sample_id}.npy", values)
    assert _run_maps(cli, folder, tmp_path / "a").exit_code == 0
    first, _ = _result(tmp_path / "a")
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert _run_maps(cli, moved, tmp_path / "b").exit_code == 0
    assert _result(tmp_path / "b")[0]["run_id"] == first["run_id"]  # a location is no identity
    np.save(moved / "coffee.npy", saliency["maps"]["coffee"][::-1].copy())
    assert _run_maps(cli, moved, tmp_path / "c").exit_code == 0
    changed, _ = _result(tmp_path / "c")
    assert changed["run_id"] != first["run_id"]
    assert changed["attributor"]["maps_sha256"] != first["attributor"]["maps_sha256"]


def test_verify_replays_a_maps_run(cli, tmp_path, saliency):
    folder = tmp_path / "maps"
    folder.mkdir()
    for sample_id, values in saliency["maps"].items():
        np.save(folder / f"{sample_id}.npy", values)
    assert _run_maps(cli, folder, tmp_path / "out").exit_code == 0
    result, _ = _result(tmp_path / "out")
    assert result["provenance"]["run_config"]["attributor"] == f"maps:{folder.resolve()}"
    res = cli("verify", tmp_path / "out" / f"{result['run_id']}.json", "--device", "cpu")
    assert res.exit_code == 0, res.stdout + res.stderr


def _one_line_error(res) -> str:
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("make, message", [
    (lambda d: np.save(d / "chelsea.npy", np.zeros((160, 160))), "has no map for 1 of 2 sample(s): 'coffee'"),
    (lambda d: [np.save(d / f"{i}.npy", np.zeros((1, 1, 160, 160))) for i in IDS], "shape (1, 1, 160, 160)"),
    (lambda d: [np.save(d / f"{i}.npy", np.zeros((8, 8))) for i in IDS], "is 8x8 but the model's input is 160x160"),
    (lambda d: [np.save(d / f"{i}.npy", np.full((160, 160), np.nan)) for i in IDS], "non-finite"),
    (lambda d: [(d / f"{i}.npy").write_bytes(b"not numpy") for i in IDS], "cannot read chelsea.npy"),
])
def test_wrong_maps_are_one_line_errors(cli, tmp_path, make, message):
    folder = tmp_path / "maps"
    folder.mkdir()
    make(folder)
    assert message in _one_line_error(_run_maps(cli, folder, tmp_path / "out"))


def test_other_paths_are_one_line_errors(cli, tmp_path):
    assert "does not exist" in _one_line_error(_run_maps(cli, tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "maps.npz").write_bytes(b"")
    assert "neither a folder nor a .safetensors file" in _one_line_error(_run_maps(cli, tmp_path / "maps.npz", tmp_path / "out"))
    assert "the path after ':' is empty" in _one_line_error(cli(*RUN, "--attributor", "maps:", "--out", tmp_path / "out"))
    assert "attributor.path" in _one_line_error(cli(*RUN, "--attributor", "maps", "--out", tmp_path / "out"))


def test_keyed_file_missing_ids(cli, tmp_path):
    from safetensors.torch import save_file

    save_file({"coffee": torch.zeros(160, 160)}, str(tmp_path / "maps.safetensors"))
    res = _run_maps(cli, tmp_path / "maps.safetensors", tmp_path / "out")
    assert "has no map for 1 of 2 sample(s): 'chelsea'" in _one_line_error(res)


def test_smaller_maps_resized_bilinearly_on_request(cli, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for i in IDS:
        np.save(folder / f"{i}.npy", np.random.default_rng(0).random((7, 7)))
    res = _run_maps(cli, folder, tmp_path / "out", "-o", "attributor.resize=bilinear")
    assert res.exit_code == 0, res.stderr


def test_folder_maps_find_ids_with_image_suffixes(tmp_path):
    from harness_plugins.attributors.maps import FolderMaps

    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "cat.npy", np.zeros((4, 4)))
    np.save(tmp_path / "dog.png.npy", np.ones((4, 4)))
    maps = FolderMaps(tmp_path)
    digests = maps.index(["sub/cat.jpg", "dog.png"])
    assert set(digests) == {"sub/cat.jpg", "dog.png"} and maps.load("dog.png").sum() == 16
    with pytest.raises(HarnessError, match="no map for 1 of 1"):
        FolderMaps(tmp_path).index(["../escape"])


def test_a_map_serves_only_its_own_image_model_and_target():
    from harness.data import Sample, sample_seed
    from harness.maps import bound_maps

    attributor = bound_maps(torch.rand(2, 4, 4))()
    samples = [Sample("a", "a"), Sample("b", "b")]
    attributor.bind_samples(samples, seed=3)
    seeds = [sample_seed(3, "a"), sample_seed(3, "b")]
    inputs, model = torch.rand(2, 3, 4, 4), object()
    first = attributor.attribute(model, inputs, torch.tensor([1, 2]), seeds)
    assert torch.equal(attributor.attribute(model, inputs, torch.tensor([1, 2]), seeds), first)
    with pytest.raises(HarnessError, match="another image"):
        attributor.attribute(model, inputs + 1, torch.tensor([1, 2]), seeds)
    with pytest.raises(HarnessError, match="another target"):
        attributor.attribute(model, inputs, torch.tensor([0, 2]), seeds)
    with pytest.raises(HarnessError, match="another model"):
        attributor.attribute(object(), inputs, torch.tensor([1, 2]), seeds)
    with pytest.raises(HarnessError, match="no sample of this run"):
        attributor.attribute(model, inputs, torch.tensor([1, 2]), [sample_seed(4, "a"), seeds[1]])
