"""BitNet b1.58 against a float64 reference of its math; packing; the Llama surgery."""

import pytest
import torch

import qt
from tests.recipes.linear_harness import SAME_MATH_TOL, SHAPES, identity, make_case, reference, run_linear
from tests.reference import fake_quant_int8, rel_err, sqnr_db, ternary_fake_quant


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bitnet_high_precision_backward_matches_reference(shape, bias):
    """int8_backward=False: BitNet b1.58's own backward, straight through in the compute dtype."""
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    qt.quantize_(linear, "bitnet", int8_backward=False, filter_fn=lambda m, n: True)
    out, gx, gw, gb = run_linear(linear, x, dy)

    def x_q(t):
        return fake_quant_int8(t.float(), 1)

    # Straight-through estimator: the gradients use the quantized operands the forward used.
    ref_out, ref_gx, ref_gw = reference(w, b, x, dy, x_q, ternary_fake_quant, identity, ternary_fake_quant,
                                        identity, x_q)
    assert rel_err(out, ref_out) < SAME_MATH_TOL
    assert rel_err(gx, ref_gx) < SAME_MATH_TOL
    assert rel_err(gw, ref_gw) < SAME_MATH_TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bitnet_default_int8_backward_matches_reference(shape, bias):
    """The default (int8_backward): the same forward; grad_input from dY by rows against the exact ternary W;
    grad_weight from X's codes, X's per-token scales s folded into dY before its column-wise quantization:
    (Q(s * dY) / s).T @ (s * X's codes)."""
    linear, x, dy = make_case(shape, bias)
    w, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    qt.quantize_(linear, "bitnet", filter_fn=lambda m, n: True)
    got = run_linear(linear, x, dy)

    def rows(t):
        return fake_quant_int8(t.float(), 1)

    s = (x.reshape(-1, x.shape[-1]).abs().amax(1, keepdim=True) / 127).double()
    expected = reference(w, b, x, dy, rows, ternary_fake_quant, rows, ternary_fake_quant,
                         lambda t: fake_quant_int8(s * t, 0) / s, rows)
    for name, actual, want in zip(("output", "grad_input", "grad_weight"), got[:3], expected):
        assert rel_err(actual, want) < SAME_MATH_TOL, name


def test_bitnet_int8_backward_gives_the_high_precision_output_and_a_gradient_close_to_it():
    linear, x, dy = make_case((64,), bias=False, in_features=96, out_features=80)
    high_precision = __import__("copy").deepcopy(linear)
    qt.quantize_(high_precision, "bitnet", int8_backward=False, filter_fn=lambda m, n: True)
    qt.quantize_(linear, "bitnet", filter_fn=lambda m, n: True)
    (out, gx, gw, _), (want_out, want_gx, want_gw, _) = run_linear(linear, x, dy), run_linear(high_precision, x, dy)
    assert torch.equal(out, want_out)
    assert sqnr_db(gx, want_gx) > 30 and sqnr_db(gw, want_gw) > 30


def test_an_unsharded_bitnet_weight_keeps_its_config():
    """FSDP2's ternary all-gather rebuilds the weight with the shard's config: its plan (int8_backward) holds."""
    from qt.recipes.bitnet import BITNET_INT8_BACKWARD_PLAN, BitNetTernaryWeight, BitNetWeight, pack_ternary, ternarize

    latent = torch.randn(8, 12)
    config = qt.resolve_recipe("bitnet", ternary_all_gather=True)
    ternary, w_scale = ternarize(latent)
    weight, _ = BitNetWeight(latent, config).fsdp_post_all_gather((pack_ternary(ternary),), (w_scale, 12),
                                                                   torch.float32)
    assert type(weight) is BitNetTernaryWeight and weight.plan is BITNET_INT8_BACKWARD_PLAN
    assert weight._to("cpu", None).plan is BITNET_INT8_BACKWARD_PLAN


def test_pack_unpack_ternary_round_trips_odd_widths():
    from qt.recipes.bitnet import pack_ternary, unpack_ternary

    ternary = torch.randint(-1, 2, (6, 13), dtype=torch.int8)
    packed = pack_ternary(ternary)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 4)
    assert torch.equal(unpack_ternary(packed, 13), ternary)


