"""Property tests for lora_gpt2.py.

Each test names the law it checks. Hypothesis draws the shapes, ranks, alphas, enable_lora
patterns, layouts and dtypes; every model here is tiny, so the suite runs in about a minute on
two CPU cores. The Hypothesis profile "ci" (derandomized) is used when CI is set in the
environment, "dev" (random) otherwise; HYPOTHESIS_PROFILE picks one explicitly.

Optional oracles (skipped cleanly when the package is missing): Hugging Face `transformers`
for GPT-2 logits, microsoft's `loralib` for the LoRA layers, `transformers` and `peft` for the
exported folders (section 8).

Section 9 tests train_shakespeare.py (tiny runs, mostly in-process through its main()/cli(), in a
subprocess or a forked process where the exit status, the absence of a traceback or several
processes matter); section 10 smoke-tests bench_lora_gpt2.py (structure only, no speed asserted);
section 11 checks the laws of lora_paper.py's subspace similarity and amplification factor, and
runs that script at tiny sizes.
"""

import argparse
import builtins
import contextlib
import copy
import glob
import http.server
import importlib.util
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bench_lora_gpt2 as bench
import lora_gpt2 as L
import train_shakespeare as ts

settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# The Hugging Face and PEFT formats are safetensors files: without the package, those tests skip.
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="needs safetensors (pip install safetensors)")

# Every model here is tiny: one thread is faster, and leaves a shared CI machine's cores alone.
torch.set_num_threads(1)

# ---- strategies ------------------------------------------------------------------------------

dtypes = st.sampled_from([torch.float32, torch.float64])
ranks = st.integers(1, 6)
alphas = st.floats(0.5, 64.0, allow_nan=False)
seeds = st.integers(0, 2**16)


@st.composite
def enable_patterns(draw, min_groups=1, max_groups=4):
    """A list of enable_lora flags with at least one True."""
    flags = draw(st.lists(st.booleans(), min_size=min_groups, max_size=max_groups))
    assume(any(flags))
    return flags


@st.composite
def tiny_configs(draw, min_rank=0):
    n_head = draw(st.integers(1, 3))
    return L.GPT2Config(
        vocab_size=draw(st.integers(5, 40)), n_positions=16, n_ctx=16,
        n_embd=n_head * draw(st.integers(2, 6)), n_layer=draw(st.integers(1, 3)), n_head=n_head,
        lora_attn_dim=draw(st.integers(min_rank, 4)), lora_attn_alpha=draw(alphas))


def tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def randomize_lora(module, seed, std=0.5):
    """Give every LoRA B (and A) random values, so that ΔW ≠ 0 and the laws are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def make_layer(kind, in_f, out_f, r, alpha, fifo, dtype, enable=None, **kw):
    if kind == "Linear":
        layer = L.Linear(in_f, out_f, r=r, lora_alpha=alpha, fan_in_fan_out=fifo, **kw)
    else:
        layer = L.MergedLinear(in_f, out_f, r=r, lora_alpha=alpha, enable_lora=enable,
                               fan_in_fan_out=fifo, **kw)
    return layer.to(dtype)


@st.composite
def lora_layers(draw, merge_weights=True):
    """A Linear or MergedLinear with random shape, rank, alpha, layout, dtype and non-zero B."""
    kind = draw(st.sampled_from(["Linear", "MergedLinear"]))
    enable = draw(enable_patterns()) if kind == "MergedLinear" else None
    groups = len(enable) if enable else 1
    in_f, out_f = draw(st.integers(1, 12)), groups * draw(st.integers(1, 6))
    layer = make_layer(kind, in_f, out_f, draw(ranks), draw(alphas), draw(st.booleans()),
                       draw(dtypes), enable, merge_weights=merge_weights)
    randomize_lora(layer, draw(seeds))
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 4)), in_f,
                    generator=torch.Generator().manual_seed(draw(seeds)), dtype=layer.weight.dtype)
    return layer, x


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    return L.GPT2LMModel(config)


def token_batch(config, seed, batch=2, length=None):
    g = torch.Generator().manual_seed(seed)
    length = config.n_ctx if length is None else length
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


# ---- 1. parameter counts ---------------------------------------------------------------------

@given(config=tiny_configs())
def test_lora_parameter_count_formula_equals_trainable_parameters(config):
    """n_layer × 2 × (n_embd + n_embd) × r is exactly what mark_only_lora_as_trainable leaves
    trainable, for any sizes and rank."""
    model = tiny_model(config)
    L.mark_only_lora_as_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == L.lora_parameter_count(config)


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
def test_merged_output_equals_unmerged_output(layer_x):
    """W0 x + scaling·B A x computed in two thin products (with or without autograd) equals
    (W0 + scaling·ΔW) x, for Linear and MergedLinear, every enable_lora pattern, both layouts,
    float32 and float64."""
    layer, x = layer_x
    unmerged = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=0)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, **tolerance(x.dtype))


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


# ---- 5. state dicts and checkpoints ----------------------------------------------------------

def test_state_dict_keys_and_shapes_match_microsoft_lora():
    """Keys and shapes of microsoft/LoRA's examples/NLG GPT2LMModel (without the mask buffer)."""
    C, r, V, P = 8, 2, 11, 16
    config = L.GPT2Config(vocab_size=V, n_positions=P, n_ctx=P, n_embd=C, n_layer=2, n_head=2,
                          lora_attn_dim=r)
    sd = tiny_model(config).state_dict()
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for i in range(2):
        h = f"transformer.h.{i}."
        expected.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_attn.lora_A": (2 * r, C), h + "attn.c_attn.lora_B": (2 * C, r),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    expected.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,),
                     "lm_head.decoder.weight": (V, C)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert list(sd) == list(expected)  # same order as well


@given(config=tiny_configs(min_rank=1), seed=seeds,
       bias=st.sampled_from(["none", "all", "lora_only"]))
def test_lora_only_checkpoint_round_trip_restores_outputs(config, seed, bias, tmp_path_factory):
    """lora_state_dict holds only LoRA tensors (plus the biases `bias` asks for); saved, loaded
    with weights_only=True into a model with the same base, it restores the logits."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed)
    sd = L.lora_state_dict(model, bias=bias)
    lora_keys = {k for k in sd if "lora_" in k}
    assert lora_keys == {k for k in model.state_dict() if "lora_" in k}
    others = set(sd) - lora_keys
    if bias == "none":
        assert not others
    elif bias == "lora_only":
        assert others == {f"transformer.h.{i}.attn.c_attn.bias" for i in range(config.n_layer)}
    else:
        assert others == {k for k in model.state_dict() if k.endswith("bias")}
    path = tmp_path_factory.mktemp("ckpt") / "lora.pt"
    torch.save(sd, path)
    fresh = tiny_model(config, seed).eval()  # same seed: same base, fresh adapters
    fresh.load_weight(path)
    ids = token_batch(config, seed)
    torch.testing.assert_close(fresh(ids)[0], model(ids)[0], rtol=0, atol=0)


@given(config=tiny_configs(min_rank=1), seed=seeds, merged_first=st.booleans())
def test_merged_state_dict_loads_into_plain_gpt2_with_same_logits(config, seed, merged_first):
    """merged_state_dict folds ΔW into W once, whether or not the model is merged already: a
    rank-0 model loaded with it gives the adapted logits."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed, std=0.2)
    if merged_first:
        L.merge_lora(model)
    plain = tiny_model(L.GPT2Config.from_dict({**config.to_dict(), "lora_attn_dim": 0}), 99).eval()
    plain.load_state_dict(L.merged_state_dict(model))
    ids = token_batch(config, seed)
    torch.testing.assert_close(plain(ids)[0], model(ids)[0], rtol=1e-4, atol=1e-5)
    assert model.transformer.h[0].attn.c_attn.merged == merged_first  # the model is left as it was


@given(config=tiny_configs(min_rank=1), seed=seeds)
def test_whole_model_merge_matches_unmerged_and_unmerge_restores(config, seed):
    """merge_lora / unmerge_lora: same logits merged, and the weights come back."""
    model = tiny_model(config, seed).eval()
    randomize_lora(model, seed, std=0.2)
    ids = token_batch(config, seed)
    before = model(ids)[0]
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    L.merge_lora(model)
    torch.testing.assert_close(model(ids)[0], before, rtol=1e-4, atol=1e-5)
    L.unmerge_lora(model)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight.detach(), w, rtol=1e-5,
                               atol=1e-6)


