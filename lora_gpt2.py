"""GPT-2 with LoRA (Low-Rank Adaptation), in one file.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained
weight matrix W0 frozen and learns a low-rank update next to it:

    h = W0 x + ΔW x,    ΔW = B A,    B ∈ R^{d_out × r},  A ∈ R^{r × d_in},  r ≪ min(d_in, d_out)

and scales the update by α/r, so that changing r does not force a new learning rate. A starts
random and B starts at zero, so before any training ΔW = 0 and the model is exactly the
pretrained one. Once trained, ΔW can be added into W0 ("merged"), and inference costs nothing
extra.

This module follows microsoft/LoRA: its `loralib` layers (`Linear`, `MergedLinear`, with the same
parameter names and shapes) and its `examples/NLG` GPT-2 (the same state-dict keys), so that
checkpoints move freely between the two. It reads top to bottom in this order:

    1. GPT2Config            the hyper-parameters, validated
    2. LoRA layers           LoRALayer, Linear, MergedLinear
    3. Conv1D                GPT-2's (in, out) linear layer
    4. Attention             causal self-attention, LoRA on the Q and V projections only
    5. MLP, Block            the rest of a transformer layer
    6. GPT2Model             embeddings, blocks, final LayerNorm
    7. GPT2LMHead            the output layer, tied to the token embedding
    8. GPT2LMModel           model + head + loss + weight loading + generation
    9. presets               gpt2.sm / .md / .lg / .xl and their hub names
   10. helpers               trainable-parameter selection, LoRA-only state dicts, merging

Shapes in comments use B (batch), T (time), C (n_embd), nh (heads), hs (head size), V (vocab),
r (LoRA rank), m (number of LoRA-enabled groups in a MergedLinear).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GPT2Config", "PRESETS", "LoRALayer", "Linear", "MergedLinear", "Conv1D", "Attention", "MLP",
    "Block", "GPT2Model", "GPT2LMHead", "GPT2LMModel", "mark_only_lora_as_trainable",
    "lora_state_dict", "lora_parameter_count", "merge_lora", "unmerge_lora", "merged_state_dict",
    "base_fingerprint",
    "HUB_MODELS",
]


# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class GPT2Config:
    """Hyper-parameters of GPT-2 and of its LoRA adapters (field names as in microsoft/LoRA).

    vocab_size          number of token ids V; ids must lie in [0, V).
    n_positions         number of learned position embeddings (rows of wpe).
    n_ctx               the longest context attention may see (past + new tokens); ≤ n_positions.
    n_embd              model width C; a multiple of n_head.
    n_layer             number of transformer blocks.
    n_head              number of attention heads nh; head size hs = C / nh.
    layer_norm_epsilon  ε added to the variance inside every LayerNorm.
    initializer_range   standard deviation of the normal init of Linear/Conv1D/Embedding weights.
    lora_attn_dim       the LoRA rank r on Q and V; 0 means no adapters, plain GPT-2.
    lora_attn_alpha     α; the update ΔW = BA is scaled by α / r.
    lora_dropout        dropout on the adapter's input x, before A (as in loralib).
    lora_r_dropout      dropout on the rank-r intermediate A x, between A and B.
    fix_dropout         the model's own dropout: on embeddings, attention weights and both residual
                        branches (GPT-2's embd/attn/resid pdrop). 0 keeps the model deterministic.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_ctx: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    lora_attn_dim: int = 0
    lora_attn_alpha: float = 128
    lora_dropout: float = 0.0
    lora_r_dropout: float = 0.0
    fix_dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if not _is_int(self.lora_attn_dim) or self.lora_attn_dim < 0:
            raise ValueError(f"GPT2Config.lora_attn_dim (the LoRA rank r) must be an integer >= 0 "
                             f"(0 disables LoRA), got {self.lora_attn_dim!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head}); choose an n_head that divides n_embd")
        if self.n_ctx > self.n_positions:
            raise ValueError(f"GPT2Config.n_ctx ({self.n_ctx}) must not exceed n_positions "
                             f"({self.n_positions}): there is no position embedding beyond it")
        if not (_is_real(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a finite number > 0, "
                             f"got {self.layer_norm_epsilon!r}")
        if not (_is_real(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"GPT2Config.initializer_range must be a finite number >= 0, "
                             f"got {self.initializer_range!r}")
        if self.lora_attn_dim > 0 and not (_is_real(self.lora_attn_alpha) and self.lora_attn_alpha > 0):
            raise ValueError(f"GPT2Config.lora_attn_alpha (α) must be a finite number > 0 when "
                             f"lora_attn_dim > 0, got {self.lora_attn_alpha!r}")
        for name in ("lora_dropout", "lora_r_dropout", "fix_dropout"):
            _check_dropout(getattr(self, name), f"GPT2Config.{name}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        """A config of one of the GPT-2 sizes in PRESETS; `overrides` set any other field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping) -> "GPT2Config":
        """Build a config from a mapping, with a ValueError (not a TypeError) for unknown fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPT2Config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_id_range(ids: torch.Tensor, vocab_size: int, what: str, fix: str) -> None:
    """A clear error instead of an embedding/gather index error (a device-side assert on CUDA)."""
    if torch.compiler.is_compiling():  # costs one device sync, so not inside a compiled graph
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} must lie in [0, vocab_size = {vocab_size}), got values in "
                         f"[{lo}, {hi}]; {fix}")


def _check_dropout(p, what: str) -> None:
    if not _is_real(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{what} is a dropout probability and must lie in [0, 1), got {p!r}")


# --------------------------------------------------------------------------------------------
# 2. LoRA layers (compatible with loralib: same constructor arguments, parameter names, shapes)
# --------------------------------------------------------------------------------------------

class LoRALayer:
    """State shared by the LoRA layers: the rank r, α, the scaling α/r, dropout, the merge flag.

    `merged` records whether scaling·ΔW currently sits inside `weight`. `merge()` and `unmerge()`
    move it in and out, and each does nothing when already in the requested state. With
    `merge_weights=True`, `eval()` merges (inference at the cost of the plain layer) and `train()`
    unmerges (the gradient must reach A and B, not a merged W).

    A state dict always holds the pretrained W0 in `weight`, merged or not, and loading a state
    dict into a merged layer re-merges with the loaded A and B. loralib saves W0 + ΔW when merged,
    so a merged checkpoint loaded into a fresh layer and merged again counts ΔW twice; here it
    cannot happen.

    Merging adds and subtracts in the weight's own dtype, so W0 comes back up to rounding: a few
    ulps in float32, about one ulp (1e-3 relative) per merge/unmerge cycle in bfloat16/float16.
    Layers that train in low precision are best left unmerged until training ends (GPT-2's
    c_attn here uses merge_weights=False, as in microsoft/LoRA).
    """

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, lora_r_dropout: float,
                   merge_weights: bool) -> None:
        if not _is_int(r) or r < 0:
            raise ValueError(f"LoRA rank r must be an integer >= 0 (0 disables LoRA), got {r!r}")
        if r > 0 and not (_is_real(lora_alpha) and lora_alpha > 0):
            raise ValueError(f"lora_alpha (α) must be a finite number > 0 when r > 0, got {lora_alpha!r}")
        _check_dropout(lora_dropout, "lora_dropout")
        _check_dropout(lora_r_dropout, "lora_r_dropout")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        # Dropout modules hold no parameters, so they leave the state dict untouched.
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_r_dropout = nn.Dropout(lora_r_dropout) if lora_r_dropout > 0 else nn.Identity()
        self.merge_weights = merge_weights
        self.merged = False

    # Subclasses implement: has_lora (bool) and delta_weight() -> scaling·ΔW in weight's layout.

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        """Move between (out, in), the layout of ΔW, and the layout `weight` is stored in."""
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + scaling·ΔW. Idempotent."""
        if self.has_lora and not self.merged:
            self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − scaling·ΔW = W0. Idempotent."""
        if self.has_lora and self.merged:
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)  # Module.eval() arrives here as train(False)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Linear._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.has_lora and self.merged:  # save W0, never W0 + ΔW
            with torch.no_grad():
                destination[prefix + "weight"] = self.weight - self.delta_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_merged = self.merged
        self.unmerge()  # back to W0 with the old A, B ...
        nn.Linear._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        if was_merged:
            self.merge()  # ... then W0 (old or loaded) + ΔW of the loaded A, B

    def reset_parameters(self) -> None:
        """nn.Linear's own init for W0 and b (in (out, in) terms, whatever the storage layout);
        A as nn.Linear would init it and B = 0, so ΔW = BA = 0: a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self._T(self.weight), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        s = nn.Linear.extra_repr(self)
        return s + (f", r={self.r}, lora_alpha={self.lora_alpha}, fan_in_fan_out={self.fan_in_fan_out}"
                    f", merged={self.merged}")


class Linear(LoRALayer, nn.Linear):
    """A dense layer with a LoRA update: y = x W0ᵀ + b + scaling · (x Aᵀ) Bᵀ.

    Parameters as in loralib: `weight` W0 (out, in), or (in, out) with `fan_in_fan_out=True`
    (GPT-2's Conv1D layout); `lora_A` A (r, in); `lora_B` B (out, r); scaling = lora_alpha / r.
    With r > 0 the pretrained weight W0, and only it, is frozen.

    The update is applied as two thin matrix products, x → r numbers → out; the (out × in) matrix
    ΔW is only formed to merge it.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 bias: bool = True, lora_r_dropout: float = 0.0, **kwargs):
        self.fan_in_fan_out = fan_in_fan_out  # needed by reset_parameters() inside nn.Linear
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, lora_r_dropout, merge_weights)
        if fan_in_fan_out:
            # Store W as (in, out) so that a GPT-2 Conv1D weight loads as it is.
            self.weight = nn.Parameter(self.weight.detach().t().contiguous())
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_empty((r, in_features)))   # (r, in)
            self.lora_B = nn.Parameter(self.weight.new_empty((out_features, r)))  # (out, r)
            self.weight.requires_grad = False
        self.reset_parameters()

    @property
    def has_lora(self) -> bool:
        return self.r > 0

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, laid out like `weight`."""
        return self._T(self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._T(self.weight), self.bias)                  # (..., out)
        if self.has_lora and not self.merged:
            h = self.lora_dropout(x) @ self.lora_A.t()                           # (..., r)
            h = self.lora_r_dropout(h) * self.scaling                            # scale the thin side
            result = result + h @ self.lora_B.t()                                # (..., out)
        return result


class MergedLinear(LoRALayer, nn.Linear):
    """One dense layer that is k projections side by side (GPT-2's fused Q,K,V: k = 3), with a
    separate LoRA update on each group whose `enable_lora` flag is True.

    Output features are split into k equal groups of d = out/k. For the m enabled groups,
    `lora_A` stacks their A_g as (r·m, in) and `lora_B` stacks their B_g as (d·m, r), exactly as
    in loralib. Group g receives scaling · x A_gᵀ B_gᵀ; disabled groups receive nothing.

    The forward pass computes x Aᵀ once for all groups, (..., r·m), then each group's thin
    product with B_g, and adds it into that group's slice of the output. loralib instead rebuilds
    the full (out × in) ΔW with a grouped convolution on every call; here ΔW is formed only to
    merge. No index tensor is kept, so nothing is left behind when the module changes device.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True, bias: bool = True,
                 lora_r_dropout: float = 0.0, **kwargs):
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora:
            raise ValueError("enable_lora must name at least one group, e.g. [True, False, True]")
        if out_features % len(enable_lora):
            raise ValueError(f"len(enable_lora) = {len(enable_lora)} must divide out_features = "
                             f"{out_features}: each flag stands for an equal slice of the output")
        self.fan_in_fan_out = fan_in_fan_out
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, lora_r_dropout, merge_weights)
        self.enable_lora = enable_lora
        self.group_size = out_features // len(enable_lora)                      # d
        self.lora_groups = [g for g, on in enumerate(enable_lora) if on]         # plain ints
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.detach().t().contiguous())
        if self.has_lora:
            m = len(self.lora_groups)
            self.lora_A = nn.Parameter(self.weight.new_empty((r * m, in_features)))             # (r·m, in)
            self.lora_B = nn.Parameter(self.weight.new_empty((self.group_size * m, r)))         # (d·m, r)
            self.weight.requires_grad = False
        self.reset_parameters()

    @property
    def has_lora(self) -> bool:
        return self.r > 0 and len(self.lora_groups) > 0

    def delta_weight(self) -> torch.Tensor:
        """scaling · ΔW, laid out like `weight`; rows of disabled groups are zero."""
        r, d = self.r, self.group_size
        delta = self.lora_A.new_zeros((self.out_features, self.in_features))  # (out, in)
        for j, g in enumerate(self.lora_groups):
            B_g = self.lora_B[j * d:(j + 1) * d]                                # (d, r)
            A_g = self.lora_A[j * r:(j + 1) * r]                                # (r, in)
            delta[g * d:(g + 1) * d] = B_g @ A_g
        return self._T(delta) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._T(self.weight), self.bias)                  # (..., out)
        if self.has_lora and not self.merged:
            r, d = self.r, self.group_size
            h = self.lora_dropout(x) @ self.lora_A.t()                           # (..., r·m), once
            h = self.lora_r_dropout(h) * self.scaling                            # scale the thin side
            # group g's slice of the output gets (x A_gᵀ) B_gᵀ: (..., r) @ (r, d) -> (..., d)
            updates = [(g, h[..., j * r:(j + 1) * r] @ self.lora_B[j * d:(j + 1) * d].t())
                       for j, g in enumerate(self.lora_groups)]
            if torch.is_grad_enabled() and (result.requires_grad or h.requires_grad):
                # Training: one concatenation. In-place slice adds would make autograd clone
                # and zero-fill the gradient of the whole (..., out) output once per group.
                parts = list(result.split(d, dim=-1))                            # k × (..., d)
                for g, u in updates:
                    parts[g] = parts[g] + u
                result = torch.cat(parts, dim=-1)                                # (..., out)
            else:
                # Inference: add into the output slices in place, no copy of the output.
                for g, u in updates:
                    result[..., g * d:(g + 1) * d] += u
        return result


# --------------------------------------------------------------------------------------------
# 3. Conv1D: GPT-2's linear layer, weight stored (in, out)
# --------------------------------------------------------------------------------------------

class Conv1D(nn.Module):
    """GPT-2's "Conv1D", which is a linear layer whose weight is stored transposed: y = x W + b
    with W of shape (nx, nf) = (in, out). Argument order (nf, nx) as in Hugging Face and
    microsoft/LoRA, so their checkpoints load unchanged."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))  # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.shape[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)   # (N, in) @ (in, out)
        return x.view(size_out)


# --------------------------------------------------------------------------------------------
# 4. Attention, with LoRA on Q and V
# --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Causal multi-head self-attention.

    `c_attn` projects x to Q, K and V at once (a (C, 3C) Conv1D weight), built as a MergedLinear
    with fan_in_fan_out=True and enable_lora=[True, False, True]: LoRA adapts W_q and W_v and
    leaves W_k frozen, the choice the LoRA paper found best for a fixed parameter budget.
    `merge_weights=False`: a training loop's eval() steps must not fold ΔW into W.

    `layer_past` holds the keys and values of earlier tokens, (2, B, nh, T_past, hs); the new
    `present` appends this call's, so decoding one token at a time costs O(T) instead of O(T²).
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.n_embd = C
        self.c_attn = MergedLinear(
            C, 3 * C, r=config.lora_attn_dim, lora_alpha=config.lora_attn_alpha,
            lora_dropout=config.lora_dropout, lora_r_dropout=config.lora_r_dropout,
            enable_lora=[True, False, True], fan_in_fan_out=True, merge_weights=False)
        self.c_proj = Conv1D(C, C)
        self.attn_pdrop = config.fix_dropout
        self.resid_dropout = nn.Dropout(config.fix_dropout)

    def forward(self, x: torch.Tensor, layer_past: Optional[torch.Tensor] = None, use_cache: bool = True):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)                               # 3 × (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)                               # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)                               # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)                               # (B, nh, T, hs)
        if layer_past is not None:
            k = torch.cat((layer_past[0], k), dim=-2)                          # (B, nh, Tk, hs)
            v = torch.cat((layer_past[1], v), dim=-2)
        # The cache for the next call; skipped when nobody will read it (training with labels).
        present = torch.stack((k, v)) if use_cache else None                   # (2, B, nh, Tk, hs)

        Tk = k.shape[-2]
        dropout_p = self.attn_pdrop if self.training else 0.0
        if Tk == T:      # no cache: the usual lower-triangular mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:     # one new token: it may look at everything before it
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:            # several new tokens after a cache: query i sits at position Tk - T + i
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                       # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), present


# --------------------------------------------------------------------------------------------
# 5. MLP and Block
# --------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Position-wise feed-forward: C → 4C, GELU (GPT-2's tanh approximation), 4C → C."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        C = config.n_embd
        self.c_fc = Conv1D(4 * C, C)
        self.c_proj = Conv1D(C, 4 * C)
        self.dropout = nn.Dropout(config.fix_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.c_fc(x), approximate="tanh")                           # (B, T, 4C)
        return self.dropout(self.c_proj(h))                                    # (B, T, C)


class Block(nn.Module):
    """A transformer layer with pre-LayerNorm: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer_past: Optional[torch.Tensor] = None, use_cache: bool = True):
        a, present = self.attn(self.ln_1(x), layer_past=layer_past, use_cache=use_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


# --------------------------------------------------------------------------------------------
# 6. GPT2Model: embeddings, n_layer blocks, final LayerNorm
# --------------------------------------------------------------------------------------------

class GPT2Model(nn.Module):
    """The GPT-2 trunk: token + position embeddings, the blocks, a final LayerNorm.

    `forward(input_ids, past, use_cache)` returns the hidden states (B, T, C) and one `present`
    per layer (None when use_cache is False).
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)              # (V, C)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)             # (n_positions, C)
        self.drop = nn.Dropout(config.fix_dropout)
        # Each block is built on its own (no deepcopy), so each layer draws its own LoRA A.
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, past: Optional[Sequence[torch.Tensor]] = None,
                use_cache: bool = True):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.dtype not in (torch.long, torch.int32):
            got = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, time), got {got}")
        B, T = input_ids.shape
        if past is not None and len(past) != cfg.n_layer:
            raise ValueError(f"past must hold one entry per layer ({cfg.n_layer}), got {len(past)}")
        if past is not None and past[0].shape[1] != B:
            raise ValueError(f"past was computed for a batch of {past[0].shape[1]}, not {B}; feed "
                             f"the same batch that produced it")
        past_length = 0 if past is None else past[0].shape[-2]
        if T == 0 or past_length + T > cfg.n_ctx:
            raise ValueError(f"sequence length {past_length + T} (past {past_length} + new {T}) must "
                             f"lie in [1, n_ctx = {cfg.n_ctx}]; crop the input to the last "
                             f"{cfg.n_ctx} tokens")
        _check_id_range(input_ids, cfg.vocab_size, "token ids", "check that the tokenizer matches the model")

        pos = torch.arange(past_length, past_length + T, device=input_ids.device)   # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))                     # (B, T, C)
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, layer_past=None if past is None else past[i], use_cache=use_cache)
            presents.append(present)
        return self.ln_f(x), presents                                          # (B, T, C)


