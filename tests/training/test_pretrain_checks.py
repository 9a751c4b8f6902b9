"""llm_pretrain.py checks its flags, then the model, then the data, and the run directory last: the first error
reported is the one to fix first."""

import json
import shutil

import pytest

import llm_pretrain
from conftest import pretrain_args


def first_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        llm_pretrain.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def existing_run(tmp_path):
    run_dir = tmp_path / "existing"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: tiny\n")
    return run_dir


def test_an_unknown_model_is_reported_before_the_data_it_would_not_fit(dataset_dir, tmp_path, capsys):
    err = first_error(pretrain_args(dataset_dir, tmp_path / "run", "--model", "gpt5", "--seq_len", "10000000"), capsys)
    assert "--model 'gpt5' is neither a config in configs/models/" in err


def test_the_data_are_checked_before_the_run_directory(dataset_dir, existing_run, tmp_path, capsys):
    err = first_error(pretrain_args(tmp_path / "missing", existing_run), capsys)
    assert f"dataset folder {tmp_path / 'missing'} does not exist" in err
    err = first_error(pretrain_args(dataset_dir, existing_run, "--seq_len", "10000000"), capsys)
    assert "lower --seq_len" in err
    err = first_error(pretrain_args(dataset_dir, existing_run), capsys)
    assert "already holds a run; continue it with --resume" in err


def test_a_pretrained_model_is_checked_before_the_run_directory(dataset_dir, existing_run, tmp_path, capsys):
    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer_only.mkdir()
    argv = pretrain_args(dataset_dir, existing_run, "--init_from", str(tokenizer_only))
    del argv[argv.index("--model"):argv.index("--model") + 2]
    assert f"--init_from {tokenizer_only} holds no config.json" in first_error(argv, capsys)


def test_a_dataset_naming_a_file_outside_it_stops_the_run(dataset_dir, tmp_path, capsys):
    dataset = tmp_path / "tokens"
    shutil.copytree(dataset_dir, dataset)
    metadata = json.loads((dataset / "metadata.json").read_text())
    metadata["splits"]["val"]["shards"][0]["file"] = "/etc/passwd"
    (dataset / "metadata.json").write_text(json.dumps(metadata))
    err = first_error(pretrain_args(dataset, tmp_path / "run"), capsys)
    assert err == (f"error: {dataset / 'metadata.json'}: shard '/etc/passwd' is not a file name in the dataset "
                   f"folder; re-tokenize the data")
    assert not (tmp_path / "run").exists()