def test_microsoft_lora_checkpoints_load_full_and_lora_only(tmp_path):
    """The files microsoft/LoRA writes: {'model_state_dict': ...} with DDP's 'module.' prefix,
    full or LoRA-only; from_pretrained reads the rank from lora_A's shape."""
    config = L.GPT2Config(vocab_size=17, n_positions=16, n_ctx=16, n_embd=8, n_layer=2, n_head=2,
                          lora_attn_dim=3, lora_attn_alpha=6)
    model = tiny_model(config, 1).eval()
    randomize_lora(model, 1)
    ids = token_batch(config, 0)
    full = {"model_state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    for i in range(config.n_layer):  # microsoft/LoRA also saves its causal-mask buffer
        full["model_state_dict"][f"module.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16)
    torch.save(full, tmp_path / "model.full.pt")
    loaded = L.GPT2LMModel.from_pretrained(tmp_path / "model.full.pt", n_head=2,
                                           lora_attn_alpha=6).eval()
    assert loaded.config.lora_attn_dim == 3
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)

    lora_only = {"model_state_dict": {"module." + k: v
                                      for k, v in L.lora_state_dict(model).items()}}
    torch.save(lora_only, tmp_path / "model.lora.pt")
    base = tiny_model(config, 1).eval()
    base.load_weight(tmp_path / "model.lora.pt")
    torch.testing.assert_close(base(ids)[0], model(ids)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="LoRA-only"):
        L.GPT2LMModel.from_pretrained(tmp_path / "model.lora.pt")


def test_checkpoint_that_does_not_fit_names_key_and_both_shapes(tmp_path):
    """A checkpoint of other sizes, or with a rank the model lacks, is refused with a clear
    error."""
    small = L.GPT2Config(vocab_size=17, n_positions=16, n_ctx=16, n_embd=8, n_layer=1, n_head=2,
                         lora_attn_dim=2)
    sd = tiny_model(small).state_dict()
    wider = tiny_model(L.GPT2Config.from_dict({**small.to_dict(), "n_embd": 12}))
    with pytest.raises(ValueError, match=r"wte\.weight.*\(17, 8\).*\(17, 12\)"):
        wider.load_weight(sd)
    rank0 = tiny_model(L.GPT2Config.from_dict({**small.to_dict(), "lora_attn_dim": 0}))
    with pytest.raises(ValueError, match="lora_attn_dim"):
        rank0.load_weight(sd)
    partial = {k: v for k, v in sd.items() if "c_fc" not in k}
    with pytest.raises(ValueError, match="missing.*c_fc"):
        tiny_model(small).load_weight(partial)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        tiny_model(small).load_weight(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="no checkpoint"):
        L.GPT2LMModel.from_pretrained(tmp_path / "absent")


def test_weights_file_config_inference_and_key_forms():
    """From shapes alone: sizes from wte/wpe/h.N, n_head from the GPT-2 size of that width; from a
    Hugging Face config.json: its epsilon, and n_ctx capped at n_positions. Old OpenAI-style
    `.w/.g/.b` names and torch.compile's `_orig_mod.` prefix load like the usual keys."""
    meta = {"wte.weight": torch.empty(50257, 1024, device="meta"),
            "wpe.weight": torch.empty(1024, 1024, device="meta"),
            "h.23.ln_1.weight": torch.empty(1024, device="meta")}
    assert L._config_from_shapes(meta, {}) == dict(vocab_size=50257, n_embd=1024, n_positions=1024,
                                                   n_ctx=1024, n_layer=24, n_head=16)
    cfg = L._config_from_hf_json({"n_embd": 32, "n_head": 4, "n_layer": 1, "n_positions": 64,
                                  "n_ctx": 128, "layer_norm_epsilon": 1e-6}, "config.json")
    assert cfg["n_ctx"] == 64 and cfg["layer_norm_epsilon"] == 1e-6
    with pytest.raises(ValueError, match="activation_function"):
        L._config_from_hf_json({"activation_function": "relu"}, "config.json")

    config = L.GPT2Config(vocab_size=17, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                          lora_attn_dim=2)
    source = tiny_model(config, 1).eval()
    randomize_lora(source, 1)
    old_style = {}
    for k, v in source.state_dict().items():
        k = "_orig_mod." + k
        old_style[k[:-len(".weight")] + ".w" if k.endswith("c_fc.weight") else
                  k[:-len(".bias")] + ".b" if k.endswith("c_fc.bias") else k] = v
    target = tiny_model(config, 2).eval()
    target.load_weight(old_style)
    ids = token_batch(config, 0)
    torch.testing.assert_close(target(ids)[0], source(ids)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no GPT-2 or LoRA weights"):
        target.load_weight({"lm_head.weight": torch.zeros(17, 8)})
    some_lora = {k: v for k, v in source.state_dict().items() if "lora_A" in k}
    with pytest.raises(ValueError, match="some LoRA weights but not all"):
        target.load_weight(some_lora)


def test_from_pretrained_with_lora_weights_asks_for_alpha(tmp_path):
    """No checkpoint records α, and scaling = α/r rescales ΔW: a file with LoRA weights needs
    lora_attn_alpha, and with it the logits come back exactly."""
    config = L.GPT2Config(vocab_size=17, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                          lora_attn_dim=2, lora_attn_alpha=32)
    model = tiny_model(config, 1).eval()
    randomize_lora(model, 1)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    with pytest.raises(ValueError, match="pass lora_attn_alpha"):
        L.GPT2LMModel.from_pretrained(tmp_path / "full.pt", n_head=2)
    loaded = L.GPT2LMModel.from_pretrained(tmp_path / "full.pt", n_head=2,
                                           lora_attn_alpha=32).eval()
    ids = token_batch(config, 0)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_hub_name_without_huggingface_hub_says_what_to_install(monkeypatch, tmp_path):
    """A hub name with huggingface_hub missing gives a ValueError with the pip command."""
    monkeypatch.chdir(tmp_path)  # no local folder called "gpt2"
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        L.GPT2LMModel.from_pretrained("gpt2")


def test_hub_name_downloads_config_and_weights_through_huggingface_hub(monkeypatch, tmp_path):
    """A hub name asks huggingface_hub for the safetensors weights and config.json of the matching
    openai-community repository, then loads the folder they landed in (a stand-in module here
    serves a tiny local checkpoint; no network)."""
    import types
    save_file = pytest.importorskip("safetensors.torch").save_file
    folder = tmp_path / "snapshot"
    config = L.GPT2Config(vocab_size=19, n_positions=8, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    model = tiny_model(config, 4)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.decoder.weight"},
              folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 19, '
                                        '"n_positions": 8, "n_embd": 8, "n_layer": 1, '
                                        '"n_head": 2}')
    asked = []

    def hf_hub_download(repo_id, filename):
        asked.append((repo_id, filename))
        if not (folder / filename).exists():
            raise FileNotFoundError(filename)
        return str(folder / filename)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=hf_hub_download))
    loaded = L.GPT2LMModel.from_pretrained("gpt2-medium", lora_attn_dim=2)
    assert asked == [("openai-community/gpt2-medium", "model.safetensors"),
                     ("openai-community/gpt2-medium", "config.json")]
    ids = token_batch(config, 0)
    torch.testing.assert_close(loaded.eval()(ids)[0], model.eval()(ids)[0], rtol=0, atol=0)

    def offline(repo_id, filename):
        raise OSError("network is unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(ValueError,
                       match="could not download openai-community/gpt2 .*network is unreachable"):
        L.GPT2LMModel.from_pretrained("gpt2")


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


# ---- 8. Hugging Face and PEFT formats: save_pretrained, save_adapter, load_adapter ----------

# The largest differences seen against the oracles, by dtype; the oracle test prints them.
MAX_DIFFS = {}


def record(what, dtype, diff):
    key = f"{what} ({str(dtype).replace('torch.', '')})"
    MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), diff)
    return diff


def tiny_lora_model(seed=0, r=2, alpha=6.0, **sizes):
    """A random GPT-2 with LoRA; initializer_range 0.3 makes every mistake show in the logits."""
    torch.manual_seed(seed)
    config = L.GPT2Config(**{**dict(vocab_size=50, n_positions=8, n_ctx=8, n_embd=12, n_layer=2,
                                    n_head=3, initializer_range=0.3, lora_attn_dim=r,
                                    lora_attn_alpha=alpha), **sizes})
    model = L.GPT2LMModel(config).eval()
    if r:
        randomize_lora(model, seed + 1)
        L.mark_only_lora_as_trainable(model)  # what an adapter carries; save_adapter refuses more
    return model


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, model.config.n_ctx),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0], ids


def no_temp_files(folder):
    return not [f for f in os.listdir(folder) if f.endswith(".tmp")]


# ---- the oracles: transformers and peft ------------------------------------------------------

@settings(max_examples=3)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), n_head=st.integers(1, 2),
       head_size=st.integers(4, 8), n_layer=st.integers(1, 2), r=st.integers(1, 3),
       alpha=st.floats(0.5, 32.0), seed=st.integers(0, 2**16))
def test_exported_folder_and_adapter_give_our_logits_in_transformers_and_peft(
        dtype, n_head, head_size, n_layer, r, alpha, seed):
    """A random Hugging Face checkpoint loaded with a random LoRA: save_pretrained's folder gives
    our logits in transformers.GPT2LMHeadModel (in our dtype, read from config.json), and
    save_adapter's folder on that checkpoint gives them in peft.PeftModel; load_adapter into a
    fresh base is exact (bitwise). In float64 all agree to 1e-10 (a wrong α, layout or GELU would
    be off by far more). In float32 merging a large ΔW alone moves the logits by up to ~2e-4
    (initializer_range 0.3, B of std 0.5 and α/r up to 32 amplify rounding), so there the merged
    folder is held to our merged model's logits, and the adapter to our unmerged ones, by 2e-5."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    with tempfile.TemporaryDirectory() as tmp:
        base, merged, adapter = (os.path.join(tmp, f) for f in ("base", "merged", "adapter"))
        torch.manual_seed(seed)
        hf_config = transformers.GPT2Config(
            vocab_size=50, n_positions=8, n_embd=n_head * head_size, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            initializer_range=0.3)
        transformers.GPT2LMHeadModel(hf_config).save_pretrained(base)
        ours = L.GPT2LMModel.from_pretrained(base, lora_attn_dim=r,
                                             lora_attn_alpha=alpha).to(dtype).eval()
        randomize_lora(ours, seed)
        L.mark_only_lora_as_trainable(ours)
        expected, ids = logits(ours, seed)

        L.save_pretrained(ours, merged)
        hf = transformers.GPT2LMHeadModel.from_pretrained(merged, dtype="auto").eval()
        assert hf.dtype == dtype
        merged_ours = copy.deepcopy(ours)
        L.merge_lora(merged_ours)
        with torch.no_grad():
            got = hf(ids).logits
        diff = record("merged vs transformers", dtype, (got - expected).abs().max().item())
        assert diff <= tol or dtype == torch.float32  # float32: merging's own rounding, see above
        assert record("merged vs transformers, both merged", dtype,
                      (got - logits(merged_ours, seed)[0]).abs().max().item()) <= tol

        L.save_adapter(ours, adapter, base_model_name_or_path=base)
        hf_base = transformers.GPT2LMHeadModel.from_pretrained(base, dtype=dtype)
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(hf_base, adapter).eval()(ids).logits
        assert record("adapter vs peft", dtype, (got - expected).abs().max().item()) <= tol

        fresh = L.GPT2LMModel.from_pretrained(base, lora_attn_dim=r,
                                              lora_attn_alpha=alpha).to(dtype).eval()
        L.load_adapter(fresh, adapter)
        got = logits(fresh, seed)[0]
        record("adapter round trip", dtype, (got - expected).abs().max().item())
        assert torch.equal(got, expected)
        for (name, p), q in zip(ours.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), name
    print(f"\nmax |Δlogits| so far: {MAX_DIFFS}")


# ---- save_pretrained without the oracles -----------------------------------------------------

@needs_safetensors
@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_leaves_the_model_bit_identical_and_reads_back_to_its_logits(
        tmp_path, monkeypatch, merged):
    """save_pretrained changes no bit of the model, merged or not, needs neither transformers
    nor peft, writes Hugging Face keys without LoRA tensors or a second copy of the tied head,
    and our own from_pretrained reads the folder back to the same logits."""
    model = tiny_lora_model(fix_dropout=0.25)
    if merged:
        L.merge_lora(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    expected, ids = logits(model)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "peft", None)
    L.save_pretrained(model, tmp_path / "out")
    L.save_adapter(model, tmp_path / "adapter")
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    assert all(layer.merged == merged for layer in L._lora_layers(model))

    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert "transformer.h.1.attn.c_attn.weight" in keys and "transformer.wte.weight" in keys
    assert not [k for k in keys if "lora_" in k or not k.startswith("transformer.")]
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["resid_pdrop"] == hf_config["attn_pdrop"] == hf_config["embd_pdrop"] == 0.25
    assert hf_config["model_type"] == "gpt2" and hf_config["tie_word_embeddings"] is True
    back = L.GPT2LMModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.lora_attn_dim == 0
    with torch.no_grad():
        got = back(ids)[0]
    record("our own merged folder", got.dtype, (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert no_temp_files(tmp_path / "out")


@needs_safetensors
def test_exported_files_get_the_permissions_of_any_new_file(tmp_path):
    """Weights and config alike are readable as the umask allows (safetensors alone writes 0600):
    a folder shared with other users or a web server is readable as a whole."""
    previous = os.umask(0o022)
    try:
        model = tiny_lora_model()
        L.save_pretrained(model, tmp_path / "hf")
        L.save_adapter(model, tmp_path / "peft")
    finally:
        os.umask(previous)
    for path in sorted(tmp_path.glob("*/*")):
        assert path.stat().st_mode & 0o777 == 0o644, path


@needs_safetensors
def test_a_plain_model_has_no_adapter_to_save_and_a_file_is_no_folder(tmp_path):
    """save_adapter refuses a rank-0 model; no export writes into a path that is a file."""
    with pytest.raises(ValueError, match="lora_attn_dim = 0"):
        L.save_adapter(tiny_lora_model(r=0), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        L.save_pretrained(tiny_lora_model(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


# ---- load_adapter refuses what it cannot represent --------------------------------------------

def _edit_adapter(folder, config=None, tensors=None, metadata=None):
    """Rewrite an adapter folder: config(dict) and tensors(dict of tensors) edit in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(sd)
        save_file(sd, path, metadata or meta)
    if config:
        cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
        config(cfg)
        json.dump(cfg, open(os.path.join(folder, "adapter_config.json"), "w"))