# --------------------------------------------------------------------------------------------
# 7. The language-model head, tied to the token embedding
# --------------------------------------------------------------------------------------------

class GPT2LMHead(nn.Module):
    """logits = h wteᵀ. `decoder.weight` is the very Parameter `wte.weight` (shared storage, one
    gradient), so the head adds no parameters: the tying of the GPT-2 paper."""

    def __init__(self, wte_weight: nn.Parameter):
        super().__init__()
        V, C = wte_weight.shape
        self.decoder = nn.Linear(C, V, bias=False, device="meta")  # allocate nothing ...
        self.decoder.weight = wte_weight                           # ... then share wte's

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.decoder(hidden_state)                                      # (B, T, V)


# --------------------------------------------------------------------------------------------
# 8. GPT2LMModel: the full model, its loss, weight loading and generation
# --------------------------------------------------------------------------------------------

class GPT2LMModel(nn.Module):
    """GPT-2 language model with optional LoRA adapters on Q and V (rank config.lora_attn_dim).

    forward(input_ids, lm_labels=None, lm_mask=None, past=None, label_smooth=0.0):
      * without labels: (logits (B, T, V), presents)
      * with labels:    (logits, loss)

    As in microsoft/LoRA the caller aligns the labels: lm_labels[b, t] is the target for the
    logits at position t (for plain next-token prediction, labels are the inputs shifted left by
    one). The loss is the mean over positions where lm_mask is 1 (everywhere when lm_mask is
    None). With label_smooth ε > 0 each position costs (1-ε)·NLL + ε·mean over the vocabulary of
    -log p, microsoft/LoRA's smoothing (the same as PyTorch's label_smoothing).
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = GPT2LMHead(self.transformer.wte.weight)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's init. Only `weight` and `bias` are touched: LoRA's A keeps its kaiming init
        # and B stays zero.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) and module is not self.lm_head.decoder:
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, lm_labels: Optional[torch.Tensor] = None,
                lm_mask: Optional[torch.Tensor] = None, past=None, label_smooth: float = 0.0):
        hidden, presents = self.transformer(input_ids, past=past, use_cache=lm_labels is None)  # (B, T, C)
        logits = self.lm_head(hidden)                                          # (B, T, V)
        if lm_labels is None:
            return logits, presents

        if lm_labels.shape != input_ids.shape or lm_labels.dtype not in (torch.long, torch.int32):
            raise ValueError(f"lm_labels must be an integer tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(lm_labels.shape)} {lm_labels.dtype}")
        _check_id_range(lm_labels, logits.shape[-1], "lm_labels",
                        "mark positions to skip with lm_mask = 0, not -100")
        if lm_mask is not None and lm_mask.shape != input_ids.shape:
            raise ValueError(f"lm_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(lm_mask.shape)}")
        if not 0.0 <= label_smooth < 1.0:
            raise ValueError(f"label_smooth must lie in [0, 1), got {label_smooth!r}")
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, V).float(), lm_labels.reshape(-1).long(),
                               reduction="none", label_smoothing=label_smooth)   # (B·T,)
        if lm_mask is None:
            return logits, loss.mean()
        mask = lm_mask.reshape(-1).to(loss.dtype)
        return logits, (loss * mask).sum() / mask.sum().clamp(min=1e-12)  # all-zero mask: 0

    # ---- loading weights ------------------------------------------------------------------

    def load_weight(self, state_dict: Union[Mapping[str, torch.Tensor], str, os.PathLike]) -> "GPT2LMModel":
        """Load GPT-2 and/or LoRA weights from a state dict or a file, in any of the usual forms:

        Hugging Face GPT-2 (keys with or without `transformer.`), microsoft/LoRA checkpoints
        (a {'model_state_dict': ...} wrapper, `module.` prefixes from DistributedDataParallel,
        full or LoRA-only), and this module's own state dicts. The causal-mask buffers
        `attn.bias` / `attn.masked_bias` and the tied `lm_head` weight are ignored.

        The base weights must be all present or all absent (a LoRA-only file, which may also carry
        trained biases, see lora_state_dict); the LoRA weights all present or all absent (a plain
        GPT-2 file). A shape that does not fit raises a ValueError naming the
        key and both shapes.
        """
        sd = _normalize_state_dict(_read_weights(state_dict) if isinstance(state_dict, (str, os.PathLike))
                                   else state_dict)
        own = {k[len("transformer."):]: v for k, v in self.state_dict().items()
               if k.startswith("transformer.")}
        if not sd:
            raise ValueError("the checkpoint holds no GPT-2 or LoRA weights")
        unexpected = sorted(set(sd) - set(own))
        if unexpected:
            hint = ""
            if any("lora_" in k for k in unexpected) and self.config.lora_attn_dim == 0:
                hint = " (the checkpoint holds LoRA weights: build the model with lora_attn_dim = r > 0)"
            raise ValueError(f"checkpoint keys this model does not have: {_short(unexpected)}{hint}")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model "
                                 f"expects {tuple(own[k].shape)}; the config does not fit this checkpoint")
        for kind, keys in (("base", [k for k in own if "lora_" not in k]),
                           ("LoRA", [k for k in own if "lora_" in k])):
            present = [k for k in keys if k in sd]
            adapter_biases = kind == "base" and all(k.endswith(".bias") for k in present)
            if present and len(present) != len(keys) and not adapter_biases:
                missing = [k for k in keys if k not in sd]
                raise ValueError(f"checkpoint holds some {kind} weights but not all; missing: {_short(missing)}")
        self.transformer.load_state_dict(sd, strict=False)
        return self

    @classmethod
    def from_pretrained(cls, source: Union[str, os.PathLike], **config_overrides) -> "GPT2LMModel":
        """GPT-2 weights from a Hugging Face checkpoint folder (config.json with model.safetensors
        or pytorch_model.bin), a single weights file (.safetensors, .bin, .pt), or a hub name
        (gpt2, gpt2-medium, gpt2-large, gpt2-xl; needs `pip install huggingface_hub`).

        The sizes come from config.json, or else from the tensor shapes (n_head from the matching
        GPT-2 preset, or from `n_head=`). `config_overrides` set the rest, typically the LoRA
        rank: `GPT2LMModel.from_pretrained("gpt2", lora_attn_dim=4, lora_attn_alpha=32)`. A file
        with LoRA weights sets the rank from their shape unless `lora_attn_dim` is given.
        """
        source = os.fspath(source)
        if not os.path.exists(source) and source in HUB_MODELS:
            source = _download_from_hub(HUB_MODELS[source][0])
        folder_config = None
        if os.path.isdir(source):
            weights_path = next((os.path.join(source, f) for f in ("model.safetensors", "pytorch_model.bin")
                                 if os.path.isfile(os.path.join(source, f))), None)
            if weights_path is None:
                raise ValueError(f"{source} holds neither model.safetensors nor pytorch_model.bin")
            cfg_path = os.path.join(source, "config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path, encoding="utf-8") as f:
                    folder_config = _config_from_hf_json(json.load(f), cfg_path)
        elif os.path.isfile(source):
            weights_path = source
        else:
            raise ValueError(f"no checkpoint at {source!r}: give a folder, a weights file, or one of "
                             f"{', '.join(HUB_MODELS)}")
        sd = _normalize_state_dict(_read_weights(weights_path))
        if "wte.weight" not in sd:
            raise ValueError(f"{weights_path} holds no GPT-2 base weights (no wte.weight); if it is a "
                             f"LoRA-only checkpoint, load a base model first, then model.load_weight(path)")
        values = folder_config if folder_config is not None else _config_from_shapes(sd, config_overrides)
        if "h.0.attn.c_attn.lora_A" in sd:
            if "lora_attn_dim" not in config_overrides:
                values["lora_attn_dim"] = sd["h.0.attn.c_attn.lora_A"].shape[0] // 2  # A is (r·2, C)
            # No checkpoint records α, and a guessed α would silently rescale ΔW.
            if "lora_attn_alpha" not in config_overrides:
                raise ValueError(f"{weights_path} holds LoRA weights, whose scaling α/r depends on "
                                 f"α: pass lora_attn_alpha=... (the α they were trained with)")
        values.update(config_overrides)
        model = cls(GPT2Config.from_dict(values))
        return model.load_weight(sd)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append `max_new_tokens` tokens to `input_ids` (B, T) and return (B, T + max_new_tokens).

        temperature 0 picks the most likely token (greedy); otherwise tokens are sampled from
        softmax(logits / temperature), restricted to the `top_k` most likely when given. With the
        cache each step feeds only the newest token; once the context would exceed n_ctx the
        model re-reads the last n_ctx tokens, exactly as the uncached loop does. Call eval()
        first unless dropout is wanted.
        """
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        n_ctx = self.config.n_ctx
        idx, past = input_ids, None
        for _ in range(max_new_tokens):
            if use_cache and past is not None and past[0].shape[-2] < n_ctx:
                hidden, past = self.transformer(idx[:, -1:], past=past)        # one new token
            else:
                hidden, past = self.transformer(idx[:, -n_ctx:], use_cache=use_cache)  # (re)read the context
            logits = self.lm_head(hidden[:, -1, :]).float()                    # (B, V): last position only
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)                                 # (B, T + 1)
        return idx


