"""Image classification data for fine-tuning timm models: a local `class_name/*.jpg` folder or a Hugging
Face image dataset, transformed with the model's own timm data config, in resumable batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qt.training.config import ConfigError
from qt.training.epochs import EpochSampler, micro_batches_after_resume, position_state
from qt.training.hub import hub_error, is_local_path, use_cache_if_hub_unreachable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Hugging Face image datasets by short name: (dataset, train split, validation split).
PRESETS = {"resisc45": ("timm/resisc45", "train", "validation")}


class ImageFolder(Dataset):
    """(path, label) samples of a `class_name/*.jpg` folder; classes in sorted order."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str]):
        self.samples, self.classes, self.transform = samples, classes, None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


class HubImages(Dataset):
    """A Hugging Face image dataset split with `image` and `label` columns."""

    def __init__(self, split, classes: list[str]):
        self.split, self.classes, self.transform = split, classes, None

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        row = self.split[int(i)]
        return self.transform(row["image"].convert("RGB")), row["label"]


def scan_folder(root: str) -> tuple[list[tuple[Path, int]], list[str]]:
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"--dataset {root}: no such folder (give a preset: {', '.join(PRESETS)}, or a folder of "
                          f"class_name/*.jpg)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"--dataset {root} has no class folders; lay it out as {root}/CLASS_NAME/IMAGE.jpg")
    if len(classes) < 2:
        raise ConfigError(f"--dataset {root} has one class folder ({classes[0]}); classification needs at least two")
    samples = []
    for label, name in enumerate(classes):
        images = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ConfigError(f"class folder {folder / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                              f"add some or remove the folder")
        samples += [(p, label) for p in images]
    return samples, classes


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): val_fraction of every class (at least one image) held out."""
    rng = np.random.default_rng([seed, 1])
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = max(1, round(len(members) * val_fraction))
        if n_val >= len(members):
            raise ConfigError(f"class {label} has {len(members)} image(s): too few to hold out a validation image "
                              f"and train on the rest; add images or lower --val_fraction")
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_image_datasets(dataset: str, val_fraction: float, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    """(train, validation, class names) of a preset, Hugging Face dataset name or local folder."""
    if dataset not in PRESETS and (is_local_path(dataset) or "/" not in dataset):  # hub names are OWNER/NAME
        samples, classes = scan_folder(dataset)
        train_ids, val_ids = stratified_split(np.array([label for _, label in samples]), val_fraction, seed)
        return (ImageFolder([samples[i] for i in train_ids], classes),
                ImageFolder([samples[i] for i in val_ids], classes), classes)
    name, train_split, val_split = PRESETS.get(dataset, (dataset, "train", "validation"))
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--dataset {dataset}: there is no such local path, and loading {name} from the "
                          f"Hugging Face hub needs `pip install datasets`; or give a local folder of "
                          f"class_name/*.jpg") from None
    use_cache_if_hub_unreachable()
    try:
        splits = datasets.load_dataset(name)
    except Exception as e:  # the hub client raises many types (connection, missing repo)
        raise hub_error(f"--dataset {dataset}" + (f" ({name})" if name != dataset else ""), e,
                        "give a local folder of class_name/*.jpg") from None
    if train_split not in splits or val_split not in splits:
        raise ConfigError(f"--dataset {dataset} needs {train_split} and {val_split} splits; it has {', '.join(splits)}")
    classes = splits[train_split].features["label"].names
    return HubImages(splits[train_split], classes), HubImages(splits[val_split], classes), classes


class ImageBatches:
    """Endless micro-batches (images, labels) of this rank (see EpochSampler), loaded by `num_workers`
    processes. Resumable by count; the random augmentations of a resumed run differ."""

    def __init__(self, dataset: Dataset, batch_size: int, *, grad_accum: int, seed: int, rank: int,
                 world_size: int, num_workers: int, device: torch.device, dtype: torch.dtype):
        self.dataset, self.num_workers, self.device, self.dtype = dataset, num_workers, device, dtype
        self.sampler = EpochSampler(len(dataset), batch_size, grad_accum=grad_accum, seed=seed, rank=rank,
                                    world_size=world_size, what="images")
        self.micro_batches_drawn, self._loader = 0, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader is None:
            start = self.micro_batches_drawn
            index_lists = (self.sampler.micro_batch(k).tolist() for k in itertools.count(start))
            self._loader = iter(DataLoader(self.dataset, batch_sampler=index_lists, num_workers=self.num_workers,
                                           pin_memory=self.device.type == "cuda",
                                           persistent_workers=self.num_workers > 0))
        images, labels = next(self._loader)
        self.micro_batches_drawn += 1
        return images.to(self.device, self.dtype, non_blocking=True), labels.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return position_state(self.micro_batches_drawn, self.sampler.grad_accum)

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches_drawn, self._loader = micro_batches_after_resume(state, self.sampler.grad_accum), None


def validation_loader(dataset: Dataset, micro_batch_size: int, *, rank: int, world_size: int,
                      num_workers: int) -> DataLoader:
    """This rank's share of the validation images, in order. Ranks get the same number of batches
    (sharded models need all ranks in every forward pass): up to world_size - 1 images are left out."""
    usable = len(dataset) - len(dataset) % world_size
    mine = list(range(rank, usable, world_size))
    batches = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
