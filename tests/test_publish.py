"""`harness publish` (harness/publish.py, harness/site_html.py) and `harness leaderboard --format latex`.

Result files are written directly (valid files as the runner writes them, with hostile strings, bad
paths and links mixed in); one real run with `--plot` checks the site against the runner's own output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import run_cli

HOSTILE = "<script>document.title='EXECUTED'</script>"
HOSTILE_IMG = "<img src=x onerror=\"document.title='EXECUTED'\">"
DIGEST_A, DIGEST_B = "a" * 64, "b" * 64
ODD_METRIC = "../Odd Metric<b>"


# -- writing result files -----------------------------------------------------------------------------------
def make_result(run_id: str, model: str = "alpha", metric: str = "accuracy", value: float | None = 0.5,
                stderr: float | None = 0.01, *, n: int = 10, dataset: str = "samples", digest: str = DIGEST_A,
                random_init: bool = False, weights: str | None = None, precision: str | None = None,
                options: dict | None = None, status: str = "ok", error: str | None = None,
                started: str = "2026-01-01T00:00:00+00:00") -> dict:
    """A valid result file's data (the keys the runner writes)."""
    curve = metric in ("deletion", "insertion")
    data = {
        "schema_version": 1,
        "run_id": run_id,
        "models": [{"id": model, "source": f"timm:{model}", "weights": weights or ("random-init(seed=0)" if random_init else f"timm:{model}"),
                    "weights_sha256": "c" * 64, "random_init": random_init}],
        "metric": {"id": metric, "version": "1", "higher_is_better": metric != "deletion",
                   "options": options if options is not None else ({"steps": 4} if curve else {})},
        "attributor": {"id": "saliency", "version": "1", "options": {"score": "logit"}} if curve else None,
        "masker": {"id": "blur", "version": "1", "options": {"granularity": None, "kernel_size": 51, "sigma": 50.0}} if curve else None,
        "dataset": {"id": dataset, "n_samples": n, "sample_ids_sha256": digest},
        "value": value,
        "stderr": stderr,
        "values": {"granularity": "pixel", "steps": 4, "mean_curve": [0.1, 0.2, 0.3]} if curve else {"top5": 0.9},
        "artifacts": {},
        "provenance": {"harness": "0.1.0", "plugins": {"harness": "0.1.0"}, "python": "3.11", "torch": "2.4",
                       "timm": "1.0", "device": "cpu", "seed": 0, "batch_size": 8, "started_at": started,
                       "duration_s": 1.5, "argv": ["harness", "run", "--model", model, "--metric", metric]},
        "status": status,
        "error": error,
    }
    if precision:
        data["provenance"]["precision"] = precision
    return data


