"""Runs a script in a process of its own where torch.compile traces qt's Triton kernels as on a GPU, with none.

Triton is told of a GPU target (compute capability 9.0) and qt's kernels are taken on CPU tensors, so tracing
records the kernel launches and Inductor generates the GPU code it would run; launching it then fails, as there is
no GPU, after the code is logged (TORCH_LOGS=output_code). Enough to check what the compiled graphs do around the
kernels: how often a tensor is stored, which allocation a kernel writes into."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PREAMBLE = """
import torch, triton
from triton.backends.compiler import GPUTarget

class GpuTargetOnly:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self):
        return torch.device("cpu")
    def __getattr__(self, name):
        raise AttributeError(name)

triton.runtime.driver.set_active(GpuTargetOnly())
import torch._inductor.config
import qt.kernels.int8_mm, qt.kernels.layout, qt.kernels.quantize

torch._inductor.config.cpu_backend = "triton"
for module in (qt.kernels.int8_mm, qt.kernels.layout, qt.kernels.quantize):
    module.use_triton = lambda t, triton_available: True
"""


def run(script: str, tmp_path: Path, *args: str, log_code: bool = False) -> subprocess.CompletedProcess:
    """Runs PREAMBLE + `script` with `args`; `log_code`: Inductor's generated code goes to stderr."""
    path = tmp_path / "script.py"
    path.write_text(PREAMBLE + script)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    if log_code:
        env["TORCH_LOGS"] = "output_code"
    return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
