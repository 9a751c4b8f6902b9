"""Tokenize a text dataset into .bin shards of token ids for llm_pretrain.py.

    # local files, training a byte-level BPE on them (offline)
    python tokenize_data.py --data_files 'corpus/*.jsonl.gz' --train_tokenizer 32000 --output_dir data/corpus
    # a Hugging Face dataset and tokenizer
    python tokenize_data.py --dataset tinystories --tokenizer TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --output_dir data/tinystories

The output folder holds the shards, metadata.json and (with --train_tokenizer) the tokenizer. Rerunning
the same command finishes an interrupted run, skipping the shards already written, or does nothing if
the folder is complete.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qt.training.config import ConfigError, one_line_errors
from qt.training.data import FORMAT, ShardWriter, token_dtype, write_metadata

# name -> (Hugging Face dataset, config, train split, validation split or None to hold out --val_fraction)
DATASET_PRESETS = {
    "tinystories": ("roneneldan/TinyStories", None, "train", "validation"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", None),
    "c4": ("allenai/c4", "realnewslike", "train", "validation"),
}
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")
TRAINED_BOS, TRAINED_EOS = "<s>", "</s>"
END_OF_TEXT = "<|endoftext|>"  # the document separator of GPT-style text dumps, e.g. TinyStories-train.txt
TXT_SPLITS = ("auto", "endoftext", "blank_lines", "lines", "file")
DOCS_PER_TASK = 256
READ_CHUNK = 1 << 24  # bytes read at a time when searching a file
IN_FLIGHT_WAIT_S = 30  # on an error or Ctrl-C, how long to wait for the tasks already sent to the workers


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_argument_group("input (one of --dataset, --hf_dataset, --data_files)")
    src.add_argument("--dataset", choices=sorted(DATASET_PRESETS), help="a named Hugging Face dataset preset")
    src.add_argument("--hf_dataset", help="any Hugging Face dataset name")
    src.add_argument("--hf_config", help="its configuration (subset)")
    src.add_argument("--split", default="train", help="its training split")
    src.add_argument("--val_split", help="its validation split (default: hold out --val_fraction of the documents)")
    src.add_argument("--data_files", nargs="+", help=f"local files or globs ({', '.join(LOCAL_SUFFIXES)}); "
                                                     f".txt files are split into documents by --txt_split")
    src.add_argument("--val_files", nargs="+", help="local validation files (default: hold out --val_fraction)")
    src.add_argument("--text_field", default="text", help="the field that holds a document's text")
    src.add_argument("--txt_split", choices=TXT_SPLITS, default="auto",
                     help=f"how a .txt file is split into documents: at {END_OF_TEXT} (endoftext), at blank lines, "
                          f"one per line, or the whole file as one; auto (default): at {END_OF_TEXT} where the "
                          f"file holds one (TinyStories' .txt files), else at blank lines")
    tok = p.add_argument_group("tokenizer (one of)")
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizer name or local folder")
    tok.add_argument("--train_tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this vocabulary size on the training documents")
    p.add_argument("--tokenizer_documents", type=int, default=200_000,
                   help="train the tokenizer on at most this many training documents")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation when there is no separate split")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (at least)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 1) - 1), help="tokenizer processes")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- sources

def local_files(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise ConfigError(f"no files match {pattern!r}; check the path")
        for f in matched:
            if not f.endswith(LOCAL_SUFFIXES):
                raise ConfigError(f"{f}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        files += matched
    return files


@contextmanager
def reading(path: str):
    """A local file opened for reading bytes (gunzipped if .gz); failing to read it is a one-line error."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield f
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{path}: cannot read it ({e}); check the file") from None


def numbered_lines(path: str):
    """(line number, line) of a text file; a line that is not UTF-8 text is an error naming it."""
    with reading(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                  f"convert the file to UTF-8 or leave it out") from None
            if "\0" in line:
                raise ConfigError(f"{path}:{number}: a NUL byte: binary data, not text; leave the file out")
            yield number, line.replace("\r\n", "\n")


