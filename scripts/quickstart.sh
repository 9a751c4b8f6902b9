#!/usr/bin/env bash
# The main job end to end on any machine, offline: make a small English corpus from this Python's own
# documentation, train a byte-level BPE on it, pretrain a small Llama with the unquantized baseline (BF16 on
# a GPU, FP32 on a CPU) and with int8_mixed_precision, then compare them (table + plot).
#
#   bash scripts/quickstart.sh [OUT_DIR]              (installation: README.md, Quickstart)
#
# A few minutes on 2 CPU cores. Rerunning skips finished steps. RECIPES overrides the recipes to compare
# (`none` is this machine's baseline); the comparison holds every run in OUT_DIR, those of earlier RECIPES too.
# Environment: RECIPES, DATA_DIR (default data/quickstart), EXTRA_ARGS (more llm_pretrain.py flags).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-runs/quickstart}
data=${DATA_DIR:-data/quickstart}
# CPU BF16 matmuls are slow on most CPUs: there the baseline computes in FP32.
baseline=$(python -c 'import torch; print("bf16" if torch.cuda.is_available() else "fp32")')

[[ -f $data/stdlib_docs.jsonl.gz ]] || python -m qt.training.corpus "$data/stdlib_docs.jsonl.gz"
python tokenize_data.py --data_files "$data/stdlib_docs.jsonl.gz" --train_tokenizer 1024 --val_fraction 0.05 \
    --output_dir "$data/tokens"
for recipe in ${RECIPES:-$baseline int8_mixed_precision}; do
    [[ $recipe == none ]] && recipe=$baseline
    python llm_pretrain.py --config configs/runs/quickstart.yaml --dataset_dir "$data/tokens" --quantize "$recipe" \
        --run_dir "$out_dir/$recipe" --resume ${EXTRA_ARGS:-}
done
python scripts/compare_runs.py --runs_in "$out_dir" --output_dir "$out_dir" --dataset_dir "$data/tokens"
echo "plot: $out_dir/loss_curves.png"
