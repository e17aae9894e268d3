"""Property tests of lora_gpt2.py: the laws of LoRA and of GPT-2, each test named for its law.

The file opens with the five laws the project rests on, one test each:

    1. Parameter count   n_layer × 2 × (n_embd + n_embd) × r trainable parameters, no more.
                         test_lora_parameter_count_formula_equals_trainable_parameters
    2. Merged = unmerged W0 x + (α/r)·B(A x) equals (W0 + (α/r)·BA) x.
                         test_merged_output_equals_unmerged_output
    3. Rank 0 baseline   fresh adapters (B = 0) give the plain GPT-2's logits.
                         test_fresh_adapters_reproduce_the_rank0_model
    4. Conv1D transpose  a fan_in_fan_out layer stores W as (in, out) and computes x W + b.
                         test_fan_in_fan_out_layer_computes_x_w_plus_b_like_conv1d
    5. Q and V only      adapters on c_attn change the query and value projections, never the key.
                         test_lora_on_c_attn_changes_q_and_v_and_never_k

Then the rest of the library's math: LoRA layers (shapes, init, merging, dropout), the model
(causality, tying, the cache, generation), microsoft's loss and accuracy, bad input, and the
oracles (Hugging Face transformers' logits, microsoft's loralib layers), which skip cleanly
without their packages. Hypothesis draws shapes, ranks, alphas, enable_lora patterns, layouts
and dtypes; conftest.py picks a derandomized profile when CI is set.
"""

import copy
import json
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import given, settings
from hypothesis import strategies as st


import lora_gpt2 as L

from helpers import (dtypes, enable_patterns, lora_layers, make_layer, needs_safetensors,
                     randomize_lora, ranks, seeds, tiny_configs, tiny_model, token_batch,
                     tolerance)


# ---- the laws ----

@given(config=tiny_configs())
def test_lora_parameter_count_formula_equals_trainable_parameters(config):
    """n_layer × 2 × (n_embd + n_embd) × r is exactly what mark_only_lora_as_trainable leaves
    trainable, for any sizes and rank."""
    model = tiny_model(config)
    L.mark_only_lora_as_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == L.lora_parameter_count(config)


@given(layer_x=lora_layers(merge_weights=False))
def test_merged_output_equals_unmerged_output(layer_x):
    """W0 x + scaling·B A x computed in two thin products (with or without autograd) equals
    (W0 + scaling·ΔW) x, for Linear and MergedLinear, every enable_lora pattern, both layouts,
    float32 and float64."""
    layer, x = layer_x
    layer.eval()  # a merged layer in training mode refuses to run with gradients
    unmerged = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=0)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, **tolerance(x.dtype))


@given(config=tiny_configs(min_rank=1), seed=seeds)
def test_fresh_adapters_reproduce_the_rank0_model(config, seed):
    """A rank-r model with fresh adapters (B = 0) gives the same logits as the rank-0 model with
    the same base weights, and a rank-0 state dict loads into it with only LoRA keys missing."""
    base = tiny_model(L.GPT2Config.from_dict({**config.to_dict(), "lora_attn_dim": 0}), seed).eval()
    lora = tiny_model(config, seed + 1).eval()
    result = lora.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("lora_" in k for k in result.missing_keys)
    ids = token_batch(config, seed)
    torch.testing.assert_close(lora(ids)[0], base(ids)[0], rtol=0, atol=0)