KEY_B = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
UNSUPPORTED = {  # name: (edit of the saved adapter, model to load into, error message)
    "K rows": (dict(tensors=lambda sd: sd[KEY_B][12:24, 0].fill_(1.0)), {}, "non-zero K rows"),
    "Q reads A_v": (dict(tensors=lambda sd: sd[KEY_B][0, 2].fill_(1.0)), {}, "not block-diagonal"),
    "V reads A_q": (dict(tensors=lambda sd: sd[KEY_B][24, 0].fill_(1.0)), {}, "not block-diagonal"),
    "other module": (dict(tensors=lambda sd: sd.update({KEY_B.replace("c_attn", "c_proj"):
                                                        sd[KEY_B].clone()})),
                     {}, "cannot hold: .*c_proj"),
    "other targets": (dict(config=lambda c: c.update(target_modules=["c_attn", "c_fc"])), {},
                      "target_modules"),
    "rsLoRA": (dict(config=lambda c: c.update(use_rslora=True)), {}, "use_rslora"),
    "DoRA": (dict(config=lambda c: c.update(use_dora=True)), {}, "use_dora"),
    "rank pattern": (dict(config=lambda c: c.update(rank_pattern={"h.0": 8})), {}, "rank_pattern"),
    "not LoRA": (dict(config=lambda c: c.update(peft_type="IA3")), {}, "peft_type = 'IA3'"),
    "odd rank": (dict(config=lambda c: c.update(r=3)), {},
                 r"r' = 3, .*lora_attn_dim = r'/2 \(r' even\)"),
    "other rank": ({}, dict(r=1, alpha=3.0), r"r' = 4, α' = 12.0 .*this one has 1 and 3.0"),
    "rank 0": ({}, dict(r=0), r"lora_attn_dim = r'/2 .*lora_attn_alpha = α'/2; this one has 0"),
    "other alpha": ({}, dict(alpha=5.0), "this one has 2 and 5.0"),
    "missing layer": (dict(tensors=lambda sd: [sd.pop(k) for k in list(sd) if ".h.1." in k]), {},
                      r"missing: .*h\.1\."),
    "other size": ({}, dict(n_embd=8, n_head=2), "do not fit this model.s size"),
    "other base": ({}, dict(seed=7), "another base"),
}


@needs_safetensors
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_an_adapter_this_model_cannot_represent_is_refused_and_changes_nothing(tmp_path, case):
    """Each adapter that would not reproduce its logits here raises a ValueError naming the
    problem, and leaves the model it was loaded into untouched."""
    edit, model_args, message = UNSUPPORTED[case]
    L.save_adapter(tiny_lora_model(), tmp_path)
    _edit_adapter(tmp_path, **edit)
    model = tiny_lora_model(**{"r": 2, **model_args})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        L.load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_safetensors
def test_load_adapter_keeps_a_merged_model_merged_with_the_new_update(tmp_path):
    """Loading into a merged model re-merges with the loaded A, B: the logits are the saver's.
    (The adapter's fingerprint is dropped here: a merged model's W0 is only known up to rounding,
    see the next test.)"""
    saver = tiny_lora_model(seed=0)
    L.save_adapter(saver, tmp_path)
    _edit_adapter(tmp_path, tensors=lambda sd: None, metadata={"format": "pt"})
    model = tiny_lora_model(seed=0)
    randomize_lora(model, 99)
    L.merge_lora(model)
    L.load_adapter(model, tmp_path)
    assert all(layer.merged for layer in L._lora_layers(model))
    torch.testing.assert_close(logits(model)[0], logits(saver)[0], rtol=0, atol=1e-5)


@needs_safetensors
def test_an_adapter_saved_after_a_merge_cycle_loads_onto_its_untouched_base(tmp_path):
    """merge_lora then unmerge_lora (an evaluation, say) before save_adapter: the adapter still
    loads onto the very base it was trained on, and gives the saver's logits."""
    saver = tiny_lora_model(seed=0)
    L.merge_lora(saver)
    L.unmerge_lora(saver)
    L.save_adapter(saver, tmp_path)
    loaded = tiny_lora_model(seed=0)
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if "lora_" in name:
                p.zero_()  # so that only the loaded adapter can give the saver's logits
    L.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(saver), rtol=1e-5, atol=1e-5)


# ---- optional safetensors, interrupted writes -------------------------------------------------

def test_without_safetensors_every_format_says_what_to_install(tmp_path, monkeypatch):
    """With safetensors missing, export and import raise a ValueError naming the package."""
    model = tiny_lora_model()
    (tmp_path / "adapter").mkdir()  # a folder in the adapter's form, written without safetensors
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for call in (lambda: L.save_pretrained(model, tmp_path / "a"),
                 lambda: L.save_adapter(model, tmp_path / "b"),
                 lambda: L.load_adapter(model, tmp_path / "adapter")):
        with pytest.raises(ValueError, match="pip install safetensors"):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@needs_safetensors
@pytest.mark.parametrize("fail_at", ["weights", "config", "replace 1", "replace 2"])
def test_an_interrupted_export_over_an_old_one_loads_old_new_or_not_at_all(tmp_path, monkeypatch,
                                                                           fail_at):
    """An export that dies at any step (half-way through writing a file, or moving one into
    place) leaves no temporary file, and a folder that loads as the old adapter, as the new one,
    or not at all: never the new weights with the old α."""
    import safetensors.torch
    old, new = tiny_lora_model(seed=0, alpha=6.0), tiny_lora_model(seed=0, alpha=2.0)
    randomize_lora(new, 5)
    L.save_adapter(old, tmp_path)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if fail_at == f"replace {len(calls)}":
            raise KeyboardInterrupt
        real_replace(src, dst)

    def half_written(tensors, path, metadata):
        with open(path, "w") as f:
            f.write("{")
        raise OSError("disk full while writing the weights")

    def no_json(*args, **kwargs):
        raise OSError("disk full while writing the config")

    monkeypatch.setattr(os, "replace", replace)
    if fail_at == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    if fail_at == "config":
        monkeypatch.setattr(json, "dumps", no_json)
    with pytest.raises((OSError, KeyboardInterrupt)):
        L.save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert no_temp_files(tmp_path)
    for saver, alpha in ((old, 6.0), (new, 2.0)):
        reader = tiny_lora_model(seed=0, alpha=alpha)
        try:
            L.load_adapter(reader, tmp_path)
        except ValueError:  # no adapter_config.json, or the other α: nothing loads
            continue
        assert torch.equal(logits(reader)[0], logits(saver)[0])


@needs_safetensors
def test_an_interrupted_first_export_leaves_no_config_and_no_temp_files(tmp_path, monkeypatch):
    """Dying between moving the weights and the config into a new folder leaves the weights
    alone, without the config.json every loader looks for first."""
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: real_replace(s, d) if d.endswith(".safetensors")
                        else (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        L.save_pretrained(tiny_lora_model(), tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]


# ---- an adapter goes only onto its base: merged exports, W0, precision, biases, fields ---------

@needs_safetensors
def test_an_adapter_is_refused_on_the_merged_export_of_its_own_model(tmp_path):
    """The merged export holds W0 + ΔW in c_attn: an adapter loaded on it would count ΔW twice."""
    model = tiny_lora_model()
    model.save_adapter(tmp_path / "ad")
    model.save_pretrained(tmp_path / "merged")
    merged = L.GPT2LMModel.from_pretrained(tmp_path / "merged", lora_attn_dim=2, lora_attn_alpha=6)
    with pytest.raises(ValueError, match="another base: transformer.h.0.attn.c_attn.weight is not"):
        merged.load_adapter(tmp_path / "ad")


@needs_safetensors
def test_an_export_never_joins_a_folder_holding_the_other_kind(tmp_path):
    """transformers loads a folder's config.json and adapter_config.json as one model: a merged
    export into an adapter's folder, or an adapter into a model folder, is refused, writing
    nothing."""
    model = tiny_lora_model()
    model.save_adapter(tmp_path / "ad")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="holds another export's adapter_config.json"):
        model.save_pretrained(tmp_path / "ad")
    with pytest.raises(ValueError, match="holds another export's config.json"):
        model.save_adapter(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json",
                                                   "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


@needs_safetensors
def test_an_adapter_is_refused_on_a_base_whose_w0_holds_a_nan(tmp_path):
    """A NaN in c_attn's W0 is no rounding difference (every comparison with NaN is false)."""
    tiny_lora_model().save_adapter(tmp_path)
    base = tiny_lora_model()
    with torch.no_grad():
        base.transformer.h[1].attn.c_attn.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="c_attn.weight is not the W0 recorded"):
        base.load_adapter(tmp_path)


def test_save_adapter_refuses_a_model_that_no_longer_says_what_trained(tmp_path):
    """After requires_grad_(False) the trained biases cannot be told from frozen ones: refused,
    rather than an adapter that silently leaves them out."""
    model = tiny_lora_model()
    L.mark_only_lora_as_trainable(model, bias="all")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no LoRA weight requires grad"):
        model.save_adapter(tmp_path / "ad")
    assert not os.path.exists(tmp_path / "ad")


@needs_safetensors
def test_base_record_accepts_w0_after_300_merge_cycles_and_refuses_a_changed_adapted_weight(
        tmp_path):
    """The record compares W0 of c_attn within 1e-4·‖W0‖: 300 merge/unmerge cycles of a ΔW 41
    times ‖W0‖ (float32 rounding moves W0 by ~3e-6·‖W0‖) stay inside; one layer's W0 moved by
    1e-3·‖W0‖ is refused, by 1e-7·‖W0‖ (below rounding) accepted; a record not JSON is
    unreadable."""
    saver = tiny_lora_model()
    saver.save_adapter(tmp_path)
    cycled = tiny_lora_model()
    randomize_lora(cycled, 3, std=2.0)  # ‖ΔW‖ = 41·‖W0‖ in layer 0
    for _ in range(300):
        L.merge_lora(cycled)
        L.unmerge_lora(cycled)
    w0 = saver.transformer.h[1].attn.c_attn.weight
    assert not torch.equal(cycled.transformer.h[1].attn.c_attn.weight, w0)  # rounding did move it
    cycled.load_adapter(tmp_path)
    torch.testing.assert_close(logits(cycled)[0], logits(saver)[0], rtol=0, atol=1e-4)
    for size, refused in ((1e-3, True), (1e-7, False)):
        model = tiny_lora_model()
        with torch.no_grad():
            noise = torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
            model.transformer.h[1].attn.c_attn.weight += noise * size * w0.norm() / noise.norm()
        if refused:
            with pytest.raises(ValueError, match="h.1.attn.c_attn.weight is not the W0"):
                model.load_adapter(tmp_path)
        else:
            model.load_adapter(tmp_path)
    assert "an unreadable base record" in L.base_difference(saver, "{not json")


@needs_safetensors
def test_a_float32_adapter_refuses_a_bfloat16_base_and_a_bfloat16_one_loads_on_its_upcast(tmp_path):
    """Another precision is named, with the dtype to load the base in; a base that holds the very
    values in a wider dtype (bfloat16 → float32 is exact) is the same base, as if cast first."""
    model = tiny_lora_model()
    model.save_adapter(tmp_path / "f32")
    message = r"another precision \(bfloat16, not float32\): load the base in float32, as saved"
    with pytest.raises(ValueError, match=message):
        tiny_lora_model().to(torch.bfloat16).load_adapter(tmp_path / "f32")
    model.to(torch.bfloat16).save_adapter(tmp_path / "bf16")
    upcast = tiny_lora_model().to(torch.bfloat16).float().load_adapter(tmp_path / "bf16")
    assert torch.equal(logits(upcast)[0], logits(model.float())[0])