def write_result(folder: Path, data: dict, samples: list[dict] | None = None) -> Path:
    """Write ``<run_id>.json`` (and its samples file) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['run_id']}.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    if samples is not None:
        lines = "".join(json.dumps(s) + "\n" for s in samples)
        (folder / f"{data['run_id']}.samples.jsonl").write_text(lines, encoding="utf-8")
    return path


def sample_lines(n: int, first_id: str | None = None) -> list[dict]:
    lines = [{"sample_id": f"img{i:03d}", "label": i, "prediction": i % 3, "values": {"top1_correct": i % 2, "top5": [1, 2, 3]}}
             for i in range(n)]
    if first_id is not None and lines:
        lines[0]["sample_id"] = first_id
    return lines


def write_png(path: Path, colour: tuple[int, int, int] = (40, 90, 160)) -> None:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (120, 80), (255, 255, 255))
    ImageDraw.Draw(image).line([(5, 75), (60, 30), (115, 10)], fill=colour, width=4)
    image.save(path)


def write_verification(folder: Path, run_id: str, passed: bool) -> None:
    record = {"run_id": run_id, "status": "passed" if passed else "failed", "n_checked": 10,
              "n_mismatched": 0 if passed else 3, "max_abs_diff": 0.0 if passed else 0.2, "same_versions": True,
              "checked_at": "2026-02-01T00:00:00+00:00"}
    (folder / f"{run_id}.verification.json").write_text(json.dumps(record), encoding="utf-8")


def build_results(folder: Path) -> dict[str, dict]:
    """Results on two sample sets, with every mark, hostile strings, a plot and files to refuse."""
    made: dict[str, dict] = {}

    def add(data: dict, samples: list[dict] | None = None) -> None:
        write_result(folder, data, samples)
        made[data["run_id"]] = data

    add(make_result("acc-alpha", "alpha", value=0.80, stderr=0.02), sample_lines(10, first_id="</td>" + HOSTILE))
    add(make_result("acc-beta", "beta", value=0.79, stderr=0.01), sample_lines(10))
    add(make_result("acc-gamma", "gamma", value=0.10, stderr=0.01, random_init=True), sample_lines(10))
    add(make_result("acc-hostile", HOSTILE, value=0.50, stderr=0.05, weights="/tmp/w<b>&amp;.safetensors"), sample_lines(10))
    add(make_result("acc-delta", "delta", value=0.70, stderr=0.03, precision="bf16"), sample_lines(10))
    add(make_result("acc-img", HOSTILE_IMG, value=0.40, stderr=0.05), sample_lines(10))
    add(make_result("acc-opt", "alpha", value=0.30, stderr=0.05, options={"evil": HOSTILE_IMG}), sample_lines(10))
    add(make_result("del-alpha", "alpha", "deletion", value=0.10, stderr=0.01), sample_lines(10))
    add(make_result("del-beta", "beta", "deletion", value=0.20, stderr=0.01), sample_lines(10))
    add(make_result("acc-alpha-imagenet", "alpha", value=0.60, stderr=0.05, n=5, dataset="imagenet", digest=DIGEST_B),
        sample_lines(5))
    add(make_result("acc-failed", "epsilon", value=None, stderr=None, status="error", error="out of memory <b>bold</b>"))
    odd = make_result("odd-metric", "alpha", value=3.0, stderr=None)  # a metric not installed here, no direction
    odd["metric"].update(id=ODD_METRIC, higher_is_better=None)
    add(odd, sample_lines(2))
    write_verification(folder, "acc-alpha", passed=True)
    write_verification(folder, "acc-beta", passed=False)

    # plots of del-alpha: a PNG, a non-PNG artifact, a PNG named link that leads outside the folder
    data = made["del-alpha"]
    write_png(folder / "del-alpha" / "curve.png")
    (folder / "del-alpha" / "notes.txt").write_text("not an image", encoding="utf-8")
    outside = folder.parent / "private.png"
    write_png(outside, (200, 0, 0))
    (folder / "del-alpha" / "leak.png").symlink_to(outside)
    data["artifacts"] = {"curve": "del-alpha/curve.png", "notes": "del-alpha/notes.txt", "leak": "del-alpha/leak.png"}
    write_result(folder, data)

    # files that are not valid results: refused with a warning
    bad = make_result("evil", "alpha")
    bad["run_id"] = "../../evil"
    (folder / "evil.json").write_text(json.dumps(bad), encoding="utf-8")
    bad = make_result("evil-artifact", "alpha")
    bad["artifacts"] = {"passwd": "../../etc/passwd"}
    (folder / "evil-artifact.json").write_text(json.dumps(bad), encoding="utf-8")
    return made


# -- reading the site ---------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Every tag with its attributes, the links and images, the element ids and the text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if a.get("id")}

    def links(self) -> list[tuple[str, str]]:
        return [(t, a[k]) for t, a in self.tags for k in ("href", "src") if a.get(k) is not None]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def html_files(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict[str, dict], str]:
    """(results folder, site folder, result data by run id, publish's stderr)."""
    root = tmp_path_factory.mktemp("publish")
    results = root / "results"
    made = build_results(results)
    site = root / "site"
    res = run_cli("publish", results, "--site", site, "--sample-rows", "3")
    assert res.exit_code == 0, res.stderr
    assert "Traceback" not in res.stderr
    return results, site, made, res.stderr


def cell_of(site: Path, table: int, model: str, column_start: str) -> tuple[dict[str, str | None], str]:
    """(td attributes, td inner HTML) of a model's cell in the index's table ``table``."""
    html = (site / "index.html").read_text(encoding="utf-8")
    section = re.search(rf'<section id="table-{table}">(.*?)</section>', html, re.S).group(1)
    headers = re.findall(r'<th scope="col"[^>]*>(.*?)</th>', section, re.S)
    names = [re.sub(r"<[^>]+>", "", h) for h in headers]
    index = next(i for i, n in enumerate(names) if n.startswith(column_start))
    for row in re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1], re.S):
        label = re.search(r'<th scope="row" data-value="([^"]*)"', row).group(1)
        import html as html_lib

        if html_lib.unescape(label).split(" [")[0] == model:
            cells = re.findall(r"<td([^>]*)>(.*?)</td>", row, re.S)
            attrs, inner = cells[index - 1]
            return dict(re.findall(r'(\w[\w-]*)="([^"]*)"', attrs)), inner
    raise AssertionError(f"no row {model!r}")