@given(in_f=st.integers(1, 10), out_f=st.integers(1, 10), dtype=dtypes, seed=seeds)
def test_fan_in_fan_out_layer_computes_x_w_plus_b_like_conv1d(in_f, out_f, dtype, seed):
    """A fan_in_fan_out layer storing W as (in, out) computes x·W + b, the same as
    F.linear(x, Wᵀ, b) and as GPT-2's Conv1D holding W."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(in_f, out_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype)
    x = torch.randn(2, 3, in_f, generator=g, dtype=dtype)
    layer = L.Linear(in_f, out_f, fan_in_fan_out=True).to(dtype)
    conv = L.Conv1D(out_f, in_f).to(dtype)
    with torch.no_grad():
        for m in (layer, conv):
            m.weight.copy_(W)
            m.bias.copy_(b)
    tol = tolerance(dtype)
    torch.testing.assert_close(layer(x), x @ W + b, **tol)
    torch.testing.assert_close(layer(x), F.linear(x, W.T, b), **tol)
    torch.testing.assert_close(conv(x), x @ W + b, **tol)


@given(config=tiny_configs(min_rank=1), seed=seeds)
def test_lora_on_c_attn_changes_q_and_v_and_never_k(config, seed):
    """For any A and B, the K third of c_attn's output equals the frozen projection's; Q and V
    move by exactly scaling·x AᵀBᵀ of their own group."""
    attn = tiny_model(config).transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, config.n_embd, generator=torch.Generator().manual_seed(seed))
    base = F.linear(x, attn.weight.T, attn.bias)
    randomize_lora(attn, seed)
    out = attn(x)
    with torch.no_grad():  # the inference path (in-place slice adds) obeys the same law
        torch.testing.assert_close(attn(x), out, rtol=0, atol=0)
    C, r = config.n_embd, config.lora_attn_dim
    torch.testing.assert_close(out[..., C:2 * C], base[..., C:2 * C], rtol=0, atol=0)
    for j, g in enumerate((0, 2)):  # Q is group 0, V is group 2
        A, B = attn.lora_A[j * r:(j + 1) * r], attn.lora_B[j * C:(j + 1) * C]
        expected = base[..., g * C:(g + 1) * C] + attn.scaling * (x @ A.T @ B.T)
        torch.testing.assert_close(out[..., g * C:(g + 1) * C], expected, rtol=1e-4, atol=1e-5)


# ---- 1. parameter counts ---------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_bias_modes(bias):
    """'none': only lora_A/lora_B train; 'all': every bias too; 'lora_only': the biases of layers
    that carry LoRA (c_attn) too."""
    config = L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=8, n_layer=2, n_head=2,
                          lora_attn_dim=2)
    model = tiny_model(config)
    L.mark_only_lora_as_trainable(model, bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    expected = {"none": lora,
                "all": lora | {n for n, _ in model.named_parameters() if n.endswith(".bias")},
                "lora_only": lora | {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}}[bias]
    assert trainable == expected


@pytest.mark.parametrize("preset, total", [("gpt2.sm", 124_439_808), ("gpt2.md", 354_823_168),
                                           ("gpt2.lg", 774_030_080), ("gpt2.xl", 1_557_611_200)])
def test_preset_total_parameter_counts_match_published_gpt2(preset, total):
    """Each preset has exactly the published GPT-2 parameter count (head tied, so counted once)."""
    with torch.device("meta"):  # shapes only, no memory
        model = L.GPT2LMModel(L.GPT2Config.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == total


def test_gpt2_medium_rank4_trains_393216_parameters():
    """The worked example of the README and the LoRA paper's setting: gpt2.md at r = 4 trains
    393,216."""
    config = L.GPT2Config.from_preset("gpt2.md", lora_attn_dim=4)
    with torch.device("meta"):
        model = L.GPT2LMModel(config)
    L.mark_only_lora_as_trainable(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 393_216
    assert L.lora_parameter_count(config) == 393_216


# ---- 2. LoRA layers: shapes, init, merging ---------------------------------------------------

@given(enable=enable_patterns(), d=st.integers(1, 5), in_f=st.integers(1, 9), r=ranks,
       fifo=st.booleans())
def test_lora_parameter_shapes_follow_loralib(enable, d, in_f, r, fifo):
    """Linear: A (r, in), B (out, r); MergedLinear: A (r·m, in), B (out/k·m, r); weight (out, in),
    or (in, out) with fan_in_fan_out; B starts at zero and only the weight is frozen."""
    k, m = len(enable), sum(enable)
    layer = L.MergedLinear(in_f, k * d, r=r, enable_lora=enable, fan_in_fan_out=fifo)
    assert layer.lora_A.shape == (r * m, in_f)
    assert layer.lora_B.shape == (d * m, r)
    assert layer.weight.shape == ((in_f, k * d) if fifo else (k * d, in_f))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert [n for n, p in layer.named_parameters() if not p.requires_grad] == ["weight"]
    lin = L.Linear(in_f, d, r=r, fan_in_fan_out=fifo)
    assert lin.lora_A.shape == (r, in_f) and lin.lora_B.shape == (d, r)
    assert lin.weight.shape == ((in_f, d) if fifo else (d, in_f))


@given(layer_x=lora_layers(merge_weights=False))
def test_merge_then_unmerge_restores_w0_and_repeats_are_no_ops(layer_x):
    """merge() adds scaling·ΔW once however often it is called; unmerge() takes it back out."""
    layer, _ = layer_x
    w0 = layer.weight.detach().clone()
    layer.merge()
    once = layer.weight.detach().clone()
    assert not torch.equal(once, w0)
    layer.merge()
    assert torch.equal(layer.weight, once)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, **tolerance(w0.dtype))
    after = layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.weight, after)


@given(layer_x=lora_layers(merge_weights=False), low=st.booleans(), assign=st.booleans())
def test_merging_never_changes_a_tensor_the_caller_holds(layer_x, low, assign):
    """A state dict taken before merge_lora, and the source of load_state_dict(assign=True), keep
    their values through merge and unmerge (loralib adds ΔW into them in place), in float32,
    float64 and bfloat16: saving that state dict and merging again never counts ΔW twice."""
    layer, x = layer_x
    if low:
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    held = layer.state_dict()
    if assign:
        held = {k: v.clone() for k, v in held.items()}
        layer.load_state_dict(held, assign=True)
    copies = {k: v.clone() for k, v in held.items()}
    layer.merge()
    layer.unmerge()
    layer.merge()
    for k in held:
        assert torch.equal(held[k], copies[k]), k
    model = L.GPT2LMModel(L.GPT2Config(vocab_size=11, n_positions=4, n_ctx=4, n_embd=4, n_layer=1,
                                       n_head=1, lora_attn_dim=1))
    randomize_lora(model, 1)
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    L.merge_lora(model)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


@given(layer_x=lora_layers(merge_weights=True))
def test_eval_merges_and_train_unmerges_with_merge_weights(layer_x):
    """With merge_weights=True, eval() folds ΔW into W (same outputs) and train() restores W0."""
    layer, x = layer_x
    w0, y = layer.weight.detach().clone(), layer(x)
    layer.eval()
    assert layer.merged and not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y, **tolerance(x.dtype))
    layer.eval()  # a second eval() must not merge again
    torch.testing.assert_close(layer(x), y, **tolerance(x.dtype))
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0, **tolerance(w0.dtype))


@given(layer_x=lora_layers(merge_weights=True), load_into_eval=st.booleans())
def test_merged_layer_survives_state_dict_round_trip_without_double_merge(layer_x, load_into_eval):
    """A state dict saved from a merged layer holds W0, so loading it (into a merged or unmerged
    layer) and calling eval() gives the original outputs, never W0 + 2·ΔW."""
    layer, x = layer_x
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.eval()
    sd = layer.state_dict()
    torch.testing.assert_close(sd["weight"], w0, **tolerance(w0.dtype))
    fresh = copy.deepcopy(layer).train()
    with torch.no_grad():
        fresh.weight.normal_()
        fresh.lora_A.zero_()  # nothing of the old values may survive the load
    if load_into_eval:
        fresh.eval()
    fresh.load_state_dict(sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), y, **tolerance(x.dtype))
    fresh.train()
    torch.testing.assert_close(fresh.weight.detach(), w0, **tolerance(w0.dtype))


@given(layer_x=lora_layers(merge_weights=True), seed=seeds)
def test_loading_lora_only_weights_into_merged_layer_remerges_with_new_adapter(layer_x, seed):
    """Loading new A, B into a merged layer gives W0 + scaling·ΔW_new, not W0 + ΔW_old + ΔW_new."""
    layer, x = layer_x
    other = copy.deepcopy(layer)
    randomize_lora(other, seed + 1)
    expected = other(x)  # unmerged, new adapter
    layer.eval()
    layer.load_state_dict({k: v for k, v in other.state_dict().items() if "lora_" in k},
                          strict=False)
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, **tolerance(x.dtype))


class OpShapes(TorchDispatchMode):
    """Records the shape of every tensor that a non-view operation creates."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.add(tuple(t.shape))
        return out


@given(enable=enable_patterns(), r=st.integers(1, 3), in_f=st.sampled_from([5, 7]),
       d=st.sampled_from([11, 13]), fifo=st.booleans(),
       kind=st.sampled_from(["Linear", "MergedLinear"]))
def test_unmerged_forward_and_backward_never_create_a_delta_w_sized_tensor(enable, r, in_f, d,
                                                                           fifo, kind):
    """Training never pays for the (out × in) ΔW (loralib's cost): no operation of the forward or
    backward pass creates a tensor of the shape of ΔW or of a group's block of it. The sizes are
    primes that no legitimate product (N × out, N × r·m, r·m × in, d × r) can take."""
    enable = enable if kind == "MergedLinear" else [True]
    layer = make_layer(kind, in_f, d * len(enable), r, 2.0, fifo, torch.float32, enable)
    randomize_lora(layer, 0)
    x = torch.randn(17, in_f)
    with OpShapes() as ops:
        layer(x).sum().backward()
    out_f = layer.out_features
    assert not ops.shapes & {(out_f, in_f), (in_f, out_f), (d, in_f), (in_f, d)}
    assert layer.lora_B.grad is not None
    with OpShapes() as ops:
        layer.delta_weight()  # the detector does see ΔW where it is built
    assert ops.shapes & {(out_f, in_f), (in_f, out_f)}


def test_lora_layers_keep_no_tensor_outside_parameters_and_buffers():
    """No index or mask tensor hides in a plain attribute (loralib's lora_ind stays on the CPU when
    the module moves): everything moves with .to(), here to the meta device."""
    layer = L.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], fan_in_fan_out=True)
    assert not [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]
    layer.to("meta")
    y = layer(torch.randn(3, 8, device="meta"))
    assert y.shape == (3, 12) and y.device.type == "meta"


