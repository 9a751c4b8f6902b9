import json
import os
import random
import time

import pytest
import torch

import llm_finetune
from conftest import quantized_weights_saved, read_metrics, without_timings
from qt.training.checkpoint import CheckpointError, Checkpointer
from qt.training.distributed import Dist
from qt.training.export import load_finetuned
from qt.training.instruct_data import IGNORE_INDEX, InstructBatches, collate, split_validation, tokenize_examples
from qt.training.lifecycle import STOPPED_EXIT_STATUS
from stopping import sigterm_during_step

WORDS = "apple river stone cloud green seven orange tiger music paper silver window garden yellow".split()
TEMPLATE = "Q: {prompt}\nA:"


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Learnable instruction data: the response is the prompt's words reversed."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 6))
        records.append({"question": "reverse " + " ".join(words), "answer": " ".join(reversed(words))})
    return records


def make_tokenizer(records):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([r["question"] + " " + r["answer"] + " Q: A:" for r in records], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model_dir(path, records, model_type: str):
    """A tiny pretrained-looking model folder: config, random weights, tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    tokenizer = make_tokenizer(records)
    shape = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    # Qwen2 with tied embeddings (like Qwen2-0.5B), Llama untied (like SmolLM-1.7B is not: tying is tested by Qwen).
    config = Qwen2Config(**shape, tie_word_embeddings=True) if model_type == "qwen2" else LlamaConfig(**shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("instruct") / "reverse.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(600)))
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    records = make_records(600)
    root = tmp_path_factory.mktemp("models")
    return {kind: make_model_dir(root / kind, records, kind) for kind in ("llama", "qwen2")}


def finetune_args(model_dir, data_file, run_dir, *flags) -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(data_file), "--prompt_field", "question",
            "--response_field", "answer", "--prompt_template", TEMPLATE, "--run_dir", str(run_dir),
            "--max_seq_len", "64", "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5",
            "--n_steps", "40", "--log_interval", "5", "--eval_interval", "20", "--val_examples", "64",
            "--wandb", "disabled", "--dtype", "fp32", *flags]


def test_prompt_masking_is_exact(model_dirs):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    records = make_records(5)
    examples, dropped = tokenize_examples(records, tokenizer, prompt_field="question", response_field="answer",
                                          template=TEMPLATE, max_seq_len=64)
    assert dropped == 0
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    for row, record in enumerate(records):
        prompt = tokenizer(TEMPLATE.replace("{prompt}", record["question"])).input_ids
        response = tokenizer(record["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        n = len(prompt) + len(response)
        assert batch["input_ids"][row, :n].tolist() == prompt + response
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (
            batch["labels"].shape[1] - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
    assert batch["n_tokens"] == int(batch["attention_mask"].sum())
    assert batch["input_ids"].shape[1] % 8 == 0


def test_truncation_keeps_at_least_one_response_token_and_drops_prompts_that_fill_the_window(model_dirs):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    records = [{"question": "reverse " + " ".join(WORDS), "answer": "x " * 50}, {"question": "hi", "answer": "yo"}]
    prompt_length = len(tokenizer(TEMPLATE.replace("{prompt}", records[0]["question"])).input_ids)
    examples, dropped = tokenize_examples(records, tokenizer, prompt_field="question", response_field="answer",
                                          template=TEMPLATE, max_seq_len=prompt_length + 1)
    assert dropped == 0 and len(examples[0].tokens) == prompt_length + 1 and examples[0].n_prompt == prompt_length
    examples, dropped = tokenize_examples(records, tokenizer, prompt_field="question", response_field="answer",
                                          template=TEMPLATE, max_seq_len=prompt_length)
    assert dropped == 1 and len(examples) == 1


def test_length_bucketing_pads_little_and_covers_each_example_once_an_epoch(model_dirs, data_file):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    examples, _ = tokenize_examples(make_records(600), tokenizer, prompt_field="question", response_field="answer",
                                    template=TEMPLATE, max_seq_len=64)
    train_examples, val_examples = split_validation(examples, 64, seed=0)
    assert len(train_examples) == 536 and len(val_examples) == 64
    ranks = [InstructBatches(train_examples, 16, grad_accum=2, seed=0, rank=r, world_size=2, pad_id=0,
                             device=torch.device("cpu")) for r in range(2)]
    steps_per_epoch = 536 // 16
    seen, real, padded = [], 0, 0
    for rank in ranks:
        for _ in range(steps_per_epoch * 2):  # grad_accum micro-batches a step
            indices = rank.sampler.micro_batch(rank.micro_batches_drawn)
            batch = next(rank)
            assert len(indices) == 4
            seen += indices.tolist()
            real += batch["n_tokens"]
            padded += batch["attention_mask"].numel()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == steps_per_epoch * 16
    assert real / padded > 0.75  # random batches of these lengths would be about 0.6


@pytest.mark.parametrize("recipe", ["none", "int8_weight_only", "int8_mixed_precision", "bitnet"])
def test_each_recipe_finetunes_and_the_loss_falls(recipe, model_dirs, data_file, tmp_path):
    run_dir = tmp_path / recipe
    llm_finetune.main(finetune_args(model_dirs["llama"], data_file, run_dir, "--quantize", recipe))
    metrics = read_metrics(run_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, metrics
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val_losses) == 2 and val_losses[-1] < metrics[0]["loss"] - 1.0
    for key in ("tokens_seen", "tokens_per_second", "lr", "grad_norm", "max_memory_allocated_gb"):
        assert key in metrics[-1]
    weights = "bitnet.safetensors" if recipe == "bitnet" else "model.safetensors"
    assert (run_dir / "hf_model" / weights).is_file()


def test_tokens_seen_counts_only_real_tokens(model_dirs, data_file, tmp_path):
    run_dir = tmp_path / "count"
    llm_finetune.main(finetune_args(model_dirs["llama"], data_file, run_dir, "--n_steps", "5", "--grad_accum", "2"))
    state = torch.load(Checkpointer(run_dir, None, sharded=False, keep=1).latest() / "rank_0.pt", weights_only=False)
    assert state["extra"]["batches"]["micro_batches_drawn"] == 10
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    examples, _ = tokenize_examples(make_records(600), tokenizer, prompt_field="question", response_field="answer",
                                    template=TEMPLATE, max_seq_len=64)
    batches = InstructBatches(split_validation(examples, 64, seed=0)[0], 16, grad_accum=2, seed=0, rank=0,
                              world_size=1, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    assert read_metrics(run_dir)[-1]["tokens_seen"] == sum(next(batches)["n_tokens"] for _ in range(10))


def trained_model(model_dir, run_dir, **settings):
    """The model a run trained, from its last checkpoint: `model_dir`'s, prepared with the run's `settings`."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    llm_finetune.prepare_model(model, llm_finetune.FinetuneConfig(model=str(model_dir), **settings))
    Checkpointer(run_dir, Dist(0, 1, torch.device("cpu")), sharded=False, keep=1).load(model, None)
    return model


@pytest.mark.parametrize("model_type, flags", [
    ("llama", ["--quantize", "int8_mixed_precision", "--freeze_embedding_layer"]),
    ("qwen2", ["--quantize", "int8_weight_only", "--quantize_lm_head"]),  # tied head: untied, quantized once
])
def test_exported_checkpoint_loads_in_transformers_with_the_trained_dequantized_weights(
        model_type, flags, model_dirs, data_file, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    import qt
    run_dir = tmp_path / "run"
    llm_finetune.main(finetune_args(model_dirs[model_type], data_file, run_dir, "--n_steps", "10", *flags))
    quantized = quantized_weights_saved(Checkpointer(run_dir, None, sharded=False, keep=1).latest())
    head_quantized = "lm_head.weight" in quantized
    assert len(quantized) == 14 + head_quantized and head_quantized == ("--quantize_lm_head" in flags)
    trained = trained_model(model_dirs[model_type], run_dir, quantize=flags[1],
                            quantize_lm_head=head_quantized).state_dict()
    original = AutoModelForCausalLM.from_pretrained(model_dirs[model_type])
    if "--freeze_embedding_layer" in flags:
        assert torch.equal(trained["model.embed_tokens.weight"], original.model.embed_tokens.weight)

    assert_config_dtype_is_the_tensors(run_dir / "hf_model", "model.safetensors", "bfloat16")
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model", dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(run_dir / "hf_model")
    assert config.tie_word_embeddings == (model_type == "qwen2" and not head_quantized)
    expected = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    expected.load_state_dict({k: (v.dequantize() if isinstance(v, qt.QuantizedWeight) else v).to(torch.bfloat16)
                              for k, v in trained.items()})
    tokens = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, expected(tokens).logits)
        assert torch.equal(load_finetuned(run_dir)[0](tokens).logits, expected(tokens).logits)
        assert not torch.equal(exported(tokens).logits, original.to(torch.bfloat16)(tokens).logits)


@pytest.mark.parametrize("flags, message", [
    (["--model", "no-such-org/no-such-model"], "cannot load the config of --model 'no-such-org/no-such-model': "
                                               "there is no such local path, and it is not in the Hugging Face cache"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such folder"),
    (["--dataset", "./no/such/data"], "--dataset ./no/such/data: no such file"),
    (["--prompt_field", "query"], "the data have no field 'query'; their fields are 'question', 'answer'"),
    (["--prompt_template", "no placeholder"], "--prompt_template must contain {prompt}"),
    (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: no such file"),
    (["--val_examples", "600"], "600 examples leave none for training after --val_examples 600"),
    (["--batch_size", "15", "--grad_accum", "2"], "--batch_size 15 must be divisible by --grad_accum 2"),
    (["--max_seq_len", "4"], "every prompt fills --max_seq_len 4 tokens"),
])
def test_bad_input_gets_a_one_line_error(flags, message, model_dirs, data_file, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    with pytest.raises(SystemExit):
        llm_finetune.main(finetune_args(model_dirs["llama"], data_file, tmp_path / "run", *flags))
    assert_one_line_error(capsys.readouterr().err, message)


def assert_one_line_error(stderr: str, message: str) -> None:
    """Exactly one error line, no traceback (progress bars of loading may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr, stderr


def test_a_non_preset_dataset_needs_its_fields(tmp_path, capsys):
    with pytest.raises(SystemExit):
        llm_finetune.main(["--model", "m", "--dataset", "data.jsonl", "--run_dir", str(tmp_path / "run")])
    assert_one_line_error(capsys.readouterr().err,
                          "--dataset data.jsonl is not a preset: pass --prompt_field and --response_field")


def test_a_folder_holding_only_a_tokenizer_gets_a_one_line_error(model_dirs, data_file, tmp_path, capsys):
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(model_dirs["llama"]).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(SystemExit):
        llm_finetune.main(finetune_args(tmp_path / "tokenizer", data_file, tmp_path / "run"))
    assert_one_line_error(capsys.readouterr().err, f"--model {tmp_path / 'tokenizer'} holds no config.json "
                                                   f"(only a tokenizer): give the folder of a Hugging Face model")


def test_a_hub_name_fails_in_seconds_when_the_hub_cannot_be_reached(model_dirs, data_file, tmp_path, capsys,
                                                                    monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing answers there
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # so that the offline mode the failed probe turns on is undone
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        llm_finetune.main(finetune_args("no-such-org/no-such-model", data_file, tmp_path / "run"))
    assert time.perf_counter() - start < 15  # the hub client alone retries for ~50 s
    assert_one_line_error(capsys.readouterr().err, "it is not in the Hugging Face cache and the hub cannot be reached")
    assert huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_max_seq_len_beyond_the_models_positions_is_capped_with_a_note(model_dirs, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    records = make_records(100)
    records[0]["answer"] = " ".join(WORDS * 40)  # longer than the model's 256 positions
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "run"
    llm_finetune.main(finetune_args(model_dirs["llama"], data, run_dir, "--max_seq_len", "1000", "--n_steps", "2",
                                    "--val_examples", "8"))
    assert "note: --max_seq_len 1000 exceeds the model's 256 positions: examples are truncated to 256 tokens" in (
        capsys.readouterr().out)
    assert read_metrics(run_dir)[-1]["step"] == 2
    assert "max_seq_len: 1000" in (run_dir / "config.yaml").read_text()  # as given: the same command resumes


def test_the_same_seed_repeats_a_stochastically_rounded_run(model_dirs, data_file, tmp_path):
    def val_losses(name):
        run_dir = tmp_path / name
        llm_finetune.main(finetune_args(model_dirs["llama"], data_file, run_dir, "--quantize", "int8_weight_only",
                                        "--n_steps", "10", "--eval_interval", "5", "--seed", "3"))
        return [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
    first = val_losses("first")
    assert len(first) == 2 and val_losses("second") == first


def test_a_stopped_run_exports_nothing_exits_75_and_resumes_from_its_run_dir_alone(model_dirs, data_file, tmp_path,
                                                                                    monkeypatch, capsys):
    flags = ["--quantize", "int8_weight_only", "--n_steps", "10", "--log_interval", "1", "--eval_interval", "5"]
    whole = tmp_path / "whole"
    llm_finetune.main(finetune_args(model_dirs["llama"], data_file, whole, *flags))
    stopped = tmp_path / "stopped"
    sigterm_during_step(monkeypatch, InstructBatches, 4)
    with pytest.raises(SystemExit) as exit_info:
        llm_finetune.main(finetune_args(model_dirs["llama"], data_file, stopped, *flags))
    output = capsys.readouterr().out
    assert exit_info.value.code == STOPPED_EXIT_STATUS == 75
    assert f"stopped at step 4; continue with --resume --run_dir {stopped}" in output, output
    assert "exit status 75: the run is not complete; hf_model/ is written when it is" in output
    assert read_metrics(stopped)[-1]["step"] == 4 and not (stopped / "hf_model").exists()
    monkeypatch.undo()

    llm_finetune.main(["--run_dir", str(stopped), "--resume"])
    assert without_timings(read_metrics(stopped)) == without_timings(read_metrics(whole))
    assert (stopped / "hf_model" / "model.safetensors").is_file()
    capsys.readouterr()
    llm_finetune.main(["--run_dir", str(stopped), "--resume"])  # a finished run is not taken for a stopped one
    assert f"{stopped} is already complete" in capsys.readouterr().out


def assert_config_dtype_is_the_tensors(export_dir, weights_file: str, dtype: str) -> None:
    from safetensors import safe_open
    with safe_open(export_dir / weights_file, "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {{"bfloat16": "BF16", "float32": "F32"}[dtype]}
    assert json.loads((export_dir / "config.json").read_text())["dtype"] == dtype


def test_a_bitnet_finetune_loads_for_evaluation_and_generation_with_the_trained_logits(model_dirs, data_file,
                                                                                       tmp_path):
    from transformers import AutoModelForCausalLM
    run_dir = tmp_path / "bitnet"
    llm_finetune.main(finetune_args(model_dirs["llama"], data_file, run_dir, "--quantize", "bitnet",
                                    "--n_steps", "10"))
    # The FP32 latent weights of a CPU run: each forward ternarizes them.
    assert_config_dtype_is_the_tensors(run_dir / "hf_model", "bitnet.safetensors", "float32")
    with pytest.raises(OSError):  # transformers alone does not take it for a plain Llama
        AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")

    trained = trained_model(model_dirs["llama"], run_dir, quantize="bitnet")
    model, tokenizer = load_finetuned(run_dir)
    tokens = tokenizer([TEMPLATE.replace("{prompt}", "reverse apple river stone")], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, trained.eval()(tokens).logits)
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    generated = model.generate(tokens, **generate)
    assert generated.shape == (1, tokens.shape[1] + 4) and torch.equal(generated, trained.generate(tokens, **generate))


def test_a_bitnet_export_loads_with_the_linears_the_run_quantized(model_dirs, tmp_path, monkeypatch):
    """On a GPU the small-layer rule leaves some linears in high precision; the export names the quantized ones,
    so the model loads back the same wherever it is loaded (on the CPU, the rule quantizes every linear)."""
    import qt
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qt.training.distributed import Dist
    from qt.training.export import export_finetuned
    trained = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    with monkeypatch.context() as rule_on_cpu:
        rule_on_cpu.setattr(qt.quantize, "SMALL_LINEAR_DEVICES", ("cpu",))
        rule_on_cpu.setitem(qt.SMALL_LINEAR_MIN_SHAPE, "bitnet", qt.MinShape(trained.config.intermediate_size, 0))
        llm_finetune.prepare_model(trained, llm_finetune.FinetuneConfig(model=str(model_dirs["llama"]),
                                                                        quantize="bitnet"))
    quantized = {name for name, m in trained.named_modules() if isinstance(getattr(m, "weight", None), qt.QuantizedWeight)}
    assert quantized == {f"model.layers.{i}.mlp.down_proj.1" for i in range(trained.config.num_hidden_layers)}
    export_finetuned(trained, AutoTokenizer.from_pretrained(model_dirs["llama"]), tmp_path / "hf_model",
                     Dist(0, 1, torch.device("cpu")), recipe="bitnet", include_head=False, weight_dtype=torch.float32)
    model, _ = load_finetuned(tmp_path)
    assert {name for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), qt.QuantizedWeight)} == quantized
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, trained.eval()(tokens).logits)


def test_a_bitnet_run_with_plain_layers_resumes_and_exports_with_its_structure(model_dirs, data_file, tmp_path,
                                                                               monkeypatch, capsys):
    """A run whose quantize_ left every linear of layer 1 in high precision (as the small-layer rule does on a GPU)
    trains layer 1 as a plain Llama layer, resumes exactly, and loads back with the same structure where every
    linear would be quantized (quantize_ as it is on the CPU)."""
    import qt
    quantize_ = qt.quantize_
    like_a_gpu = lambda model, recipe, **kwargs: quantize_(  # noqa: E731
        model, recipe, **kwargs, filter_fn=lambda module, name: name.startswith("model.layers.0."))
    monkeypatch.setattr(qt, "quantize_", like_a_gpu)
    flags = ["--quantize", "bitnet", "--n_steps", "6", "--log_interval", "1", "--eval_interval", "3"]
    whole = tmp_path / "whole"
    llm_finetune.main(finetune_args(model_dirs["llama"], data_file, whole, *flags))
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.startswith("llama-reverse-bitnet: bitnet on 7 of 15 linears; left in high precision: ")
    assert summary.endswith("; BitNet's SubLN in 1 of 2 decoder layers (1 with no BitNet linear stay plain Llama "
                            "layers)")
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as stop:
        sigterm_during_step(stop, InstructBatches, 4)
        with pytest.raises(SystemExit):
            llm_finetune.main(finetune_args(model_dirs["llama"], data_file, stopped, *flags))
    llm_finetune.main(["--run_dir", str(stopped), "--resume"])
    assert without_timings(read_metrics(stopped)) == without_timings(read_metrics(whole))

    trained = trained_model(model_dirs["llama"], whole, quantize="bitnet").eval()
    assert "model.layers.1.input_layernorm.weight" in trained.state_dict()
    assert "model.layers.0.self_attn.k_proj.0.weight" in trained.state_dict()
    monkeypatch.undo()
    model, _ = load_finetuned(whole)
    assert model.state_dict().keys() == trained.state_dict().keys()
    quantized = lambda m: {name for name, module in m.named_modules()  # noqa: E731
                           if isinstance(getattr(module, "weight", None), qt.QuantizedWeight)}
    assert quantized(model) == quantized(trained) == {f"model.layers.0.{path}.1" for path in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, trained(tokens).logits)

    # A checkpoint of a GPU run does not resume on the CPU, where quantize_ takes every linear: a clear error.
    manifest = whole / "checkpoints" / "step_00000006" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"device": "cpu"', '"device": "cuda"'))
    with pytest.raises(CheckpointError, match=r"Missing key .*model.layers.1.self_attn.q_proj.0.weight; it was saved "
                                              r"on cuda and this run is on cpu, .*: resume it on cuda$"):
        trained_model(model_dirs["llama"], whole, quantize="bitnet")
