"""The device benchmark's CPU smoke path: rows run, files are written, targets are evaluated."""

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("transformers")


def _load_bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_memory.py")
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_memory_smoke(tmp_path):
    bench = _load_bench()
    argv = ["--out", str(tmp_path), "--model", "tiny", "--device", "cpu", "--seq_len", "32", "--batch_sizes", "1"]
    argv += ["--warmup", "1", "--steps", "2", "--setups", "mixed precision", "int8_weight_only + qt AdamW8bit",
             "CPU-offloaded"]
    rows = bench.main(argv)
    assert [row["setup"] for row in rows] == [
        "mixed precision (FP32 weights, BF16 autocast) + torch AdamW",
        "int8_weight_only + qt AdamW8bit",
        "BF16 weights + CPU-offloaded torch AdamW (FP32 master weights and states on the CPU)",
    ]
    for row in rows:
        assert "error" not in row, row
        # Random tokens over a 1024-entry vocabulary: the loss starts near ln(1024) = 6.93.
        assert 6.0 < row["final_loss"] < 7.5
    saved = json.loads((tmp_path / "bench_memory.json").read_text())
    assert saved["rows"] == rows
    table = (tmp_path / "bench_memory.md").read_text()
    assert "| int8_weight_only + qt AdamW8bit | 1 |" in table
    assert "not measured" in table  # no CUDA peak memory on CPU