@needs_safetensors
def test_an_adapter_recorded_before_w0_was_covered_loads_on_its_frozen_parts(tmp_path):
    """Older adapters hold a SHA-256 of the frozen parts without c_attn: checked as they were."""
    import hashlib
    model, h = tiny_lora_model(), hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(k for k in sd if k.startswith("transformer.") and "lora_" not in k
                    and "c_attn.weight" not in k):
        v = sd[k].to(torch.float32).contiguous()
        h.update(f"{k}:{tuple(v.shape)};".encode() + v.numpy().tobytes())
    model.save_adapter(tmp_path)
    old_record = {"format": "pt", "base_fingerprint": h.hexdigest()}
    _edit_adapter(tmp_path, tensors=lambda sd: None, metadata=old_record)
    tiny_lora_model().load_adapter(tmp_path)
    with pytest.raises(ValueError, match="another base"):
        tiny_lora_model(seed=3).load_adapter(tmp_path)


@needs_safetensors
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_go_with_the_adapter_and_peft_reproduces_our_logits(tmp_path, bias):
    """After mark_only_lora_as_trainable(bias=...) the adapter says bias = lora_only or all and
    carries those biases (as PEFT names them); load_adapter onto the untrained base restores the
    model bit for bit, and peft gives its logits."""
    model = tiny_lora_model()
    L.mark_only_lora_as_trainable(model, bias=bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(1.0)  # "trained"
    model.save_adapter(tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["bias"] == bias
    fresh = tiny_lora_model()
    fresh.load_adapter(tmp_path)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    if bias == "all":
        transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
        base = tiny_lora_model()
        for layer in L._lora_layers(base):
            layer.lora_B.data.zero_()
        base.save_pretrained(tmp_path / "base")  # W0 and the untrained biases
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        expected, ids = logits(model)
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(hf, tmp_path).eval()(ids).logits
        assert (got - expected).abs().max() < 1e-4


def test_save_adapter_refuses_a_model_with_trainable_weights_an_adapter_cannot_carry(tmp_path):
    model = tiny_lora_model()
    model.transformer.wte.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"transformer.wte.weight require grad: .*save_pretrained"):
        model.save_adapter(tmp_path)
    assert not os.listdir(tmp_path)


@needs_safetensors
@pytest.mark.parametrize("field, value", [
    ("layers_to_transform", [0]), ("layers_pattern", "h"), ("exclude_modules", ["h.1.attn.c_attn"]),
    ("modules_to_save", ["lm_head"]), ("alpha_pattern", {"h.0": 3}), ("layer_replication", [[0]]),
    ("init_lora_weights", "pissa"), ("lora_bias", True), ("trainable_token_indices", [1]),
    ("a_field_of_a_newer_peft", 1), ("bias", "some")])
def test_load_adapter_refuses_every_field_it_does_not_model_unless_neutral(tmp_path, field, value):
    model = tiny_lora_model()
    model.save_adapter(tmp_path)
    _edit_adapter(tmp_path, config=lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=f"{field} = .* is not supported"):
        tiny_lora_model().load_adapter(tmp_path)
    neutral = {field: "none" if field == "bias" else None, "revision": "main",
               "inference_mode": True, "init_lora_weights": "gaussian", "peft_version": "9.9"}
    _edit_adapter(tmp_path, config=lambda c: c.update(neutral))
    tiny_lora_model().load_adapter(tmp_path)


@needs_safetensors
def test_stale_export_temp_files_are_removed_and_a_failed_write_is_an_oserror(tmp_path,
                                                                              monkeypatch):
    import safetensors.torch
    model = tiny_lora_model()
    tmp_path.joinpath(".model.safetensors.99999.tmp").write_text("killed")
    tmp_path.joinpath(".config.json.1.tmp").write_text("killed")
    tmp_path.joinpath(".mine.1.tmp").write_text("not an export's")
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".mine.1.tmp", "config.json", "model.safetensors"]

    def full(*args):
        raise safetensors.SafetensorError("Error while serializing: No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'a'}: Error while serializing"):
        model.save_adapter(tmp_path / "a")
    assert no_temp_files(tmp_path / "a")


def test_weights_that_are_not_floating_point_are_refused_by_name():
    model = tiny_lora_model(r=0)
    for dtype in (torch.int64, torch.bool):
        sd = {**model.state_dict(), "transformer.h.1.ln_1.weight": torch.ones(12, dtype=dtype)}
        with pytest.raises(ValueError, match=f"'transformer.h.1.ln_1.weight' is {dtype}"):
            model.load_weight(sd)


@needs_safetensors
def test_an_unreadable_file_says_permission_denied_and_a_sharded_folder_says_sharded(tmp_path,
                                                                                     monkeypatch):
    model = tiny_lora_model(r=0)
    model.save_pretrained(tmp_path / "hf")

    def denied(path, *args, **kwargs):  # the weights only: config.json is read as usual
        if str(path).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(L, "open", denied, raising=False)  # as for another user's file (not root)
    with pytest.raises(ValueError, match="Permission denied"):
        L.GPT2LMModel.from_pretrained(tmp_path / "hf")
    monkeypatch.undo()
    os.rename(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "model-00001-of-00002.bin")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ValueError, match="hf: sharded checkpoints are not read"):
        L.GPT2LMModel.from_pretrained(tmp_path / "hf")


# ==============================================================================================
# 9. train_shakespeare.py: tiny end-to-end runs on a text the tests write themselves
# ==============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_shakespeare.py")

# A tiny model and a short schedule: a whole base + LoRA run takes about a second.
SIZES = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64"]  # of the scratch base
SCHEDULE = ["--block-size", "32", "--batch-size", "8", "--base-iters", "30", "--base-lr", "3e-3",
            "--max-iters", "20", "--warmup", "2", "--eval-interval", "5", "--eval-iters", "4",
            "--rank", "2", "--alpha", "8", "--lora-dropout", "0.1", "--lr", "1e-2",
            "--sample", "16", "--device", "cpu", "--seed", "7"]
TRAIN_TINY = SIZES + SCHEDULE


def without(args, option, n_values=1):
    i = args.index(option)
    return args[:i] + args[i + 1 + n_values:]


def make_text(n_lines: int = 600, seed: int = 0) -> str:
    """Play-like lines over a small vocabulary: enough structure to learn in a few steps. The
    second half speaks with other words than the first, so adapting a base pretrained on the
    first half to the rest lowers the held-out loss clearly (as the scratch path intends)."""
    rng = random.Random(seed)
    vocabularies = [("the and of to my thy thee love night day sweet good lord lady fair heart "
                     "death light moon star").split(),
                    ("sword kiss name rose tomb poison banish friar art thou hence anon marry "
                     "prithee forsooth villain").split()]
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR", "TYBALT"]
    lines = []
    for i in range(n_lines):
        words = vocabularies[i * 2 // n_lines]
        if rng.random() < 0.2:
            lines.append(f"\n{rng.choice(names)}:")
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
        lines.append(line.capitalize() + rng.choice(",.;!?"))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "play.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file):
    """One complete scratch base + LoRA run, shared read-only by several tests."""
    out = str(tmp_path_factory.mktemp("run"))
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    return report, out


def copy_run(run_dir, dest, everything=False):
    """The cached base of a run (or all its files) in another folder, to start from without
    pretraining again."""
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(run_dir):
        if everything or f.startswith("base-"):
            shutil.copy(os.path.join(run_dir, f), dest)
    return str(dest)


def held_out(model, text_file, eval_iters=4):
    """(loss, accuracy) on the script's held-out windows, computed here from the logits."""
    s = argparse.Namespace(block_size=32, batch_size=8, eval_iters=eval_iters)
    text = open(text_file, encoding="utf-8").read()
    ids = torch.tensor(ts.encode({"type": "char", "chars": "".join(sorted(set(text)))}, text,
                                 "text"))
    _, _, val, windows = ts.split(ids, s, scratch=True)
    windows = val[windows[:, None] + torch.arange(33)]
    with torch.no_grad():
        logits = model.eval()(windows[:, :-1])[0]
    loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    return loss, (logits.argmax(-1) == windows[:, 1:]).double().mean().item()


def one_line_error(argv, capsys, code=1):
    """Run the command in-process; it must fail with one line on stderr. Returns that line."""
    assert ts.cli(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "weights_only" not in err, err  # never the advice to load unsafely
    return err


# ---- an end-to-end run ------------------------------------------------------------------------

def test_lora_run_lowers_held_out_loss_and_reports_accuracy(finished_run, text_file):
    report, out = finished_run
    assert report["adapted_loss"] < report["base_loss"] - 0.01
    assert [h["step"] for h in report["history"]] == [5, 10, 15, 20]
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"]
    # rank 2 on Q and V of 2 layers of width 64: 2 layers x 2 projections x (64 + 64) x 2
    assert report["trainable"] == 2 * 2 * (64 + 64) * 2
    assert report["sample"].startswith("\n") and len(report["sample"]) == 1 + 16
    # accuracy: the share of held-out positions whose most likely next token is the right one
    base, _ = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])
    adapted, _ = ts.load_model(os.path.join(out, "ckpt.pt"))
    for model, name in ((base, "base"), (adapted, "adapted")):
        figures = (report[f"{name}_loss"], report[f"{name}_accuracy"])
        assert held_out(model, text_file) == pytest.approx(figures, rel=1e-5)
    assert 0 < report["base_accuracy"] < report["adapted_accuracy"] < 1