def file_contains(path: str, text: str) -> bool:
    needle = text.encode()
    with reading(path) as f:
        previous = b""
        while chunk := f.read(READ_CHUNK):
            if needle in chunk or needle in previous[-len(needle):] + chunk[:len(needle)]:
                return True
            previous = chunk
    return False


def split_text(lines, mode: str):
    """The documents of a stream of text lines, split as --txt_split `mode` (not auto) says."""
    document = []
    for line in lines:
        if mode == "endoftext":
            *finished, line = line.split(END_OF_TEXT)
            for piece in finished:
                yield "".join(document) + piece
                document = []
        elif mode == "blank_lines" and not line.strip():
            yield "".join(document)
            document = []
            continue
        document.append(line)
        if mode == "lines":
            yield "".join(document)
            document = []
    yield "".join(document)


def text_documents(path: str, mode: str):
    """The documents of a .txt file, without surrounding whitespace; blank ones are dropped."""
    if mode == "auto":
        mode = "endoftext" if file_contains(path, END_OF_TEXT) else "blank_lines"
    for document in split_text((line for _, line in numbered_lines(path)), mode):
        if document.strip():
            yield document.strip()


def json_records(path: str):
    """(where, record) for each record of a JSON lines file, or of a .json file holding one JSON array."""
    lines = numbered_lines(path)
    for number, line in lines:
        if not line.strip():
            continue
        if path.endswith((".json", ".json.gz")) and line.lstrip().startswith("["):  # the rest of the file too
            try:
                records = json.loads(line + "".join(rest for _, rest in lines))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number + e.lineno - 1}: not valid JSON ({e.msg}); fix the file") from None
            if not isinstance(records, list):
                raise ConfigError(f"{path}: not a JSON array of records")
            yield from ((f"{path}: record {i}", record) for i, record in enumerate(records))
            return
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg}); JSON lines hold one object a line: "
                              f"fix or remove the line") from None