def test_lora_r_dropout_and_lora_dropout_act_in_training_only():
    """lora_dropout (on x) and lora_r_dropout (between A and B) both change training outputs, and
    neither acts in eval mode: no config field is dead."""
    for kw in (dict(lora_dropout=0.5), dict(lora_r_dropout=0.5)):
        layer = L.Linear(16, 8, r=4, merge_weights=False, **kw)
        randomize_lora(layer, 0)
        x = torch.randn(4, 16)
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(2)
        b = layer(x)
        assert not torch.allclose(a, b), kw
        layer.eval()
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_lora_r_dropout_drops_rank_components_and_lora_dropout_drops_inputs(kind):
    """With r = 1, lora_r_dropout (between A and B) keeps or drops each group's whole update:
    every row of update / full update is 0 or 1/(1-p) = 2. lora_dropout acts on the inputs before
    A, so its rows take many other values."""
    def ratios(**kw):
        enable = dict(enable_lora=[True, True]) if kind == "MergedLinear" else {}
        layer = getattr(L, kind)(32, 8, r=1, lora_alpha=1, merge_weights=False, **enable,
                                 **kw).double()
        randomize_lora(layer, 3)
        x = torch.randn(200, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        base = F.linear(x, layer.weight, layer.bias)
        torch.manual_seed(0)
        update = layer(x) - base
        layer.eval()
        full = layer(x) - base
        return (update / full).view(200, -1, 4)  # (rows, groups, d): one ratio per group and row

    r_drop = ratios(lora_r_dropout=0.5)
    per_group = r_drop[..., 0]
    assert torch.allclose(r_drop, per_group.unsqueeze(-1).expand_as(r_drop))
    assert set(per_group.round(decimals=9).unique().tolist()) == {0.0, 2.0}
    x_drop = ratios(lora_dropout=0.5)[..., 0].round(decimals=9)
    assert len(set(x_drop.unique().tolist()) - {0.0, 2.0}) > 100


def test_config_dropouts_reach_every_site():
    """Each dropout field of the config reaches the modules that apply it: lora_dropout and
    lora_r_dropout in c_attn, fix_dropout at the embeddings, the attention weights and both
    residual branches; and each fix_dropout site alone changes training outputs."""
    config = L.GPT2Config(vocab_size=13, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                          lora_attn_dim=2, lora_dropout=0.1, lora_r_dropout=0.2, fix_dropout=0.3)
    model = tiny_model(config)
    block = model.transformer.h[0]
    assert block.attn.c_attn.lora_dropout.p == 0.1 and block.attn.c_attn.lora_r_dropout.p == 0.2
    sites = {"embeddings": (model.transformer.drop, "p"),
             "attention weights": (block.attn, "attn_pdrop"),
             "attention residual": (block.attn.resid_dropout, "p"),
             "mlp residual": (block.mlp.dropout, "p")}
    assert all(getattr(m, a) == 0.3 for m, a in sites.values())
    ids = token_batch(config, 0)
    for name, (module, attr) in sites.items():
        for m, a in sites.values():
            setattr(m, a, 0.0)
        setattr(module, attr, 0.5)
        with torch.no_grad():
            assert not torch.allclose(model(ids)[0], model(ids)[0]), name


# ---- 3. the model: Q/V only, rank 0 baseline, causality, tying, cache ------------------------

@given(config=tiny_configs(min_rank=1), seed=seeds)
def test_optimizer_step_moves_only_lora_and_leaves_frozen_tensors_bit_identical(config, seed):
    """After mark_only_lora_as_trainable and an AdamW step, every frozen tensor is bit-identical
    and every lora_A / lora_B has moved."""
    model = tiny_model(config, seed)
    L.mark_only_lora_as_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(config, seed, length=8)
    _, loss = model(ids, lm_labels=ids)
    loss.backward()
    opt.step()
    for k, v in model.state_dict().items():
        if "lora_" in k:
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


@given(config=tiny_configs(), seed=seeds, t=st.integers(0, 14))
def test_logits_at_t_do_not_depend_on_later_tokens(config, seed, t):
    """Causality: changing tokens after position t leaves logits[:, :t+1] unchanged."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed, std=0.1)
    ids = token_batch(config, seed)
    changed = ids.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % config.vocab_size
    a, b = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-6)
    if t + 1 < config.n_ctx:
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_lm_head_is_tied_to_the_token_embedding():
    """The head's weight is wte's Parameter itself: same object, same storage, one gradient."""
    model = tiny_model(L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=8, n_layer=1,
                                    n_head=2))
    assert model.lm_head.decoder.weight is model.transformer.wte.weight
    assert model.lm_head.decoder.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        model.transformer.wte.weight[3, 0] = 42.0
    assert model.lm_head.decoder.weight[3, 0] == 42.0


def test_the_head_stays_the_embedding_through_every_way_of_loading_and_moving(tmp_path):
    """After load_state_dict (assign=True, strict=False, with or without the head's key),
    load_weight, to(), deepcopy and set_tied, the head is wte itself and the model holds the
    same number of parameters; a state dict whose head differs from wte is refused unchanged."""
    config = L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    source = tiny_model(config, seed=1)
    full = {k: v.clone() for k, v in source.state_dict().items()}
    without_head = {k: v for k, v in full.items() if not k.startswith("lm_head.")}
    ids = token_batch(config, 0)
    expected = source(ids)[0]

    def check(model):
        assert model.lm_head.decoder.weight is model.transformer.wte.weight
        assert len(list(model.parameters())) == len(list(source.parameters()))
        torch.testing.assert_close(model(ids)[0], expected)

    for state_dict, strict in ((full, True), (without_head, False)):
        for assign in (False, True):
            model = tiny_model(config, seed=2)
            model.load_state_dict({k: v.clone() for k, v in state_dict.items()}, strict=strict,
                                  assign=assign)
            check(model)
    check(tiny_model(config, seed=2).load_weight(full))
    check(copy.deepcopy(source))
    check(tiny_model(config, seed=2).load_weight(full).to(torch.float64).to(torch.float32))
    model = tiny_model(config, seed=2).load_weight(full)
    model.lm_head.decoder.weight = torch.nn.Parameter(model.transformer.wte.weight.clone())
    model.set_tied()
    check(model)
    untied = dict(full, **{"lm_head.decoder.weight": full["transformer.wte.weight"] + 1})
    model = tiny_model(config, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="untied head"):
        model.load_state_dict(untied, assign=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_merged_model_refuses_to_train_its_adapters_and_says_to_unmerge():
    """Training through merged layers would move W and never A or B: a forward with gradients in
    training mode and mark_only_lora_as_trainable are refused until unmerge_lora; evaluating a
    merged model (eval mode, or without gradients) is allowed."""
    config = L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                          lora_attn_dim=2)
    model = tiny_model(config)
    randomize_lora(model, 0)
    ids = token_batch(config, 0)
    L.mark_only_lora_as_trainable(model)
    L.merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        model(ids, lm_labels=ids)
    with pytest.raises(ValueError, match="unmerge_lora"):
        L.mark_only_lora_as_trainable(model, bias="all")
    with torch.no_grad():
        model(ids, lm_labels=ids)
    model.eval()(ids, lm_labels=ids)
    L.unmerge_lora(model)
    L.mark_only_lora_as_trainable(model, bias="all")
    model.train()(ids, lm_labels=ids)[1].backward()
    assert model.transformer.h[0].attn.c_attn.lora_B.grad.abs().sum() > 0


@given(config=tiny_configs(), seed=seeds, shift=st.integers(0, 4))
def test_position_and_token_type_ids_add_their_embeddings_as_in_microsofts_gpt2(config, seed,
                                                                                shift):
    """GPT2Model(input_ids, position_ids, token_type_ids): explicit default positions change
    nothing; positions p give the embedding wpe[p]; token types t add wte[t] to the input, as
    microsoft's model.py does (token_type_embeds = self.wte(token_type_ids))."""
    model = tiny_model(config, seed).eval()
    T = 4
    ids = token_batch(config, seed, batch=2, length=T)
    types = token_batch(config, seed + 1, batch=2, length=T)
    hidden = model.transformer(ids)[0]
    torch.testing.assert_close(model.transformer(ids, torch.arange(T))[0], hidden)
    positions = (torch.arange(T) + shift).clamp(max=config.n_positions - 1).expand(2, T)
    shifted = model.transformer(ids, position_ids=positions, token_type_ids=types)[0]
    # The same trunk fed by hand: the first block sees wte[ids] + wpe[positions] + wte[types].
    x = (model.transformer.wte(ids) + model.transformer.wpe(positions)
         + model.transformer.wte(types))
    for block in model.transformer.h:
        x = block(x)[0]
    torch.testing.assert_close(shifted, model.transformer.ln_f(x))
    with pytest.raises(ValueError, match="position_ids"):
        model.transformer(ids, position_ids=torch.full((T,), config.n_positions))


def test_microsofts_name_for_the_vocabulary_size_is_accepted():
    """GPT2Config(vocab_size_or_config_json_file=V) is GPT2Config(vocab_size=V), as in microsoft's
    model.py, and is not saved as a field of its own."""
    config = L.GPT2Config(vocab_size_or_config_json_file=321, n_embd=12, n_head=3)
    assert config.vocab_size == 321 and config == L.GPT2Config(vocab_size=321, n_embd=12, n_head=3)
    assert "vocab_size_or_config_json_file" not in config.to_dict()
    with pytest.raises(ValueError, match="disagree"):
        L.GPT2Config(vocab_size=5, vocab_size_or_config_json_file=7)


def test_each_layer_draws_its_own_lora_a():
    """LoRA A is drawn independently per layer (microsoft/LoRA deep-copies one block, so every
    layer starts from the same A)."""
    model = tiny_model(L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=8, n_layer=3,
                                    n_head=2, lora_attn_dim=2))
    As = [blk.attn.c_attn.lora_A for blk in model.transformer.h]
    assert not torch.equal(As[0], As[1]) and not torch.equal(As[1], As[2])


@given(config=tiny_configs(), seed=seeds, split=st.integers(1, 15))
def test_cached_forward_equals_full_forward(config, seed, split):
    """Feeding a prefix, then the rest with the prefix's presents as past, gives the logits of
    one full pass (several new tokens after a cache need the shifted causal mask)."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed, std=0.1)
    ids = token_batch(config, seed)
    full, _ = model(ids)
    _, past = model(ids[:, :split])
    rest, presents = model(ids[:, split:], past=past)
    torch.testing.assert_close(rest, full[:, split:], rtol=1e-4, atol=1e-5)
    assert presents[0].shape == (2, 2, config.n_head, config.n_ctx, config.n_embd // config.n_head)


@settings(max_examples=10)
@given(config=tiny_configs(), seed=seeds, prompt=st.integers(1, 6), new=st.integers(1, 20))
def test_cached_greedy_generation_equals_uncached(config, seed, prompt, new):
    """Greedy decoding with the key/value cache gives the tokens of re-running the whole sequence
    each step, also past n_ctx where both slide the window."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed, std=0.1)
    ids = token_batch(config, seed, length=prompt)
    cached = model.generate(ids, new, temperature=0, use_cache=True)
    uncached = model.generate(ids, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt + new)
    assert torch.equal(cached, uncached)


def _ragged_start(config, seed, data, max_steps, min_rows, max_len):
    """microsoft's gpt2_beam start on drawn prompts: a random adapted model; prompts right-padded
    (with random tokens) to one length that leaves room for `steps` more tokens; one full call.
    Returns the model, the generator, the steps, the prompts, their last logits, the cache,
    lengths."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed)
    steps = data.draw(st.integers(1, max_steps))
    prompts = data.draw(st.lists(st.lists(st.integers(0, config.vocab_size - 1), min_size=1,
                                          max_size=max_len),
                                 min_size=min_rows, max_size=4))
    lens = torch.tensor([len(p) for p in prompts])
    padded = torch.randint(0, config.vocab_size, (len(prompts), int(lens.max()) + steps),
                           generator=g)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = torch.tensor(p)
    logits, past = model(padded)
    return (model, g, steps, [list(p) for p in prompts],
            logits[torch.arange(len(prompts)), lens - 1], past, lens)


def _alone(model, seq):
    return model(torch.tensor([seq]))[0][0, -1]   # the last logits of one prompt, no padding


@settings(max_examples=10)
@given(config=tiny_configs(), seed=seeds, data=st.data())
def test_ragged_batch_decoded_with_len_past_equals_each_prompt_alone(config, seed, data):
    """A right-padded batch decoded one token per row with len_past gives, row by row, the logits
    of decoding that prompt alone without padding: each new token sits at position len_past[b],
    is written to cache row len_past[b], and sees rows 0..len_past[b] only."""
    model, g, steps, seqs, logits, past, lens = _ragged_start(config, seed, data, 4, 1, 6)
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(logits[b], _alone(model, seq), rtol=1e-4, atol=1e-5)
    for i in range(steps):
        new = torch.randint(0, config.vocab_size, (len(seqs), 1), generator=g)
        logits, past = model(new, past=past, len_past=lens + i)
        assert past[0].shape[-2] == int(lens.max()) + steps   # the cache keeps its size
        for b, seq in enumerate(seqs):
            seq.append(int(new[b]))
            torch.testing.assert_close(logits[b, -1], _alone(model, seq), rtol=1e-4, atol=1e-5)


@settings(max_examples=10)
@given(config=tiny_configs(), seed=seeds, data=st.data())
def test_reordering_the_cache_between_steps_equals_decoding_the_reordered_batch(config, seed, data):
    """Beam search reorders the cache along dim 1 (index_select(1, beam_idx)) between len_past
    steps; the logits then equal those of decoding the reordered sequences, each alone. The
    caller's cache tensors are never written to."""
    model, g, steps, seqs, _, past, lens = _ragged_start(config, seed, data, 3, 2, 5)
    for i in range(steps):
        beam_idx = torch.tensor(data.draw(st.lists(st.integers(0, len(seqs) - 1),
                                                   min_size=len(seqs), max_size=len(seqs))))
        past = tuple(p.index_select(1, beam_idx).contiguous() for p in past)
        seqs, lens = [list(seqs[j]) for j in beam_idx], lens[beam_idx]
        held = [p.clone() for p in past]
        new = torch.randint(0, config.vocab_size, (len(seqs), 1), generator=g)
        logits, past_next = model(new, past=past, len_past=lens + i)
        assert all(torch.equal(a, b) for a, b in zip(past, held))
        past = past_next
        for b, seq in enumerate(seqs):
            seq.append(int(new[b]))
            torch.testing.assert_close(logits[b, -1], _alone(model, seq), rtol=1e-4, atol=1e-5)


def test_bad_len_past_raises_value_error_naming_the_problem():
    """len_past of the wrong shape or dtype, outside the cache, with several new tokens, or
    without past: a ValueError that says which."""
    config = L.GPT2Config(vocab_size=10, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config)
    _, past = model(torch.zeros(2, 4, dtype=torch.long))
    one = torch.zeros(2, 1, dtype=torch.long)
    cases = [(dict(len_past=torch.tensor([1, 2, 3])), r"shape \(batch,\) = \(2,\)"),
             (dict(len_past=torch.tensor([1.0, 2.0])), "torch.long"),
             (dict(len_past=torch.tensor([1, 2], dtype=torch.int32)), "torch.long"),
             (dict(len_past=[1, 2]), "torch.long tensor"),
             (dict(len_past=torch.tensor([1, 4])), r"in \[0, 4\).*\[1, 4\]"),
             (dict(len_past=torch.tensor([-1, 0])), r"in \[0, 4\)")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(one, past=past, **kwargs)
    with pytest.raises(ValueError, match="exactly one new token per row.*got .* and 2 new tokens"):
        model(torch.zeros(2, 2, dtype=torch.long), past=past, len_past=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="len_past needs past"):
        model(one, len_past=torch.tensor([1, 2]))


def test_temperature_sharpens_and_flattens_the_sampling_distribution():
    """Near temperature 0 sampling is greedy; at a high temperature it spreads over many tokens;
    at temperature 1 the frequencies follow softmax(logits)."""
    config = L.GPT2Config(vocab_size=7, n_positions=4, n_ctx=4, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config, 5).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(60)  # sharp but not one-hot next-token probabilities
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    probs = torch.softmax(model(prompt[:1])[0][0, -1].double(), dim=-1)
    assert 0.3 < probs.max() < 0.99 and probs.min() < 0.01, probs  # neither flat nor one-hot

    def freq(t):
        nxt = model.generate(prompt, 1, temperature=t,
                             generator=torch.Generator().manual_seed(1))[:, -1]
        return torch.bincount(nxt, minlength=7).double() / len(nxt)

    assert freq(1e-3)[probs.argmax()] == 1.0
    assert (freq(100.0) > 0.08).all()  # nearly uniform over the 7 tokens
    torch.testing.assert_close(freq(1.0), probs, rtol=0, atol=0.03)


def test_sampling_respects_top_k_and_generator():
    """top_k=1 sampling is greedy; the same generator seed gives the same sample."""
    config = L.GPT2Config(vocab_size=23, n_positions=16, n_ctx=16, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config, 3).eval()
    ids = token_batch(config, 0, length=3)
    assert torch.equal(model.generate(ids, 8, top_k=1), model.generate(ids, 8, temperature=0))
    a = model.generate(ids, 8, temperature=1.5, generator=torch.Generator().manual_seed(5))
    b = model.generate(ids, 8, temperature=1.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_generation_records_no_autograd_history(monkeypatch):
    """Every forward inside generate runs without grad, even on a model whose weights require it:
    with the cache, a recorded graph would link each step to all earlier ones and keep their
    activations alive."""
    config = L.GPT2Config(vocab_size=23, n_positions=16, n_ctx=16, n_embd=8, n_layer=1, n_head=2,
                          lora_attn_dim=2)
    model = tiny_model(config, 3).eval().requires_grad_(True)
    forward, grad_enabled = L.GPT2Model.forward, []

    def recording(self, *args, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(L.GPT2Model, "forward", recording)
    model.generate(token_batch(config, 0, length=3), 5)
    assert grad_enabled == [False] * 5 and torch.is_grad_enabled()


# ---- 4. loss ---------------------------------------------------------------------------------

@given(config=tiny_configs(), seed=seeds, eps=st.sampled_from([0.0, 0.1, 0.3]),
       negative=st.sampled_from([-1, -100]), use_mask=st.booleans())
def test_loss_is_microsoft_masked_mean_and_negative_labels_act_as_mask_0(config, seed, eps,
                                                                         negative, use_mask):
    """loss = Σ mask·((1-ε)·NLL + ε·mean_v(-log p)) / (Σ mask + 1e-4), microsoft/LoRA's formula
    (mask of ones when lm_mask is None); a negative label gives the loss of that position
    relabelled and masked to 0; an all-zero mask gives 0."""
    model = tiny_model(config, seed)
    g = torch.Generator().manual_seed(seed)
    ids = token_batch(config, seed, length=6)
    labels = token_batch(config, seed + 1, length=6)
    mask = (torch.rand(ids.shape, generator=g) < 0.6).float() if use_mask else torch.ones(ids.shape)
    no_target = torch.rand(ids.shape, generator=g) < 0.3
    logits, loss = model(ids, lm_labels=labels.masked_fill(no_target, negative),
                         lm_mask=mask if use_mask else None, label_smooth=eps)
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    per_pos = (1 - eps) * nll + eps * (-logp.mean(-1))
    kept = mask.double() * ~no_target
    torch.testing.assert_close(loss.double(), (per_pos * kept).sum() / (kept.sum() + 1e-4),
                               rtol=2e-6, atol=1e-7)
    _, relabelled = model(ids, lm_labels=labels, lm_mask=kept.float(), label_smooth=eps)
    torch.testing.assert_close(loss, relabelled, rtol=1e-6, atol=1e-7)
    _, nothing = model(ids, lm_labels=labels, lm_mask=torch.zeros(ids.shape), label_smooth=eps)
    assert nothing.item() == 0.0


@given(config=tiny_configs(), seed=seeds, use_mask=st.booleans(), right=st.floats(0, 1))
def test_accuracy_flags_equal_a_plain_reference_loop(config, seed, use_mask, right):
    """is_report_accuracy returns (logits, loss, t1_acc, all_acc): t1_acc[b] = 1 when the argmax is
    right at row b's first counted position, all_acc[b] = 1 when it is right at every counted one
    (counted: mask 1 and a label >= 0; every position without lm_mask), as microsoft's loops say."""
    model = tiny_model(config, seed)
    g = torch.Generator().manual_seed(seed)
    ids = token_batch(config, seed, batch=4, length=5)
    pred = model(ids)[0].argmax(-1)
    wrong = token_batch(config, seed + 1, batch=4, length=5)
    labels = torch.where(torch.rand(ids.shape, generator=g) < right, pred, wrong)  # many hits
    labels[torch.rand(ids.shape, generator=g) < 0.1] = -1
    mask = (torch.rand(ids.shape, generator=g) < 0.7).float() if use_mask else None
    logits, loss, t1_acc, all_acc = model(ids, lm_labels=labels, lm_mask=mask,
                                          is_report_accuracy=True)
    assert t1_acc.shape == all_acc.shape == (4,) and t1_acc.dtype == all_acc.dtype == torch.float32
    for b in range(4):
        counted = [t for t in range(5) if labels[b, t] >= 0 and (mask is None or mask[b, t] >= 1)]
        hits = [bool(pred[b, t] == labels[b, t]) for t in counted]
        assert t1_acc[b] == float(bool(hits) and hits[0])
        assert all_acc[b] == float(all(hits))
    assert torch.equal(model(ids, lm_labels=labels, lm_mask=mask)[1], loss)


def test_fix_dropout_acts_in_training_only():
    """fix_dropout drops activations in train mode and nothing in eval mode."""
    config = L.GPT2Config(vocab_size=13, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                          fix_dropout=0.5)
    model = tiny_model(config)
    ids = token_batch(config, 0)
    assert not torch.allclose(model(ids)[0], model(ids)[0])
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])


# ---- 4b. the loss over chunks, without logits, and activation checkpointing ----------------

def plain_loss(logits, labels, mask, eps):
    """microsoft's loss written out at once in float64: the reference for the chunked one."""
    targets = labels.clamp(min=0)
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_position = (1 - eps) * nll + eps * (-logp.mean(-1))
    kept = mask.double() * (labels >= 0)
    return (per_position * kept).sum() / (kept.sum() + 1e-4)


@given(config=tiny_configs(min_rank=1), seed=seeds, eps=st.sampled_from([0.0, 0.1]),
       chunk_positions=st.integers(1, 7), dtype=dtypes)
def test_chunked_loss_and_its_gradients_equal_the_loss_computed_at_once(config, seed, eps,
                                                                        chunk_positions, dtype):
    """The loss over chunks of positions, from the logits or from the hidden states and the head,
    equals microsoft's loss computed at once, and so do the gradients of the hidden states and of
    the head, for any chunk size, fractional masks, negative labels and label smoothing."""
    model = tiny_model(config, seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    ids = token_batch(config, seed, batch=2, length=5)
    labels = token_batch(config, seed + 1, batch=2, length=5)
    labels[torch.rand(ids.shape, generator=g) < 0.2] = -100
    mask = torch.rand(ids.shape, generator=g, dtype=dtype)  # fractional weights in [0, 1)
    hidden = model.transformer(ids)[0].detach().requires_grad_(True)
    head = model.transformer.wte.weight.detach().clone().requires_grad_(True)
    chunk_elements = chunk_positions * config.vocab_size
    expected = plain_loss(hidden @ head.t(), labels, mask, eps)
    expected_grads = torch.autograd.grad(expected, (hidden, head))
    from_logits, _ = L.lm_loss(hidden @ head.t(), labels, mask, eps,
                               chunk_elements=chunk_elements)
    from_hidden, _ = L.lm_loss_from_hidden(hidden, head, labels, mask, eps,
                                           chunk_elements=chunk_elements)
    closeness = tolerance(dtype)
    for loss in (from_logits, from_hidden):
        torch.testing.assert_close(loss.double(), expected, **closeness)
        grads = torch.autograd.grad(loss, (hidden, head))
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad.double(), **closeness)


class WidestTensorsAlive(TorchDispatchMode):
    """Counts the tensors `width` columns wide that operations create (views, and what an
    in-place operation on a view returns, aside), and the most of them alive at any one time."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.alive = {}  # id → a weak reference that removes its entry when the tensor dies
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                wide = isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == self.width
                # An in-place operation returns a tensor already counted, or a view of one.
                if wide and t._base is None and id(t) not in self.alive:
                    key = id(t)
                    self.alive[key] = weakref.ref(t, lambda _, key=key: self.alive.pop(key))
                    self.most = max(self.most, len(self.alive))
        return out


@pytest.mark.parametrize("chunk_positions", [1, 3, 5])
@pytest.mark.parametrize("source", ["hidden states, head frozen", "hidden states, head trains",
                                    "logits"])
def test_the_chunked_loss_holds_two_vocabulary_wide_tensors_at_most(chunk_positions, source):
    """The chunked loss's memory law: computing the loss and its gradients, from the hidden states
    and the head or from the logits, no more than two (n, V) or (N, V) tensors are created and
    alive at once, whatever the number of chunks: a chunk's logits and their log-softmax, or the
    logits' gradient and one chunk's; a chunk's are freed before the next one's."""
    vocab, width, positions = 37, 8, 24  # V, C and B·T differ, so only logits are V wide
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, positions // 2, width, generator=g, requires_grad=True)
    head = torch.randn(vocab, width, generator=g, requires_grad=source.endswith("trains"))
    labels = torch.randint(0, vocab, (2, positions // 2), generator=g)
    mask = torch.ones(2, positions // 2)
    chunk_elements = chunk_positions * vocab
    logits = hidden @ head.t()  # made before counting: the caller's, not the loss's
    counter = WidestTensorsAlive(vocab)
    with counter:
        if source == "logits":
            loss, _ = L.lm_loss(logits, labels, mask, 0.1, chunk_elements=chunk_elements)
        else:
            loss, _ = L.lm_loss_from_hidden(hidden, head, labels, mask, 0.1,
                                            chunk_elements=chunk_elements)
        loss.backward()
    assert counter.most == 2


@given(config=tiny_configs(min_rank=1), seed=seeds, use_mask=st.booleans())
def test_a_forward_without_logits_gives_the_same_loss_accuracy_and_gradients(config, seed,
                                                                             use_mask):
    """forward(..., return_logits=False) returns (None, loss[, t1_acc, all_acc]) with the loss,
    the accuracies and every parameter's gradient of the default call."""
    model = tiny_model(config, seed)
    randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed)
    ids = token_batch(config, seed, batch=2, length=6)
    labels = token_batch(config, seed + 1, batch=2, length=6)
    mask = (torch.rand(ids.shape, generator=g) < 0.7).float() if use_mask else None
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss, t1_acc, all_acc = model(ids, lm_labels=labels, lm_mask=mask,
                                              is_report_accuracy=True,
                                              return_logits=return_logits)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits, loss, t1_acc, all_acc, grads))
    (logits, loss, t1_acc, all_acc, grads), (no_logits, loss2, t1_acc2, all_acc2, grads2) = results
    assert logits.shape == (2, 6, config.vocab_size) and no_logits is None
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(t1_acc2, t1_acc) and torch.equal(all_acc2, all_acc)
    assert grads2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-6)


