import numpy as np
import pytest

from conftest import quantized_weights_saved, read_metrics
from stopping import sigterm_during_step

timm = pytest.importorskip("timm", reason="timm (with torchvision) is not installed")
sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (bundled digits images) is not installed")

import timm_finetune  # noqa: E402

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model_kwargs",
            '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}']


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as 32x32 PNGs in class_name/ folders."""
    from PIL import Image
    root = tmp_path_factory.mktemp("digits")
    digits = sklearn_datasets.load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (image / 16 * 255).astype(np.uint8)
        (root / f"digit_{label}").mkdir(exist_ok=True)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(root / f"digit_{label}" / f"{i}.png")
    return root


def args(dataset, run_dir, *flags):
    return [*TINY_VIT, "--dataset", str(dataset), "--run_dir", str(run_dir), "--batch_size", "64", "--lr", "3e-3",
            "--warmup_steps", "10", "--weight_decay", "0.01", "--log_interval", "10", "--num_workers", "1",
            "--augment_kwargs", '{"hflip": 0, "scale": [0.7, 1], "ratio": [0.9, 1.1]}', "--wandb", "disabled",
            "--dtype", "fp32", *flags]


@pytest.mark.parametrize("recipe", ["none", "int8_mixed_precision"])
def test_a_tiny_vit_learns_the_digits_well_above_chance(recipe, digits_dir, tmp_path):
    run_dir = tmp_path / recipe
    timm_finetune.main(args(digits_dir, run_dir, "--quantize", recipe, "--n_epochs", "12"))
    metrics = read_metrics(run_dir)
    evaluations = [m for m in metrics if "val_acc" in m]
    assert len(evaluations) == 12  # one per epoch: 1,618 training images / 64 = 25 steps
    assert evaluations[-1]["val_acc"] > 0.6 and evaluations[-1]["val_top5"] > 0.9, evaluations  # chance: 0.1
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert metrics[-1]["images_seen"] == 300 * 64 and "images_per_second" in metrics[-1]


@pytest.mark.parametrize("dtype", ["bf16", "fp32_master"])
def test_bf16_weights_or_compute_take_the_images_in_their_dtype(dtype, digits_dir, tmp_path):
    """The images arrive in float32 from the loader; BF16 weights without autocast must get BF16 inputs."""
    run_dir = tmp_path / dtype
    timm_finetune.main(args(digits_dir, run_dir, "--n_steps", "4", "--eval_interval", "4", "--log_interval", "2",
                            "--dtype", dtype))  # the last --dtype wins
    metrics = read_metrics(run_dir)
    assert metrics[-1]["step"] == 4 and 0 <= metrics[-1]["val_acc"] <= 1 and metrics[-1]["loss"] < 3.0


def test_quantize_takes_the_backbone_linears_and_leaves_the_new_head(digits_dir, tmp_path):
    run_dir = tmp_path / "w8"
    timm_finetune.main(args(digits_dir, run_dir, "--quantize", "int8_weight_only", "--n_steps", "3"))
    quantized = quantized_weights_saved(run_dir / "checkpoints" / "step_00000003")
    assert len(quantized) == 2 * 4 and "head.weight" not in quantized


def write_image(path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


@pytest.mark.parametrize("layout, flags, message", [
    ({}, [], "has no class folders; lay it out as"),
    ({"a/1.png": True, "b/notes.txt": False}, [], "class folder"),
    ({"a/1.png": True, "a/2.png": True, "b/1.png": True, "b/2.png": True}, ["--model", "no_such_model"], "--model 'no_such_model' is not a timm model"),
    ({"a/1.png": True, "a/2.png": True, "b/1.png": True, "b/2.png": True}, ["--model", "vit_tiny_patch16_224", "--pretrained"], "cannot create"),
])
def test_bad_input_gets_a_one_line_error(layout, flags, message, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    root = tmp_path / "images"
    root.mkdir()
    for name, is_image in layout.items():
        if is_image:
            write_image(root / name)
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("not an image")
    with pytest.raises(SystemExit):
        timm_finetune.main(args(root, tmp_path / "run", "--val_fraction", "0.5", *flags))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr, stderr


def test_a_stopped_run_exits_75_and_resumes_from_its_run_dir_alone(digits_dir, tmp_path, monkeypatch):
    from qt.training.image_data import ImageBatches
    run_dir = tmp_path / "run"
    sigterm_during_step(monkeypatch, ImageBatches, 3)
    with pytest.raises(SystemExit) as exit_info:
        timm_finetune.main(args(digits_dir, run_dir, "--n_steps", "6", "--eval_interval", "6", "--log_interval", "1"))
    assert exit_info.value.code == 75 and read_metrics(run_dir)[-1]["step"] == 3
    monkeypatch.undo()
    timm_finetune.main(["--run_dir", str(run_dir), "--resume"])
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7)) and "val_acc" in metrics[-1]
