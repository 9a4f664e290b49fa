"""Token affinity spectrum (plugins/metrics/token_spectrum.py): eigenvalue counts on token sets with a
known number of groups, token extraction from sequences and maps, block discovery, and the CLI run on
FAN (``harness run --model fan_t --random-init --metric token_spectrum``) with its PNG."""

from __future__ import annotations

import json

import pytest
import torch

from _rep_helpers import run_metric, smooth_images
from conftest import wrap_module


def _groups(sizes: list[int], dim: int = 16, noise: float = 0.0) -> torch.Tensor:
    """Tokens in len(sizes) mutually orthogonal groups (identical within a group), (1, N, dim)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    tokens = torch.cat([basis[k].expand(n, dim) for k, n in enumerate(sizes)])
    return (tokens + noise * torch.randn(tokens.shape, generator=g))[None]


def test_k_orthogonal_groups_give_k_significant_eigenvalues():
    from harness_plugins.metrics.token_spectrum import affinity_spectrum, spectrum_stats

    eig = affinity_spectrum(_groups([10, 6, 3]))
    torch.testing.assert_close(eig[0, :4], torch.tensor([10.0, 6.0, 3.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    stats = spectrum_stats(eig, threshold=0.01, keep=5)
    assert stats["significant"].item() == 3
    torch.testing.assert_close(stats["spectrum"][0], torch.tensor([1.0, 0.6, 0.3, 0.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    p = torch.tensor([10, 6, 3], dtype=torch.float64) / 19
    assert stats["effective_rank"].item() == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    # one group: a single eigenvalue; all tokens orthogonal: all significant
    assert spectrum_stats(affinity_spectrum(_groups([12])), 0.01, 4)["significant"].item() == 1
    assert spectrum_stats(affinity_spectrum(_groups([1] * 16)), 0.01, 4)["significant"].item() == 16


def test_negative_cosines_are_clipped():
    from harness_plugins.metrics.token_spectrum import affinity_spectrum

    tokens = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # cosine -1 -> affinity 0: two groups, not one
    torch.testing.assert_close(affinity_spectrum(tokens)[0], torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_tokens_from_sequences_and_maps():
    from harness_plugins.metrics.token_spectrum import to_tokens

    seq = torch.randn(2, 1 + 196, 8)
    assert to_tokens(seq, 1, 196, False).shape == (2, 196, 8)
    torch.testing.assert_close(to_tokens(seq, 1, 196, False), seq[:, 1:])
    fmap = torch.randn(2, 8, 56, 56)
    pooled = to_tokens(fmap, 0, 196, False)
    assert pooled.shape == (2, 196, 8)
    torch.testing.assert_close(pooled[:, 0], fmap[:, :, :4, :4].mean((2, 3)))
    small = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(to_tokens(small, 0, 196, False), small.flatten(2).transpose(1, 2))
    torch.testing.assert_close(to_tokens(small.permute(0, 2, 3, 1), 0, 196, True), small.flatten(2).transpose(1, 2))


def test_block_discovery():
    import timm

    from harness_plugins.metrics.token_spectrum import find_blocks
    from harness_plugins.models.fan import create_fan

    with torch.device("meta"):
        assert find_blocks(create_fan("fan_t")) == [f"blocks.{i}" for i in range(12)]
        resnet = find_blocks(timm.create_model("resnet50"))
        convnext = find_blocks(timm.create_model("convnext_tiny"))
    assert len(resnet) == 16 and resnet[0] == "layer1.0" and resnet[-1] == "layer4.2"
    assert len(convnext) == 18 and convnext[-1] == "stages.3.blocks.2"


class GroupedTokens(torch.nn.Module):
    """16 tokens in two groups (left / right half) plus an input-dependent part, through two blocks."""

    def __init__(self):
        super().__init__()
        self.num_prefix_tokens = 0
        self.blocks = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
        self.head = torch.nn.Linear(2, 3)

    def forward(self, x):
        tokens = torch.zeros(x.shape[0], 16, 2)
        tokens[:, :8, 0] = 1.0
        tokens[:, 8:, 1] = 1.0
        tokens = tokens + 0.5 * x.flatten(1)[:, :32].reshape(x.shape[0], 16, 2)
        return self.head(self.blocks(tokens).mean(1))


def test_noise_free_runs_change_nothing(tmp_path):
    from harness_plugins.metrics.token_spectrum import TokenSpectrum

    model = wrap_module(GroupedTokens(), size=16, batch_size=4)
    metric = TokenSpectrum(TokenSpectrum.Options(noise_std=0.0))
    summary, records = run_metric(metric, [model], smooth_images(3, 16), batch_size=4, out_dir=tmp_path)
    assert summary.value == 0.0
    assert summary.values["noise_ratio"] == [0.0, 0.0]
    assert summary.values["significant_clean"] == summary.values["significant_noisy"]
    assert summary.values["layers"] == ["blocks.0", "blocks.1"] and summary.values["n_tokens"] == [16, 16]
    noisy = TokenSpectrum(TokenSpectrum.Options(noise_std=0.5))
    summary, _ = run_metric(noisy, [model], smooth_images(3, 16), batch_size=4, out_dir=tmp_path)
    assert all(r > 0 for r in summary.values["noise_ratio"])


def test_cli_on_fan_random_init_writes_values_and_png(cli, tmp_path):
    res = cli("run", "--model", "fan_t", "--random-init", "--metric", "token_spectrum", "--data", "samples",
              "--limit", "2", "--batch-size", "2", "--out", tmp_path, "--quiet")
    assert res.exit_code == 0, res.stderr
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    values = result["values"]
    assert result["models"][0]["random_init"] is True and result["metric"]["higher_is_better"] is None
    assert values["layers"] == [f"blocks.{i}" for i in range(12)] and values["n_tokens"] == [196] * 12
    for key in ("significant_clean", "significant_noisy", "effective_rank_clean", "noise_ratio"):
        assert len(values[key]) == 12
    assert all(1 <= v <= 196 for v in values["significant_clean"] + values["significant_noisy"])
    assert len(values["spectrum_clean"][0]) == 32 and values["spectrum_clean"][0][0] == pytest.approx(1.0)
    png = tmp_path / result["artifacts"]["token_spectrum"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in path.with_name(path.name.replace(".json", ".samples.jsonl")).read_text().splitlines()]
    assert len(records) == 2 and len(records[0]["values"]["significant_clean"]) == 12