def test_convert_llama_to_bitnet_moves_the_norms():
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 8))
    qt.quantize_(model, "bitnet")
    qt.convert_llama_to_bitnet(model)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    assert isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(proj, torch.nn.Sequential) and type(proj[0]).__name__ == "LlamaRMSNorm"
        assert isinstance(proj[1], torch.nn.Linear)
    assert isinstance(layer.mlp.down_proj[1].weight, qt.QuantizedWeight)
    assert not isinstance(model.lm_head.weight, qt.QuantizedWeight)
    assert torch.isfinite(model(input_ids=tokens).logits).all()
    with pytest.raises(ValueError, match="already been converted"):
        qt.convert_llama_to_bitnet(model)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def is_converted(layer) -> bool:
    """A BitNet layer: a SubLN before each of its linears and no layer norms; a plain one: neither."""
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    subln = [isinstance(layer.get_submodule(path), torch.nn.Sequential) for path in LINEARS]
    if all(subln) and all(isinstance(norm, torch.nn.Identity) for norm in norms):
        return True
    assert not any(subln) and not any(isinstance(norm, torch.nn.Identity) for norm in norms)
    return False


def test_only_the_layers_with_a_bitnet_linear_are_converted_and_a_plain_one_computes_as_before():
    """Layer 0 has one BitNet linear (q_proj): all its linears get a SubLN. Layer 2 has none: it stays the
    plain Llama layer it was, computing the same bits."""
    import copy

    from tests.tiny_models import tiny_llama

    plain = tiny_llama(num_hidden_layers=3)
    model = copy.deepcopy(plain)
    qt.quantize_(model, "bitnet", filter_fn=lambda m, name: name in ("model.layers.0.self_attn.q_proj",
                                                                      "model.layers.1.mlp.down_proj"))
    qt.convert_llama_to_bitnet(model)
    assert [is_converted(layer) for layer in model.model.layers] == [True, True, False]
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj[1].weight, qt.QuantizedWeight)
    assert not isinstance(layer.self_attn.k_proj[1].weight, qt.QuantizedWeight)  # normed all the same
    assert qt.recipes.bitnet.converted_layers(model.state_dict()) == [0, 1]

    seen = {}
    model.model.layers[2].register_forward_hook(lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs,
                                                                                        out=out), with_kwargs=True)
    model(input_ids=torch.randint(0, 128, (2, 8)))
    assert torch.equal(plain.model.layers[2](*seen["args"], **seen["kwargs"]), seen["out"])
    assert model.model.layers[2].state_dict().keys() == plain.model.layers[2].state_dict().keys()


def test_a_model_whose_linears_quantize_all_left_in_high_precision_stays_a_plain_llama():
    """The 124M Llama on a GPU: every linear below the small-layer rule, so no layer gets BitNet's norms."""
    from tests.tiny_models import tiny_llama

    model, plain = tiny_llama(), tiny_llama()
    qt.quantize_(model, "bitnet", min_shape=(1024, 1024))
    qt.convert_llama_to_bitnet(model)
    assert [is_converted(layer) for layer in model.model.layers] == [False, False]
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_convert_llama_to_bitnet_before_quantize_is_refused_unless_every_layer_is_asked_for():
    from tests.tiny_models import tiny_llama

    model = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r'qt.quantize_\(model, "bitnet"\) first, then this \(or pass layers="all"'):
        qt.convert_llama_to_bitnet(model)
    assert not any(is_converted(layer) for layer in model.model.layers)  # left as it was
    qt.convert_llama_to_bitnet(model, layers="all")
    assert all(is_converted(layer) for layer in model.model.layers)
    assert qt.recipes.bitnet.converted_layers(model.state_dict()) == [0, 1, 2]