def record_text(where: str, record, text_field: str) -> str:
    """The document text of one record, which must be an object with a string `text_field`."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with a {text_field!r} field, not "
                          f"{json.dumps(record, default=str)[:40]}; fix or remove the record")
    if text_field not in record:
        raise ConfigError(f"{where}: has no field {text_field!r} (fields: {', '.join(record)}); pass --text_field")
    return checked_text(where, record[text_field], text_field)


def checked_text(where: str, text, text_field: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: {text_field!r} is {json.dumps(text, default=str)[:40]}, not a string; "
                          f"fix or remove the record")
    return text


def parquet_documents(path: str, text_field: str):
    import pyarrow.parquet as pq  # only for parquet input
    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                          f"pass --text_field")
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield checked_text(f"{path}: row {row}", text, text_field)
            row += 1


def read_local_file(path: str, text_field: str, txt_split: str = "auto"):
    """The documents of one local file."""
    if path.endswith((".txt", ".txt.gz")):
        return text_documents(path, txt_split)
    if path.endswith(".parquet"):
        return parquet_documents(path, text_field)
    return (record_text(where, record, text_field) for where, record in json_records(path))


def hf_documents(name: str, config: str | None, split: str, text_field: str):
    try:
        import datasets  # only for Hugging Face datasets
    except ImportError:
        raise ConfigError("reading a Hugging Face dataset needs `pip install datasets` "
                          "(or download its files and pass them to --data_files)") from None
    for i, record in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
        yield record_text(f"{name} {split}: record {i}", record, text_field)


def document_streams(args) -> tuple[dict, object, object]:
    """(a description of the source, a function returning the training documents, the same for
    validation documents or None when validation documents are held out of the training stream)."""
    sources = [args.dataset, args.hf_dataset, args.data_files]
    if sum(s is not None for s in sources) != 1:
        raise ConfigError("give exactly one of --dataset, --hf_dataset, --data_files")
    if args.data_files:
        train_files = local_files(args.data_files)
        val_files = local_files(args.val_files) if args.val_files else None
        description = {"data_files": train_files, "val_files": val_files, "text_field": args.text_field}
        if any(f.endswith((".txt", ".txt.gz")) for f in train_files + (val_files or [])):
            description["txt_split"] = args.txt_split

        def from_files(files):
            return lambda: (doc for f in files for doc in read_local_file(f, args.text_field, args.txt_split))
        return description, from_files(train_files), val_files and from_files(val_files)
    if args.dataset:
        name, config, split, val_split = DATASET_PRESETS[args.dataset]
    else:
        name, config, split, val_split = args.hf_dataset, args.hf_config, args.split, args.val_split
    description = {"hf_dataset": name, "hf_config": config, "split": split, "val_split": val_split,
                   "text_field": args.text_field}

    def from_hub(s):
        return lambda: hf_documents(name, config, s, args.text_field)
    return description, from_hub(split), val_split and from_hub(val_split)


def is_held_out(index: int, val_fraction: float) -> bool:
    # Fractional parts of index * golden ratio are evenly spread: a deterministic, well-mixed split.
    return (index * 0.6180339887498949) % 1.0 < val_fraction


def labeled_documents(train_docs, val_docs, val_fraction):
    """(split, text) for every document, in a fixed order."""
    if val_docs:
        yield from (("train", d) for d in train_docs())
        yield from (("val", d) for d in val_docs())
    else:
        for i, doc in enumerate(train_docs()):
            yield ("val" if is_held_out(i, val_fraction) else "train"), doc


# -------------------------------------------------------------------------------------------- tokenizer

def train_bpe(documents, vocab_size: int, output_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 300:
        raise ConfigError("--train_tokenizer needs a vocabulary of at least 300 (256 bytes + merges)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TRAINED_BOS, TRAINED_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tokenizer.train_from_iterator(documents, trainer)
    save_trained_tokenizer(tokenizer, output_dir)
    return tokenizer


def save_trained_tokenizer(tokenizer, output_dir: Path) -> None:
    """Save in the Hugging Face format, so that AutoTokenizer.from_pretrained(output_dir) loads it."""
    from transformers import PreTrainedTokenizerFast
    tmp = output_dir / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=TRAINED_BOS,
                            eos_token=TRAINED_EOS).save_pretrained(tmp)
    for f in tmp.iterdir():  # tokenizer.json last: its presence marks a saved tokenizer
        if f.name != "tokenizer.json":
            os.replace(f, output_dir / f.name)
    os.replace(tmp / "tokenizer.json", output_dir / "tokenizer.json")
    tmp.rmdir()


def load_tokenizer(name: str):
    """(the fast tokenizer's `tokenizers.Tokenizer`, BOS id or None, EOS id)."""
    from transformers import AutoTokenizer
    try:
        hf = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"cannot load tokenizer {name!r} ({str(e).splitlines()[0]}); give a local folder "
                          f"or train one with --train_tokenizer VOCAB_SIZE") from None
    if not hf.is_fast:
        raise ConfigError(f"tokenizer {name!r} has no fast (Rust) version; pick another tokenizer")
    if hf.eos_token_id is None:
        raise ConfigError(f"tokenizer {name!r} has no EOS token to end documents with; pick another tokenizer")
    return hf.backend_tokenizer, hf.bos_token_id, hf.eos_token_id


# ------------------------------------------------------------------------------------------ tokenizing

_worker = {}


def _init_worker(tokenizer_json: str, bos: int | None, eos: int, parallel: bool):
    from tokenizers import Tokenizer
    if not parallel:  # one process per core already; Rust threads on top would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), bos=[] if bos is None else [bos], eos=[eos])


def _encode(task):
    splits, texts = task
    encodings = _worker["tokenizer"].encode_batch(texts, add_special_tokens=False)
    return splits, [np.array(_worker["bos"] + e.ids + _worker["eos"], dtype=np.uint32) for e in encodings]


