"""tokenize_data.py on the files users have: plain text split into documents, and bad input named by file
and line, with nothing written for a run that fails."""

import gzip
import json

import pytest

import tokenize_data
from qt.training.data import read_metadata

TEXT = "First line.\nSame paragraph.\n\nSecond paragraph.\n\n\n  \nThird.\n"
# TinyStories-train.txt: stories (with blank lines inside) separated by <|endoftext|> lines.
TINYSTORIES = ("Once upon a time, Lily found a ball.\n\nShe was happy.\n<|endoftext|>\n"
               "Tom had a red car.\nHe liked it.\n<|endoftext|>\nThe end<|endoftext|>")


@pytest.mark.parametrize("text, mode, documents", [
    (TEXT, "auto", ["First line.\nSame paragraph.", "Second paragraph.", "Third."]),
    (TEXT, "blank_lines", ["First line.\nSame paragraph.", "Second paragraph.", "Third."]),
    (TEXT, "lines", ["First line.", "Same paragraph.", "Second paragraph.", "Third."]),
    (TEXT, "file", ["First line.\nSame paragraph.\n\nSecond paragraph.\n\n\n  \nThird."]),
    (TINYSTORIES, "auto", ["Once upon a time, Lily found a ball.\n\nShe was happy.",
                           "Tom had a red car.\nHe liked it.", "The end"]),
    ("a\r\nb\r\n\r\nc", "auto", ["a\nb", "c"]),
])
def test_text_files_are_split_into_documents(tmp_path, text, mode, documents):
    for path in (tmp_path / "plain.txt", tmp_path / "packed.txt.gz"):
        (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(text.encode())
        assert list(tokenize_data.read_local_file(str(path), "text", mode)) == documents


def test_the_separator_is_found_across_read_chunks(tmp_path, monkeypatch):
    path = tmp_path / "stories.txt"
    path.write_text("a" * 10 + "<|endoftext|>b")
    monkeypatch.setattr(tokenize_data, "READ_CHUNK", 16)  # the separator straddles bytes 16
    assert tokenize_data.file_contains(str(path), "<|endoftext|>")
    assert list(tokenize_data.read_local_file(str(path), "text")) == ["a" * 10, "b"]
    assert not tokenize_data.file_contains(str(path), "<|endoftext|>c")


def tokenize(dataset_dir, *flags):
    tokenize_data.main([*flags, "--tokenizer", str(dataset_dir), "--num_proc", "1"])


def test_one_big_text_file_makes_a_dataset(dataset_dir, tmp_path):
    stories = tmp_path / "TinyStories-train.txt"
    stories.write_text("".join(f"Story {i}: a cat sat.\n\nIt slept.\n<|endoftext|>\n" for i in range(50)))
    tokenize(dataset_dir, "--data_files", str(stories), "--val_fraction", "0.1", "--output_dir", str(tmp_path / "out"))
    splits = read_metadata(tmp_path / "out")["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 50 and 3 <= splits["val"]["documents"] <= 7


def run_failing(argv, capsys) -> str:
    """The one error line of a run that must fail (besides progress bars)."""
    with pytest.raises(SystemExit) as exit_info:
        tokenize_data.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("error:"), err
    assert "Traceback" not in err
    return errors[0]


def test_a_failed_run_writes_nothing_and_advises_right(tmp_path, capsys):
    one_document = tmp_path / "book.txt"
    one_document.write_text("A single paragraph with no blank line in it. " * 20)
    output_dir = tmp_path / "out"
    flags = ["--data_files", str(one_document), "--train_tokenizer", "300", "--num_proc", "1"]
    err = run_failing(flags + ["--output_dir", str(output_dir)], capsys)
    assert err == ("error: found a single document, which went to validation: give more documents (.txt files "
                   "are split into documents by --txt_split, now auto; see --help)")
    assert not output_dir.exists()  # no metadata.json, no tokenizer trained on nothing
    output_dir.mkdir()
    (output_dir / "notes.md").write_text("mine")
    run_failing(flags + ["--output_dir", str(output_dir)], capsys)
    assert [p.name for p in output_dir.iterdir()] == ["notes.md"]  # only what the run wrote is removed


def test_an_empty_split_says_what_would_fill_it(dataset_dir, tmp_path, capsys):
    (tmp_path / "two.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    for files, flags, message in [
        ("two.jsonl", ["--val_fraction", "0.9"], "all 2 documents went to validation, none to training: give more "
                                                 "documents or a lower --val_fraction (now 0.9)"),
        ("empty.jsonl", [], "the train data hold no documents; check --data_files"),
    ]:
        err = run_failing(["--data_files", str(tmp_path / files), *flags, "--tokenizer", str(dataset_dir),
                           "--output_dir", str(tmp_path / "out")], capsys)
        assert err == f"error: {message}"
    tokenize(dataset_dir, "--data_files", str(tmp_path / "two.jsonl"), "--val_fraction", "0.5", "--output_dir",
             str(tmp_path / "out"))  # the advice works
    assert [s["documents"] for s in read_metadata(tmp_path / "out")["splits"].values()] == [1, 1]


def test_missing_validation_data_is_named(dataset_dir, tmp_path, capsys):
    (tmp_path / "train.txt").write_text("One.\n\nTwo.\n")
    (tmp_path / "val.txt").write_text("\n\n")
    err = run_failing(["--data_files", str(tmp_path / "train.txt"), "--val_files", str(tmp_path / "val.txt"),
                       "--tokenizer", str(dataset_dir), "--output_dir", str(tmp_path / "out")], capsys)
    assert err == "error: the val data hold no documents; check --val_files"
    err = run_failing(["--data_files", str(tmp_path / "train.txt"), "--val_fraction", "0", "--tokenizer",
                       str(dataset_dir), "--output_dir", str(tmp_path / "out")], capsys)
    assert "--val_fraction 0 holds out no validation documents" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": \n', "bad.jsonl:2: not valid JSON (Expecting value)"),
    ("null.jsonl", b'{"text": "fine"}\n\n{"text": null}\n', "null.jsonl:3: 'text' is null, not a string"),
    ("number.jsonl", b'{"text": 5}\n', "number.jsonl:1: 'text' is 5, not a string"),
    ("list.jsonl", b'{"text": "fine"}\n["a", "b"]\n', "list.jsonl:2: expected a JSON object with a 'text' field"),
    ("plain.jsonl", b'{"text": "fine"}\n"just a string"\n', "plain.jsonl:2: expected a JSON object"),
    ("latin1.txt", "ok\ncaf\u00e9\n".encode("latin-1"), "latin1.txt:2: not UTF-8 text"),
    ("image.jsonl", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image.jsonl:1: not UTF-8 text"),
    ("zeros.txt", b"text\n\0\0\0\0", "zeros.txt:2: a NUL byte: binary data, not text"),
    ("fake.jsonl.gz", b'{"text": "not compressed"}\n', "fake.jsonl.gz: cannot read it"),
    ("array.json", b'[{"text": "a"},\n {"text": ["b"]}]', "array.json: record 1: 'text' is [\"b\"], not a string"),
    ("broken.json", b'[{"text": "a"},\n {"text": }]', "broken.json:2: not valid JSON"),
])
def test_bad_input_names_the_file_and_line(dataset_dir, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    err = run_failing(["--data_files", str(tmp_path / name), "--tokenizer", str(dataset_dir), "--num_proc", "2",
                       "--output_dir", str(tmp_path / "out")], capsys)
    assert err.startswith(f"error: {tmp_path / name}") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_record_is_found_while_the_tokenizer_trains_too(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    err = run_failing(["--data_files", str(tmp_path / "docs.jsonl"), "--train_tokenizer", "300", "--output_dir",
                       str(tmp_path / "out")], capsys)
    assert "docs.jsonl:2: has no field 'text' (fields: body); pass --text_field" in err
    assert not (tmp_path / "out").exists()