def test_convert_llama_to_bitnet_takes_layer_indices_such_as_those_of_a_saved_model():
    from tests.tiny_models import tiny_llama

    model = tiny_llama(num_hidden_layers=3)
    qt.convert_llama_to_bitnet(model, layers=[2, 0])
    assert [is_converted(layer) for layer in model.model.layers] == [True, False, True]
    fresh = tiny_llama(num_hidden_layers=3)
    qt.convert_llama_to_bitnet(fresh, layers=qt.recipes.bitnet.converted_layers(model.state_dict()))
    fresh.load_state_dict(model.state_dict())  # strict: the same structure
    with pytest.raises(ValueError, match=r"decoder layers 0 to 2, not \[3\]"):
        qt.convert_llama_to_bitnet(tiny_llama(num_hidden_layers=3), layers=[1, 3])
    with pytest.raises(ValueError, match=r"layers='some': pass \"quantized\", \"all\" or the indices"):
        qt.convert_llama_to_bitnet(tiny_llama(), layers="some")


def test_convert_llama_to_bitnet_refuses_other_models():
    with pytest.raises(ValueError, match="supports Hugging Face LlamaForCausalLM.*got Sequential"):
        qt.convert_llama_to_bitnet(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# TinyLlama-1.1B's proportions, 8 times narrower: intermediate 2.75 x hidden, k/v projections hidden / 8 wide. With
# min_shape=(256, 256) k/v stay in BF16, as TinyLlama's do on a GPU by the small-layer rule.
TINYLLAMA_EIGHTH = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 8, "num_key_value_heads": 1,
                    "num_hidden_layers": 1}


def tinyllama_shaped(recipe, subln="recomputed"):
    """A one-layer BF16 Llama of TinyLlama's proportions, plain ("bf16") or converted for BitNet, with the SubLNs
    of `SubLNLinear` or (subln="kept") as the surgery made them before it: a plain nn.Sequential(norm, linear)."""
    from tests.tiny_models import tiny_llama

    model = tiny_llama(**TINYLLAMA_EIGHTH).to(torch.bfloat16)
    if recipe == "bitnet":
        qt.quantize_(model, "bitnet", min_shape=(256, 256))
        qt.convert_llama_to_bitnet(model)
        assert not isinstance(model.model.layers[0].self_attn.k_proj[1].weight, qt.QuantizedWeight)
        if subln == "kept":
            for name, module in list(model.named_modules()):
                if isinstance(module, qt.recipes.bitnet.SubLNLinear):
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, torch.nn.Sequential(*module))
    return model


def saved_bytes(model, forward):
    """forward()'s result and the bytes of the tensors it saves for the backward, each storage once, the model's
    parameters left out."""
    params = {t.untyped_storage().data_ptr() for p in model.parameters()
              for t in ([getattr(p, n) for n in p._inner_names] if isinstance(p, qt.QuantizedWeight) else [p])}
    storages = {}

    def pack(t):
        if not isinstance(t, qt.QuantizedWeight) and t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(storages.values())


def assert_same_bits(model, reference, forward):
    """forward(model) and forward(reference) give the same output and gradients to the bit; returns the bytes each
    saved for the backward."""
    results = []
    for m in (model, reference):
        out, nbytes = saved_bytes(m, lambda m=m: forward(m))
        out.float().square().mean().backward()
        results.append((out.detach(), [p.grad for p in m.parameters() if p.grad is not None], nbytes))
    (out, grads, nbytes), (ref_out, ref_grads, ref_nbytes) = results
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    return nbytes, ref_nbytes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_subln_before_a_high_precision_linear_computes_the_same_bits_as_one_that_keeps_its_output(checkpointing):
    """k/v stay in BF16: their SubLNs' outputs are recomputed in the backward (eager here; under the model's own
    activation checkpointing too) with the numbers of the SubLNs that kept them."""
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    model, reference = tinyllama_shaped("bitnet"), tinyllama_shaped("bitnet", subln="kept")
    if checkpointing:
        for m in (model, reference):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
    nbytes, ref_nbytes = assert_same_bits(model, reference, lambda m: m(input_ids=tokens).logits)
    if not checkpointing:  # eager, k/v's SubLNs no longer keep their float32 copies of the input
        assert nbytes < ref_nbytes