@given(config=tiny_configs(min_rank=1), seed=seeds)
def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_dropout(config, seed):
    """Recomputing each block in backward changes nothing: the same loss and gradients, bit for
    bit, with the model's and LoRA's dropout drawing the same masks in the recomputation."""
    config = L.GPT2Config.from_dict({**config.to_dict(), "fix_dropout": 0.2, "lora_dropout": 0.2})
    model = tiny_model(config, seed)
    randomize_lora(model, seed)
    L.mark_only_lora_as_trainable(model)
    ids = token_batch(config, seed, batch=2, length=6)
    results = []
    for checkpointing in (False, True):
        model.transformer.checkpoint_activations = checkpointing
        model.zero_grad()
        torch.manual_seed(seed)  # the same dropout masks in both runs
        loss = model(ids, lm_labels=ids)[1]
        loss.backward()
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss, grads), (loss_recomputed, grads_recomputed) = results
    assert torch.equal(loss_recomputed, loss)
    for grad, grad_recomputed in zip(grads, grads_recomputed):
        assert torch.equal(grad_recomputed, grad)
    with torch.no_grad():  # no backward to come: nothing is recomputed, the cache is kept
        assert model(ids)[1][0] is not None


# ---- 6. bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("n_head", 5, "divisible by n_head"),
    ("n_embd", 0, "n_embd must be a positive integer"),
    ("n_layer", 1.5, "n_layer must be a positive integer"),
    ("lora_attn_dim", -1, "lora_attn_dim"),
    ("lora_attn_alpha", 0, "lora_attn_alpha"),
    ("lora_dropout", -0.1, "lora_dropout.*\\[0, 1\\)"),
    ("lora_r_dropout", 1.0, "lora_r_dropout.*\\[0, 1\\)"),
    ("fix_dropout", 2.0, "fix_dropout.*\\[0, 1\\)"),
    ("n_ctx", 2048, "n_ctx .* must not exceed n_positions"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon"),
])
def test_bad_config_values_raise_value_error_naming_the_field(field, value, message):
    values = dict(lora_attn_dim=4)
    values[field] = value
    with pytest.raises(ValueError, match=message):
        L.GPT2Config(**values)