def test_held_out_windows_are_evaluated_once_per_logged_step_and_the_report_reuses_the_last(
        text_file, tmp_path, monkeypatch):
    """Every evaluation pass is a logged one (6 in pretraining, 4 in adaptation): the report's
    figures are the last evaluation of each phase, not a second pass over the same weights."""
    forward, batches = L.GPT2LMModel.forward, []

    def counting(self, *args, **kwargs):
        # evaluation: eval mode, with labels (sampling has none)
        if not self.training and len(args) > 1:
            batches.append(args[0].shape[0])
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(L.GPT2LMModel, "forward", counting)
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path),
                                   "--sample", "0"])
    s = argparse.Namespace(block_size=32, batch_size=8, eval_iters=4)
    text = open(text_file, encoding="utf-8").read()
    windows = ts.split(torch.tensor(ts.encode({"type": "char",
                                               "chars": "".join(sorted(set(text)))}, text, "")),
                       s, scratch=True)[3]
    assert sum(batches) == (30 // 5 + 20 // 5) * len(windows)
    assert (report["adapted_loss"], report["adapted_accuracy"]) == \
        (report["history"][-1]["val_loss"], report["history"][-1]["val_accuracy"])


def test_checkpoint_holds_the_trained_tensors_and_the_fingerprint_of_its_base(finished_run):
    _, out = finished_run
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["kind"] == "ckpt" and ckpt["format"] == ts.FORMAT and ckpt["phase"] == "adapt"
    assert ckpt["weights"] and all("lora_" in k for k in ckpt["weights"])
    assert ckpt["config"]["lora_attn_dim"] == 2 and ckpt["tokenizer"]["type"] == "char"
    # the context is the trained block size, so sampling never uses an untrained position
    assert ckpt["config"]["n_ctx"] == ckpt["config"]["n_positions"] == 32
    assert ckpt["settings"]["rank"] == 2 and ckpt["step"] == 20
    base_file = os.path.join(out, ckpt["base"]["file"])
    assert ckpt["base"]["source"] == "scratch" and os.path.isfile(base_file)
    assert ckpt["base"]["fingerprint"] == L.base_fingerprint(ts.load_model(base_file)[0])
    # no temporary file left
    assert sorted(os.listdir(out)) == [".lock", ckpt["base"]["file"], "ckpt.pt"]


def test_base_is_cached_and_stays_frozen(finished_run):
    _, out = finished_run
    bases = glob.glob(os.path.join(out, "base-*.pt"))
    assert len(bases) == 1
    base = torch.load(bases[0], weights_only=True)
    assert base["kind"] == "base" and not any("lora_" in k for k in base["weights"])
    sd = ts.load_model(os.path.join(out, "ckpt.pt"))[0].state_dict()
    for k, v in base["weights"].items():
        assert torch.equal(sd[k], v), k


def test_full_fine_tuning_with_rank_0(text_file, tmp_path, finished_run, capsys):
    out = copy_run(finished_run[1], tmp_path)
    report = ts.main(without(TRAIN_TINY, "--lr") + ["--data", text_file, "--out-dir", out,
                                                    "--rank", "0", "--sample", "0"])
    assert "using the cached base" in capsys.readouterr().out
    assert report["trainable"] == report["total"]
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["lora_attn_dim"] == 0 and "transformer.wte.weight" in ckpt["weights"]


def test_a_base_pretrained_in_another_precision_is_not_reused(finished_run, text_file, tmp_path,
                                                              capsys, monkeypatch):
    """bfloat16 and float32 pretraining give different weights: a bfloat16 run pretrains its own
    base."""
    def stop(*a):
        raise KeyboardInterrupt  # at its first step: enough to see which base the run took
    monkeypatch.setattr(ts, "learning_rate", stop)
    with pytest.raises(KeyboardInterrupt, match="interrupted before a checkpoint"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", copy_run(finished_run[1], tmp_path),
                              "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "pretraining a char-level base" in out and "using the cached base" not in out


@needs_safetensors
def test_exports_reproduce_the_adapted_model(text_file, tmp_path, finished_run, monkeypatch):
    """A scratch run's adapter folder holds its base (base/, named by a path relative to where the
    run ran, which is where peft looks) and both exports the character vocabulary (chars.json)."""
    out = copy_run(finished_run[1], tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--max-iters", "5",
                                   "--sample", "0", "--save-pretrained", "hf",
                                   "--save-adapter", "peft"])
    figures = (report["adapted_loss"], report["adapted_accuracy"])
    assert held_out(L.GPT2LMModel.from_pretrained(tmp_path / "hf"), text_file) == pytest.approx(
        figures, rel=1e-5)
    base = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])[0]
    adapted = L.GPT2LMModel(L.GPT2Config.from_dict({**base.config.to_dict(), "lora_attn_dim": 2,
                                                    "lora_attn_alpha": 8}))
    adapted.load_weight(base.state_dict()).load_adapter(tmp_path / "peft")
    assert held_out(adapted, text_file) == pytest.approx(figures, rel=1e-5)
    config = json.load(open("peft/adapter_config.json"))
    assert config["base_model_name_or_path"] == os.path.join("peft", "base")
    exported = L.GPT2LMModel.from_pretrained("peft/base", lora_attn_dim=2, lora_attn_alpha=8)
    exported.load_adapter("peft")
    assert held_out(exported, text_file) == pytest.approx(figures, rel=1e-5)
    text = open(text_file, encoding="utf-8").read()
    for folder in ("hf", "peft"):
        assert json.load(open(f"{folder}/chars.json")) == {"chars": "".join(sorted(set(text)))}
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    chars = json.load(open("peft/chars.json"))["chars"]  # the README's example, as written there
    ids = torch.tensor([[chars.index(c) for c in "ROMEO:"]])
    with torch.no_grad():
        got = peft.AutoPeftModelForCausalLM.from_pretrained("peft")(ids).logits
    assert (got - adapted.eval()(ids)[0]).abs().max() < 1e-4


def test_progress_lines_reach_a_pipe_as_the_run_goes_every_tenth_of_the_steps(text_file, tmp_path):
    """Redirected to a file or a pipe, stdout is block-buffered unless each line is flushed: the log
    of a long run must fill as it goes. A line comes every 10% of the steps even when evaluations
    are rarer, with the train loss and the time left."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: faster, and kinder to a shared machine
    argv = TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path), "--base-iters", "1000",
                         "--eval-interval", "1000"]
    with subprocess.Popen([sys.executable, SCRIPT] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=HERE, env=env) as proc:
        try:
            first = proc.stdout.readline()
            step = proc.stdout.readline()
            running = not os.path.exists(tmp_path / "ckpt.pt")  # written at step 1000 only
        finally:
            proc.terminate()
            proc.communicate(timeout=120)
    assert first.startswith("pretraining a char-level base") and running
    line = r"\[base\] step   100/1000 \| train \d\.\d{4} \| +\d+ ms/step \| \d+s left\n"  # no val
    assert re.fullmatch(line, step), step


def test_a_run_into_an_out_dir_holding_one_is_refused_unless_overwrite(finished_run, text_file,
                                                                     tmp_path, capsys):
    """Running a command again, or another one into the same --out-dir, never replaces the run
    there silently: it points at --resume and at --overwrite, which starts over on the cached
    base."""
    out = copy_run(finished_run[1], tmp_path, everything=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    argv = TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--rank", "1", "--sample", "0"]
    err = one_line_error(argv, capsys)
    assert "holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    report = ts.main(argv + ["--overwrite"])
    assert "using the cached base" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]["rank"] == 1
    assert report["base_loss"] == finished_run[0]["base_loss"]


def test_resume_on_a_finished_run_samples_without_training(finished_run, tmp_path, capsys):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    report = ts.main(["--resume", "--out-dir", out, "--prompt", "ROMEO:", "--sample", "20"])
    assert report["sample"].startswith("ROMEO:") and len(report["sample"]) == 6 + 20
    assert "] step " not in capsys.readouterr().out
    assert report["history"] == finished_run[0]["history"]
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_help_shows_the_defaults_and_how_to_sample_from_a_finished_run(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        ts.parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for option, default in (("--base-iters", 1500), ("--max-iters", 1000), ("--block-size", 64),
                            ("--out-dir", "out-shakespeare"), ("--prompt", "'\\n'")):
        assert re.search(f"{option} [^(]*\\(default: {re.escape(str(default))}\\)", text), option
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "a finished run is only evaluated and sampled" in text and "--overwrite" in text


# ---- resume -------------------------------------------------------------------------------------

def test_resume_after_interrupts_in_pretraining_and_adaptation_is_bit_exact(
        finished_run, text_file, tmp_path, monkeypatch, capsys):
    """A crash loses at most the work since the last checkpoint, in the base pretraining as in
    the adaptation; and the message after an interrupted resumed run names the checkpoint."""
    uninterrupted, run_dir = finished_run
    out = str(tmp_path)
    real_lr, calls = ts.learning_rate, []

    def interrupt_at(n):  # Ctrl-C during the n-th step of the next run
        calls.clear()

        def lr(*a):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_lr(*a)
        monkeypatch.setattr(ts, "learning_rate", lr)

    interrupt_at(13)  # base step 13; the last checkpoint is base step 10
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    assert not glob.glob(os.path.join(out, "base-*.pt"))
    interrupt_at(2)  # a resumed run interrupted before its first checkpoint
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(["--resume", "--out-dir", out, "--device", "cpu"])  # where the run began
    assert "[base] resuming from step 10 of 30" in capsys.readouterr().out
    interrupt_at(20 + 13)  # base steps 11-30, then adaptation step 13
    with pytest.raises(KeyboardInterrupt, match="step 10 of the adapt phase"):
        ts.main(["--resume", "--out-dir", out, "--device", "cpu"])
    monkeypatch.setattr(ts, "learning_rate", real_lr)
    resumed = ts.main(["--resume", "--out-dir", out, "--sample", "16", "--device", "cpu"])

    assert resumed["history"] == uninterrupted["history"]
    for key in ("base_loss", "adapted_loss", "base_accuracy", "adapted_accuracy", "sample"):
        assert resumed[key] == uninterrupted[key], key
    for name in ["ckpt.pt"] + [f for f in os.listdir(run_dir) if f.startswith("base-")]:
        a = torch.load(os.path.join(out, name), weights_only=True)["weights"]
        b = torch.load(os.path.join(run_dir, name), weights_only=True)["weights"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_report_after_resume_measures_base_and_adapted_on_the_same_windows(finished_run, text_file,
                                                                           tmp_path):
    """--resume with another --eval-iters: both figures come from the new windows."""
    report, run_dir = finished_run
    out = copy_run(run_dir, tmp_path, everything=True)
    resumed = ts.main(["--resume", "--out-dir", out, "--eval-iters", "2", "--sample", "0",
                       "--device", "cpu"])
    base = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])[0]
    assert held_out(base, text_file, eval_iters=2) == pytest.approx(
        (resumed["base_loss"], resumed["base_accuracy"]), rel=1e-5)
    assert held_out(ts.load_model(os.path.join(out, "ckpt.pt"))[0], text_file, eval_iters=2) == (
        pytest.approx((resumed["adapted_loss"], resumed["adapted_accuracy"]), rel=1e-5))
    assert abs(resumed["base_loss"] - report["base_loss"]) > 1e-4  # the windows did change


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    ts.save_atomic({"x": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ts.save_atomic({"x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    monkeypatch.undo()
    ts.save_atomic({"x": torch.zeros(3)}, path)  # the next save replaces what the failed one left
    assert os.listdir(tmp_path) == ["ck.pt"] and torch.equal(
        torch.load(path, weights_only=True)["x"], torch.zeros(3))


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_run(finished_run, tmp_path):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    for name in ("ckpt.pt.tmp", "base-0123456789ab.pt.tmp"):  # what kill -9 mid-save leaves
        (tmp_path / name).write_bytes(b"partial")
    ts.main(["--resume", "--out-dir", out, "--sample", "0", "--device", "cpu"])
    assert not glob.glob(os.path.join(out, "*.tmp"))


@pytest.mark.skipif(ts.fcntl is None, reason="no fcntl: runs go unlocked")
def test_a_second_run_into_the_same_out_dir_is_refused(text_file, tmp_path, capsys):
    with open(tmp_path / ".lock", "w") as lock:  # as a run in progress holds it
        ts.fcntl.flock(lock, ts.fcntl.LOCK_EX | ts.fcntl.LOCK_NB)
        err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path)], capsys)
    assert "another run is using --out-dir" in err
    assert sorted(os.listdir(tmp_path)) == [".lock"]


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/missing.txt"], "no such file"),
    (["--data", "{tmp}"], "not a regular file"),
    (["--data", "{fifo}"], "not a regular file"),
    (["--data", "{empty}"], "is empty"),
    (["--data", "{short}"], "too short"),
    (["--data", "{latin1}"], "not UTF-8"),
    (["--rank", "-1"], "lora_attn_dim"),
    (["--rank", "four"], "invalid"),
    (["--alpha", "0"], "lora_attn_alpha"),
    (["--alpha", "inf"], "lora_attn_alpha"),
    (["--alpha", "1e25"], "α/r"),
    (["--n-embd", "63"], "divisible"),
    (["--eval-interval", "0"], "must lie in [1, "),
    (["--lr", "nan"], "--lr: must lie in [0, "),
    (["--weight-decay", "inf"], "--weight-decay: must lie in [0, "),
    (["--batch-size", "0"], "must lie in [1, "),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--prompt", "€"], "--prompt has characters outside the corpus's alphabet"),
    (["--resume"], "No such file"),
    (["--init-from", "{tmp}/missing"], "no checkpoint at"),
    (["--init-from", "{run}/ckpt.pt"], "is a checkpoint of this script, not GPT-2 weights"),
    (["--save-adapter", "{tmp}/peft", "--rank", "0"], "--save-adapter"),
    (["--resume", "--out-dir", "{run}", "--data", "{other}"], "not the text"),
    (["--resume", "--out-dir", "{run}", "--rank", "4"], "--rank 4: the run in"),
    (["--resume", "--out-dir", "{run}", "--n-embd", "32"], "--n-embd 32: the run in"),
    (["--resume", "--out-dir", "{run}", "--alpha", "4"], "trained with 8.0, which --resume keeps"),
    (["--resume", "--out-dir", "{run}", "--block-size", "16"], "--block-size 16: the run in"),
    (["--save-pretrained", "{tmp}/x", "--save-adapter", "{tmp}/x"], "need separate folders"),
    (["--save-pretrained", "{tmp}/x/hf", "--save-adapter", "{tmp}/x"], "need separate folders"),
    (["--save-adapter", "{short}"], "short.txt (not a directory)"),
    (["--save-pretrained", "{short}/hf"], "cannot write in"),
    (["--save-pretrained", "/proc/no/such/hf"], "cannot write in /proc"),
    (["--save-adapter", "{tmp}/out"], "is --out-dir (the checkpoints)"),
    (["--out-dir", "{short}/sub"], "Not a directory"),
    (["--out-dir", "{short}"], "short.txt is a file; pass a folder"),
    (["--resume", "--out-dir", "{short}"], "short.txt is a file; pass a folder"),
])
def test_bad_input_is_one_line_and_nonzero_before_any_training(extra, message, finished_run,
                                                               text_file, tmp_path, capsys):
    if "{fifo}" in extra and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 2)
    (tmp_path / "latin1.txt").write_bytes("Sé bien\n".encode("latin-1") * 100)
    (tmp_path / "other.txt").write_text(make_text(seed=1))
    (tmp_path / "empty.txt").write_text("")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")  # opening it for reading would block: it must not be opened
    subs = dict(tmp=tmp_path, run=finished_run[1], short=tmp_path / "short.txt",
                fifo=tmp_path / "fifo", latin1=tmp_path / "latin1.txt",
                other=tmp_path / "other.txt", empty=tmp_path / "empty.txt")
    argv = SCHEDULE if "--init-from" in extra else TRAIN_TINY
    argv = argv + ["--data", text_file, "--out-dir", str(tmp_path / "out")]
    argv += [e.format(**subs) for e in extra]
    assert message in one_line_error(argv, capsys)
    assert not os.path.exists(tmp_path / "out")  # refused before any step, leaving no folder


def test_bad_input_in_a_real_process_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--data", str(tmp_path / "nope.txt"),
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=HERE)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: --data") and proc.stderr.count("\n") == 1, proc.stderr


def _craft(ckpt):
    """Ways to damage a ckpt.pt, each with what the one-line error must say."""
    other_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    rank8 = L.GPT2LMModel(L.GPT2Config.from_dict({**ckpt["config"], "lora_attn_dim": 8,
                                                  "lora_attn_alpha": 8}))
    return [
        ({**ckpt, "weights": {k: v.cpu() for k, v in L.lora_state_dict(rank8).items()}},
         "does not fit this run"),
        ({k: v for k, v in ckpt.items() if k != "settings"}, "lacks settings"),
        ({**ckpt, "optimizer": other_optimizer}, "does not fit this run"),
        ({**ckpt, "step": "ten"}, "does not fit this run"),
        ({**ckpt, "base": {**ckpt["base"], "fingerprint": "0" * 64}}, "is not the base"),
        ({**ckpt, "settings": {**ckpt["settings"], "bogus": 1}}, "unrecognized arguments"),
        ({**ckpt, "settings": {**ckpt["settings"], "rank": "four"}}, "invalid"),
        ({**ckpt, "format": "something else"}, "not a ckpt checkpoint of this script"),
        # refused by weights_only
        ({**ckpt, "settings": argparse.Namespace()}, "holds more than tensors"),
    ]


def test_damaged_checkpoints_are_one_line_errors(finished_run, text_file, tmp_path, capsys,
                                                 monkeypatch):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    for crafted, message in _craft(ckpt):
        torch.save(crafted, path)
        assert message in one_line_error(["--resume", "--out-dir", out, "--sample", "0"],
                                         capsys), message
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    assert "cannot read the checkpoint" in one_line_error(["--resume", "--out-dir", out], capsys)

    # a cached base of another size under the name this run's base would have
    torch.save(ckpt, path)
    base_path = glob.glob(os.path.join(out, "base-*.pt"))[0]
    small = L.GPT2LMModel(L.GPT2Config.from_dict({**ckpt["config"], "n_embd": 32,
                                                  "lora_attn_dim": 0}))
    torch.save({**torch.load(base_path, weights_only=True), "weights": small.state_dict()},
               base_path)
    assert "shape" in one_line_error(["--resume", "--out-dir", out], capsys)

    # a full disk: torch.save raises its own RuntimeError, not an OSError
    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path / "new")],
                         capsys)
    assert "cannot write" in err and "inline_container" in err


def test_non_finite_loss_stops_the_run_with_a_message_about_the_settings_that_matter(
        text_file, tmp_path, capsys):
    args = TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path), "--warmup", "0",
                         "--grad-clip", "0"]
    err = one_line_error(args + ["--base-lr", "1e30"], capsys)
    assert "is not finite" in err and "base phase, at lr 1.0e+30" in err
    err = one_line_error(args + ["--weight-decay", "1e9"], capsys)
    assert "weight decay 1e+09" in err and "float" not in err  # the run is in float32 already


# ---- schedule -----------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [ts.learning_rate(step, 1.0, 10, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert ts.learning_rate(100, 1.0, 10, 100) == pytest.approx(0.1)


# ---- pretrained GPT-2 path, with a stand-in tokenizer ------------------------------------------

def byte_tokens():
    """Stands in for GPT-2's BPE (which needs a package and network access to fetch its files)."""
    return ((lambda text: list(text.encode("utf-8"))),
            (lambda ids: bytes(ids).decode("utf-8", errors="replace")))


