"""Scale-out and crash safety: torchrun sharding, SIGKILL + --resume, the attribution cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import skimage.data

PHOTOS = Path(skimage.data.__file__).parent


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Nine real photos (three scikit-image photos, three copies each)."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(3):
        for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
            shutil.copy(PHOTOS / name, folder / f"{i}_{name}")
    return folder


def harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *map(str, args)]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    e.pop("WORLD_SIZE", None)
    return e


def result_and_lines(out: Path) -> tuple[dict, list[dict]]:
    [path] = [p for p in out.glob("*.json")]
    data = json.loads(path.read_text())
    lines = [json.loads(l) for l in path.with_name(f"{data['run_id']}.samples.jsonl").read_text().splitlines()]
    return data, lines


RUN = ("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "-o", "metric.steps=5",
       "--quiet", "--no-cache")


@pytest.mark.parametrize("launcher", ["torchrun", "local"])
def test_two_process_run_equals_one_process(image_folder, tmp_path, launcher):
    single, double = tmp_path / "one", tmp_path / "two"
    common = [*RUN, "--data", f"folder:{image_folder}", "--batch-size", "2"]
    subprocess.run(harness_cmd(*common, "--out", single), check=True, env=env(), capture_output=True, timeout=300)
    res = subprocess.run(harness_cmd(*common, "--out", double, "--launcher", launcher, "--nproc", "2"),
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, lines_a = result_and_lines(single)
    b, lines_b = result_and_lines(double)
    assert a["run_id"] == b["run_id"]
    assert a["value"] == b["value"] and a["stderr"] == b["stderr"]
    assert lines_a == lines_b  # same samples, same order, same numbers
    assert len(lines_b) == 9
    assert not list(double.glob("*.rank*"))  # the ranks' files were merged away
    assert res.stdout.count("insertion test_resnet") == 1  # only rank 0 reports


def test_local_launcher_stops_the_other_workers_and_passes_the_failure_on(tmp_path):
    """Every rank fails on a missing data folder: one line each, a non-zero exit, no process left."""
    res = subprocess.run(harness_cmd(*RUN, "--data", f"folder:{tmp_path / 'missing'}", "--out", tmp_path / "out",
                                     "--launcher", "local", "--nproc", "2"), env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "is not a folder" in res.stderr and "Traceback" not in res.stderr


def test_local_launcher_environment_matches_torchrun():
    from harness.launch import strip_launcher_args, worker_environments

    envs = worker_environments(2, 29555, {"PATH": "/bin"})
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_PORT"]) for e in envs] == [
        ("0", "0", "2", "29555"), ("1", "1", "2", "29555")]
    assert all(e["MASTER_ADDR"] == "127.0.0.1" and e["PATH"] == "/bin" and int(e["OMP_NUM_THREADS"]) >= 1 for e in envs)
    assert worker_environments(2, 1, {"OMP_NUM_THREADS": "3"})[1]["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    assert strip_launcher_args(["run", "--launcher", "local", "--nproc=2", "--model", "m", "--launcher=torchrun"]) == [
        "run", "--model", "m"]


def test_sigkill_then_resume_gives_the_uninterrupted_result(image_folder, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    common = [*RUN, "--data", f"folder:{image_folder}", "--batch-size", "1"]
    subprocess.run(harness_cmd(*common, "--out", reference), check=True, env=env(), capture_output=True, timeout=300)
    proc = subprocess.Popen(harness_cmd(*common, "--out", killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    samples = None
    while time.time() < deadline:
        found = list(killed.glob("*.samples.jsonl"))
        if found and found[0].read_text().count("\n") >= 3:
            samples = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert samples is not None, "the run never wrote three samples"
    done_before = samples.read_text().count("\n")
    assert done_before < 9, "killed too late to test anything"
    assert not list(killed.glob("*.json")), "no result file before the run finished"
    res = subprocess.run(harness_cmd(*common, "--out", killed, "--resume"), env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    a, lines_a = result_and_lines(reference)
    b, lines_b = result_and_lines(killed)
    assert [l["sample_id"] for l in lines_b] == [l["sample_id"] for l in lines_a]  # none lost, none twice
    assert lines_a == lines_b and a["value"] == b["value"]
    assert not list(killed.glob(".*.tmp"))


def test_deletion_after_insertion_reuses_cached_attributions(tmp_path, cli):
    cache = tmp_path / "cache"
    base = ["run", "--model", "test_resnet", "--random-init", "--limit", "2", "--attributor", "smoothgrad",
            "-o", "attributor.samples=3", "-o", "metric.steps=4", "--cache", cache, "--out", tmp_path / "out"]
    first = cli(*base, "--metric", "insertion")
    second = cli(*base, "--metric", "deletion")
    uncached = cli(*base[:-2], "--out", tmp_path / "plain", "--metric", "deletion", "--no-cache")
    assert first.exit_code == second.exit_code == uncached.exit_code == 0, first.stderr + second.stderr
    ins = json.loads(Path(first.stdout.strip().rsplit(" -> ", 1)[1]).read_text())
    dele = json.loads(Path(second.stdout.strip().rsplit(" -> ", 1)[1]).read_text())
    plain = json.loads(Path(uncached.stdout.strip().rsplit(" -> ", 1)[1]).read_text())
    assert ins["provenance"]["attribution_cache"]["misses"] == 2
    assert dele["provenance"]["attribution_cache"] == {"path": str(cache), "hits": 2, "misses": 0}
    assert plain["provenance"]["attribution_cache"] is None
    assert dele["value"] == plain["value"]  # a cached map gives the same numbers
    info = cli("cache", "info", "--cache", cache, "--json")
    assert json.loads(info.stdout)["entries"] == 2
    cleared = cli("cache", "clear", "--cache", cache, "--json")
    assert json.loads(cleared.stdout)["removed"] == 2
    assert json.loads(cli("cache", "info", "--cache", cache, "--json").stdout)["entries"] == 0


def test_a_different_option_misses_the_cache(tmp_path, cli):
    cache = tmp_path / "cache"
    base = ["run", "--model", "test_resnet", "--random-init", "--limit", "1", "--metric", "insertion",
            "-o", "metric.steps=3", "--attributor", "integrated_gradients", "--cache", cache]
    cli(*base, "-o", "attributor.steps=2", "--out", tmp_path / "a")
    res = cli(*base, "-o", "attributor.steps=3", "--out", tmp_path / "b")
    data = json.loads(Path(res.stdout.strip().rsplit(" -> ", 1)[1]).read_text())
    assert data["provenance"]["attribution_cache"]["misses"] == 1


LAUNCHER = """
import os, sys, time
import harness.launch as launch
folder, behaviour = sys.argv[1], sys.argv[2]
worker = (
    "import os, signal, sys, time; rank = os.environ['RANK']; "
    f"open(os.path.join({folder!r}, rank + '.pid'), 'w').write(str(os.getpid())); "
    + ("os.kill(os.getpid(), signal.SIGKILL) if rank == '1' else time.sleep(60)" if behaviour == "kill" else "time.sleep(60)")
)
launch.worker_command = lambda args: [sys.executable, "-c", worker]
sys.exit(launch.launch_local(2, []))
"""


def _launcher(tmp_path, behaviour: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), behaviour], env=env())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(tmp_path, n: int = 2) -> list[int]:
    deadline = time.time() + 60
    while time.time() < deadline:
        files = list(tmp_path.glob("*.pid"))
        if len(files) == n and all(f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def test_local_launcher_stops_its_workers_when_terminated(tmp_path):
    launcher = _launcher(tmp_path, "sleep")
    pids = _pids(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def test_local_launcher_reports_a_killed_worker_as_the_shell_does(tmp_path):
    launcher = _launcher(tmp_path, "kill")
    assert launcher.wait(timeout=60) == 128 + signal.SIGKILL  # 137, not 247
    time.sleep(0.2)
    assert not any(_alive(int(f.read_text())) for f in tmp_path.glob("*.pid") if f.read_text())