def test_bad_layer_arguments_and_presets_raise_value_error():
    with pytest.raises(ValueError, match="must divide out_features"):
        L.MergedLinear(8, 10, r=2, enable_lora=[True, False, True])
    with pytest.raises(ValueError, match="at least one"):
        L.MergedLinear(8, 9, r=2, enable_lora=[])
    with pytest.raises(ValueError, match="rank r"):
        L.Linear(8, 8, r=-2)
    with pytest.raises(ValueError, match="lora_alpha"):
        L.Linear(8, 8, r=2, lora_alpha=0)
    with pytest.raises(ValueError, match="gpt2.sm, gpt2.md, gpt2.lg, gpt2.xl"):
        L.GPT2Config.from_preset("gpt2.huge")
    with pytest.raises(ValueError, match="unknown GPT2Config field"):
        L.GPT2Config.from_preset("gpt2.sm", n_embed=5)
    with pytest.raises(ValueError, match="bias must be one of"):
        L.mark_only_lora_as_trainable(torch.nn.Linear(2, 2), bias="some")


def test_bad_model_inputs_raise_value_error():
    config = L.GPT2Config(vocab_size=10, n_positions=8, n_ctx=6, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size = 10\)"):
        model(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence length 7 .* n_ctx = 6"):
        model(torch.zeros(1, 7, dtype=torch.long))
    _, past = model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"past 4 \+ new 3"):
        model(torch.zeros(1, 3, dtype=torch.long), past=past)
    with pytest.raises(ValueError, match="batch of 1, not 2"):
        model(torch.zeros(2, 1, dtype=torch.long), past=past)
    with pytest.raises(ValueError, match=r"integer tensor \(batch, time\)"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="lm_labels must be an integer tensor of the shape"):
        model(torch.zeros(1, 3, dtype=torch.long), lm_labels=torch.zeros(1, 2, dtype=torch.long))
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="lm_labels must lie"):
        model(ids, lm_labels=torch.tensor([[1, 10, 2]]))
    with pytest.raises(ValueError, match="label_smooth"):
        model(ids, lm_labels=ids, label_smooth=1.0)
    assert torch.isfinite(model(ids.int(), lm_labels=ids.int())[1])  # int32 ids and labels work
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="non-empty integer tensor"):
        model(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="list of booleans"):
        L.MergedLinear(8, 9, r=2, enable_lora=True)
    with pytest.raises(ValueError, match="list of booleans"):
        L.MergedLinear(8, 9, r=2, enable_lora="TFT")


