"""scripts/bench_peers.py: its CPU smoke run, its report, and the SQNR measurement of torchao's rows."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_peers  # noqa: E402


def table(text):
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                              for line in text.splitlines() if line.startswith("| ") and "---" not in line)}


def test_smoke_trains_the_rows_in_their_own_processes_and_reports_them(tmp_path, capsys):
    out = tmp_path / "peers.md"
    text = bench_peers.main(["--smoke", "--only", "qt bitnet$", "torchao", "--out", str(out)])
    rows = table(text)
    assert list(rows) == ["row", "fp32", "qt bitnet", *bench_peers.TORCHAO_ROWS]
    tok_s, speedup, memory, loss, sqnr, call = rows["qt bitnet"]
    assert float(tok_s.replace(",", "")) > 0 and speedup.endswith("x") and memory == "n/a" and call == "1"
    assert 5.0 < float(loss) < 7.0  # two steps from ln(512) = 6.24 on the tiny model's vocabulary
    assert float(sqnr) < 15  # ternary weights: far below the not-quantized line
    assert rows["fp32"][1] == "1.00x" and float(rows["fp32"][4]) > 50  # FP32 rounding only, not flagged
    reason = bench_peers.torchao_missing() or "--smoke runs the qt rows only"
    assert all(rows[name][0] == f"skipped: {reason}" for name in bench_peers.TORCHAO_ROWS)
    if bench_peers.torchao_missing():
        # this interpreter's pip: a bare `pip` may install for another Python (it did on the device machine)
        assert f"{sys.executable} -m pip install torchao=={bench_peers.TORCHAO_RELEASE}" in capsys.readouterr().out
    assert out.read_text() == text and "--smoke --only qt bitnet$ torchao" in text
    calls = json.loads(out.with_suffix(".json").read_text())["calls"]
    assert bench_peers.main(["--report", str(out.with_suffix(".json")), "--out", str(tmp_path / "again.md")]) == text
    assert [row["row"] for row in calls[0]["rows"]][:2] == ["fp32", "qt bitnet"]
    own_qt = str((Path(bench_peers.REPO) / "qt").resolve())  # without --qt_from, this checkout's
    assert [row["result"]["qt"] for row in calls[0]["rows"][:2]] == [own_qt] * 2 and "qt from" not in text


class RoundedWeightLinear(nn.Linear):
    """A module swap that quantizes its weight row-wise to INT8 in the forward (as torchao's swapped modules do)."""

    def forward(self, x):
        scale = self.weight.abs().amax(dim=1, keepdim=True) / 127
        return nn.functional.linear(x, (self.weight / scale).round() * scale, self.bias)


def test_a_torchao_rows_sqnr_measures_the_largest_converted_linear_against_its_float64_twin():
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 128), nn.Linear(128, 64))
    plain = bench_peers.torchao_forward_sqnr(model, torch.float32)
    assert plain["layer"] == "1" and not plain["quantized"] and plain["db"] > 100  # FP32 rounding only
    model[2].__class__ = RoundedWeightLinear  # the one converted linear, though not the largest
    swapped = bench_peers.torchao_forward_sqnr(model, torch.float32)
    assert swapped["layer"] == "2" and swapped["quantized"] and 35 < swapped["db"] < 50


def test_variant_rows_quantize_with_their_options():
    from tests.tiny_models import tiny_llama

    rows = bench_peers.qt_rows(small_linears=False)
    assert rows["qt fp8_mixed_precision rowwise"] == ("fp8_mixed_precision", {"scaling": "rowwise"})
    assert rows["qt int8_weight_only int8_activations"] == ("int8_weight_only", {"int8_activations": True})
    assert set(rows) >= {f"qt {recipe}" for recipe in bench_peers.qt.RECIPES}
    model = tiny_llama()
    bench_peers.apply_row(model, "qt fp8_mixed_precision rowwise", small_linears=False)
    assert model.model.layers[0].mlp.up_proj.weight.config.scaling == "rowwise"


def test_only_takes_prefixes_and_whole_names():
    names = ["qt fp8_mixed_precision", "qt fp8_mixed_precision codes", "qt fp8_mixed_precision rowwise"]
    chosen = lambda prefix: [name for name in names if bench_peers.row_is_chosen(name, prefix)]  # noqa: E731
    assert chosen("qt fp8") == names
    assert chosen("qt fp8_mixed_precision$") == ["qt fp8_mixed_precision"]
    assert chosen("qt fp8_mixed_precision rowwise$") == ["qt fp8_mixed_precision rowwise"]
    assert chosen("qt fp8_mixed$") == []


def test_qt_from_trains_the_rows_with_another_checkouts_qt(tmp_path):
    """A before/after comparison in one call: the rows' processes import the qt of --qt_from, not this checkout's
    (which PYTHONPATH cannot override), and each row and the report say which."""
    repo = Path(bench_peers.REPO)
    other = tmp_path / "other"
    shutil.copytree(repo / "qt", other / "qt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "configs", other / "configs")
    out = tmp_path / "peers.md"
    text = bench_peers.main(["--smoke", "--only", "qt int8_weight_only$", "--qt_from", str(other), "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["calls"][0]["rows"]
    assert [row["result"]["qt"] for row in rows] == [str((other / "qt").resolve())] * 2
    assert f"qt from {other.resolve()}" in text and float(table(text)["qt int8_weight_only"][0].replace(",", "")) > 0


def test_qt_from_must_be_a_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_peers.main(["--smoke", "--qt_from", str(tmp_path), "--out", str(tmp_path / "peers.md")])
    assert "holds no qt/__init__.py or configs/models: give a checkout" in capsys.readouterr().err
