import gzip
import json

import numpy as np
import pytest

import tokenize_data
from qt.training.config import ConfigError
from qt.training.data import ShardWriter, TokenShards, read_metadata


def test_tokenized_corpus_has_wrapped_documents_and_a_validation_split(dataset_dir, corpus_file):
    metadata = read_metadata(dataset_dir)
    assert metadata["complete"] and metadata["dtype"] == "uint16" and metadata["vocab_size"] == 512
    n_documents = sum(1 for _ in gzip.open(corpus_file, "rt"))
    splits = metadata["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == n_documents
    assert 0.03 < splits["val"]["documents"] / n_documents < 0.07
    for name, split in splits.items():
        tokens = np.concatenate(TokenShards(dataset_dir, name).shards)
        assert len(tokens) == split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert (tokens == metadata["bos_id"]).sum() == (tokens == metadata["eos_id"]).sum() == split["documents"]
        assert tokens[0] == metadata["bos_id"] and tokens[-1] == metadata["eos_id"]
        for record, shard in zip(split["shards"], TokenShards(dataset_dir, name).shards):
            assert record["max_token_id"] == shard.max() < metadata["vocab_size"]
    from transformers import AutoTokenizer  # the trained tokenizer is saved in the Hugging Face format
    tokenizer = AutoTokenizer.from_pretrained(dataset_dir)
    assert tokenizer.decode(tokenizer("Return the sum of x and y.")["input_ids"]) == "Return the sum of x and y."


def test_rerun_skips_a_complete_folder(dataset_dir, corpus_file, capsys):
    tokenize_data.main(["--data_files", str(corpus_file), "--train_tokenizer", "512", "--val_fraction", "0.05",
                        "--output_dir", str(dataset_dir)])
    assert "already complete" in capsys.readouterr().out


def interrupt_after_shards(monkeypatch, shards: int):
    """Ctrl-C, as it were, once a split has written `shards` shards; returns ShardWriter's own flush."""
    flush = ShardWriter.flush

    def interrupting_flush(self):
        if len(self.shards) == shards:
            raise KeyboardInterrupt
        flush(self)
    monkeypatch.setattr(ShardWriter, "flush", interrupting_flush)
    return flush


def test_interrupted_tokenization_finishes_identically(dataset_dir, corpus_file, tmp_path, monkeypatch):
    args = ["--data_files", str(corpus_file), "--tokenizer", str(dataset_dir), "--val_fraction", "0.05",
            "--shard_tokens", "30000", "--num_proc", "2"]
    tokenize_data.main(args + ["--output_dir", str(tmp_path / "whole")])

    flush = interrupt_after_shards(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        tokenize_data.main(args + ["--output_dir", str(tmp_path / "resumed")])
    with pytest.raises(ConfigError, match="did not finish"):
        read_metadata(tmp_path / "resumed")
    monkeypatch.setattr(ShardWriter, "flush", flush)
    tokenize_data.main(args + ["--output_dir", str(tmp_path / "resumed")])

    whole, resumed = read_metadata(tmp_path / "whole"), read_metadata(tmp_path / "resumed")
    assert whole["splits"] == resumed["splits"] and len(whole["splits"]["train"]["shards"]) > 3
    for shard in whole["splits"]["train"]["shards"] + whole["splits"]["val"]["shards"]:
        assert (tmp_path / "whole" / shard["file"]).read_bytes() == (tmp_path / "resumed" / shard["file"]).read_bytes()
    assert not list((tmp_path / "resumed").glob("*.tmp"))


def test_local_file_formats(dataset_dir, tmp_path):
    docs = [f"Document number {i} says hello." for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:20]))
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs[20:30]]))
    for i, d in enumerate(docs[30:]):
        with gzip.open(tmp_path / f"c{i}.txt.gz", "wt") as f:
            f.write(d)
    tokenize_data.main(["--data_files", str(tmp_path / "*.json*"), str(tmp_path / "*.txt.gz"), "--text_field", "body",
                        "--tokenizer", str(dataset_dir), "--val_fraction", "0.2", "--output_dir", str(tmp_path / "out")])
    splits = read_metadata(tmp_path / "out")["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 40


@pytest.mark.parametrize("flags, message", [
    (["--data_files", "/nonexistent/*.jsonl"], "no files match"),
    (["--data_files", "{corpus}", "--text_field", "body"], "has no field 'body'"),
    (["--data_files", "{corpus}", "--val_fraction", "0.5"], "different settings"),
    (["--data_files", "{corpus}", "--tokenizer", "x", "--train_tokenizer", "512"], "exactly one of --tokenizer"),
])
def test_bad_input_is_a_one_line_error(flags, message, corpus_file, dataset_dir, tmp_path, capsys):
    flags = [f.format(corpus=corpus_file) for f in flags]
    if "--tokenizer" not in flags:
        flags += ["--train_tokenizer", "512"]
    output_dir = dataset_dir if "different settings" in message else tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        tokenize_data.main(flags + ["--output_dir", str(output_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_shared_corpus_reads_when_present():
    from pathlib import Path
    corpus = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "docs_val.jsonl.gz"
    if not corpus.is_file():
        pytest.skip("../shared/corpus is not here")
    docs = list(tokenize_data.read_local_file(str(corpus), "text"))
    assert len(docs) > 10 and all(isinstance(d, str) and d for d in docs)



def test_an_interrupted_parallel_run_gets_its_tasks_back_before_the_pool_terminates(dataset_dir, corpus_file,
                                                                                      tmp_path, monkeypatch):
    """Pool.terminate joins the pool's thread that sends tasks. Caught in the middle of sending one larger than the
    pipe's buffer, with the workers gone, that thread never returns: a run stopped by Ctrl-C hung now and then.
    So the feeding stops and the tasks already sent come back first (the pool's record of outstanding tasks,
    `_cache`, is then empty)."""
    import multiprocessing.pool

    outstanding = []
    terminate = multiprocessing.pool.Pool.terminate
    def recording_terminate(pool):
        outstanding.append(len(pool._cache))
        terminate(pool)
    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", recording_terminate)
    interrupt_after_shards(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        tokenize_data.main(["--data_files", str(corpus_file), "--tokenizer", str(dataset_dir), "--val_fraction",
                            "0.05", "--shard_tokens", "2000", "--num_proc", "2", "--output_dir", str(tmp_path)])
    assert outstanding == [0]