@needs_safetensors
def test_odd_calls_get_a_value_error_or_work_never_another_exception(tmp_path):
    """Calls an adversarial sweep found failing deep inside: each now raises a ValueError that
    names the problem, or works (numpy numbers in a config, a tiny sampling temperature)."""
    np = pytest.importorskip("numpy")
    config = L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=np.int64(8), n_layer=1,
                          n_head=2, lora_attn_dim=np.int64(2), lora_attn_alpha=np.float32(4.0))
    model = tiny_model(config)
    assert type(config.n_embd) is int and type(config.lora_attn_alpha) is float
    L.mark_only_lora_as_trainable(model)
    model.save_adapter(tmp_path / "adapter")  # plain numbers: JSON can write them
    with pytest.raises(AttributeError):
        config.n_head = 3  # frozen: a config is checked once and never changes
    with pytest.raises(ValueError, match="must be a GPT2Config"):
        L.GPT2LMModel({"n_embd": 8})
    ids = torch.tensor([[1, 2, 3]])
    _, past = model(ids)
    wrong_heads = [p.view(2, 1, 4, 3, 2) for p in past]
    with pytest.raises(ValueError, match=r"caches \(2, B, 2, T, 4\)"):
        model(ids[:, :1], past=wrong_heads)
    assert model.generate(ids, 2, temperature=1e-300).shape == (1, 5)
    with pytest.raises(ValueError, match="needs a folder, a file or a hub name"):
        L.GPT2LMModel.from_pretrained(None)
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "n_layer": 10**7}))
    with pytest.raises(ValueError, match="n_layer = 10000000 does not fit the weights"):
        L.GPT2LMModel.from_pretrained(tmp_path / "hf")  # refused before building 10**7 blocks
    ac = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del ac["peft_type"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(ac))
    with pytest.raises(ValueError, match="peft_type = None is not supported"):
        model.load_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="in_features, out_features must be positive integers"):
        L.Linear(None, 4)
    with pytest.raises(ValueError, match="valid presets"):
        L.GPT2Config.from_preset(["gpt2.sm"])
    with pytest.raises(ValueError, match="the folder must be a path"):
        model.save_pretrained(None)
    with pytest.raises(ValueError, match="base_model_name_or_path must be a path"):
        model.save_adapter(tmp_path / "other", base_model_name_or_path=3)
    with pytest.raises(ValueError, match="the adapter folder must be a path"):
        model.load_adapter(None)
    sd = model.state_dict()
    sd["transformer.wte.weight"][0, 0] = float("nan")
    tiny_model(config).load_weight({**sd,
                                    "lm_head.weight": sd["transformer.wte.weight"].clone()})  # tied


