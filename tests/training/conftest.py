import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the entry points (llm_pretrain.py, tokenize_data.py) live at the repo root

import tokenize_data  # noqa: E402
from qt.training.corpus import write_stdlib_corpus  # noqa: E402

# A tiny model and short runs: each step takes milliseconds on a CPU.
TINY_RUN = ["--model", "tiny", "--seq_len", "64", "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5",
            "--log_interval", "1", "--eval_interval", "20", "--eval_tokens", "4096", "--wandb", "disabled",
            "--dtype", "fp32"]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib_docs.jsonl.gz"
    write_stdlib_corpus(path)
    return path


@pytest.fixture(scope="session")
def dataset_dir(corpus_file, tmp_path_factory) -> Path:
    """The stdlib corpus tokenized with a trained 512-token BPE."""
    out = tmp_path_factory.mktemp("data") / "tokens"
    tokenize_data.main(["--data_files", str(corpus_file), "--train_tokenizer", "512", "--val_fraction", "0.05",
                        "--output_dir", str(out), "--num_proc", "1"])
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# What two runs of the same steps log differently: timings.
TIMINGS = ("tokens_per_second", "host_wait_ms")


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def quantized_weights_saved(checkpoint: Path) -> set[str]:
    """The names of the quantized weights a checkpoint holds (stored as their inner tensors, NAME.__INNER)."""
    from qt.training.checkpoint import read_dcp_metadata
    keys = read_dcp_metadata(Path(checkpoint) / ".metadata").state_dict_metadata
    return {key.removeprefix("model.").split(".__")[0] for key in keys if key.startswith("model.") and ".__" in key}


def pretrain_args(dataset_dir, run_dir, *flags) -> list[str]:
    return ["--dataset_dir", str(dataset_dir), "--run_dir", str(run_dir), *TINY_RUN, *flags]