def opaque(implementation, fake):
    """`implementation` (typed, as torch.library.custom_op needs) as the op qt_tests::<its name>: one opaque node in a
    compiled graph, as qt's ops are on a GPU, where they launch Triton kernels that torch.compile's partitioner can
    neither fuse into nor recompute. On the CPU their torch ops are traced instead, and the partitioner saves and
    recomputes around them as it does in no GPU graph. Traced so, qt's matmul led it to keep the SwiGLU product
    for the down projection's SubLN (4 GB at TinyLlama's shape), which GPU runs do not: bitnet's peak memory stayed
    32.67 GB there (docs/benchmarks.md, round 16)."""
    name = implementation.__name__
    if not hasattr(torch.ops.qt_tests, name):
        torch.library.custom_op(f"qt_tests::{name}", implementation, mutates_args=()).register_fake(fake)
    return getattr(torch.ops.qt_tests, name)


def opaque_quantize_int8(x: torch.Tensor, axis: int, seed: torch.Tensor | None, row_multipliers: torch.Tensor | None,
                         col_amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    from qt.kernels.quantize import _torch_quantize_int8
    return tuple(t.clone() for t in _torch_quantize_int8(x, axis, seed, row_multipliers, col_amax))


def opaque_scaled_int8_mm(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                          out_dtype: torch.dtype, kernel: str) -> torch.Tensor:
    from qt.kernels.int8_mm import _torch_scaled_int8_mm
    return _torch_scaled_int8_mm(a, b, row_scale, col_scale, out_dtype)


def test_a_compiled_bitnet_decoder_layer_saves_no_more_than_a_bf16_one(monkeypatch):
    """On TinyLlama-1.1B's shape, bitnet's peak memory was above BF16's (35.62 GB against 34.69 on an H100): its
    compiled decoder layer saved 58,266 bytes a token against BF16's 55,688 (counted on the CPU as a GPU compiles
    it), k/v's SubLN outputs among them. Now it saves less than BF16's, and computes the same bits as before.
    Compiled by the aot_eager_decomp_partition backend: Inductor's decompositions and partitioner, hence Inductor's
    saved tensors (the same bytes for all three layers here), without its code generation, in seconds; qt's
    kernels opaque, as on a GPU (a linear's input quantized in torch ops by default, QT_COMPILED_QUANTIZE)."""
    from qt.kernels.quantize import _empty_outputs

    monkeypatch.setattr(torch.ops.qt, "quantize_int8", opaque(
        opaque_quantize_int8, lambda x, axis, seed, row_multipliers, col_amax: _empty_outputs(x, axis)))
    monkeypatch.setattr(torch.ops.qt, "scaled_int8_mm", opaque(
        opaque_scaled_int8_mm, lambda a, b, row_scale, col_scale, out_dtype, kernel: a.new_empty(
            (a.shape[0], b.shape[1]), dtype=out_dtype)))
    torch._dynamo.reset()
    x = torch.randn(1, 64, 256, dtype=torch.bfloat16)

    def compiled_layer(model):
        layer, rotary = model.model.layers[0], model.model.rotary_emb
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager_decomp_partition")
        return lambda x: compiled(x, position_embeddings=rotary(x, torch.arange(x.shape[1])[None]))

    bf16 = tinyllama_shaped("bf16")
    _, bf16_bytes = saved_bytes(bf16, lambda: compiled_layer(bf16)(x.clone().requires_grad_()))
    bitnet, kept = tinyllama_shaped("bitnet"), tinyllama_shaped("bitnet", subln="kept")
    layers = {m: compiled_layer(m) for m in (bitnet, kept)}
    inputs = {m: x.clone().requires_grad_() for m in (bitnet, kept)}
    bitnet_bytes, kept_bytes = assert_same_bits(bitnet, kept, lambda m: layers[m](inputs[m]))
    assert torch.equal(inputs[bitnet].grad, inputs[kept].grad)
    assert kept_bytes > bf16_bytes  # as before
    assert bitnet_bytes <= bf16_bytes, (bitnet_bytes, bf16_bytes)