@pytest.mark.parametrize("alpha, r", [(1e308, 4), (1e25, 1), (1e-25, 1)])
def test_a_scaling_adamw_cannot_train_is_refused(alpha, r):
    """α/r outside the accepted range is refused by the config and by the layers: AdamW squares
    gradients proportional to it, and in float32 the square overflows (B never moves) or the
    logits become non-finite."""
    with pytest.raises(ValueError, match="scaling α/r"):
        L.GPT2Config(lora_attn_dim=r, lora_attn_alpha=alpha)
    with pytest.raises(ValueError, match="scaling α/r"):
        L.Linear(4, 4, r=r, lora_alpha=alpha)


@pytest.mark.parametrize("scaling", [L._SCALING_RANGE[0], L._SCALING_RANGE[1]])
def test_one_adamw_step_moves_b_at_both_ends_of_the_accepted_scaling(scaling):
    """At either end of the accepted α/r, one AdamW step on a float32 layer changes B to finite
    values: the accepted range is one AdamW can train in."""
    torch.manual_seed(0)
    layer = L.Linear(8, 8, r=2, lora_alpha=2 * scaling)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-3)
    layer(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    assert layer.lora_B.abs().min() > 0 and torch.isfinite(layer.lora_B).all()


def test_an_untied_head_is_refused_not_dropped(tmp_path):
    """A checkpoint whose lm_head differs from wte (tie_word_embeddings=false) cannot be held by
    this tied model: a ValueError, not logits that silently ignore the head. A head equal to wte
    (how Hugging Face saves a tied model) loads."""
    config = L.GPT2Config(vocab_size=11, n_positions=4, n_ctx=4, n_embd=4, n_layer=1, n_head=1)
    sd = tiny_model(config, 1).state_dict()
    tied = {**sd, "lm_head.weight": sd["transformer.wte.weight"].clone()}
    tiny_model(config, 2).load_weight(tied)
    with pytest.raises(ValueError, match="untied head"):
        tiny_model(config, 2).load_weight({**sd, "lm_head.weight": torch.randn(11, 4)})


class Unlisted:
    """An object of a class that torch.load(weights_only=True) refuses to unpickle."""


def test_malformed_checkpoints_raise_value_error(tmp_path):
    """config.json with a list or null sizes, integer keys, random or truncated files, a 1-D wte:
    each a ValueError naming the problem, never a TypeError, KeyError or a library's own error."""
    config = L.GPT2Config(vocab_size=11, n_positions=4, n_ctx=4, n_embd=4, n_layer=1, n_head=1)
    sd = {k: v for k, v in tiny_model(config).state_dict().items() if k.startswith("transformer.")}
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    for cfg, message in [([1, 2], "JSON object"), ({"n_embd": None}, "n_embd"),
                         ({"n_layer": [2]}, "n_layer"), ("{", "cannot read")]:
        (folder / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        with pytest.raises(ValueError, match=message):
            L.GPT2LMModel.from_pretrained(folder)
    torch.save({**sd, 3: torch.zeros(1)}, tmp_path / "int-keys.bin")
    torch.save({**sd, "transformer.wte.weight": torch.zeros(44)}, tmp_path / "flat-wte.bin")
    (tmp_path / "random.bin").write_bytes(os.urandom(256))
    for name, message in [("int-keys.bin", "entry 3 -> Tensor: not a state dict"),
                          ("flat-wte.bin", "2-D wte"), ("random.bin", "cannot read")]:
        with pytest.raises(ValueError, match=message) as e:
            L.GPT2LMModel.from_pretrained(tmp_path / name)
        assert "weights_only=False" not in str(e.value)  # never advise unpickling code
    torch.save({"wte.weight": Unlisted()}, tmp_path / "object.pt")
    with pytest.raises(ValueError,
                       match=r"\(UnpicklingError: it holds more than tensors and plain data\)$"):
        L.GPT2LMModel.from_pretrained(tmp_path / "object.pt")
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(64))
    for name in ("cut.safetensors", "noise.safetensors"):
        with pytest.raises(ValueError, match="cannot read .* as a safetensors file"):
            L.GPT2LMModel.from_pretrained(tmp_path / name)


def test_a_foreign_cache_a_deep_config_and_nan_logits_raise_value_errors(tmp_path):
    """Each of these used to fail deep inside torch (or json), or, for greedy decoding of NaN
    logits, silently pick token 0."""
    config = L.GPT2Config(vocab_size=20, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config).eval()
    ids = torch.randint(0, 20, (2, 3))
    _, past = model(ids)
    with pytest.raises(ValueError, match=r"past must be the 1 caches .* \(torch.float32, on cpu\)"):
        model(ids[:, :1], past=[p.double() for p in past])
    with pytest.raises(ValueError, match="past must be the 1 caches"):
        model(ids[:, :1], past=[p.double() for p in past], len_past=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="len_past must be a torch.long tensor on cpu"):
        model(ids[:, :1], past=past, len_past=torch.zeros(2, dtype=torch.long, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's caches, in its dtype: accepted
        _, half = model(ids)
        model(ids[:, :1], past=half)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="cannot read .*config.json as JSON"):
        L.GPT2LMModel.from_pretrained(tmp_path)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    for temperature in (0, 1.0):
        with pytest.raises(ValueError, match="the model produced NaN or infinite logits"):
            model.generate(ids, 2, temperature=temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_device_to_host_sync_in_a_cuda_training_step_or_decoding():
    """On an accelerator, forward (loss, accuracy, ragged decoding) and backward never wait for
    the device: no device→host copy stalls the launch queue."""
    config = L.GPT2Config(vocab_size=50, n_positions=16, n_ctx=16, n_embd=16, n_layer=2, n_head=2,
                          lora_attn_dim=2, lora_attn_alpha=4)
    model = tiny_model(config).cuda()
    L.mark_only_lora_as_trainable(model)
    ids = torch.randint(0, 50, (2, 8), device="cuda")
    model(ids, lm_labels=ids)[1].backward()  # warm-up: first kernel launches may synchronize
    len_past = torch.tensor([3, 5], device="cuda")  # a copy from pageable memory synchronizes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, loss, t1, full = model(ids, lm_labels=ids, lm_mask=torch.ones(2, 8, device="cuda"),
                                  is_report_accuracy=True)
        loss.backward()
        with torch.no_grad():
            _, past = model(ids)
            model(ids[:, :1], past=past, len_past=len_past)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_lm_mask_must_hold_finite_weights_of_input_ids_shape_and_fractions_weigh_positions():
    """A mask of ±1 (which gave a loss of -3101) or NaN is refused, naming lm_mask; a fractional
    mask weighs each position's loss: the loss is Σ m·ℓ / (Σ m + 1e-4)."""
    config = L.GPT2Config(vocab_size=11, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config)
    ids = token_batch(config, 0)
    for bad in (torch.tensor([1.0, -1.0]).repeat(2, 4), torch.full(ids.shape, float("nan")),
                torch.full(ids.shape, float("inf"))):
        with pytest.raises(ValueError, match="lm_mask must hold finite weights >= 0"):
            model(ids, lm_labels=ids, lm_mask=bad)
    with pytest.raises(ValueError, match="lm_mask must have input_ids' shape"):
        model(ids, lm_labels=ids, lm_mask=torch.ones(3))
    with pytest.raises(ValueError, match="return_logits"):
        model(ids, lm_labels=ids, return_logits="no")
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    logits, loss = model(ids, lm_labels=ids, lm_mask=weights)
    per_position = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
    expected = (per_position * weights.flatten()).sum() / (weights.sum() + 1e-4)
    torch.testing.assert_close(loss, expected)



# ---- 7. oracles: Hugging Face transformers and microsoft's loralib ---------------------------

def _hf_random_checkpoint(tmp_path, seed, **sizes):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    # initializer_range 0.3 instead of 0.02: activations of order 1, where a wrong GELU variant or
    # a misplaced LayerNorm shows in the logits far above the 1e-4 tolerance.
    hf_config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=0, eos_token_id=0, initializer_range=0.3,
                                        **sizes)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("layout", ["folder", "bin-file"])
def test_logits_match_transformers_gpt2_on_the_same_checkpoint(tmp_path, layout):
    """from_pretrained on a random Hugging Face checkpoint gives GPT2LMHeadModel's logits to 1e-4,
    with and without the cache, from a checkpoint folder or a bare .bin file."""
    hf = _hf_random_checkpoint(tmp_path, 0, vocab_size=101, n_positions=24, n_embd=48, n_layer=3,
                               n_head=4)
    if layout == "folder":
        source = tmp_path
    else:
        source = tmp_path / "weights.bin"
        torch.save(hf.state_dict(), source)
    ours = L.GPT2LMModel.from_pretrained(source, n_head=4).eval()
    assert ours.config.n_embd == 48 and ours.config.n_layer == 3 and ours.config.n_positions == 24
    ids = torch.randint(0, 101, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids)[0], expected, rtol=0, atol=1e-4)
        _, past = ours(ids[:, :10])
        torch.testing.assert_close(ours(ids[:, 10:], past=past)[0], expected[:, 10:], rtol=0,
                                   atol=1e-4)


