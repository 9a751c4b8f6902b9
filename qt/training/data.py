"""Token shards on disk, and the batches a language model trains and evaluates on.

A dataset folder (written by tokenize_data.py) holds `metadata.json` and, per split, `.bin` shards: the
raw token ids of whole documents, each wrapped in BOS/EOS, as uint16 (or uint32 for vocabularies over
65,536). `metadata.json` is rewritten after every finished shard and says `"complete": true` only at the
end, so a half-tokenized folder is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from qt.training.config import ConfigError, write_atomically
from qt.training.epochs import micro_batches_after_resume, position_state

FORMAT = "qt-token-shards-v1"
TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def read_metadata(dataset_dir: str | Path) -> dict:
    """The metadata of a finished dataset folder; anything unusable about it is a one-line error."""
    path = Path(dataset_dir) / "metadata.json"
    if not Path(dataset_dir).is_dir():
        raise ConfigError(f"dataset folder {dataset_dir} does not exist; make it with "
                          f"`python tokenize_data.py --output_dir {dataset_dir} ...`")
    if not path.is_file():
        raise ConfigError(f"dataset folder {dataset_dir} has no metadata.json; make it with "
                          f"`python tokenize_data.py --output_dir {dataset_dir} ...`")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-tokenize the data") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a tokenize_data.py output ({FORMAT}); re-tokenize the data")
    problem = metadata_problem(metadata)
    if problem:
        raise ConfigError(f"{path}: {problem}; re-tokenize the data")
    if not metadata["complete"]:
        raise ConfigError(f"tokenization of {dataset_dir} did not finish; rerun tokenize_data.py with the "
                          f"same flags to complete it")
    return metadata


def metadata_problem(metadata: dict) -> str | None:
    """What makes a dataset's metadata unusable, or None."""
    def count(value, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(metadata.get("complete"), bool):
        return "'complete' is missing or not true/false"
    if not count(metadata.get("vocab_size"), 1):
        return f"'vocab_size' must be a positive integer, not {metadata.get('vocab_size')!r}"
    if metadata.get("dtype") not in TOKEN_DTYPES:
        return f"'dtype' must be one of {', '.join(TOKEN_DTYPES)} (token ids), not {metadata.get('dtype')!r}"
    splits = metadata.get("splits")
    for split in ("train", "val"):
        records = splits.get(split, {}).get("shards") if isinstance(splits, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            return f"'splits' must hold a list of shards for {split!r}"
        for record in records:
            name = record.get("file")
            if not (isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")):
                return f"shard {name!r} is not a file name in the dataset folder"
            if not count(record.get("tokens"), 1):
                return f"shard {name}: 'tokens' must be a positive integer, not {record.get('tokens')!r}"
            if "max_token_id" in record and not count(record["max_token_id"], 0):
                return f"shard {name}: 'max_token_id' must be a non-negative integer"
    return None


def write_metadata(output_dir: Path, metadata: dict) -> None:
    write_atomically(output_dir / "metadata.json", json.dumps(metadata, indent=1))


class ShardWriter:
    """Appends documents of one split to shards of at least `shard_tokens` tokens, cut between documents.

    A shard is written under a temporary name and renamed when complete; `on_shard` then records it in
    the metadata, so an interrupted run can skip the documents of every recorded shard.
    """

    def __init__(self, output_dir: Path, split: str, dtype: str, shard_tokens: int, shards: list, on_shard):
        self.output_dir, self.split, self.dtype, self.shard_tokens = output_dir, split, dtype, shard_tokens
        self.shards = shards  # the split's shard records, possibly from an interrupted run; appended to
        self.on_shard = on_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        tmp = self.output_dir / (name + ".tmp")
        tokens = np.concatenate(self.pending)
        tokens.astype(self.dtype).tofile(tmp)
        os.replace(tmp, self.output_dir / name)
        self.shards.append({"file": name, "documents": len(self.pending), "tokens": self.pending_tokens,
                            "max_token_id": int(tokens.max())})
        self.pending, self.pending_tokens = [], 0
        self.on_shard()


class TokenShards:
    """The memory-mapped shards of one split of a dataset folder, each checked against its record in the
    metadata (inside the folder, of the recorded size)."""

    def __init__(self, dataset_dir: str | Path, split: str):
        metadata = read_metadata(dataset_dir)
        folder = Path(dataset_dir).resolve()
        itemsize = np.dtype(metadata["dtype"]).itemsize
        self.split = split
        self.vocab_size = metadata["vocab_size"]
        self.shards, max_ids = [], []
        for record in metadata["splits"][split]["shards"]:
            path = Path(dataset_dir) / record["file"]
            if path.resolve().parent != folder:
                raise ConfigError(f"shard {path} leads to {path.resolve()}, outside the dataset folder; shards "
                                  f"must be files in {dataset_dir}")
            size, expected = (path.stat().st_size if path.is_file() else None), record["tokens"] * itemsize
            if size != expected:
                found = "is missing" if size is None else f"has {size} bytes, not the {expected} of its metadata"
                raise ConfigError(f"shard {path} {found}; re-tokenize {dataset_dir}")
            shard = np.memmap(path, dtype=metadata["dtype"], mode="r")
            self.shards.append(shard)
            # Datasets tokenized before shards recorded their largest id are scanned, once per load.
            max_ids.append(record["max_token_id"] if "max_token_id" in record else int(shard.max()))
        self.max_token_id = max(max_ids, default=0)
        if self.max_token_id >= self.vocab_size:
            raise ConfigError(f"the {split} shards of {dataset_dir} hold token id {self.max_token_id}, beyond the "
                              f"vocabulary of {self.vocab_size} in its metadata.json; re-tokenize the data")
        self.n_tokens = sum(len(s) for s in self.shards)

    def check_vocabulary(self, model_vocab_size: int) -> None:
        if self.max_token_id >= model_vocab_size:
            raise ConfigError(f"the dataset's {self.split} token ids go up to {self.max_token_id}, beyond the model's "
                              f"vocabulary of {model_vocab_size}; tokenize the data with the model's tokenizer")

    def check_fits(self, seq_len: int, what: str) -> None:
        longest = max((len(s) for s in self.shards), default=0)
        if longest < seq_len + 1:
            raise ConfigError(f"--seq_len {seq_len} needs {what} shards of at least {seq_len + 1} tokens, but "
                              f"the longest {self.split} shard has {longest}; lower --seq_len or tokenize more data")


class RandomWindows:
    """Endless micro-batches of random (inputs, targets) windows of `seq_len + 1` tokens.

    The windows of optimizer step i are a pure function of (seed, i), dealt out to micro-steps and ranks:
    every rank reads a different part, a resumed run needs only the count of micro-batches drawn, and the
    data do not depend on --grad_accum or the number of processes.
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, *, grad_accum: int, seed: int,
                 rank: int, world_size: int, device: torch.device):
        shards.check_fits(seq_len, "training")
        self.shards, self.seq_len, self.batch_size, self.grad_accum = shards.shards, seq_len, batch_size, grad_accum
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        # Window starts over all shards, numbered consecutively: shard k owns [first_start[k], first_start[k+1]).
        self.first_start = np.concatenate([[0], np.cumsum([max(len(s) - seq_len, 0) for s in self.shards])])
        self.micro_batches_drawn = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro_step = divmod(self.micro_batches_drawn, self.grad_accum)
        self.micro_batches_drawn += 1
        starts = np.random.default_rng([self.seed, step]).integers(0, self.first_start[-1], size=self.batch_size)
        starts = starts.reshape(self.grad_accum, self.world_size, -1)[micro_step, self.rank]
        shard_ids = np.searchsorted(self.first_start, starts, side="right") - 1
        windows = np.stack([self.shards[k][s - self.first_start[k]:][:self.seq_len + 1]
                            for k, s in zip(shard_ids, starts)]).astype(np.int64)
        return _to_device(windows, self.device)

    def state_dict(self) -> dict:
        return position_state(self.micro_batches_drawn, self.grad_accum)

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches_drawn = micro_batches_after_resume(state, self.grad_accum)


def validation_batches(shards: TokenShards, seq_len: int, n_tokens: int, micro_batch_size: int, *,
                       rank: int, world_size: int, device: torch.device) -> list:
    """The same consecutive windows at every evaluation, dealt out to ranks.

    Every rank gets the same number of batches: sharded models need all ranks in every forward pass.
    """
    shards.check_fits(seq_len, "validation")
    windows = [shard[i:i + seq_len + 1] for shard in shards.shards
               for i in range(0, len(shard) - seq_len, seq_len)]
    per_round = micro_batch_size * world_size
    n_rounds = max(1, min(n_tokens // (seq_len * per_round), len(windows) // per_round))
    if len(windows) < per_round:
        raise ConfigError(f"the validation split has {len(windows)} windows of --seq_len {seq_len}, fewer than "
                          f"one batch per rank ({per_round}); lower --seq_len or tokenize with more validation data")
    mine = windows[rank:n_rounds * per_round:world_size]
    return [_to_device(np.stack(mine[i:i + micro_batch_size]).astype(np.int64), device)
            for i in range(0, len(mine), micro_batch_size)]


def _to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(windows)
    if device.type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def unigram_entropy(shards: TokenShards) -> float:
    """Entropy (nats per token) of the split's token frequencies: the loss of a model that learned those
    frequencies and nothing else. A loss far below it is a real learning signal."""
    counts = np.zeros(shards.vocab_size, dtype=np.int64)
    for shard in shards.shards:
        counts += np.bincount(shard, minlength=shards.vocab_size)[:shards.vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