def _hf_folder(folder, seed):
    folder.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    model = L.GPT2LMModel(L.GPT2Config(vocab_size=256, n_positions=64, n_ctx=64, n_embd=32,
                                       n_layer=2, n_head=2))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 256, '
                                        '"n_positions": 64, "n_embd": 32, "n_layer": 2, '
                                        '"n_head": 2}')
    return model


def test_init_from_a_hugging_face_folder_and_refusing_a_changed_one(text_file, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder, out = tmp_path / "hf", str(tmp_path / "out")
    model = _hf_folder(folder, seed=0)
    args = SCHEDULE + [
        "--data", text_file, "--init-from", str(folder), "--max-iters", "10"]
    report = ts.main(args + ["--out-dir", out])
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["base"] == {"source": str(folder), "fingerprint": L.base_fingerprint(model)}
    assert ckpt["tokenizer"] == {"type": "gpt2-bpe"}
    reloaded, _ = ts.load_model(os.path.join(out, "ckpt.pt"))
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)

    err = one_line_error(args + ["--out-dir", out, "--block-size", "65", "--overwrite"], capsys)
    assert "n_ctx = 64" in err
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2048))  # damaged: says so, not "network"
    err = one_line_error(args + ["--out-dir", str(tmp_path / "out2")], capsys)
    assert "pytorch_model.bin" in err and "network" not in err

    _hf_folder(folder, seed=1)  # another base under the same path: the adapters refuse it
    with pytest.raises(ValueError, match="is not the base"):
        ts.load_model(os.path.join(out, "ckpt.pt"))
    assert "is not the base" in one_line_error(["--resume", "--out-dir", out], capsys)


@needs_safetensors
def test_an_adapter_exported_from_a_pretrained_base_names_that_base(text_file, tmp_path,
                                                                    monkeypatch):
    """--save-adapter records where the base came from (peft loads it from there); a scratch base
    has no name."""
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder = tmp_path / "hf"
    _hf_folder(folder, seed=0)
    ts.main(SCHEDULE + ["--data", text_file, "--init-from", str(folder), "--max-iters", "2",
                        "--sample", "0", "--out-dir", str(tmp_path / "out"),
                        "--save-adapter", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)


@needs_safetensors
def test_exports_into_the_init_from_base_are_refused(text_file, tmp_path, monkeypatch, capsys):
    """--save-pretrained over the base would replace the user's model, and --save-adapter into it
    would make transformers apply the adapter to every later load of the base."""
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder = tmp_path / "hf"
    _hf_folder(folder, seed=0)
    for option, target in (("--save-pretrained", folder), ("--save-adapter", folder / "peft"),
                           ("--save-adapter", folder / ".." / "hf")):
        args = ["--data", text_file, "--init-from", str(folder), "--out-dir", str(tmp_path / "out")]
        err = one_line_error(SCHEDULE + args + [option, str(target)], capsys)
        assert "would write into the --init-from base" in err
    assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.bin"]
    assert not glob.glob(str(tmp_path / "out" / "*.pt"))


@needs_safetensors
def test_a_failed_export_write_is_one_line(text_file, tmp_path, finished_run, monkeypatch, capsys):
    import safetensors.torch

    def full(*args):
        raise safetensors.SafetensorError("Error while serializing: No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = copy_run(finished_run[1], tmp_path / "o")
    err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--max-iters", "1",
                                       "--sample", "0", "--save-pretrained", str(tmp_path / "hf")],
                         capsys)
    assert f"cannot write {tmp_path / 'hf'}: Error while serializing: No space left" in err


def test_without_tiktoken_gpt2s_tokenizer_is_a_one_line_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    ts.gpt2_bpe.cache_clear()
    try:
        with pytest.raises(ValueError, match="pip install tiktoken"):
            ts.gpt2_bpe()
    finally:
        ts.gpt2_bpe.cache_clear()


def test_offline_tiktoken_says_where_it_keeps_its_files(monkeypatch):
    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net')")
    monkeypatch.setitem(sys.modules, "tiktoken", argparse.Namespace(get_encoding=offline))
    ts.gpt2_bpe.cache_clear()
    try:
        with pytest.raises(OSError, match="TIKTOKEN_CACHE_DIR") as e:
            ts.gpt2_bpe()
    finally:
        ts.gpt2_bpe.cache_clear()
    assert "openaipublic" in str(e.value) and "\n" not in str(e.value)


def test_weights_of_an_unknown_width_point_at_a_folder_with_a_config(text_file, tmp_path, capsys):
    """The command line cannot pass n_head: the message names what it can do, and that works."""
    model = L.GPT2LMModel(L.GPT2Config(vocab_size=256, n_positions=64, n_ctx=64, n_embd=48,
                                       n_layer=1, n_head=2))
    (tmp_path / "hf").mkdir()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    args = SCHEDULE + ["--data", text_file, "--out-dir", str(tmp_path / "out")]
    err = one_line_error(args + ["--init-from", str(tmp_path / "hf" / "pytorch_model.bin")], capsys)
    assert "n_head" in err and "config.json" in err
    (tmp_path / "hf" / "config.json").write_text('{"n_embd": 48, "n_layer": 1, "n_head": 2, '
                                                 '"vocab_size": 256, "n_positions": 64}')
    loaded = L.GPT2LMModel.from_pretrained(tmp_path / "hf")
    assert L.base_fingerprint(loaded) == L.base_fingerprint(model)


# ---- download -----------------------------------------------------------------------------------