def test_from_pretrained_with_lora_rank_starts_at_the_pretrained_model(tmp_path):
    """Loading with lora_attn_dim > 0 adds fresh adapters: the logits are still GPT-2's."""
    hf = _hf_random_checkpoint(tmp_path, 1, vocab_size=50, n_positions=16, n_embd=32, n_layer=2,
                               n_head=4)
    ours = L.GPT2LMModel.from_pretrained(tmp_path, lora_attn_dim=4, lora_attn_alpha=8).eval()
    assert ours.transformer.h[0].attn.c_attn.r == 4
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, rtol=0, atol=1e-4)


@given(kind=st.sampled_from(["Linear", "MergedLinear"]), enable=enable_patterns(max_groups=3),
       d=st.integers(1, 6), in_f=st.integers(1, 10), r=ranks, alpha=st.integers(1, 32),
       fifo=st.booleans(), seed=seeds)
def test_lora_layers_match_loralib_outputs_names_and_shapes(kind, enable, d, in_f, r, alpha,
                                                            fifo, seed):
    """With copied parameters our layer and loralib's have the same state-dict keys and shapes and
    give the same outputs, unmerged (train) and merged (eval)."""
    loralib = pytest.importorskip("loralib")
    out_f = d * len(enable) if kind == "MergedLinear" else d
    kw = dict(r=r, lora_alpha=alpha, fan_in_fan_out=fifo)
    if kind == "MergedLinear":
        kw["enable_lora"] = enable
    ours = getattr(L, kind)(in_f, out_f, **kw)
    theirs = getattr(loralib, kind)(in_f, out_f, **kw)
    randomize_lora(ours, seed)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
           [n for n, p in theirs.named_parameters() if p.requires_grad]
    x = torch.randn(2, 3, in_f, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