def wait_for_tasks_in_flight(results, seconds: float) -> None:
    """Waits, at most `seconds`, until the workers have returned every task the pool sent them (their results
    dropped). Pool.terminate joins the pool's thread that sends tasks; caught in the middle of sending one larger
    than the pipe's buffer, with the workers gone, that thread never returns (seen as a hung test after Ctrl-C)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            results.next(timeout=max(0.0, deadline - time.monotonic()))
        except (StopIteration, multiprocessing.TimeoutError):
            return
        except Exception:  # a worker's error: the one that stopped the loop, if any, is already on its way out
            continue


def batched(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    source, train_docs, val_docs = document_streams(args)
    if not val_docs and args.val_fraction == 0:
        raise ConfigError("--val_fraction 0 holds out no validation documents: give a fraction (e.g. 0.01) or "
                          "separate validation data (--val_files / --val_split)")
    output_dir = Path(args.output_dir)
    settings = {"source": source, "tokenizer": args.tokenizer or f"trained byte-level BPE {args.train_tokenizer}",
                "val_fraction": None if val_docs else args.val_fraction, "shard_tokens": args.shard_tokens}

    metadata = previous_metadata(output_dir, settings)
    if metadata and metadata["complete"]:
        print(f"{output_dir} is already complete ({metadata['splits']['train']['tokens']:,} training tokens)")
        return
    existing = set(output_dir.iterdir()) if output_dir.is_dir() else None
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        splits = write_dataset(args, settings, metadata, train_docs, val_docs, output_dir)
    except Exception:
        # A failed fresh run leaves nothing behind; an interrupted one (Ctrl-C) stays, for a rerun to finish.
        if metadata is None:
            remove_new_files(output_dir, existing)
        raise
    print(f"wrote {output_dir}: " + ", ".join(
        f"{name} {s['documents']:,} documents {s['tokens']:,} tokens in {len(s['shards'])} shards"
        for name, s in splits.items()))


def check_args(args) -> None:
    if (args.tokenizer is None) == (args.train_tokenizer is None):
        raise ConfigError("give exactly one of --tokenizer NAME and --train_tokenizer VOCAB_SIZE")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val_fraction must be at least 0 and below 1, not {args.val_fraction}")
    for name in ("shard_tokens", "num_proc", "tokenizer_documents"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, not {getattr(args, name)}")


def write_dataset(args, settings: dict, metadata: dict | None, train_docs, val_docs, output_dir: Path) -> dict:
    """Tokenize into `output_dir`, continuing the interrupted run of `metadata` if any; the splits written."""
    if args.tokenizer:
        tokenizer, bos, eos = load_tokenizer(args.tokenizer)
    elif (output_dir / "tokenizer.json").is_file():  # trained by the interrupted run being finished
        tokenizer, bos, eos = load_tokenizer(str(output_dir))
    else:
        print(f"training a {args.train_tokenizer}-token byte-level BPE on the training documents")
        train_texts = (text for split, text in labeled_documents(train_docs, None, 0 if val_docs else
                                                                 args.val_fraction) if split == "train")
        tokenizer = train_bpe((t for t, _ in zip(train_texts, range(args.tokenizer_documents))),
                              args.train_tokenizer, output_dir)
        bos, eos = tokenizer.token_to_id(TRAINED_BOS), tokenizer.token_to_id(TRAINED_EOS)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    if metadata is None:
        metadata = {"format": FORMAT, "complete": False, "settings": settings,
                    "tokenizer": args.tokenizer or str(output_dir), "vocab_size": vocab_size,
                    "bos_id": bos, "eos_id": eos, "dtype": token_dtype(vocab_size),
                    "splits": {s: {"documents": 0, "tokens": 0, "shards": []} for s in ("train", "val")}}
    tokenize_documents(labeled_documents(train_docs, val_docs, args.val_fraction), tokenizer, bos, eos,
                       metadata, output_dir, args)
    for name, split in metadata["splits"].items():
        if split["tokens"] == 0:
            raise empty_split_error(name, metadata["splits"], settings)
    metadata["complete"] = True
    write_metadata(output_dir, metadata)
    return metadata["splits"]


def empty_split_error(name: str, splits: dict, settings: dict) -> ConfigError:
    """Why split `name` holds no documents, and what would give it some. (Held out of the training documents,
    the validation split is never empty: the first document goes to it.)"""
    source, val_fraction = settings["source"], settings["val_fraction"]
    total = sum(split["documents"] for split in splits.values())
    if val_fraction is None or total == 0:
        local = "data_files" in source
        flag = {"train": "--data_files" if local else "--split", "val": "--val_files" if local else "--val_split"}
        return ConfigError(f"the {name} data hold no documents; check {flag[name]}")
    more = "give more documents"
    if "txt_split" in source:
        more += f" (.txt files are split into documents by --txt_split, now {source['txt_split']}; see --help)"
    if total == 1:
        return ConfigError(f"found a single document, which went to validation: {more}")
    return ConfigError(f"all {total} documents went to validation, none to training: {more} or a lower "
                       f"--val_fraction (now {val_fraction})")


def remove_new_files(output_dir: Path, existing: set | None) -> None:
    """Remove what a failed run wrote: the whole folder if it made it, else the entries not in `existing`."""
    if existing is None:
        shutil.rmtree(output_dir, ignore_errors=True)
        return
    for path in set(output_dir.iterdir()) - existing:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def previous_metadata(output_dir: Path, settings: dict) -> dict | None:
    """The metadata of an earlier run into the same folder with the same settings, else None."""
    path = output_dir / "metadata.json"
    if not path.is_file():
        if output_dir.is_dir() and any(output_dir.glob("*.bin")):
            raise ConfigError(f"{output_dir} holds shards but no metadata.json; delete it or pick another "
                              f"--output_dir")
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); delete {output_dir} or pick another --output_dir") from None
    if not isinstance(metadata, dict) or metadata.get("settings") != settings:
        raise ConfigError(f"{output_dir} holds a dataset made with different settings; pick another "
                          f"--output_dir or delete it")
    return metadata


def tokenize_documents(documents, tokenizer, bos, eos, metadata, output_dir: Path, args) -> None:
    """Tokenize and write the documents not yet in a finished shard; update `metadata` as shards finish."""
    splits = metadata["splits"]
    done = {name: sum(s["documents"] for s in split["shards"]) for name, split in splits.items()}
    seen = {name: 0 for name in splits}
    # What the finished shards hold; documents tokenized after them are counted as their shards finish.
    for name, split in splits.items():
        split["documents"], split["tokens"] = done[name], sum(s["tokens"] for s in split["shards"])

    def record_shard():
        for name, writer in writers.items():
            splits[name]["documents"] = sum(s["documents"] for s in writer.shards)
            splits[name]["tokens"] = sum(s["tokens"] for s in writer.shards)
        write_metadata(output_dir, metadata)

    writers = {name: ShardWriter(output_dir, name, metadata["dtype"], args.shard_tokens, split["shards"],
                                 record_shard) for name, split in splits.items()}

    stop_feeding = threading.Event()

    def todo():
        for split, text in documents:
            if stop_feeding.is_set():
                return
            seen[split] += 1
            if seen[split] > done[split]:
                yield split, text

    tasks = (tuple(zip(*batch)) for batch in batched(todo(), DOCS_PER_TASK))
    parallel = args.num_proc > 1
    init_args = (tokenizer.to_str(), bos, eos, not parallel)
    if parallel:
        pool = multiprocessing.get_context("fork").Pool(args.num_proc, _init_worker, init_args)
        results = pool.imap(_encode, tasks)
    else:
        _init_worker(*init_args)
        results = map(_encode, tasks)
    try:
        with tqdm(desc="tokenizing", unit=" docs", initial=sum(done.values())) as progress:
            for task_splits, token_arrays in results:
                for split, tokens in zip(task_splits, token_arrays):
                    writers[split].add(tokens)
                progress.update(len(token_arrays))
    finally:  # every result is in, or something went wrong (a document could not be read, Ctrl-C)
        if parallel:
            stop_feeding.set()
            try:
                wait_for_tasks_in_flight(results, IN_FLIGHT_WAIT_S)
            finally:
                pool.terminate()
    for writer in writers.values():
        writer.flush()


if __name__ == "__main__":
    main()
