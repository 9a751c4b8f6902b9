"""How close bitnet's INT8 backward gradients come to its straight-through BF16 gradients, per linear, on a small
BitNet Llama trained briefly on the corpus: grad_input from dY by rows, grad_weight from (s * dY) by columns over
all tokens (int8_backward), and alternatives for grad_weight: per-128-token blocks, stochastic rounding; since round
22 also grad_weight as `grad_weight_token_blocks=True` computes it (qt's quantize_int8 k_blocks and scaled_int8_mm).

The record of a one-off CPU analysis (docs/benchmarks.md, round 21), not part of the package or its tests:
    python docs/probes/bitnet_int8_backward_gradients.py STEPS CAPTURE_SEQUENCES [TRAIN_TOKENS_BIN]
Round 21 ran `150 16` and `150 64` (12 min each on 2 cores); the outputs are beside this file."""
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import qt
from qt.kernels import quantize_int8, scaled_int8_mm, to_column_major
from qt.recipes.bitnet import ternarize

torch.manual_seed(0)
torch.set_num_threads(2)
cfg = LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg)
qt.quantize_(model, "bitnet", min_shape=None)
qt.convert_llama_to_bitnet(model)
tokens = np.fromfile(sys.argv[3] if len(sys.argv) > 3 else ".carry/corpus32k/train_000000.bin", dtype=np.uint16)
SEQ, BATCH = 256, 16
CAPTURE_BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else BATCH  # sequences of the batch the gradients come from
def batch(i, size=BATCH):
    rng = np.random.default_rng(i)
    starts = rng.integers(0, len(tokens) - SEQ - 1, size)
    x = torch.from_numpy(np.stack([tokens[s:s + SEQ + 1] for s in starts]).astype(np.int64))
    return x[:, :-1], x[:, 1:]
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 150
t0 = time.time()
for step in range(STEPS):
    inp, tgt = batch(step)
    loss = torch.nn.functional.cross_entropy(model(input_ids=inp).logits.flatten(0, 1), tgt.flatten())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 25 == 0 or step == STEPS - 1:
        print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)

# Capture each BitNet linear's input X and output gradient dY on one batch.
captured = {}
def hooks(name, mod):
    def fwd(m, args, out):
        captured.setdefault(name, {})["x"] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
    def bwd(m, gin, gout):
        captured[name]["dy"] = gout[0].detach().reshape(-1, gout[0].shape[-1]).float()
    mod.register_forward_hook(fwd); mod.register_full_backward_hook(bwd)
for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and isinstance(mod.weight, qt.subclass.QuantizedWeight):
        hooks(name, mod)
inp, tgt = batch(10_000, CAPTURE_BATCH)
print(f"gradients of one batch of {CAPTURE_BATCH} x {SEQ} tokens")
loss = torch.nn.functional.cross_entropy(model(input_ids=inp).logits.flatten(0, 1), tgt.flatten())
loss.backward()

def sqnr(a, ref):
    return (10 * torch.log10(ref.double().pow(2).sum() / (a.double() - ref.double()).pow(2).sum())).item()
def fq(t, axis, sr=False):  # fake-quantized, as the kernels do
    q, s = quantize_int8(t, axis, sr)
    return q.float() * s.float()
def fq_blocks(t, block):  # columns of t [T, N] quantized per block of `block` rows (tokens)
    T = t.shape[0]
    pad = -T % block
    tb = torch.nn.functional.pad(t, (0, 0, 0, pad)).view(-1, block, t.shape[1])
    amax = tb.abs().amax(1, keepdim=True).clamp(min=1e-12)
    return (torch.round(tb / amax * 127) * amax / 127).view(-1, t.shape[1])[:T]

rows = []
for name, c in captured.items():
    x, dy = c["x"], c["dy"]
    w = dict(model.named_modules())[name].weight
    wt, ws = ternarize(w.latent.detach())
    xq, xs = quantize_int8(x, 1)
    x_ste = xq.float() * xs.float()             # BitNet's X as the forward used it
    gw_ref = dy.T @ x_ste                       # straight-through grad_weight (what BF16 computes)
    gx_ref = dy @ (wt.float() * ws)
    sdy = dy * xs.float()                       # X's per-token scales folded into dY
    gw_cols = (fq(sdy, 0)).T @ xq.float()
    gw_cols_sr = (fq(sdy, 0, True)).T @ xq.float()
    gw_b128 = fq_blocks(sdy, 128).T @ xq.float()
    gw_b32 = fq_blocks(sdy, 32).T @ xq.float()
    dy_q, dy_s = quantize_int8(dy, 0, row_multipliers=xs, k_blocks=True)  # grad_weight_token_blocks' math
    gw_recipe = scaled_int8_mm(dy_q.T, to_column_major(xq), dy_s.T, xs.new_ones(1, x.shape[1]))
    gx_rows = fq(dy, 1) @ (wt.float() * ws)
    tok_norm = dy.norm(dim=1)
    spread = (tok_norm.quantile(0.99) / tok_norm.median()).item()
    rows.append((name, sqnr(gx_rows, gx_ref), sqnr(gw_cols, gw_ref), sqnr(gw_cols_sr, gw_ref), sqnr(gw_b128, gw_ref),
                 sqnr(gw_b32, gw_ref), sqnr(gw_recipe, gw_ref), spread))
print(f"{'linear':42s} {'gx rows':>8s} {'gw cols':>8s} {'gw SR':>8s} {'gw b128':>8s} {'gw b32':>8s} {'gw qt b128':>10s} "
      f"{'dY p99/med':>10s}")
for r in rows:
    print(f"{r[0]:42s} " + " ".join(f"{v:8.1f}" for v in r[1:6]) + f" {r[6]:10.1f} {r[7]:10.1f}")
means = np.array([r[1:] for r in rows]).mean(0)
print(f"{'mean':42s} " + " ".join(f"{v:8.1f}" for v in means[:5]) + f" {means[5]:10.1f} {means[6]:10.1f}")
