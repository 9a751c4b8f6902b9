"""scripts/bench_small_layers.py: the thresholds it suggests, and its CPU smoke run."""

import json
import sys
from pathlib import Path

import pytest

import qt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_small_layers  # noqa: E402


def grid(speedup_of):
    """(tokens, K, N) -> speedup over K, N in {256, 1024, 4096} and 16384 / 4096 tokens."""
    return {(t, k, n): speedup_of(t, k, n) for t in (16384, 4096) for k in (256, 1024, 4096) for n in (256, 1024, 4096)}


def test_the_suggested_thresholds_quantize_the_most_shapes_that_win_at_every_token_count():
    def speedup(tokens, k, n):
        if k < 1024 or n < 1024:
            return 0.8
        return 0.95 if tokens == 4096 and k == 1024 else 1.2  # K=1024 loses at 4096 tokens only

    assert bench_small_layers.suggest_min_shape(grid(speedup), 1.0) == (qt.MinShape(4096, 1024), 2, 9)
    assert bench_small_layers.suggest_min_shape(grid(speedup), 0.9) == (qt.MinShape(1024, 1024), 4, 9)
    assert bench_small_layers.suggest_min_shape(grid(lambda t, k, n: 1.1), 1.0) == (qt.MinShape(256, 256), 9, 9)
    # Nothing wins: thresholds past the largest shape measured keep every linear in high precision.
    assert bench_small_layers.suggest_min_shape(grid(lambda t, k, n: 0.5), 1.0) == (qt.MinShape(4097, 4097), 0, 9)


def test_smoke_run_measures_every_recipe_and_shape_and_its_report_can_be_rebuilt(tmp_path):
    text = bench_small_layers.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_small_layers.json").read_text())["rows"]
    cases = ["baseline", *qt.RECIPES]
    assert sorted((r["case"], r["tokens"], r["K"], r["N"]) for r in rows) == sorted(
        (case, tokens, k, n) for case in cases for tokens in (64, 16) for k in (16, 32) for n in (16, 32))
    assert all(r["ms"] > 0 for r in rows)
    for recipe in qt.RECIPES:
        assert f'    "{recipe}": MinShape(in_features=' in text
        assert f"{recipe}, 64 tokens: speedup over the baseline" in text
    assert (tmp_path / "bench_small_layers.md").read_text() == text + "\n"
    assert bench_small_layers.main(["--report", str(tmp_path / "bench_small_layers.json"),
                                    "--out", str(tmp_path / "again")]) == text


def test_without_a_gpu_it_says_to_run_the_smoke_mode(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="run it on a CUDA GPU \\(or --smoke on the CPU\\)"):
        bench_small_layers.main(["--out", "unused"])