# ---- checkpoint reading (used by load_weight / from_pretrained) ------------------------------

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of HF / microsoft
_IGNORED_KEYS = ("lm_head.weight", "lm_head.decoder.weight")  # tied to wte


def _read_weights(path: Union[str, os.PathLike]) -> Mapping[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no weights file at {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-torch files
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None


def _normalize_state_dict(sd: Mapping) -> Dict[str, torch.Tensor]:
    """Keys relative to GPT2Model ("h.0.attn.c_attn.weight"), whatever wrapper or prefix they had."""
    if isinstance(sd, Mapping) and "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    out = {}
    for key, value in sd.items():
        k = key
        for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k in _IGNORED_KEYS or k.endswith(_IGNORED_SUFFIXES):
            continue
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        # Old OpenAI-style names, as microsoft/LoRA's loader also accepts.
        if k.endswith((".g", ".w")):
            k = k[:-2] + ".weight"
        elif k.endswith(".b"):
            k = k[:-2] + ".bias"
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        out[k] = value
    return out


def _config_from_hf_json(cfg: Mapping, where: str) -> dict:
    """The GPT2Config fields of a Hugging Face GPT-2 config.json; refuses variants we don't build."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} is not gpt2")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"{where}: activation_function {act!r} is not GPT-2's tanh GELU")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported by this GPT-2")
    if cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 768)):
        raise ValueError(f"{where}: n_inner={cfg['n_inner']} is not 4·n_embd, which this GPT-2 assumes")
    if cfg.get("scale_attn_weights", True) is False:
        raise ValueError(f"{where}: scale_attn_weights=false is not supported by this GPT-2")
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
            "initializer_range")
    values = {k: cfg[k] for k in keys if k in cfg}
    values["n_ctx"] = min(cfg.get("n_ctx", values.get("n_positions", 1024)), values.get("n_positions", 1024))
    return values


def _config_from_shapes(sd: Mapping[str, torch.Tensor], overrides: Mapping) -> dict:
    V, C = sd["wte.weight"].shape
    n_pos = sd["wpe.weight"].shape[0] if "wpe.weight" in sd else 1024
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("h.")}
    values = dict(vocab_size=V, n_embd=C, n_positions=n_pos, n_ctx=n_pos,
                  n_layer=max(layers) + 1 if layers else 0)
    heads = [p["n_head"] for p in PRESETS.values() if p["n_embd"] == C]
    if heads:
        values["n_head"] = heads[0]
    elif "n_head" not in overrides:
        raise ValueError(f"cannot tell n_head from the weights (n_embd = {C} is no GPT-2 size); "
                         f"pass n_head=... to from_pretrained")
    return values


def _download_from_hub(repo_id: str) -> str:
    """Fetch config.json and the weights of a hub model; returns the local folder."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f"downloading {repo_id} needs the huggingface_hub package: "
                         f"pip install huggingface_hub safetensors (or pass a local folder)") from None
    try:
        cfg = hf_hub_download(repo_id, "config.json")
        try:
            hf_hub_download(repo_id, "model.safetensors")
        except Exception:  # older snapshots hold only the pickled weights
            hf_hub_download(repo_id, "pytorch_model.bin")
    except Exception as e:  # no network, no access, an unknown revision: one clear message
        raise ValueError(f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: "
                         f"{e}); check the network, or pass a local checkpoint folder") from None
    return os.path.dirname(cfg)


def _short(keys: List[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------
# 9. Presets: the four published GPT-2 sizes
# --------------------------------------------------------------------------------------------

# n_embd / n_layer / n_head of the four published GPT-2 sizes.
PRESETS: Dict[str, Dict[str, int]] = {
    "gpt2.sm": dict(n_embd=768, n_layer=12, n_head=12),    # 124M, "gpt2"
    "gpt2.md": dict(n_embd=1024, n_layer=24, n_head=16),   # 355M, "gpt2-medium"
    "gpt2.lg": dict(n_embd=1280, n_layer=36, n_head=20),   # 774M, "gpt2-large"
    "gpt2.xl": dict(n_embd=1600, n_layer=48, n_head=25),   # 1558M, "gpt2-xl"
}

# Hugging Face hub names of the same checkpoints, and the preset each one is.
HUB_MODELS: Dict[str, Tuple[str, str]] = {
    "gpt2": ("openai-community/gpt2", "gpt2.sm"),
    "gpt2-medium": ("openai-community/gpt2-medium", "gpt2.md"),
    "gpt2-large": ("openai-community/gpt2-large", "gpt2.lg"),
    "gpt2-xl": ("openai-community/gpt2-xl", "gpt2.xl"),
}


# --------------------------------------------------------------------------------------------
# 10. Helpers: what to train, what to save, merging
# --------------------------------------------------------------------------------------------

_BIAS_MODES = ("none", "all", "lora_only")


def _lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Make lora_A / lora_B trainable and freeze everything else, except biases as `bias` says:
    'none' (all frozen), 'all' (every bias trains), 'lora_only' (biases of LoRA layers train)."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad = True
    elif bias == "lora_only":
        for m in _lora_layers(model):
            if m.has_lora and m.bias is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The LoRA tensors of `model.state_dict()` (plus biases, per `bias` as above): a checkpoint
    of a few hundred kilobytes to a few megabytes instead of the whole model."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    sd = model.state_dict()
    keep = {k for k in sd if "lora_" in k}
    if bias == "all":
        keep |= {k for k in sd if k.endswith("bias")}
    elif bias == "lora_only":
        lora_prefixes = {n + "." for n, m in model.named_modules() if isinstance(m, LoRALayer) and m.has_lora}
        keep |= {k for k in sd if k.endswith("bias") and any(k.startswith(p) for p in lora_prefixes)}
    return {k: sd[k] for k in sd if k in keep}


def lora_parameter_count(config: GPT2Config) -> int:
    """Trainable LoRA parameters: n_layer × 2 (Q and V) × (n_embd + n_embd) × r.

    Per adapted projection, A is (r, C) and B is (C, r): 2·C·r numbers."""
    return config.n_layer * 2 * (config.n_embd + config.n_embd) * config.lora_attn_dim


def merge_lora(model: nn.Module) -> None:
    """Fold scaling·ΔW into every LoRA layer's weight (idempotent)."""
    for m in _lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take scaling·ΔW back out of every LoRA layer's weight (idempotent)."""
    for m in _lora_layers(model):
        m.unmerge()


def base_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the frozen base: every non-LoRA tensor of the trunk, by name, shape and value
    (as float32, so the same numbers stored in another dtype give the same fingerprint). An
    adapter records it, so that it can refuse a base it was not trained on."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(k for k in sd if k.startswith("transformer.") and "lora_" not in k):
        v = sd[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A plain state dict with ΔW folded into the weights and no LoRA tensors: it loads into a
    rank-0 model of the same sizes (load_state_dict or load_weight), for inference at no extra
    cost. For Hugging Face's GPT2LMHeadModel, drop `lm_head.decoder.weight` (tied to wte there too)
    and load with strict=False. The model itself is left as it was."""
    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALayer) and m.has_lora:
                key = f"{name}.weight" if name else "weight"
                sd[key] = sd[key] + m.delta_weight()  # state_dict holds W0 either way
    return sd