# -- the site: structure, links, escaping -------------------------------------------------------------------
def test_every_link_and_image_resolves_to_a_file_inside_the_site(built):
    _, site, made, _ = built
    pages = html_files(site)
    assert len(pages) > 10
    checked = 0
    for page_path in pages:
        page = parse(page_path)
        for tag, url in page.links():
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, f"{page_path}: absolute link {url!r}"
            assert not url.startswith("/"), f"{page_path}: root-relative link {url!r}"
            if not parts.path:  # an anchor on the same page
                assert parts.fragment in page.ids, f"{page_path}: no element #{parts.fragment}"
                continue
            target = (page_path.parent / unquote(parts.path)).resolve()
            assert target.is_relative_to(site.resolve()), f"{page_path}: {url!r} leaves the site"
            assert target.is_file(), f"{page_path}: {url!r} does not resolve"
            if parts.fragment:
                assert parts.fragment in parse(target).ids, f"{page_path}: {url!r}: no such anchor"
            checked += 1
        for tag, attrs in page.tags:
            if tag == "img":
                assert (attrs.get("alt") or "").strip(), f"{page_path}: image without alt text"
    assert checked > 100
    # a page for every valid result, metric, attributor and masker
    for run_id in made:
        assert (site / "results" / run_id / "index.html").is_file()
    for page in ("metrics/accuracy.html", "metrics/deletion.html", "attributors/saliency.html", "maskers/blur.html",
                 "components.html"):
        assert (site / page).is_file(), page


def test_every_page_is_self_contained_under_a_strict_csp(built):
    _, site, _, _ = built
    for page_path in html_files(site):
        text = page_path.read_text(encoding="utf-8")
        page = parse(page_path)
        csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
        assert csp == ["default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; base-uri 'none'; "
                       "form-action 'none'"], page_path
        scripts = [a for t, a in page.tags if t == "script"]
        assert len(scripts) == 1 and scripts[0]["src"].endswith("assets/sort.js"), page_path
        assert "<style" not in text and " style=" not in text  # the CSP forbids inline styles: none are used
        assert not re.search(r"https?://", " ".join(u for _, u in page.links())), page_path
        for tag, attrs in page.tags:
            assert not any(name.startswith("on") for name in attrs), f"{page_path}: event handler on <{tag}>"
    assert (site / ".nojekyll").is_file() and (site / "assets" / "site.css").is_file()


