"""scripts/bench_fsdp_hooks.py: its CPU run, and bad arguments."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_fsdp_hooks.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_times_every_weight_of_plain_and_quantized_models():
    result = run("--recipes", "bf16", "fp8_mixed_precision", "int8_weight_only", "--blocks", "2", "--iters", "3",
                 "--repeats", "2")
    assert result.returncode == 0, result.stderr
    assert "(14 weights 64 wide, torch" in result.stdout
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|$", result.stdout, re.MULTILINE))
    assert set(rows) == {"bf16", "fp8_mixed_precision", "int8_weight_only"}
    assert all(float(us) > 0 for us in rows.values())


def test_unknown_recipe_is_a_one_line_error():
    result = run("--recipes", "int9")
    assert result.returncode == 2
    assert "unknown recipe(s) ['int9']" in result.stderr.splitlines()[-1]
