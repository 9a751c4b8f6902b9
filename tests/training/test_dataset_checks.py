"""A dataset folder is checked when it is loaded: its metadata, and every shard against its record."""

import json
import shutil

import numpy as np
import pytest

from qt.training.config import ConfigError
from qt.training.data import TokenShards


@pytest.fixture
def dataset(dataset_dir, tmp_path):
    """A copy of the tokenized test corpus, free to corrupt."""
    copy = tmp_path / "tokens"
    shutil.copytree(dataset_dir, copy)
    return copy


def edit_metadata(dataset, edit) -> None:
    path = dataset / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def first_shard(dataset) -> dict:
    return json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["shards"][0]


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_metadata_cannot_name_a_shard_outside_the_folder(dataset, name):
    outside = dataset.parent / "outside.bin"
    np.arange(100, dtype=np.uint16).tofile(outside)  # a file that would load as a shard of 100 tokens
    if name.startswith("sub"):
        (dataset / "sub").mkdir()

    def point_outside(metadata):
        metadata["splits"]["train"]["shards"][0].update(file=name, tokens=100)
    edit_metadata(dataset, point_outside)
    with pytest.raises(ConfigError, match=f"shard '{name}' is not a file name in the dataset folder"):
        TokenShards(dataset, "train")


def test_a_shard_linked_outside_the_folder_is_refused(dataset):
    shard = dataset / first_shard(dataset)["file"]
    outside = dataset.parent / "moved.bin"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the dataset folder"):
        TokenShards(dataset, "train")


@pytest.mark.parametrize("corruption, message", [
    (lambda b: b + b"\0", r"has \d+ bytes, not the \d+ of its metadata"),  # an odd byte count
    (lambda b: b"", r"has 0 bytes"),
    (lambda b: b[:-2], r"has \d+ bytes"),
])
def test_a_shard_of_the_wrong_size_is_a_one_line_error(dataset, corruption, message):
    shard = dataset / first_shard(dataset)["file"]
    shard.write_bytes(corruption(shard.read_bytes()))
    with pytest.raises(ConfigError, match=message):
        TokenShards(dataset, "train")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("complete"), "'complete' is missing"),
    (lambda m: m.update(complete="yes"), "'complete' is missing or not true/false"),
    (lambda m: m.update(dtype="float16"), "'dtype' must be one of uint16, uint32 .*not 'float16'"),
    (lambda m: m.update(dtype="int7"), "'dtype' must be one of"),
    (lambda m: m.update(vocab_size="512"), "'vocab_size' must be a positive integer"),
    (lambda m: m["splits"].pop("val"), "a list of shards for 'val'"),
    (lambda m: m["splits"]["train"]["shards"][0].update(tokens=0), "'tokens' must be a positive integer"),
    (lambda m: m["splits"]["train"]["shards"][0].update(max_token_id=-3), "'max_token_id' must be"),
])
def test_unusable_metadata_is_a_one_line_error(dataset, edit, message):
    edit_metadata(dataset, edit)
    with pytest.raises(ConfigError, match=message):
        TokenShards(dataset, "train")


def test_metadata_that_is_not_json_is_a_one_line_error(dataset):
    (dataset / "metadata.json").write_text('{"format": "qt-token-shards-v1", "complete": tr')
    with pytest.raises(ConfigError, match="metadata.json is not valid JSON"):
        TokenShards(dataset, "train")


def write_token(dataset, record: dict, token_id: int) -> None:
    shard = np.memmap(dataset / record["file"], dtype=np.uint16, mode="r+")
    shard[7] = token_id
    shard.flush()


def test_token_ids_are_checked_against_the_vocabulary(dataset):
    """Against the dataset's own vocabulary at load (from each shard's recorded largest id) and against a
    model's with check_vocabulary."""
    shards = TokenShards(dataset, "train")
    assert shards.max_token_id == max(int(s.max()) for s in shards.shards)
    with pytest.raises(ConfigError, match="token ids go up to 511, beyond the model's vocabulary of 100"):
        shards.check_vocabulary(100)

    def claim_a_large_id(metadata):
        metadata["splits"]["train"]["shards"][0]["max_token_id"] = 600
    edit_metadata(dataset, claim_a_large_id)
    with pytest.raises(ConfigError, match="hold token id 600, beyond the vocabulary of 512"):
        TokenShards(dataset, "train")


def test_a_dataset_without_recorded_largest_ids_is_scanned(dataset):
    recorded = TokenShards(dataset, "train").max_token_id

    def forget_largest_ids(metadata):
        for split in metadata["splits"].values():
            for record in split["shards"]:
                del record["max_token_id"]
    edit_metadata(dataset, forget_largest_ids)
    assert TokenShards(dataset, "train").max_token_id == recorded
    write_token(dataset, first_shard(dataset), 600)  # beyond the 512-token vocabulary
    with pytest.raises(ConfigError, match="hold token id 600"):
        TokenShards(dataset, "train")