@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/site; yields (site, base URL, request log)."""
    site = tmp_path / "site"
    site.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(site), **k)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def test_download_on_first_use_then_cached(loopback_server, tmp_path, monkeypatch):
    site, url, requests = loopback_server
    body = make_text(seed=3).encode("utf-8")
    (site / "input.txt").write_bytes(body)
    monkeypatch.setattr(ts, "DATA_URL", f"{url}/input.txt")
    monkeypatch.setattr(ts, "DATA_BYTES", len(body))
    monkeypatch.setattr(ts, "CACHE_DIR", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "tinyshakespeare.txt"

    report = ts.main(TRAIN_TINY + ["--out-dir", str(tmp_path / "out"), "--base-iters", "2",
                                   "--max-iters", "2", "--sample", "0"])
    assert requests == ["/input.txt"] and cached.read_bytes() == body
    assert report["history"][-1]["step"] == 2

    default_data = (argparse.Namespace(data=None),
                    argparse.Namespace(rank=0, world=1, log=lambda *a: None))
    assert ts.read_text(*default_data) == body.decode()
    assert requests == ["/input.txt"]  # the right size is already there: no second download
    cached.write_bytes(body[:100])  # a truncated file is fetched again
    ts.read_text(*default_data)
    assert len(requests) == 2 and cached.read_bytes() == body


def test_download_failure_says_to_pass_data(loopback_server, tmp_path, monkeypatch, capsys):
    site, url, _ = loopback_server
    (site / "input.txt").write_bytes(b"too short\n")
    monkeypatch.setattr(ts, "DATA_BYTES", 1000)
    monkeypatch.setattr(ts, "CACHE_DIR", str(tmp_path / "cache"))
    for target in (f"{url}/missing.txt", f"{url}/input.txt"):  # a 404, then a wrong size
        monkeypatch.setattr(ts, "DATA_URL", target)
        assert "pass --data PATH" in one_line_error(
            TRAIN_TINY + ["--out-dir", str(tmp_path / "out")], capsys)
        assert not os.path.exists(tmp_path / "cache" / "tinyshakespeare.txt")  # no partial download


# ---- several processes ----------------------------------------------------------------------

def _process_of_two(rank, port, argv, log):
    """One of two processes, with the environment torchrun gives its workers."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = ts.cli(argv)
    os._exit(code)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_match_one_and_share_its_cached_base(finished_run, text_file, tmp_path):
    """Two processes started as torchrun starts them (Gloo on CPUs; forked, so that they need not
    import torch again): a step's samples, and so the cached base's key and the adapters, do not
    depend on the number of processes."""
    if torch.cuda.is_initialized():  # autograd's device threads do not survive a fork
        pytest.skip("CUDA was used in this process, so it cannot fork; run this test alone")
    argv = TRAIN_TINY + ["--data", text_file, "--lora-dropout", "0", "--sample", "8",
                         "--out-dir", copy_run(finished_run[1], tmp_path / "out")]
    single = ts.main(argv)
    one = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    argv += ["--overwrite"]
    procs = [fork.Process(target=_process_of_two, args=(r, port, argv, tmp_path / f"log{r}"))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        p.kill()
    logs = [(tmp_path / f"log{r}").read_text() for r in range(2)]
    assert [p.exitcode for p in procs] == [0, 0], logs
    assert "using the cached base" in logs[0] and "2 process(es)" in logs[0]
    assert logs[0].count("trainable parameters") == 1 and logs[1] == ""  # process 0 alone prints
    two = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert two["weights"].keys() == one["weights"].keys()
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], rtol=1e-3, atol=1e-4)
    assert two["history"][-1]["val_loss"] == pytest.approx(single["adapted_loss"], abs=1e-4)
    # the logged train loss is the mean over both processes' sequences, as one process's over all
    for a, b in zip(two["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


# ---- the README's set-up ------------------------------------------------------------------------

def test_readme_installs_a_cpu_torch_before_the_requirements_would_pull_a_cuda_one():
    """Followed top to bottom on a machine without a GPU, the README never fetches a CUDA build."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    cpu = readme.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < readme.index("pip install -r requirements.txt")


# ==============================================================================================
# 10. bench_lora_gpt2.py: a smoke test on a tiny configuration (it asserts no speed)
# ==============================================================================================

BENCH_TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size", "64",
              "--block-size", "16", "--batch-size", "2", "--repeats", "1",
              "--gen-tokens", "8", "--gen-model", "bench", "--threads", "1"]

UNMEASURED = ("not installed", "no baseline")  # cells of rows whose reference is missing

# A stand-in for nanoGPT's model.py: the same GPTConfig fields, GPT(config), and
# forward(idx, targets) -> (logits, loss); it prints on construction, as nanoGPT's GPT does.
NANOGPT_STANDIN = '''
from dataclasses import dataclass
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.gelu = nn.GELU()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        print("number of parameters: %d" % sum(p.numel() for p in self.parameters()))

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.gelu(self.wte(idx)))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
'''


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _table(text: str):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].replace("|", "").replace("-", "") == ""
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def _run(argv):
    threads = torch.get_num_threads()  # bench.main pins its own thread count and restores it
    with contextlib.redirect_stdout(io.StringIO()) as out:
        payload = bench.main(argv)
    assert torch.get_num_threads() == threads
    return out.getvalue(), payload


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    text, payload = _run(BENCH_TINY + ["--json", str(path)])
    return text, payload, json.loads(path.read_text(encoding="utf-8"))


def test_bench_smoke_table_structure(tiny_run):
    text, _, _ = tiny_run
    assert "torch " in text and "threads: 1" in text and "processor:" in text
    header, rows = _table(text)
    assert header == list(bench.TABLE_HEADER)
    assert all(len(r) == len(header) for r in rows)
    comparisons = {r[0].split(":")[0].split(" ")[0] for r in rows}
    assert comparisons == set(bench.COMPARISONS)
    # every comparison has exactly one baseline row (none when its reference is not installed)
    by_comp = {}
    for r in rows:
        by_comp.setdefault(r[0], []).append(r)
    for comp, rs in by_comp.items():
        baselines = sum(r[6] == "baseline" for r in rs)
        assert baselines == 1 or (baselines == 0 and any(r[2].startswith("not installed")
                                                         for r in rs)), comp
    for r in rows:
        assert r[7] in ("yes", "MISSED", "—")


def test_bench_smoke_figures_positive(tiny_run):
    _, rows = _table(tiny_run[0])
    for r in rows:
        if r[2].startswith(UNMEASURED):
            continue
        median, ratio = _number(r[2]), _number(r[4])
        assert math.isfinite(median) and median > 0, r
        assert math.isfinite(ratio) and ratio > 0, r
        if r[5] != "—":
            lo, hi = (_number(x) for x in r[5].split("–"))
            assert 0 < lo <= hi, r


def test_bench_smoke_json_matches_table(tiny_run):
    text, payload, data = tiny_run
    _, rows = _table(text)
    assert data["rows"] == json.loads(json.dumps(payload["rows"]))
    assert data["table"] == [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(data["rows"]) == len(rows)
    assert data["meta"]["threads"] == 1 and data["meta"]["torch"]
    for cells, row in zip(rows, data["rows"]):
        assert [cells[0], cells[1], cells[3]] == [row["comparison"], row["candidate"], row["unit"]]
        if row["median"] is None:
            assert cells[2].startswith(UNMEASURED)
            continue
        assert row["median"] > 0 and all(s > 0 for s in row["samples"])
        assert _number(cells[2]) == pytest.approx(row["median"], rel=1e-2, abs=1e-3)
        assert _number(cells[4]) == pytest.approx(row["ratio"], rel=1e-2)


def test_bench_without_nanogpt_path_its_rows_read_not_installed(tiny_run):
    _, rows = _table(tiny_run[0])
    status = {r[1]: r[2] for r in rows if r[0] == "nanogpt"}
    assert status == {"nanoGPT model.py GPT": "not installed (--nanogpt PATH)",
                      "nanoGPT model.py GPT with GPT-2's biases and tanh GELU": "no baseline",
                      "ours, full fine-tuning (r=0)": "no baseline"}


def test_bench_nanogpt_row_with_a_standin_model_py(tmp_path):
    """With --nanogpt pointing at a folder holding a model.py of nanoGPT's interface, the rows time
    its GPT as configured there and doing GPT-2's work (biases, tanh GELU) against ours, all three
    interleaved; its construction message is not printed."""
    (tmp_path / "model.py").write_text(NANOGPT_STANDIN, encoding="utf-8")
    text, payload = _run(BENCH_TINY + ["--only", "nanogpt", "--nanogpt", str(tmp_path)])
    assert "number of parameters" not in text
    theirs, work, ours = ("nanoGPT model.py GPT",
                          "nanoGPT model.py GPT with GPT-2's biases and tanh GELU",
                          "ours, full fine-tuning (r=0)")
    rows = {(r["comparison"], r["candidate"]): r for r in payload["rows"]}
    assert (rows[("nanogpt", theirs)]["target"] == "baseline"
            and rows[("nanogpt", theirs)]["median"] > 0)
    assert rows[("nanogpt", ours)]["ratio"] > 0 and rows[("nanogpt", ours)]["met"] is None
    assert rows[("nanogpt: GPT-2's work", ours)]["met"] in (True, False)
    # the second comparison pairs the very samples of the first
    assert rows[("nanogpt: GPT-2's work", work)]["samples"] == rows[("nanogpt", work)]["samples"]
    assert rows[("nanogpt: GPT-2's work", ours)]["samples"] == rows[("nanogpt", ours)]["samples"]
    c = bench.NANOGPT_CPU
    params = {n: rows[("nanogpt: trainable params", n)]["median"] for n in (theirs, work)}
    # wte and an untied, bias-free lm_head
    assert params[theirs] == c["vocab_size"] * c["n_embd"] * 2
    assert params[work] == params[theirs] + c["vocab_size"]  # ... and the bias it gets
    assert any(n.startswith(f"nanogpt: {tmp_path}") and "its 1 nn.GELU approximate='tanh'" in n
               for n in payload["notes"])


@pytest.mark.parametrize("option, value, message", [
    ("--nanogpt", None, "--nanogpt: no model.py"),
    ("--preset", "gpt2.xs", "--preset: choose from gpt2.sm"),
    ("--gen-model", "4,256,8", "--gen-model"),
    ("--gen-model", "1,30,4,64", "n_embd (30) must be divisible by n_head (4)"),
    ("--gen-tokens", "0", "--gen-tokens"),
    ("--device", "gpu", "--device"),
    ("--json", "{tmp}/no/such/folder/bench.json", "--json"),
    ("--n-head", "3", "n_head"),
    ("--block-size", "2048", "--block-size")])
def test_bench_refuses_bad_options_before_measuring(tmp_path, monkeypatch, option, value, message):
    monkeypatch.setattr(bench, "run", lambda a: pytest.fail("measured despite a bad option"))
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.main(BENCH_TINY + [option, str(tmp_path) if value is None
                                 else value.format(tmp=tmp_path)])


@pytest.mark.parametrize("argv, start", [(["--gen-model", "4,256"], "error: --gen-model"),
                                         (["--repeats", "x"],
                                          "error: argument --repeats: invalid int value")])
def test_bench_command_line_error_is_one_line(argv, start):
    """Our checks and argparse's alike: one line on stderr, exit status 1, no usage dump or
    traceback."""
    out = subprocess.run([sys.executable, bench.__file__, *argv], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(start) and out.stderr.count("\n") == 1, out.stderr


def test_bench_without_reference_packages_marks_their_rows_not_installed(monkeypatch):
    """With loralib, transformers and peft hidden, their rows read "not installed" and ours are
    still measured where they need no reference."""
    real_find_spec = bench.importlib.util.find_spec
    hidden = {"loralib", "transformers", "peft"}
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    text, _ = _run(BENCH_TINY + ["--only", "layer,hf"])
    _, rows = _table(text)
    status = {(r[0], r[1]): r[2] for r in rows}
    assert status[("layer C=32", "loralib.MergedLinear")] == "not installed (loralib)"
    assert _number(status[("layer C=32", "ours MergedLinear")]) > 0
    assert (status[("hf", "transformers+peft r=4 (c_attn: Q,K,V)")]
            == "not installed (transformers and peft)")
    assert status[("hf", "ours LoRA r=4 (Q,V)")] == "no baseline"


def test_bench_mfu_is_the_step_flops_of_nanogpts_estimate_over_time_and_peak(monkeypatch):
    """6N + 12·L·C·T FLOPs per token for full fine-tuning, 4N + ... for LoRA (N less wpe), over
    the step's time and the peak; the peak by GPU name (PCIe before SXM), in bf16 only."""
    a = argparse.Namespace(peak_tflops=0.0, dtype="bfloat16", batch_size=2, block_size=8,
                           n_layer=2, n_embd=12)
    model = tiny_lora_model()
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    attention = 12 * 2 * 12 * 8
    cuda = types.SimpleNamespace(type="cuda")
    for gpu, peak in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, gpu=gpu: gpu)
        rows = bench.mfu_rows("train", a, cuda, {"full": [10.0], "lora": [5.0]}, [model] * 2,
                              lora=("lora",))
        assert rows[0]["comparison"] == f"train: MFU of {peak} TFLOP/s"
        for row, k, ms in zip(rows, (6, 4), (10.0, 5.0)):
            flops = 2 * 8 * (k * n + attention)
            assert row["median"] == pytest.approx(100 * flops / (ms / 1e3) / (peak * 1e12))
    float32 = argparse.Namespace(**{**vars(a), "dtype": "float32"})
    assert bench.mfu_rows("train", float32, cuda, {"full": [10.0]}, [model]) == []  # no fp32 peak


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_offers_the_dry_run():
    out = subprocess.run([sys.executable, "gpu_check.py"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: no CUDA GPU") and "--dry-run" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr


# ==============================================================================================
# 11. lora_paper.py: the laws of phi and of the amplification factor; a smoke test at tiny sizes
# ==============================================================================================

import lora_paper as paper  # noqa: E402


@st.composite
def two_matrices(draw, max_d=12):
    """Two Gaussian matrices (r1, d) and (r2, d) with r1, r2 <= d, float64."""
    d = draw(st.integers(2, max_d))
    r1, r2 = draw(st.integers(1, d)), draw(st.integers(1, d))
    g = torch.Generator().manual_seed(draw(seeds))
    return (torch.randn(r1, d, generator=g, dtype=torch.float64),
            torch.randn(r2, d, generator=g, dtype=torch.float64))


@given(pair=two_matrices())
def test_phi_lies_in_zero_one_and_is_symmetric(pair):
    """0 <= phi(A1, A2, i, j) <= 1 for all i <= r1, j <= r2, and phi(A2, A1, j, i) equals it."""
    A1, A2 = pair
    grid = paper.subspace_similarity(A1, A2)
    assert grid.shape == (len(A1), len(A2))
    assert grid.min() >= -1e-12 and grid.max() <= 1 + 1e-12
    torch.testing.assert_close(paper.subspace_similarity(A2, A1), grid.T)


@given(pair=two_matrices())
def test_phi_is_one_for_identical_subspaces_and_zero_for_orthogonal_ones(pair):
    """phi(A, A, i, j) = 1 for all i, j (the top-min(i, j) directions are shared); phi = 1 at
    i = j = r for another basis M A of the same row space; 0 for rows spanning orthogonal spaces."""
    A, other = pair
    ones = torch.ones(len(A), len(A), dtype=A.dtype)
    torch.testing.assert_close(paper.subspace_similarity(A, A), ones)
    mix = torch.randn(len(A), len(A), generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    M = torch.linalg.qr(mix)[0] * torch.arange(1.0, len(A) + 1, dtype=A.dtype)  # invertible
    assert abs(paper.subspace_similarity(M @ A, A)[-1, -1].item() - 1) < 1e-9
    Q = torch.linalg.qr(torch.cat([A.T, other.T], 1))[0].T  # orthonormal rows
    k = min(len(A), len(Q) - 1)
    assert paper.subspace_similarity(Q[:k], Q[k:]).abs().max() < 1e-9


@given(pair=two_matrices())
def test_phi_takes_the_top_singular_directions_first(pair):
    """A = diag(s) Q, Q with orthonormal rows and s decreasing: the top-i right-singular subspace
    of A is the span of Q's first i rows, so phi(A, Q_1, i, 1) = 1 for every i, and
    phi(A, Q_r, 1, 1) = 0 for the last row Q_r."""
    A, _ = pair
    Q = torch.linalg.qr(A.T)[0].T  # (r, d), orthonormal rows
    scaled = torch.arange(len(Q), 0, -1, dtype=Q.dtype)[:, None] * Q
    ones = torch.ones(len(Q), 1, dtype=Q.dtype)
    torch.testing.assert_close(paper.subspace_similarity(scaled, Q[:1]), ones)
    if len(Q) > 1:
        assert paper.subspace_similarity(scaled, Q[-1:])[0, 0] < 1e-9


@given(pair=two_matrices(), data=st.data())
def test_phi_is_invariant_to_the_sign_and_order_of_the_basis_vectors(pair, data):
    """Permuting the rows of A1 and flipping their signs keeps its row space, so the grid of phi."""
    A1, A2 = pair
    order = data.draw(st.permutations(range(len(A1))))
    signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(A1), max_size=len(A1)))
    moved = (A1 * torch.tensor(signs, dtype=A1.dtype)[:, None])[list(order)]
    expected = paper.subspace_similarity(A1, A2)
    torch.testing.assert_close(paper.subspace_similarity(moved, A2), expected)


@given(pair=two_matrices(), c=st.floats(0.01, 100) | st.floats(-100, -0.01), r=st.integers(1, 12))
def test_amplification_of_a_multiple_of_W(pair, c, r):
    """dW = c W: ||dW||_F / ||U^T W V^T||_F = |c| ||W||_F / ||W_r||_F, with W_r the best rank-r part
    of W (its norm: that of the top r singular values); exactly |c| when W has rank <= r."""
    W, B = pair
    r = min(r, min(W.shape))
    top = torch.linalg.svdvals(W)[:r].square().sum().sqrt().item()
    expected = abs(c) * W.norm().item() / top
    assert paper.amplification(c * W, W, r) == pytest.approx(expected, rel=1e-9)
    assert paper.projected_norm(W, *paper.top_singular(W, r)) == pytest.approx(top, rel=1e-9)
    low = B[:r].T @ B[:r]  # (d, d) of rank <= r
    assert paper.amplification(c * low, low, r) == pytest.approx(abs(c), rel=1e-6)


PAPER_SETTINGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                  "--batch-size", "4", "--base-iters", "6", "--max-iters", "4", "--warmup", "1",
                  "--eval-interval", "2", "--eval-iters", "2", "--device", "cpu",
                  "--latency-repeats", "1"]
PAPER_TINY = PAPER_SETTINGS + ["--ranks", "1,2,4", "--phi-ranks", "2,4", "--amp-ranks", "1,4"]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("paper")
    return paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)]), out