def test_strings_from_result_and_samples_files_are_shown_as_text(built):
    _, site, _, _ = built
    index = parse(site / "index.html")
    assert [t for t, _ in index.tags].count("img") == 0  # the hostile <img> model id stayed text
    text = "".join(index.text)
    assert HOSTILE in text and HOSTILE_IMG in text  # shown, as text
    assert f"evil={HOSTILE_IMG}" in text  # an option value in a column header
    page = parse(site / "results" / "acc-alpha" / "index.html")
    assert "</td>" + HOSTILE in "".join(page.text)  # a sample id from the samples file
    assert [t for t, _ in page.tags].count("script") == 1
    failed = (site / "results" / "acc-failed" / "index.html").read_text(encoding="utf-8")
    assert "out of memory &lt;b&gt;bold&lt;/b&gt;" in failed and "<b>bold" not in failed
    weights = (site / "results" / "acc-hostile" / "index.html").read_text(encoding="utf-8")
    assert "w&lt;b&gt;&amp;amp;.safetensors" in weights


def test_index_one_table_per_group_with_dataset_n_and_direction(built):
    _, site, _, _ = built
    html = (site / "index.html").read_text(encoding="utf-8")
    sections = re.findall(r'<section id="table-(\d+)"><h2>(.*?)</h2><dl class="facts">(.*?)</dl>', html, re.S)
    assert [s[0] for s in sections] == ["1", "2"]
    assert sections[0][1].startswith("1. imagenet, 5 samples") and sections[1][1].startswith("2. samples, 10 samples")
    facts = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", sections[1][2]))
    assert facts["dataset"] == "samples" and facts["samples"] == "10" and DIGEST_A in facts["sample ids sha256"]
    assert facts["direction"] == "per column: ↑ higher is better, ↓ lower is better"
    assert 'data-better="lower"' in html and 'data-better="higher"' in html
    # the failed run is listed apart, with its page
    assert 'id="failed"' in html and "results/acc-failed/index.html" in html


def test_best_value_within_one_stderr_and_ranks_are_marked(built):
    _, site, _, _ = built
    attrs, inner = cell_of(site, 2, "alpha", "accuracy ↑")
    assert attrs["class"] == "best" and "<strong>0.8000</strong>" in inner and "#1" in inner
    assert attrs["data-value"] == "0.8"
    attrs, inner = cell_of(site, 2, "beta", "accuracy ↑")  # 0.79: within 0.02 (the best's stderr) of 0.80
    assert attrs["class"] == "near" and "≈" in inner and "#2" in inner and "<strong>" not in inner
    attrs, inner = cell_of(site, 2, "delta", "accuracy ↑")  # 0.70: not within one stderr
    assert "class" not in attrs and "#3" in inner and "≈" not in inner
    attrs, inner = cell_of(site, 2, "alpha", "deletion")  # lower is better: 0.10 beats 0.20
    assert attrs["class"] == "best" and "#1" in inner
    attrs, inner = cell_of(site, 2, "beta", "deletion")
    assert "class" not in attrs and "#2" in inner


def test_marks_for_random_init_user_weights_precision_and_verification(built):
    _, site, _, _ = built
    html = (site / "index.html").read_text(encoding="utf-8")
    section = re.search(r'<section id="table-2">(.*?)</section>', html, re.S).group(1)
    assert 'gamma <span class="tag" title="untrained weights, on purpose">random-init</span>' in section
    assert "weights: w&lt;b&gt;&amp;amp;.safetensors" in section
    assert "delta" in section and ">bf16</span>" in section
    _, inner = cell_of(site, 2, "alpha", "accuracy ↑")
    assert 'class="ok"' in inner and "✓" in inner
    _, inner = cell_of(site, 2, "beta", "accuracy ↑")
    assert 'class="bad"' in inner and "✗" in inner
    # every value links to its result page
    _, inner = cell_of(site, 2, "delta", "accuracy ↑")
    assert 'href="results/acc-delta/index.html"' in inner


