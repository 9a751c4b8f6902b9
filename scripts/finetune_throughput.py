"""Throughput of the finetuning scripts, BF16 vs a recipe, on data and models made on the spot.

    python scripts/finetune_throughput.py --out $OUT                         # on one GPU (the device)
    python scripts/finetune_throughput.py --out /tmp/smoke --smoke           # a CPU smoke run, tiny shapes

Needs no hub access: it writes a folder of random-pixel images (8 classes) and a causal LM folder
(random init from configs/models/smollm-1.7b.json, with a byte-level BPE trained on the synthetic
instruction data it also writes), then runs `timm_finetune.py` (ViT-B/16, batch 64) and
`llm_finetune.py` (configs/runs/finetune_throughput_*.yaml) once per recipe and prints, from each run's
own metrics.jsonl, the median throughput of the logged intervals after the first (compilation) and
the peak memory. Writes OUT/finetune_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing qt

from qt.sqnr import sqnr_cell  # noqa: E402
from qt.training.config import is_baseline  # noqa: E402

WORDS = ("the model trains weights in low precision while the loss follows its baseline and every step "
         "counts tokens images gradients scales rows columns kernels memory speed").split()


def write_images(folder: Path, classes: int, per_class: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{c}" / f"{i}.png")


def write_instructions(path: Path, examples: int, words: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(examples):
            prompt = " ".join(rng.choices(WORDS, k=words // 4))
            response = " ".join(rng.choices(WORDS, k=words))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def write_causal_lm(folder: Path, config_file: Path, corpus: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    config = LlamaConfig(**{k: v for k, v in json.loads(config_file.read_text()).items() if k != "model_type"})
    texts = [" ".join(json.loads(line).values()) for line in corpus.read_text().splitlines()]
    trainer = trainers.BpeTrainer(vocab_size=min(1024, config.vocab_size), special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 2
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # random init, model's own vocab size
    fast.save_pretrained(folder)


def run(script: str, args: list[str], run_dir: Path, log: Path) -> dict:
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, str(REPO / script), *args, "--run_dir", str(run_dir)],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    metrics_file = run_dir / "metrics.jsonl"
    if result.returncode != 0 or not metrics_file.exists():
        return {"error": f"exit {result.returncode}: see {log.name}"}
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    speed_key = next(k for k in records[-1] if k.endswith("_per_second"))
    speeds = [r[speed_key] for r in records[1:]] or [records[0][speed_key]]  # the first interval compiles
    sqnr = [r["forward_sqnr_db"] for r in records if r.get("forward_sqnr_db") is not None]
    return {"unit": speed_key, "speed": statistics.median(speeds), "peak_gb": records[-1].get("max_memory_allocated_gb"),
            "loss": records[-1]["loss"], "sqnr": sqnr[0] if sqnr else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/finetune_throughput"))
    parser.add_argument("--recipes", nargs="+", default=["none", "int8_mixed_precision"])
    parser.add_argument("--smoke", action="store_true", help="tiny model and images, a few steps (CPU check)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["timm", "llm"])
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    smoke_timm = ["--model", "vit_tiny_patch16_224", "--model_kwargs", '{"img_size": 32, "patch_size": 8}',
                  "--batch_size", "8", "--n_steps", "4", "--no-compile", "--dtype", "fp32", "--log_interval", "2",
                  "--num_workers", "0"]
    smoke_llm = ["--batch_size", "4", "--n_steps", "4", "--max_seq_len", "128", "--no-compile", "--dtype", "fp32",
                 "--log_interval", "2", "--val_examples", "4"]
    rows = []
    if "timm" not in args.skip:
        images = work / "images"
        if not images.exists():
            write_images(images, classes=8, per_class=16 if args.smoke else 80, size=32 if args.smoke else 224)
        for recipe in args.recipes:
            flags = ["--config", "configs/runs/finetune_throughput_vit_b16.yaml", "--dataset", str(images),
                     "--quantize", recipe, *(smoke_timm if args.smoke else [])]
            rows.append(("timm_finetune.py", recipe, run("timm_finetune.py", flags, work / f"timm-{recipe}",
                                                          out / f"timm-{recipe}.log")))
            print(rows[-1], flush=True)
    if "llm" not in args.skip:
        data, model = work / "instructions.jsonl", work / "causal_lm"
        if not data.exists():
            write_instructions(data, examples=64 if args.smoke else 800, words=60 if args.smoke else 400)
        if not (model / "config.json").exists():
            config = REPO / "configs" / "models" / ("tiny.json" if args.smoke else "smollm-1.7b.json")
            write_causal_lm(model, config, data)
        for recipe in args.recipes:
            flags = ["--config", "configs/runs/finetune_throughput_smollm_1.7b.yaml", "--model", str(model),
                     "--dataset", str(data), "--prompt_field", "prompt", "--response_field", "response",
                     "--quantize", recipe, *(smoke_llm if args.smoke else [])]
            rows.append(("llm_finetune.py", recipe, run("llm_finetune.py", flags, work / f"llm-{recipe}",
                                                         out / f"llm-{recipe}.log")))
            print(rows[-1], flush=True)

    lines = ["| script | recipe | throughput (median after the first interval) | peak memory allocated (GB) | last loss | "
             "forward SQNR (dB) |", "| --- | --- | --- | --- | --- | --- |"]
    for script, recipe, r in rows:
        if "error" in r:
            lines.append(f"| {script} | {recipe} | {r['error']} | | | |")
        else:
            peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "n/a"
            lines.append(f"| {script} | {recipe} | {r['speed']:,.0f} {r['unit']} | {peak} | {r['loss']:.3f} | "
                         f"{sqnr_cell(r['sqnr'], not is_baseline(recipe))} |")
    table = "\n".join(lines)
    (out / "finetune_throughput.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
