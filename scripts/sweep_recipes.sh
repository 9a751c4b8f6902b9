#!/usr/bin/env bash
# Train one run config once per recipe (same data, same seed) and compare the runs.
#
#   bash scripts/sweep_recipes.sh CONFIG OUT_DIR [RECIPE ...]
#   bash scripts/sweep_recipes.sh configs/runs/convergence_120m.yaml runs/convergence bf16 int8_mixed_precision
#
# Tokenizes the corpus first if DATA_DIR is not complete yet (CORPUS_DIR: a folder with docs_train.jsonl.gz and
# docs_val.jsonl.gz, default ../shared/corpus or shared/corpus). Each run is limited to RUN_TIMEOUT_S seconds:
# at the limit it is stopped with SIGTERM, saves a checkpoint and still appears in the comparison (rerunning the
# same command resumes it). A failed run is reported and the sweep goes on.
# Run directories (with checkpoints) go to RUNS_DIR/CONFIG_NAME/RECIPE (RUNS_DIR default runs); OUT_DIR gets
# only what is worth keeping: comparison.md, loss_curves.png, and per recipe its log, metrics.jsonl, config.yaml.
# The comparison holds every recipe in OUT_DIR, those of earlier sweeps into it too.
# With wandb, the runs of a config share a group (the config's name) and two tags: `sweep` and the recipe set
# (e.g. bf16+int8_mixed_precision); WANDB_RUN_GROUP and WANDB_TAGS (comma-separated) override them.
# Environment: NPROC (GPUs per run, default 1), RUN_TIMEOUT_S (default 300), VOCAB_SIZE (default 32000),
# DATA_DIR, RUNS_DIR, EXTRA_ARGS (more llm_pretrain.py flags), PARALLEL=1 (train all recipes at once on the
# same GPUs: for small models that leave the GPU idle, the sweep then takes about as long as its slowest run;
# the logged tok/s are then shared-GPU figures, not comparable to a run alone).
set -uo pipefail
cd "$(dirname "$0")/.."

config=${1:?usage: sweep_recipes.sh CONFIG OUT_DIR [RECIPE ...]}
out_dir=${2:?usage: sweep_recipes.sh CONFIG OUT_DIR [RECIPE ...]}
shift 2
if [[ $# -gt 0 ]]; then recipes=("$@"); else recipes=(bf16 int8_mixed_precision); fi
data_dir=${DATA_DIR:-data/corpus_bpe${VOCAB_SIZE:-32000}}
nproc=${NPROC:-1}
if [[ $nproc -eq 1 ]]; then launcher=(python); else launcher=(torchrun --standalone --nproc_per_node "$nproc"); fi
[[ -f $config ]] || { echo "error: no run config $config" >&2; exit 2; }

if [[ ! -f $data_dir/metadata.json ]] || ! grep -q '"complete": true' "$data_dir/metadata.json"; then
    corpus=${CORPUS_DIR:-}
    for candidate in ../shared/corpus shared/corpus; do
        [[ -z $corpus && -f $candidate/docs_train.jsonl.gz ]] && corpus=$candidate
    done
    [[ -n $corpus ]] || { echo "error: no corpus: set CORPUS_DIR to a folder with docs_{train,val}.jsonl.gz" >&2; exit 2; }
    echo "== tokenizing $corpus into $data_dir"
    python tokenize_data.py --data_files "$corpus/docs_train.jsonl.gz" --val_files "$corpus/docs_val.jsonl.gz" \
        --train_tokenizer "${VOCAB_SIZE:-32000}" --output_dir "$data_dir" || exit 1
fi

mkdir -p "$out_dir"
config_name=$(basename "$config" .yaml)
runs_dir=${RUNS_DIR:-runs}/$config_name
recipe_set=$(IFS=+; echo "${recipes[*]}")
export WANDB_RUN_GROUP=${WANDB_RUN_GROUP:-$config_name} WANDB_TAGS=${WANDB_TAGS:-sweep,$recipe_set}
exec 3>&1  # the sweep's own stdout, for status lines while a run's output goes to its log
train() {
    local recipe=$1 run_dir=$runs_dir/$1
    echo "== $recipe -> $run_dir ($(date +%T))" >&3
    # --resume: rerunning the sweep continues interrupted runs and skips finished ones.
    timeout --signal=TERM --kill-after=60 "${RUN_TIMEOUT_S:-300}" \
        "${launcher[@]}" llm_pretrain.py --config "$config" \
        --dataset_dir "$data_dir" --quantize "$recipe" --run_dir "$run_dir" --resume ${EXTRA_ARGS:-}
    local status=$?
    [[ $status -eq 0 ]] || echo "!! $recipe exited with status $status (124: stopped at RUN_TIMEOUT_S)" >&3
}

for recipe in "${recipes[@]}"; do
    if [[ ${PARALLEL:-0} == 1 ]]; then
        train "$recipe" > "$out_dir/$recipe.log" 2>&1 &
    else
        train "$recipe" 2>&1 | tee "$out_dir/$recipe.log"
    fi
done
wait

for recipe in "${recipes[@]}"; do
    run_dir=$runs_dir/$recipe
    if [[ -s $run_dir/metrics.jsonl ]]; then
        mkdir -p "$out_dir/$recipe" && cp "$run_dir/metrics.jsonl" "$run_dir/config.yaml" "$out_dir/$recipe/"
    fi
done

note=()
if [[ ${PARALLEL:-0} == 1 ]]; then
    note=(--note "The runs trained at the same time on shared GPUs (PARALLEL=1): their speeds are not comparable.")
fi
python scripts/compare_runs.py --runs_in "$out_dir" --output_dir "$out_dir" --dataset_dir "$data_dir" "${note[@]}"