def test_result_page_has_configuration_provenance_values_plots_samples_and_downloads(built):
    results, site, made, _ = built
    folder = site / "results" / "del-alpha"
    html = (folder / "index.html").read_text(encoding="utf-8")
    for expected in ("0.1000 ± 0.0100", "(lower is better)", "mean_curve", "<code>harness run --model alpha --metric deletion</code>",
                     "kernel_size", "saliency", "sample ids sha256", "rank 1 of 2", "started at", "batch size"):
        assert expected in html, expected
    page = parse(folder / "index.html")
    images = [a for t, a in page.tags if t == "img"]
    assert [a["src"] for a in images] == ["files/del-alpha/curve.png"]
    assert images[0]["alt"] == "curve plot of deletion for alpha: the mean curve and the first images' curves"
    assert (folder / "files" / "del-alpha" / "curve.png").read_bytes() == (results / "del-alpha" / "curve.png").read_bytes()
    assert "notes: not a PNG image" in html and "leak: missing, or outside the results folder" in html
    assert not any(p.name == "leak.png" for p in site.rglob("*"))  # the link to a file outside was not followed
    # downloads: the result file byte for byte, the samples file
    assert (folder / "del-alpha.json").read_bytes() == (results / "del-alpha.json").read_bytes()
    assert (folder / "del-alpha.samples.jsonl").read_bytes() == (results / "del-alpha.samples.jsonl").read_bytes()
    hrefs = [a["href"] for t, a in page.tags if t == "a" and "download" in a]
    assert hrefs == ["del-alpha.json", "del-alpha.samples.jsonl"]


def test_per_sample_table_is_capped_with_a_note(built):
    _, site, _, _ = built
    html = (site / "results" / "acc-beta" / "index.html").read_text(encoding="utf-8")
    table = re.search(r'<table class="samples sortable">(.*?)</table>', html, re.S).group(1)
    rows = re.findall(r"<tr>", table.split("<tbody>")[1])
    assert len(rows) == 3  # --sample-rows 3
    assert "3 of 10 sample(s) shown (the first 3; the whole file is a download above)" in html
    assert "[3 values]" in table and "top1_correct" in table
    assert "Verification" in html and "✗ failed" in html and "samples that differ</th><td>3" in html


def test_component_pages_have_docstring_citation_options_and_every_result(built):
    from harness.registry import get_registry

    _, site, _, _ = built
    accuracy = get_registry().get("metric", "accuracy")
    html = (site / "metrics" / "accuracy.html").read_text(encoding="utf-8")
    assert accuracy.summary() in html
    assert "Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015" in html
    runs = re.findall(r'href="../results/([^/]+)/index.html"', html)
    assert sorted(runs) == sorted(["acc-alpha", "acc-beta", "acc-gamma", "acc-hostile", "acc-delta", "acc-img",
                                   "acc-opt", "acc-alpha-imagenet", "acc-failed"])
    deletion = (site / "metrics" / "deletion.html").read_text(encoding="utf-8")
    assert "<code>steps</code>" in deletion and "<code>null</code>" in deletion  # option with its default
    assert "Insertion and deletion" in deletion  # the plugin module's docstring describes it
    blur = (site / "maskers" / "blur.html").read_text(encoding="utf-8")
    assert "<code>kernel_size</code></th><td><code>int</code></td><td><code>51</code>" in blur
    from harness.site_html import component_page

    odd = component_page("metric", ODD_METRIC)
    assert re.fullmatch(r"metrics/odd_metric_b-[0-9a-f]{10}\.html", odd)  # a plain file name for any id
    odd_html = (site / odd).read_text(encoding="utf-8")
    assert "metric ../Odd Metric&lt;b&gt;</h1>" in odd_html and "Not installed where this site was built" in odd_html
    index = (site / "index.html").read_text(encoding="utf-8")
    assert f'href="{odd}"' in index
    _, inner = cell_of(site, 2, "alpha", "../Odd Metric")
    assert "#" not in inner and "<strong>" not in inner  # no direction: no rank, no best
    saliency = (site / "attributors" / "saliency.html").read_text(encoding="utf-8")
    assert "Simonyan" in saliency and "../results/del-alpha/index.html" in saliency


