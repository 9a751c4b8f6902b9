#!/usr/bin/env bash
# The main job end to end on any machine, offline: make a small English corpus from this Python's own
# documentation, train a byte-level BPE on it, pretrain a small Llama with the BF16 baseline (FP32 on a CPU)
# and with int8_mixed_precision, then compare them (table + loss-curve plot).
#
#   pip install -e . transformers tokenizers pyyaml tqdm matplotlib && bash scripts/quickstart.sh [OUT_DIR]
#
# A few minutes on 2 CPU cores. Rerunning skips finished steps. RECIPES overrides the recipes to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-runs/quickstart}
data=data/quickstart

[[ -f $data/stdlib_docs.jsonl.gz ]] || python -m qt.training.corpus "$data/stdlib_docs.jsonl.gz"
python tokenize_data.py --data_files "$data/stdlib_docs.jsonl.gz" --train_tokenizer 1024 --val_fraction 0.05 \
    --output_dir "$data/tokens"
run_dirs=()
for recipe in ${RECIPES:-none int8_mixed_precision}; do
    python llm_pretrain.py --config configs/runs/quickstart.yaml --dataset_dir "$data/tokens" --quantize "$recipe" \
        --run_dir "$out_dir/$recipe" --resume
    run_dirs+=("$out_dir/$recipe")
done
python scripts/compare_runs.py "${run_dirs[@]}" --output_dir "$out_dir" --dataset_dir "$data/tokens"
echo "plot: $out_dir/loss_curves.png"
