"""Training infrastructure shared by the project's entry points (llm_pretrain.py and later fine-tuning
scripts): flags and YAML config, token shards, the one training loop, checkpoints, metrics, distributed setup.

The training loop knows nothing about language models: it takes a model, an optimizer, a batch iterator
and a loss function. Everything LLM-specific lives in `data.py`, `models.py` and `llm_pretrain.py`.
"""
