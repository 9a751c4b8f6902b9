"""Instruction data for fine-tuning a causal LM: (prompt, response) records from a Hugging Face dataset or
a local JSON / JSONL / parquet file, tokenized so that the loss covers the response tokens only, and
batched by length so that little compute goes to padding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qt.training.config import ConfigError
from qt.training.epochs import EpochSampler, micro_batches_after_resume, position_state
from qt.training.hub import hub_error, is_local_path, use_cache_if_hub_unreachable

IGNORE_INDEX = -100  # label of the prompt and padding positions: cross_entropy skips it
PAD_MULTIPLE = 8  # micro-batches are padded to a multiple of this: fewer distinct shapes to compile

# Hugging Face instruction datasets by short name: (dataset, split, prompt field, response field).
PRESETS = {"metamathqa": ("meta-math/MetaMathQA", "train", "query", "response")}

ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def preset_fields(dataset: str) -> tuple[str, str] | None:
    """The (prompt, response) fields of a preset dataset, None for any other."""
    return PRESETS[dataset][2:] if dataset in PRESETS else None


def load_records(dataset: str) -> list[dict]:
    """The records of a preset, a local file, or a Hugging Face dataset name (its train split)."""
    path = Path(dataset)
    if path.suffix in LOCAL_SUFFIXES or (is_local_path(dataset) and not path.exists()):
        if not path.is_file():
            raise ConfigError(f"--dataset {dataset}: no such file")
        records = _read_local(path)
    elif path.exists():
        raise ConfigError(f"--dataset {dataset}: a local dataset must be a {', '.join(LOCAL_SUFFIXES)} file")
    else:
        name, split = PRESETS[dataset][:2] if dataset in PRESETS else (dataset, "train")
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"--dataset {dataset}: there is no such local path, and loading {name} from the "
                              f"Hugging Face hub needs `pip install datasets`; or give a local "
                              f".json/.jsonl/.parquet file") from None
        use_cache_if_hub_unreachable()
        try:
            records = datasets.load_dataset(name, split=split).to_list()
        except Exception as e:  # the hub client raises many types (connection, missing repo, bad split)
            raise hub_error(f"--dataset {dataset} ({name}, split {split})", e,
                            "give a local .json/.jsonl/.parquet file") from None
    if not records:
        raise ConfigError(f"--dataset {dataset} has no records")
    return records


def _read_local(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise ConfigError(f"reading {path} needs `pip install pyarrow`") from None
        return pyarrow.parquet.read_table(path).to_pylist()
    text = path.read_text()
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); give a JSON list of objects or one object a line") from None
    if not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path} must hold JSON objects (one per record), e.g. {{\"prompt\": ..., \"response\": ...}}")
    return records


@dataclass
class Example:
    tokens: np.ndarray  # prompt then response token ids, truncated to max_seq_len
    n_prompt: int  # the first n_prompt tokens are the prompt: no loss on them


def tokenize_examples(records: list[dict], tokenizer, *, prompt_field: str, response_field: str,
                      template: str, max_seq_len: int) -> tuple[list[Example], int]:
    """(examples, number of records dropped because the prompt alone fills max_seq_len).

    Prompt and response are tokenized separately so that the boundary between them is exact; the response
    ends with EOS so that the model learns to stop."""
    missing = [f for f in (prompt_field, response_field) if f not in records[0]]
    if missing:
        raise ConfigError(f"the data have no field {', '.join(map(repr, missing))}; their fields are "
                          f"{', '.join(map(repr, records[0]))}: pass --prompt_field and --response_field")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token to end responses with; give a model whose tokenizer has one")
    examples, dropped = [], 0
    chunk = 1000  # fast tokenizers batch in parallel
    for start in range(0, len(records), chunk):
        batch = records[start:start + chunk]
        for i, record in enumerate(batch):
            for f in (prompt_field, response_field):
                if not isinstance(record.get(f), str):
                    raise ConfigError(f"record {start + i} has no text in field {f!r}: {str(record)[:200]}")
        prompts = tokenizer([template.replace("{prompt}", r[prompt_field]) for r in batch]).input_ids
        responses = tokenizer([r[response_field] for r in batch], add_special_tokens=False).input_ids
        for prompt, response in zip(prompts, responses):
            if len(prompt) >= max_seq_len:
                dropped += 1
                continue
            tokens = np.array((prompt + response + [tokenizer.eos_token_id])[:max_seq_len], dtype=np.int64)
            examples.append(Example(tokens, len(prompt)))
    if not examples:
        raise ConfigError(f"every prompt fills --max_seq_len {max_seq_len} tokens, leaving no response to "
                          f"learn; raise --max_seq_len")
    return examples, dropped


def split_validation(examples: list[Example], n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): n_val examples held out at random, the same ones for a given seed."""
    if len(examples) <= n_val:
        raise ConfigError(f"{len(examples)} examples leave none for training after --val_examples {n_val}; "
                          f"lower --val_examples or give more data")
    order = np.random.default_rng([seed, 1]).permutation(len(examples))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict:
    """A micro-batch padded on the right to its longest example (rounded up to PAD_MULTIPLE).

    labels[i] is the token at position i where it is a response token and IGNORE_INDEX elsewhere; the loss
    compares the logits at position i with labels[i + 1]. n_tokens counts the real (non-pad) tokens."""
    length = -(-max(len(e.tokens) for e in examples) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        tokens = torch.from_numpy(example.tokens)
        input_ids[row, :len(tokens)] = tokens
        labels[row, example.n_prompt:len(tokens)] = tokens[example.n_prompt:]
        attention_mask[row, :len(tokens)] = 1
    n_tokens = int(attention_mask.sum())
    if device.type == "cuda":
        input_ids, labels, attention_mask = (t.pin_memory().to(device, non_blocking=True)
                                             for t in (input_ids, labels, attention_mask))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "n_tokens": n_tokens}


class InstructBatches:
    """Endless length-bucketed micro-batches of this rank (see EpochSampler), resumable by count."""

    def __init__(self, examples: list[Example], batch_size: int, *, grad_accum: int, seed: int, rank: int,
                 world_size: int, pad_id: int, device: torch.device):
        self.examples, self.pad_id, self.device = examples, pad_id, device
        self.sampler = EpochSampler(len(examples), batch_size, grad_accum=grad_accum, seed=seed, rank=rank,
                                    world_size=world_size, lengths=np.array([len(e.tokens) for e in examples]))
        self.micro_batches_drawn = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        indices = self.sampler.micro_batch(self.micro_batches_drawn)
        self.micro_batches_drawn += 1
        return collate([self.examples[i] for i in indices], self.pad_id, self.device)

    def state_dict(self) -> dict:
        return position_state(self.micro_batches_drawn, self.sampler.grad_accum)

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches_drawn = micro_batches_after_resume(state, self.sampler.grad_accum)


def validation_batches(examples: list[Example], micro_batch_size: int, *, rank: int, world_size: int,
                       pad_id: int, device: torch.device) -> list[dict]:
    """The held-out examples sorted by length and dealt out to ranks, the same at every evaluation. Every
    rank gets the same number of batches (sharded models need all ranks in every forward pass), so up to
    world_size - 1 examples are left out."""
    if len(examples) < world_size:
        raise ConfigError(f"--val_examples {len(examples)} gives some of the {world_size} processes no "
                          f"validation example; raise it")
    ordered = sorted(examples, key=lambda e: len(e.tokens))
    mine = ordered[rank:len(ordered) - len(ordered) % world_size:world_size]
    return [collate(mine[i:i + micro_batch_size], pad_id, device) for i in range(0, len(mine), micro_batch_size)]


def response_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX)