def test_invalid_files_are_left_out_with_a_warning(built):
    results, site, _, stderr = built
    assert "harness: warning: left out of the site:" in stderr
    assert "evil.json: schema error at run_id" in stderr and "evil-artifact.json: schema error at artifacts" in stderr
    assert "artifact 'leak'" in stderr and "not published" in stderr
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'id="skipped"' in index and "<li>evil.json: schema error at run_id" in index
    assert str(results) not in index and str(results.parent) not in index  # no local folder names on the site
    assert not (site / "results" / "evil").exists()
    assert all(p.resolve().is_relative_to(site.resolve()) for p in site.rglob("*"))


def test_downloads_have_latex_and_one_markdown_table_per_group(built):
    _, site, _, _ = built
    markdown = (site / "downloads" / "leaderboard.md").read_text(encoding="utf-8")
    assert [line.split(",")[0] for line in markdown.splitlines() if line.startswith("## ")] == ["## imagenet", "## samples"]
    latex = (site / "downloads" / "leaderboard.tex").read_text(encoding="utf-8")
    assert latex.count(r"\begin{tabular}") == 2
    assert json.loads((site / "downloads" / "leaderboard.json").read_text(encoding="utf-8"))["group_by"] == "sample-set"


def test_index_size_does_not_grow_with_samples_and_stays_small_for_50_results(tmp_path):
    sizes = []
    for n_samples in (2, 300):
        results = tmp_path / f"results{n_samples}"
        for i in range(50):  # 10 models x 5 metric settings
            model, steps = f"model_{i // 5:02d}", 2 + i % 5
            metric = "deletion" if i % 2 else "insertion"
            data = make_result(f"r{i:02d}", model, metric, value=0.1 + i / 100, stderr=0.01, n=n_samples,
                               options={"steps": steps})
            write_result(results, data, sample_lines(n_samples))
        res = run_cli("publish", results, "--site", tmp_path / f"site{n_samples}")
        assert res.exit_code == 0, res.stderr
        sizes.append((tmp_path / f"site{n_samples}" / "index.html").stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 50  # no per-sample data on the index (only "n" differs)
    assert sizes[0] < 60_000, sizes


def test_an_earlier_site_is_replaced_and_other_folders_are_refused(tmp_path):
    results = tmp_path / "results"
    write_result(results, make_result("one", "alpha"), sample_lines(2))
    site = tmp_path / "site"
    assert run_cli("publish", results, "--site", site).exit_code == 0
    (results / "one.json").unlink()
    write_result(results, make_result("two", "beta"), sample_lines(2))
    res = run_cli("publish", results, "--site", site)
    assert res.exit_code == 0, res.stderr
    assert (site / "results" / "two").is_dir() and not (site / "results" / "one").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind

    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me", encoding="utf-8")
    res = run_cli("publish", results, "--site", other)
    assert res.exit_code == 2 and "not empty and was not written by `harness publish`" in res.stderr
    assert (other / "thesis.tex").read_text(encoding="utf-8") == "keep me"
    res = run_cli("publish", results, "--site", results / "site")
    assert res.exit_code == 2 and "a folder being published" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("publish", empty, "--site", tmp_path / "site3")
    assert res.exit_code == 2 and res.stderr.startswith("harness: error: ") and "Traceback" not in res.stderr


def test_a_site_from_a_real_run_with_plots(tmp_path):
    out = tmp_path / "results"
    res = run_cli("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "-o", "metric.steps=3",
                  "--limit", "2", "--out", out, "--quiet", "--plot")
    assert res.exit_code == 0, res.stderr
    site = tmp_path / "site"
    res = run_cli("publish", out, "--site", site)
    assert res.exit_code == 0, res.stderr
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    folder = site / "results" / result["run_id"]
    images = [a for t, a in parse(folder / "index.html").tags if t == "img"]
    assert sorted(Path(a["src"]).name for a in images) == ["attributions.png", "curve.png"]
    assert all((folder / unquote(a["src"])).is_file() and a["alt"] for a in images)
    html = (folder / "index.html").read_text(encoding="utf-8")
    assert "2 of 2 sample(s) shown" in html and "chelsea" in html and "auc" in html


# -- LaTeX ------------------------------------------------------------------------------------------------------
LATEX_HOSTILE = r"a_b & c % $x$ \input{/etc/passwd} ^^5c #~ [x] <y> | --" + ' "q" `b` ✓ é'


@pytest.fixture
def latex_results(tmp_path) -> Path:
    results = tmp_path / "results"
    write_result(results, make_result("acc-a", "alpha", value=0.80, stderr=0.02))
    write_result(results, make_result("acc-b", LATEX_HOSTILE, value=0.70, stderr=0.01))
    write_result(results, make_result("del-a", "alpha", "deletion", value=0.30, stderr=0.01))
    write_result(results, make_result("del-b", LATEX_HOSTILE, "deletion", value=0.20, stderr=0.02))
    return results


def test_latex_booktabs_bold_best_stderr_caption_and_escaping(latex_results):
    res = run_cli("leaderboard", latex_results, "--format", "latex")
    assert res.exit_code == 0, res.stderr
    tex = res.stdout
    for command in (r"\begin{table}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert tex.count(command) == 1, command
    assert r"\caption{Dataset samples, $n=10$ (sample ids aaaaaaaaaaaa). Mean $\pm$ standard error;" in tex
    assert r"accuracy $\uparrow$ & deletion steps=4 (saliency, blur:pixel) $\downarrow$ \\" in tex
    rows = {line.split(" & ")[0]: line.split(" & ")[1:] for line in tex.splitlines() if line.endswith(r" \\") and " & " in line}
    escaped = (r"a\_b \& c \% \$x\$ \textbackslash{}input\{/etc/passwd\} \textasciicircum{}\textasciicircum{}5c "
               r"\#\textasciitilde{} {[}x{]} \textless{}y\textgreater{} \textbar{} -{}- {\ttfamily\char34}q{\ttfamily\char34} "
               r"\textasciigrave{}b\textasciigrave{} {\ttfamily U+2713} é")
    assert rows["alpha"] == [r"\textbf{0.8000 $\pm$ 0.0200}", r"0.3000 $\pm$ 0.0100 \\"]
    assert rows[escaped] == [r"0.7000 $\pm$ 0.0100", r"\textbf{0.2000 $\pm$ 0.0200} \\"]  # lower is better: 0.20


def test_latex_text_escapes_every_special_character():
    from harness.leaderboard_format import latex_text

    assert latex_text("50% of $5 & #1_a^b~{c}\\d") == (
        r"50\% of \$5 \& \#1\_a\textasciicircum{}b\textasciitilde{}\{c\}\textbackslash{}d")
    assert latex_text("line\nbreak\ttab") == "line break tab"
    assert latex_text("---") == "-{}-{}-" and latex_text("é ü") == "é ü" and latex_text("✓") == r"{\ttfamily U+2713}"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles_with_pdflatex(latex_results, tmp_path):
    tex = run_cli("leaderboard", latex_results, "--format", "latex").stdout
    document = tmp_path / "paper.tex"
    document.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"  # the default OT1 font encoding
                        "\\begin{document}\n" + tex + "\\end{document}\n", encoding="utf-8")
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", document.name],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "openin_any": "p"})
    assert res.returncode == 0, res.stdout[-2000:]
    assert (tmp_path / "paper.pdf").stat().st_size > 1000
    assert "(/etc/passwd" not in (tmp_path / "paper.log").read_text(errors="replace")  # never opened