def test_paper_script_writes_every_table(paper_run):
    result, out = paper_run
    text = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("Rank sweep", "Subspace similarity", "Amplification", "Inference latency"):
        assert f"## {heading}" in text
    assert set(result["runs"]) == {(1, 0), (2, 0), (4, 0), (0, 0), (4, 1)}  # (rank, seed - --seed)
    # rank 2 on Q and V of 2 layers of width 16
    assert result["runs"][(2, 0)]["trainable"] == 2 * 2 * (16 + 16) * 2
    assert result["phi"]["ranks"][0]["q"]["mean"].shape == (2, 4)
    assert [row[:2] for row in result["amplification"][4]] == [[4, 0], [4, 1]]


def test_paper_script_draws_every_figure_with_matplotlib(paper_run):
    pytest.importorskip("matplotlib")
    result, out = paper_run
    text = (out / "report.md").read_text(encoding="utf-8")
    assert result["files"] == ["rank_sweep.png", "subspace_ranks.png", "subspace_seeds.png"]
    for name in result["files"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text


def test_paper_script_again_trains_nothing_and_keeps_its_tables_without_matplotlib(
        paper_run, text_file, monkeypatch, capsys):
    result, out = paper_run
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    again = paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)])
    assert again["files"] == [] and "pip install matplotlib" in capsys.readouterr().out
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| LoRA r = 4 |" in text and "| full fine-tuning |" in text and "![" not in text
    losses = {k: r["loss"] for k, r in result["runs"].items()}
    assert {k: r["loss"] for k, r in again["runs"].items()} == losses


def test_paper_script_goes_on_from_an_interrupted_run(paper_run, text_file, tmp_path, monkeypatch,
                                                      capsys):
    """Stopped at the first checkpoint of its first adaptation (r = 1), then run again: the same
    figures as a run never stopped. Runs are keyed by their settings, not by --ranks."""
    result, out = paper_run
    copy_run(str(out), tmp_path)  # the cached base
    argv = PAPER_SETTINGS + ["--ranks", "1", "--phi-ranks", "1,2", "--amp-ranks", "1",
                             "--data", text_file, "--out-dir", str(tmp_path)]
    save = ts.save_atomic

    def stop(obj, path):
        save(obj, path)
        if path.endswith(".part"):
            raise KeyboardInterrupt
    monkeypatch.setattr(ts, "save_atomic", stop)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the figures are tested above
    assert paper.cli(argv) == 130
    assert "interrupted: run the same command again" in capsys.readouterr().err
    [part] = os.listdir(tmp_path / "runs")
    assert part.startswith("r1-") and part.endswith(".part")
    monkeypatch.setattr(ts, "save_atomic", save)
    again = paper.main(argv)
    for key in ("loss", "accuracy", "history"):
        assert again["runs"][(1, 0)][key] == result["runs"][(1, 0)][key]


def test_paper_script_adapts_the_base_given_by_init_from(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _hf_folder(tmp_path / "hf", seed=0)  # 2 layers of width 32
    out = tmp_path / "out"
    result = paper.main(PAPER_SETTINGS + ["--ranks", "1", "--phi-ranks", "1,2", "--amp-ranks", "2",
                                          "--data", text_file, "--init-from", str(tmp_path / "hf"),
                                          "--out-dir", str(out)])
    assert not glob.glob(str(out / "base-*.pt"))  # nothing pretrained
    assert result["runs"][(1, 0)]["trainable"] == 1 * 2 * (32 + 32) * 2
    assert (f"Base: {tmp_path / 'hf'}, 2 layers of width 32"
            in (out / "report.md").read_text("utf-8"))


@pytest.mark.parametrize("option, message", [(["--rank", "4"], "use --ranks"),
                                             (["--phi-ranks", "4"], "two different"),
                                             (["--ranks", "1,x"], "ranks and commas")])
def test_paper_script_bad_options_are_one_line(option, message, capsys):
    assert paper.cli(PAPER_TINY + option) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_paper_script_reuses_the_base_train_shakespeare_cached_for_the_same_settings(
        finished_run, text_file, tmp_path, monkeypatch, capsys):
    """Both scripts name a scratch base with ts.base_file: given train_shakespeare.py's settings,
    lora_paper.py loads the base that run cached instead of pretraining its own."""
    class Loaded(Exception):
        pass

    def stop(*args):
        raise Loaded
    copy_run(finished_run[1], tmp_path)
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("pretrained a base again"))
    monkeypatch.setattr(ts, "evaluate", stop)  # the base's first evaluation: far enough
    with pytest.raises(Loaded):
        paper.main(without(TRAIN_TINY, "--rank") + ["--data", text_file, "--out-dir",
                                                    str(tmp_path)])
    assert "using the cached base" in capsys.readouterr().out


def test_paper_script_names_a_damaged_run_file_and_the_fix(tmp_path):
    """A run file cut short or foreign is a ValueError naming it (cli makes it one line), never a
    traceback of whichever unpickling error it raises."""
    for i, data in enumerate((b"not a checkpoint", b"PK\x03\x04cut")):
        path = tmp_path / f"run{i}.pt"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"cannot read {re.escape(str(path))} .*delete it"):
            paper.load(str(path))
    assert paper.load(str(tmp_path / "absent.pt")) is None
