"""GPT-2 with LoRA (Low-Rank Adaptation), in one file.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained
weight matrix W0 frozen and learns a low-rank update next to it:

    h = W0 x + ΔW x,    ΔW = B A,    B ∈ R^{d_out × r},  A ∈ R^{r × d_in},  r ≪ min(d_in, d_out)

scaled by α/r, so that changing r does not force a new learning rate. A starts random and B at
zero: before training ΔW = 0. Once trained, ΔW can be added into W0 ("merged"), at no extra cost.

This module follows microsoft/LoRA: its `loralib` layers (`Linear`, `MergedLinear`, with the same
parameter names and shapes) and its `examples/NLG` GPT-2 (the same state-dict keys and forward
arguments), so that checkpoints and scripts move freely between the two. Its numbered sections
read top to bottom, from the config to the checkpoint formats.

Shapes in comments use B (batch), T (time), C (n_embd), nh (heads), hs (head size), V (vocab),
r (LoRA rank), m (number of LoRA-enabled groups in a MergedLinear).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

_Path = Union[str, os.PathLike]

# ---- 1. Configuration ----
@dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of GPT-2 and of its LoRA adapters (names as in microsoft/LoRA), frozen.

    vocab_size          number of token ids V; ids must lie in [0, V).
    n_positions         number of learned position embeddings (rows of wpe).
    n_ctx               the longest context attention sees (past + new tokens); ≤ n_positions.
    n_embd              model width C; a multiple of n_head.
    n_layer             number of transformer blocks.
    n_head              number of attention heads nh; head size hs = C / nh.
    layer_norm_epsilon  ε added to the variance inside every LayerNorm.
    initializer_range   standard deviation of the normal init of the weights.
    lora_attn_dim       the LoRA rank r on Q and V; 0 means no adapters, plain GPT-2.
    lora_attn_alpha     α; the update ΔW = BA is scaled by α / r.
    lora_dropout        dropout on the adapter's input x, before A (as in loralib).

    Two fields microsoft's GPT-2 stores but never uses; here they mean (0, off, by default):
    lora_r_dropout      dropout on A x, between A and B.
    fix_dropout         the model's own dropout: embeddings, attention weights, residual branches.
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

    def __post_init__(self):  # checked once: the config never changes
        for f in fields(self):  # plain Python numbers (not numpy's), as JSON and torch expect
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                object.__setattr__(self, f.name, (int if _is_int(value) else float)(value))
        for name in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head})")
        if self.n_ctx > self.n_positions:
            raise ValueError(f"GPT2Config.n_ctx ({self.n_ctx}) must not exceed n_positions "
                             f"({self.n_positions})")
        eps, std = self.layer_norm_epsilon, self.initializer_range
        if not (_is_real(eps) and eps > 0):
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number > 0, got {eps!r}")
        if not (_is_real(std) and std >= 0):
            raise ValueError(f"GPT2Config.initializer_range must be a number >= 0, got {std!r}")
        _check_lora(self.lora_attn_dim, self.lora_attn_alpha, self.lora_dropout,
                    self.lora_r_dropout, "GPT2Config.lora_attn_dim (the LoRA rank r)",
                    "GPT2Config.lora_attn_alpha (α)")
        _check_dropout(self.fix_dropout, "GPT2Config.fix_dropout")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        """A config of one of the GPT-2 sizes in PRESETS; `overrides` set any other field."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping) -> "GPT2Config":
        """Build a config from a mapping, with a ValueError (not a TypeError) for unknown fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, values)) - known)
        if unknown:
            raise ValueError(f"unknown GPT2Config field(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# Argument checks shared by the config and the layers.

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_dropout(p, what: str) -> None:
    if not _is_real(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{what} is a dropout probability and must lie in [0, 1), got {p!r}")


# A's and B's gradients grow with α/r, and AdamW squares them: beyond these bounds the square
# overflows (or underflows) float32 and bfloat16, and B would silently never move.
_SCALING_RANGE = (1e-18, 1e18)


def _check_lora(r, alpha, dropout, r_dropout, r_name="LoRA rank r", alpha_name="lora_alpha (α)"):
    if not _is_int(r) or r < 0:
        raise ValueError(f"{r_name} must be an integer >= 0 (0 disables LoRA), got {r!r}")
    if r > 0:
        if not (_is_real(alpha) and alpha > 0):
            raise ValueError(f"{alpha_name} must be a finite number > 0 when r > 0, got {alpha!r}")
        lo, hi = _SCALING_RANGE
        if not lo <= alpha / r <= hi:
            raise ValueError(f"the LoRA scaling α/r = {alpha}/{r} lies outside [{lo:g}, {hi:g}], "
                             f"where AdamW overflows float32; choose {alpha_name} nearer to r")
    _check_dropout(dropout, "lora_dropout")
    _check_dropout(r_dropout, "lora_r_dropout")


def _check_id_range(ids: torch.Tensor, n: int, what: str, fix: str, negative_ok=False) -> None:
    """A clear error instead of an index error deep inside; on the CPU only, as elsewhere it would
    stall every step on a device→host copy (a device-side assert reports it there)."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if (lo < 0 and not negative_ok) or hi >= n:
        bound = f"vocab_size = {n}" if what in ("token ids", "lm_labels") else n
        raise ValueError(f"{what} must lie in [0, {bound}), got values in [{lo}, {hi}]; {fix}")


def _is_tensor(x, dim: int, dtypes=None) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == dim and (dtypes is None or x.dtype in dtypes)


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


# ---- 2. LoRA layers: loralib's arguments, parameter names and shapes ----
class LoRALayer(nn.Linear):
    """A dense layer W0 (bias b), output in k groups of d = out/k rows, a low-rank update on the m
    groups `enable_lora` names: Linear (k = m = 1) and MergedLinear. `lora_A` stacks the A_g as
    (r·m, in), `lora_B` the B_g as (d·m, r), as in loralib. `weight` is W0 as (out, in), or (in,
    out) with `fan_in_fan_out=True` (GPT-2's Conv1D); with an adapter, W0 alone is frozen.
    `merged` says whether scaling·ΔW is inside `weight`; merge() and unmerge() move it. With
    `merge_weights=True`, eval() merges and train() unmerges.

    Unlike loralib: a state dict always holds W0, and loading into a merged layer re-merges with
    the loaded A and B (ΔW never counts twice); merging writes a new tensor, so one held elsewhere
    (an earlier state dict) never changes; the forward pass never forms the (out × in) ΔW."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float,
                 lora_dropout: float, lora_r_dropout: float, enable_lora: Sequence[bool],
                 fan_in_fan_out: bool, merge_weights: bool, bias: bool, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would draw W0 once in the wrong layout
        if not all(_is_int(n) and n > 0 for n in (in_features, out_features)):
            raise ValueError(f"in_features, out_features must be positive integers: "
                             f"{in_features!r}, {out_features!r}")
        if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, Sequence) \
                or not enable_lora or not all(e in (0, 1) for e in enable_lora):
            raise ValueError(f"enable_lora must be a list of booleans, one per output group, at "
                             f"least one, e.g. [True, False, True]; got {enable_lora!r}")
        if out_features % len(enable_lora):
            raise ValueError(f"len(enable_lora) = {len(enable_lora)} must divide out_features = "
                             f"{out_features}: each flag stands for an equal slice of the output")
        _check_lora(r, lora_alpha, lora_dropout, lora_r_dropout)
        new = dict(device=device, dtype=dtype)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.group_size = d = out_features // len(enable_lora)
        self.lora_groups = [g for g, on in enumerate(self.enable_lora) if on]   # plain ints
        m = len(self.lora_groups)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r if r > 0 else 0.0
        self.fan_in_fan_out, self.merge_weights, self.merged = fan_in_fan_out, merge_weights, False
        self.has_lora = r > 0 and m > 0
        w_shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(w_shape, **new), requires_grad=not self.has_lora)
        self.bias = nn.Parameter(torch.empty(out_features, **new)) if bias else None
        if self.has_lora:
            self.lora_A = nn.Parameter(torch.empty(r * m, in_features, **new))       # (r·m, in)
            self.lora_B = nn.Parameter(torch.empty(d * m, r, **new))                 # (d·m, r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_r_dropout = nn.Dropout(lora_r_dropout) if lora_r_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for W0, b and A (in (out, in) terms), and B = 0: ΔW starts at zero."""
        nn.init.kaiming_uniform_(self._T(self.weight), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)  # in_features >= 1, checked above
            nn.init.uniform_(self.bias, -bound, bound)
        if self.has_lora:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        """Move between (out, in), the layout of ΔW, and the layout `weight` is stored in."""
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def delta_weight(self) -> torch.Tensor:
        """scaling · ΔW, laid out like `weight`; rows of disabled groups are zero."""
        r, d = self.r, self.group_size
        delta = self.lora_A.new_zeros((self.out_features, self.in_features))  # (out, in)
        for j, g in enumerate(self.lora_groups):
            B_g, A_g = self.lora_B[j * d:(j + 1) * d], self.lora_A[j * r:(j + 1) * r]
            delta[g * d:(g + 1) * d] = B_g @ A_g
        return self._T(delta) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._T(self.weight), self.bias)                  # (..., out)
        if not self.has_lora or self.merged:
            return result
        r, d = self.r, self.group_size
        # x Aᵀ once for all groups, scaled on the thin side: r·m multiplications per token, not out
        # (..., r·m)
        h = self.lora_r_dropout(self.lora_dropout(x) @ self.lora_A.t()) * self.scaling
        parts = list(result.split(d, dim=-1))                                  # k × (..., d)
        for j, g in enumerate(self.lora_groups):
            # group g gets (x A_gᵀ) B_gᵀ: (..., r) @ (r, d) -> (..., d)
            parts[g] = parts[g] + h[..., j * r:(j + 1) * r] @ self.lora_B[j * d:(j + 1) * d].t()
        # One concatenation: in-place slice adds would make autograd clone the whole output's
        # gradient once per group.
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]       # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + scaling·ΔW, into a new tensor. Idempotent."""
        if self.has_lora and not self.merged:
            self.weight.data = self.weight.data + self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − scaling·ΔW = W0, into a new tensor. Idempotent."""
        if self.has_lora and self.merged:
            self.weight.data = self.weight.data - self.delta_weight()
        self.merged = False

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)  # Module.eval() arrives here as train(False)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.has_lora and self.merged:  # save W0, never W0 + ΔW
            with torch.no_grad():
                destination[prefix + "weight"] = self.weight - self.delta_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_merged = self.merged
        self.unmerge()  # back to W0 with the old A, B ...
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        if was_merged:
            self.merge()  # ... then W0 (old or loaded) + ΔW of the loaded A, B


class Linear(LoRALayer):
    """A dense layer with a LoRA update: y = x W0ᵀ + b + scaling · (x Aᵀ) Bᵀ, in two thin matrix
    products, x → r numbers → out. As in loralib: `lora_A` A (r, in), `lora_B` B (out, r)."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: bool = True, bias: bool = True, lora_r_dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, lora_r_dropout,
                         [True], fan_in_fan_out, merge_weights, bias, device, dtype)


class MergedLinear(LoRALayer):
    """k projections side by side in one layer (GPT-2's fused Q,K,V: k = 3), each enabled group g
    receiving scaling · x A_gᵀ B_gᵀ (loralib instead rebuilds the whole ΔW on every call)."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True, bias: bool = True,
                 lora_r_dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, lora_r_dropout,
                         enable_lora, fan_in_fan_out, merge_weights, bias, device, dtype)


# ---- 3. Conv1D: GPT-2's linear layer, weight stored (in, out) ----
class Conv1D(nn.Module):
    """GPT-2's "Conv1D": a linear layer y = x W + b whose W is stored as (nx, nf) = (in, out).
    Arguments (nf, nx) as in Hugging Face and microsoft/LoRA, whose checkpoints load as they are."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))   # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)                         # (..., out)


# ---- 4. Attention, with LoRA on Q and V ----
class Attention(nn.Module):
    """Causal multi-head self-attention. `c_attn` projects x to Q, K and V at once ((C, 3C), as
    Conv1D), a MergedLinear with enable_lora=[True, False, True]: LoRA on W_q and W_v, W_k frozen,
    the paper's best choice for a parameter budget; merge_weights=False: eval() does not merge.

    `layer_past` (2, B, nh, T_past, hs) holds earlier keys and values; without `len_past` this
    call's are appended. With `len_past` (B,) the cache has a fixed size (microsoft's beam
    search): row b's new token sits at len_past[b], replaces that row, sees rows 0..len_past[b]."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.c_attn = MergedLinear(
            C, 3 * C, r=config.lora_attn_dim, lora_alpha=config.lora_attn_alpha,
            lora_dropout=config.lora_dropout, lora_r_dropout=config.lora_r_dropout,
            enable_lora=[True, False, True], fan_in_fan_out=True, merge_weights=False)
        self.c_proj = Conv1D(C, C)
        self.attn_pdrop = config.fix_dropout
        self.resid_dropout = nn.Dropout(config.fix_dropout)

    def forward(self, x: torch.Tensor, layer_past: Optional[torch.Tensor] = None,
                len_past: Optional[torch.Tensor] = None, use_cache: bool = True):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        # (B, nh, T, hs) each
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        mask = None
        if len_past is not None:     # fixed-size cache: write row len_past[b], out of place
            row = len_past.view(B, 1, 1, 1).expand(B, nh, 1, hs)
            k = layer_past[0].scatter(2, row, k)                               # (B, nh, Tc, hs)
            v = layer_past[1].scatter(2, row, v)
            visible = torch.arange(k.shape[-2], device=x.device) <= len_past.view(B, 1)  # (B, Tc)
            mask = visible.view(B, 1, 1, -1)
        elif layer_past is not None:
            k = torch.cat((layer_past[0], k), dim=-2)                          # (B, nh, Tk, hs)
            v = torch.cat((layer_past[1], v), dim=-2)
            Tk = k.shape[-2]
            if T > 1:                # query i sits at position Tk - T + i; one new token sees all
                mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
        # The cache for the next call; skipped when nobody will read it (training with labels).
        present = torch.stack((k, v)) if use_cache else None                   # (2, B, nh, Tk, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=layer_past is None,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                                 # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), present


# ---- 5. MLP and Block ----
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

    def forward(self, x: torch.Tensor, layer_past=None, len_past=None, use_cache: bool = True):
        a, present = self.attn(self.ln_1(x), layer_past, len_past, use_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


# ---- 6. GPT2Model: embeddings, n_layer blocks, final LayerNorm ----
class GPT2Model(nn.Module):
    """The GPT-2 trunk: token + position embeddings, the blocks, a final LayerNorm. forward returns
    the hidden states (B, T, C) and one cache per layer (None when use_cache is False)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise ValueError(f"config must be a GPT2Config, e.g. "
                             f"GPT2Config.from_preset('gpt2.sm'); got {config!r}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)              # (V, C)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)             # (n_positions, C)
        self.drop = nn.Dropout(config.fix_dropout)
        # Each block is built on its own (no deepcopy), so each layer draws its own LoRA A.
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, past: Optional[Sequence[torch.Tensor]] = None,
                len_past: Optional[torch.Tensor] = None, use_cache: bool = True):
        past_length = self._check_inputs(input_ids, past, len_past)
        B, T = input_ids.shape
        # (B, 1) or (T,)
        pos = len_past.view(B, 1) if len_past is not None \
            else torch.arange(past_length, past_length + T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))                     # (B, T, C)
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, None if past is None else past[i], len_past, use_cache)
            presents.append(present)
        return self.ln_f(x), presents                                          # (B, T, C)

    def _check_inputs(self, input_ids, past, len_past) -> int:
        """Clear errors for inputs that would fail deep inside; returns the past length."""
        cfg, dev, dtype = self.config, self.wte.weight.device, self.wte.weight.dtype
        if not _is_tensor(input_ids, 2, (torch.long, torch.int32)) or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty integer tensor (batch, time), got "
                             f"{_describe(input_ids)}")
        B, T = input_ids.shape
        _check_id_range(input_ids, cfg.vocab_size, "token ids",
                        "check that the tokenizer matches the model")
        if past is None and len_past is not None:
            raise ValueError("len_past needs past: a first call without len_past gives the cache")
        nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
        autocast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) \
            else dtype
        if past is not None:
            ok = isinstance(past, Sequence) and len(past) == cfg.n_layer and all(
                _is_tensor(p, 5) and p.shape == past[0].shape and p.dtype in (dtype, autocast)
                and p.device == dev for p in past)
            if not ok or (past[0].shape[0], past[0].shape[2], past[0].shape[4]) != (2, nh, hs):
                raise ValueError(f"past must be the {cfg.n_layer} caches (2, B, {nh}, T, {hs}) a "
                                 f"previous call returned ({dtype}, on {dev})")
            if past[0].shape[1] != B:
                raise ValueError(f"past was computed for a batch of {past[0].shape[1]}, not {B}; "
                                 f"feed the same batch")
        past_length = 0 if past is None else past[0].shape[-2]
        if past_length + (T if len_past is None else 0) > cfg.n_ctx:
            raise ValueError(f"sequence length {past_length + T} (past {past_length} + new {T}) "
                             f"must lie in [1, n_ctx = {cfg.n_ctx}]; crop the input to the last "
                             f"{cfg.n_ctx} tokens")
        if len_past is not None:
            if not _is_tensor(len_past, 1, (torch.long,)) or len_past.shape != (B,) or T != 1 \
                    or len_past.device != dev:
                raise ValueError(f"len_past must be a torch.long tensor on {dev} of shape (batch,) "
                                 f"= ({B},), with exactly one new token per row; got "
                                 f"{_describe(len_past)} and {T} new tokens")
            _check_id_range(len_past, past_length, "len_past values (rows of the cache)",
                            "pad the prompts to leave room for the tokens to generate")
        return past_length


# ---- 7. The language-model head, tied to the token embedding ----
class GPT2LMHead(nn.Module):
    """logits = h wteᵀ. `decoder.weight` is the very Parameter `wte.weight` (one storage, one
    gradient): the tying of the GPT-2 paper, no parameters of its own."""

    def __init__(self, wte_weight: nn.Parameter):
        super().__init__()
        V, C = wte_weight.shape
        self.decoder = nn.Linear(C, V, bias=False, device="meta")  # allocate nothing ...
        self.decoder.weight = wte_weight                           # ... then share wte's

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.decoder(hidden_state)                                      # (B, T, V)


# ---- 8. GPT2LMModel: the full model, its loss, accuracy and generation ----
class GPT2LMModel(nn.Module):
    """GPT-2 language model with optional LoRA adapters on Q and V (rank config.lora_attn_dim).

    forward takes microsoft's arguments in its order and returns (logits (B, T, V), caches)
    without labels, for decoding with `past` / `len_past`; with labels (logits, loss), or (logits,
    loss, t1_acc, all_acc) with is_report_accuracy. As in microsoft/LoRA, lm_labels[b, t] is the
    target of position t (the inputs shifted left by one); a negative label (-1, -100) is none."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = GPT2LMHead(self.transformer.wte.weight)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's init. Only `weight` and `bias` are touched: LoRA's A keeps its init, B stays zero.
        std = self.config.initializer_range
        if module is self.lm_head.decoder:
            return
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, lm_labels: Optional[torch.Tensor] = None,
                lm_mask: Optional[torch.Tensor] = None, past=None,
                len_past: Optional[torch.Tensor] = None, label_smooth: float = 0.0,
                is_report_accuracy: bool = False):
        hidden, presents = self.transformer(input_ids, past, len_past, use_cache=lm_labels is None)
        logits = self.lm_head(hidden)                                          # (B, T, V)
        if lm_labels is None:
            return logits, presents
        mask = self._target_mask(input_ids, lm_labels, lm_mask, label_smooth)  # (B, T)
        loss = self._loss(logits, lm_labels, mask, label_smooth)
        if not is_report_accuracy:
            return logits, loss
        return (logits, loss) + self._accuracy(logits, lm_labels, mask)

    def _target_mask(self, input_ids, lm_labels, lm_mask, label_smooth) -> torch.Tensor:
        """lm_mask (ones when None) with the positions of negative labels set to 0, as float."""
        shape = tuple(input_ids.shape)
        if not _is_tensor(lm_labels, 2, (torch.long, torch.int32)) or lm_labels.shape != shape:
            raise ValueError(f"lm_labels must be an integer tensor of the shape of input_ids "
                             f"{shape}, got {_describe(lm_labels)}")
        if lm_mask is not None and not (_is_tensor(lm_mask, 2) and lm_mask.shape == shape):
            raise ValueError(f"lm_mask must have input_ids' shape {shape}, got "
                             f"{_describe(lm_mask)}")
        if not (_is_real(label_smooth) and 0.0 <= label_smooth < 1.0):
            raise ValueError(f"label_smooth must lie in [0, 1), got {label_smooth!r}")
        _check_id_range(lm_labels, self.config.vocab_size, "lm_labels",
                        "a negative label marks a position without target", negative_ok=True)
        return (lm_labels >= 0).float() if lm_mask is None else lm_mask.float() * (lm_labels >= 0)

    @staticmethod
    def _loss(logits, lm_labels, mask, label_smooth) -> torch.Tensor:
        """Σ loss·mask / (Σ mask + 1e-4), microsoft's masked mean (no targets: loss 0). With
        label_smooth ε > 0 a position costs (1-ε)·NLL + ε·mean over the vocabulary of -log p."""
        targets = lm_labels.reshape(-1).clamp(min=0).long()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="none",
                               label_smoothing=label_smooth)                   # (B·T,)
        mask = mask.reshape(-1)
        return (loss * mask).sum() / (mask.sum() + 1e-4)

    @staticmethod
    @torch.no_grad()
    def _accuracy(logits, lm_labels, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """microsoft's two accuracies, float (B,): t1_acc[b] = 1 when the prediction is right at
        row b's first position with mask 1; all_acc[b] = 1 when it is right at every one."""
        counted = mask >= 1                                                    # (B, T)
        hit = (logits.argmax(dim=-1) == lm_labels) & counted                   # (B, T)
        first = counted.int().argmax(dim=1, keepdim=True)                      # (B, 1): first True
        t1_acc = hit.gather(1, first).squeeze(1)
        all_acc = (hit | ~counted).all(dim=1)
        return t1_acc.float(), all_acc.float()

    # ---- checkpoint formats (section 11)

    def load_weight(self, state_dict: Union[Mapping[str, torch.Tensor], _Path]) -> "GPT2LMModel":
        """Load GPT-2 and/or LoRA weights (Hugging Face, microsoft/LoRA or ours) from a state dict
        or a file; base and LoRA weights must each be all present or all absent."""
        return _load_weight(self, _state_dict_of(state_dict))

    @classmethod
    def from_pretrained(cls, source: _Path, **config_overrides) -> "GPT2LMModel":
        """A model from a Hugging Face folder, a weights file or a hub name; `config_overrides` set
        the LoRA rank and the rest: from_pretrained("gpt2", lora_attn_dim=4, lora_attn_alpha=32)."""
        return _from_pretrained(cls, source, config_overrides)

    def save_pretrained(self, folder: _Path) -> None:  # a Hugging Face folder, ΔW merged
        save_pretrained(self, folder)

    def save_adapter(self, folder: _Path, base_model_name_or_path: Optional[str] = None) -> None:
        save_adapter(self, folder, base_model_name_or_path)  # a PEFT LoRA folder

    def load_adapter(self, folder: _Path) -> "GPT2LMModel":  # reads save_adapter's folder
        return load_adapter(self, folder)

    # ---- generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append `max_new_tokens` tokens to `input_ids` (B, T): the most likely (temperature 0), or
        drawn from softmax(logits / temperature) among the `top_k` most likely. With the cache, a
        step feeds the newest token; past n_ctx the model re-reads the last n_ctx tokens."""
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (_is_real(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        if not _is_tensor(input_ids, 2):
            raise ValueError("input_ids must be a tensor of shape (batch, time); for one prompt, "
                             "ids[None]")
        idx, past, n_ctx = input_ids, None, self.config.n_ctx
        bad = torch.zeros((), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and past is not None and past[0].shape[-2] < n_ctx:
                hidden, past = self.transformer(idx[:, -1:], past=past)        # one new token
            else:
                # (re)read the context
                hidden, past = self.transformer(idx[:, -n_ctx:], use_cache=use_cache)
            logits = self.lm_head(hidden[:, -1, :]).float()                    # (B, V): last only
            bad = bad | ~logits.isfinite().all()  # raised after the loop: no sync per token
            logits = logits.nan_to_num()  # so that sampling runs on until then
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                # ≤ 0 before dividing, and a divisor float32 can hold: no inf - inf, no 0 / 0
                divisor = max(temperature, torch.finfo(logits.dtype).tiny)
                logits = (logits - logits.amax(-1, keepdim=True)) / divisor
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)                                 # (B, T + 1)
        if bad:  # not token 0, as argmax would pick
            raise ValueError("the model produced NaN or infinite logits (bad weights, an overflow)")
        return idx


# ---- 9. Presets: the four published GPT-2 sizes ----
PRESETS: Dict[str, Dict[str, int]] = {
    "gpt2.sm": dict(n_embd=768, n_layer=12, n_head=12),    # 124M, "gpt2"
    "gpt2.md": dict(n_embd=1024, n_layer=24, n_head=16),   # 355M, "gpt2-medium"
    "gpt2.lg": dict(n_embd=1280, n_layer=36, n_head=20),   # 774M, "gpt2-large"
    "gpt2.xl": dict(n_embd=1600, n_layer=48, n_head=25),   # 1558M, "gpt2-xl"
}

# Hugging Face hub names of the same sizes.
HUB_MODELS: Dict[str, str] = {n: f"openai-community/{n}"
                              for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


# ---- 10. Helpers: what to train, what to save, merging ----
_BIAS_MODES = ("none", "all", "lora_only")


def _named_lora_layers(model: nn.Module, adapted_only: bool = True) -> Dict[str, LoRALayer]:
    """{name: layer} of the LoRA layers; only those with r > 0 if `adapted_only`."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALayer) and (m.has_lora or not adapted_only)}


def _lora_layers(model: nn.Module) -> List[LoRALayer]:
    return list(_named_lora_layers(model, adapted_only=False).values())


def _is_lora_name(model: nn.Module, name: str, bias: str) -> bool:
    """Whether a name is LoRA's: lora_A, lora_B, and biases per `bias`: 'none', 'all' or
    'lora_only' (of adapted layers)."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    if "lora_" in name or (bias == "all" and name.endswith("bias")):
        return True
    return bias == "lora_only" and name.removesuffix(".bias") in _named_lora_layers(model)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Make lora_A / lora_B (and biases, as `bias` says) trainable and freeze everything else."""
    for name, p in model.named_parameters():
        p.requires_grad = _is_lora_name(model, name, bias)


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The LoRA tensors of `model.state_dict()` (plus biases, as `bias` says): kilobytes to
    megabytes instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_name(model, k, bias)}


def lora_parameter_count(config: GPT2Config) -> int:
    """Trainable LoRA parameters: n_layer × 2 (Q, V) × 2C × r: A is (r, C), B (C, r)."""
    return config.n_layer * 2 * 2 * config.n_embd * config.lora_attn_dim


def merge_lora(model: nn.Module) -> None:
    """Fold scaling·ΔW into every LoRA layer's weight (idempotent)."""
    for m in _lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take scaling·ΔW back out of every LoRA layer's weight (idempotent)."""
    for m in _lora_layers(model):
        m.unmerge()


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict with ΔW folded in and no LoRA tensors, for a rank-0 model of the same sizes;
    the model is left as it was."""
    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for name, m in _named_lora_layers(model).items():
            key = f"{name}.weight" if name else "weight"
            sd[key] = sd[key] + m.delta_weight()  # state_dict holds W0 either way
    return sd


def _frozen_hash(sd: Mapping[str, torch.Tensor], skip) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        if not k.startswith("transformer.") or "lora_" in k or k in skip:
            continue
        v = sd[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}:{tuple(v.shape)};".encode() + v.numpy().tobytes())
    return h.hexdigest()


def _probes(w: torch.Tensor) -> List[float]:
    """‖W‖ and 8 projections uᵀWv in float64, u and v fixed cosines (not an RNG's draws)."""
    f = torch.tensor([2.0, 3, 5, 7, 11, 13, 17, 19], dtype=torch.float64).sqrt()
    U, V = (torch.cos(torch.arange(1, n + 1, dtype=torch.float64)[:, None] * f * c) * math.sqrt(2)
            for n, c in zip(w.shape, (1, math.pi)))                           # (rows, 8), (cols, 8)
    w = w.detach().to("cpu", torch.float64)
    return [w.norm().item()] + (U.t() @ w @ V).diagonal().tolist()


def base_fingerprint(model: nn.Module, bias: str = "none") -> str:
    """The record of the base an adapter keeps (JSON): the dtype, a SHA-256 of the trunk but LoRA,
    the biases `bias` names and the W0 of LoRA layers (rank 0 too), and each such W0's _probes."""
    sd = model.state_dict()
    adapted = {f"{n}.weight" for n in _named_lora_layers(model, adapted_only=False)}
    skip = adapted | {k for k in sd if _is_lora_name(model, k, bias)}
    probes = {k: _probes(sd[k]) for k in sorted(adapted)}
    dtype = str(model.transformer.wte.weight.dtype)[6:]
    return json.dumps(dict(dtype=dtype, frozen=_frozen_hash(sd, skip), adapted=probes))


# W0 within tol·‖W0‖: k merge/unmerge cycles move W (and a probe) by about u·sqrt(2k)·‖W0 + ΔW‖
# (u = 2^-24 in float32, 2^-8 in bfloat16). 1e-4 allows float32 ~10^5 cycles at ‖ΔW‖ = ‖W0‖ and
# refuses merged exports from ‖ΔW‖ ≈ 1e-3·‖W0‖ up; 16 bits get 2^-5.


def base_difference(model: nn.Module, record: str, bias: str = "none") -> Optional[str]:
    """None if `model` is the base `record` describes (base_fingerprint's, or an older SHA-256 of
    the frozen parts), else what differs."""
    sd = model.state_dict()
    if re.fullmatch("[0-9a-f]{64}", str(record)):
        adapted = {f"{n}.weight" for n in _named_lora_layers(model)}
        return None if _frozen_hash(sd, adapted) == record else "another base (its weights differ)"
    try:
        rec, mine = json.loads(record), json.loads(base_fingerprint(model, bias))
        tol = 2 ** -5 if rec["dtype"] in ("float16", "bfloat16") else 1e-4
        differs = rec["frozen"] != mine["frozen"] or set(rec["adapted"]) != set(mine["adapted"])
        far = [k for k, p in rec["adapted"].items() if not differs and any(  # NaN is far too
            not abs(a - b) <= tol * p[0] for a, b in zip(p, mine["adapted"][k], strict=True))]
    except (ValueError, TypeError, LookupError, AttributeError):
        return "an unreadable base record"
    if (differs or far) and rec["dtype"] != mine["dtype"]:
        dtype = rec["dtype"]
        return (f"another precision ({mine['dtype']}, not {dtype}): load the base in {dtype}, as "
                f"saved (a copy cast to {mine['dtype']} and back has lost bits)")
    if far:
        return f"another base: {far[0]} is not the W0 recorded, beyond rounding (a merged export?)"
    return "another base (its weights differ)" if differs else None


# ---- 11. Checkpoint formats: Hugging Face, microsoft/LoRA and PEFT, in and out ----
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of HF / microsoft
_HEAD_KEYS = ("lm_head.weight", "lm_head.decoder.weight")  # tied to wte


def _safetensors():
    try:  # imported here only: safetensors stays optional
        import safetensors.torch
    except ImportError:
        raise ValueError("Hugging Face and PEFT files need: pip install safetensors") from None
    return safetensors


def _read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    safe_open = _safetensors().safe_open
    try:
        open(path, "rb").close()  # safetensors calls an unreadable file missing
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"cannot read {path} as a safetensors file "
                         f"({type(e).__name__}: {e})") from None


def _read_weights(path: _Path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no weights file at {path!r}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)[0]
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as e:  # pickle errors, truncated files, non-torch files
        reason = str(e).split("\n")[0]
        if "Weights only" in reason:
            reason = "it holds more than tensors and plain data"
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint "
                         f"({type(e).__name__}: {reason})") from None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        raise ValueError(f"cannot read {path} as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _state_dict_of(source) -> Dict[str, torch.Tensor]:
    """A state dict (or the file holding one) keyed relative to GPT2Model, "h.0.attn.c_attn.weight",
    whatever wrapper or prefix it had; a head not tied to wte is refused: this model has none."""
    sd = _read_weights(source) if isinstance(source, (str, os.PathLike)) else source
    if isinstance(sd, Mapping) and "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got "
                         f"{type(sd).__name__}")
    out, head = {}, None
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} -> {type(value).__name__}: not a state "
                             f"dict (names -> tensors)")
        k = key.removeprefix("module.").removeprefix("_orig_mod.")  # DDP, torch.compile
        if not value.is_floating_point() and not k.endswith(_IGNORED_SUFFIXES):
            raise ValueError(f"checkpoint tensor {key!r} is {value.dtype}: weights are floats")
        if k in _HEAD_KEYS:
            head = value
        elif not k.endswith(_IGNORED_SUFFIXES):
            k = k.removeprefix("transformer.")
            # Old OpenAI-style names, as microsoft/LoRA's loader also accepts.
            if k.endswith((".g", ".w", ".b")):
                k = k[:-2] + (".bias" if k.endswith(".b") else ".weight")
            out[k] = value
    wte = out.get("wte.weight")
    if head is not None and wte is not None and head.shape == wte.shape and not torch.equal(
            head.nan_to_num(), wte.nan_to_num()):
        raise ValueError("the checkpoint's lm_head differs from its token embedding (an untied "
                         "head, tie_word_embeddings=false): GPT-2 ties them, this model too")
    return out


def _load_weight(model: GPT2LMModel, sd: Dict[str, torch.Tensor]) -> GPT2LMModel:
    """Copy in a state dict _state_dict_of gave, after checking that it fits the model."""
    own = model.transformer.state_dict()
    if not sd:
        raise ValueError("the checkpoint holds no GPT-2 or LoRA weights")
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        hint = " (LoRA weights: build the model with lora_attn_dim = r > 0)" \
            if "lora_" in unexpected[0] else ""
        raise ValueError(f"checkpoint keys this model does not have: {_short(unexpected)}{hint}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model "
                             f"expects {tuple(own[k].shape)}; the config does not fit it")
    for kind, is_lora in (("base", False), ("LoRA", True)):
        keys = [k for k in own if ("lora_" in k) == is_lora]
        present = [k for k in keys if k in sd]
        adapter_biases = not is_lora and all(k.endswith(".bias") for k in present)
        if present and len(present) != len(keys) and not adapter_biases:
            missing = [k for k in keys if k not in sd]
            raise ValueError(f"checkpoint holds some {kind} weights but not all; missing: "
                             f"{_short(missing)}")
    model.transformer.load_state_dict(sd, strict=False)
    return model


def _from_pretrained(cls, source, config_overrides: Mapping) -> GPT2LMModel:
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"from_pretrained needs a folder, a file or a hub name, got {source!r}")
    name = path = os.fspath(source)
    if not os.path.exists(path) and path in HUB_MODELS:
        path = _download_from_hub(HUB_MODELS[path])
    values = None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            values = _config_from_hf_json(_read_json(os.path.join(path, "config.json")), path)
        files = [f for f in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(path, f))]
        if not files and any(f.endswith(".index.json") for f in os.listdir(path)):
            raise ValueError(f"{path}: sharded checkpoints are not read; save it as one file")
        path = os.path.join(path, (files + ["model.safetensors"])[0])
    elif not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path!r}: give a folder, a weights file, or one of "
                         f"{', '.join(HUB_MODELS)}")
    sd = _state_dict_of(path)
    if "wte.weight" not in sd or sd["wte.weight"].dim() != 2:
        raise ValueError(f"{path} holds no GPT-2 base weights (no 2-D wte.weight); for LoRA-only "
                         f"weights, load a base model first, then model.load_weight(path)")
    # With a config.json, n_head comes from it, not from the shapes
    shapes = _config_from_shapes(sd, config_overrides if values is None else {"n_head": None})
    values = dict(shapes) if values is None else values
    if "h.0.attn.c_attn.lora_A" in sd:
        values["lora_attn_dim"] = sd["h.0.attn.c_attn.lora_A"].shape[0] // 2  # A is (r·2, C)
        if "lora_attn_alpha" not in config_overrides:  # a guessed α would silently rescale ΔW
            raise ValueError(f"{path} holds LoRA weights, whose scaling α/r depends on α: pass "
                             f"lora_attn_alpha=... (the α they were trained with)")
    config = GPT2Config.from_dict({**values, **config_overrides})
    for key, value in shapes.items():  # before building the model
        if key not in ("n_ctx", "n_head") and getattr(config, key) != value:
            raise ValueError(f"{key} = {getattr(config, key)} does not fit the weights in {path}, "
                             f"which have {value}")
    model = _load_weight(cls(config), sd)
    model.name_or_path = name  # where the base came from, recorded in exported adapters
    return model


def _config_from_hf_json(cfg: dict, where: str) -> dict:
    """The GPT2Config fields of a Hugging Face GPT-2 config.json; refuses other variants."""
    unsupported = {"model_type": cfg.get("model_type", "gpt2") != "gpt2",
                   "activation_function": cfg.get("activation_function", "gelu_new") not in
                   ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),  # GPT-2's tanh GELU
                   "scale_attn_by_inverse_layer_idx": cfg.get("scale_attn_by_inverse_layer_idx"),
                   "reorder_and_upcast_attn": cfg.get("reorder_and_upcast_attn"),
                   "scale_attn_weights": cfg.get("scale_attn_weights", True) is False}
    for key, bad in unsupported.items():
        if bad:
            raise ValueError(f"{where}: {key} = {cfg[key]!r} is not supported by this GPT-2")
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
            "initializer_range")
    values = {k: cfg[k] for k in keys if k in cfg}
    GPT2Config.from_dict({**values, "n_ctx": 1})  # a ValueError naming a bad field, first
    if cfg.get("n_inner") not in (None, 4 * values.get("n_embd", 768)):
        raise ValueError(f"{where}: n_inner = {cfg['n_inner']} is not 4·n_embd, which this GPT-2 "
                         f"assumes")
    n_ctx = cfg.get("n_ctx", values.get("n_positions", 1024))
    values["n_ctx"] = min(n_ctx, values.get("n_positions", 1024)) if _is_int(n_ctx) else n_ctx
    return values


def _config_from_shapes(sd: Mapping[str, torch.Tensor], overrides: Mapping) -> dict:
    V, C = sd["wte.weight"].shape
    wpe = sd.get("wpe.weight")
    n_pos = wpe.shape[0] if wpe is not None and wpe.dim() == 2 else 1024
    layers = {int(k.split(".")[1]) for k in sd if re.match(r"h\.\d+\.", k)}
    values = dict(vocab_size=V, n_embd=C, n_positions=n_pos, n_ctx=n_pos,
                  n_layer=max(layers, default=-1) + 1)
    heads = [p["n_head"] for p in PRESETS.values() if p["n_embd"] == C]
    if not heads and "n_head" not in overrides:
        raise ValueError(f"cannot tell n_head from the weights (n_embd = {C} is no GPT-2 size): "
                         f"give their folder with a config.json, or pass n_head=...")
    return {**values, "n_head": heads[0]} if heads else values


def _download_from_hub(repo_id: str) -> str:
    try:  # returns the local folder of the weights and config.json
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f"downloading {repo_id} needs: pip install huggingface_hub "
                         f"safetensors") from None
    try:
        hf_hub_download(repo_id, "model.safetensors")
        return os.path.dirname(hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # no network, no access, an unknown revision: one clear message
        raise ValueError(f"could not download {repo_id} from the Hugging Face hub "
                         f"({type(e).__name__}: {e}); check the network, or pass a local "
                         f"folder") from None


def _write_folder(folder, weights_name: str, tensors: dict, metadata: dict, config_name: str,
                  config: dict):
    """Write so that an interruption never leaves a folder that loads wrong: both files to
    temporary names, the old config out, then the weights, the config last."""
    save_file, folder = _safetensors().torch.save_file, _path(folder, "the folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} exists and is a file, not a folder; choose another path")
    other = ("adapter_" if config_name == "config.json" else "") + "config.json"
    if os.path.isfile(os.path.join(folder, other)):  # transformers would load them as one
        raise ValueError(f"{folder} holds another export's {other}; choose another folder")
    os.makedirs(folder, exist_ok=True)
    names = (weights_name, config_name)
    for name in os.listdir(folder):  # what a killed export left
        if re.fullmatch(rf"\.({'|'.join(map(re.escape, names))})\.\d+\.tmp", name):
            os.remove(os.path.join(folder, name))
    temps = [os.path.join(folder, f".{name}.{os.getpid()}.tmp") for name in names]
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in tensors.items()}
    try:
        save_file(tensors, temps[0], metadata)
        with open(temps[1], "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # safetensors writes 0600: give the mode a new file gets
        os.chmod(temps[0], os.stat(temps[1]).st_mode)
        if os.path.exists(os.path.join(folder, config_name)):
            os.remove(os.path.join(folder, config_name))
        for name, temp in zip(names, temps):
            os.replace(temp, os.path.join(folder, name))
    except Exception as e:  # a full disk, safetensors' errors
        raise OSError(f"cannot write {folder}: {e}") from None
    finally:
        for temp in filter(os.path.exists, temps):
            os.remove(temp)


def save_pretrained(model: GPT2LMModel, folder) -> None:
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors), ΔW merged in, the tied
    head stored once (as wte): transformers and from_pretrained give this model's logits from it.
    The model is left as it was."""
    cfg, p = model.config, model.config.fix_dropout
    tensors = {k: v for k, v in merged_state_dict(model).items() if k.startswith("transformer.")}
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if in the vocabulary
    sizes = {k: v for k, v in cfg.to_dict().items() if not k.startswith(("lora_", "fix_"))}
    hf_config = dict(
        sizes, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_inner=None,
        activation_function="gelu_new", resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        torch_dtype=str(model.transformer.wte.weight.dtype).replace("torch.", ""))
    _write_folder(folder, "model.safetensors", tensors, {"format": "pt"}, "config.json", hf_config)


_PEFT_KEY = "base_model.model.transformer.h.{}.attn.c_attn.lora_{}.weight"


def _peft_biases(model: GPT2LMModel, bias: str) -> Dict[str, str]:  # {our key: PEFT's}
    keys = [k for k in model.state_dict() if _is_lora_name(model, k, bias) and "lora_" not in k]
    return {k: "base_model.model." + k.replace("c_attn.bias", "c_attn.base_layer.bias")
            for k in keys}


def _trained_bias_mode(model: GPT2LMModel) -> str:
    if not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n):
        raise ValueError("no LoRA weight requires grad, so trained biases cannot be told: "
                         "mark_only_lora_as_trainable(model, bias=...) first")
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    for bias in _BIAS_MODES:
        if trained == list(_peft_biases(model, bias)):
            return bias
    raise ValueError(f"{_short(trained)} require grad: if trained, save_pretrained writes the "
                     f"whole model; if not, mark_only_lora_as_trainable(model) first")


def save_adapter(model: GPT2LMModel, folder, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the LoRA weights as a PEFT adapter folder, which peft and load_adapter read back to
    this model's logits. PEFT has one LoRA on the fused c_attn; ours on Q and V are the same ΔW
    with A' = [A_q; A_v] (2r × C), B' = [[B_q, 0], [0, 0], [0, B_v]] (3C × 2r) and α' = 2α, so
    α'/r' = α/r. Trained biases go too; other trainable weights are refused. The base record goes
    in the safetensors metadata (PEFT warns of unknown config keys)."""
    cfg = model.config
    r, C = cfg.lora_attn_dim, cfg.n_embd
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    if r == 0:
        raise ValueError("the model has no LoRA adapters (lora_attn_dim = 0); save_pretrained "
                         "saves it whole")
    bias, sd = _trained_bias_mode(model), model.state_dict()
    tensors = {peft: sd[k] for k, peft in _peft_biases(model, bias).items()}
    for i, block in enumerate(model.transformer.h):
        A, B = block.attn.c_attn.lora_A.detach(), block.attn.c_attn.lora_B.detach()  # (2r, C)
        B2 = B.new_zeros(3 * C, 2 * r)                         # (3C, 2r) from (2C, r), K rows 0
        B2[:C, :r], B2[2 * C:, r:] = B[:C], B[C:]              # B_q on A_q, B_v on A_v
        tensors[_PEFT_KEY.format(i, "A")], tensors[_PEFT_KEY.format(i, "B")] = A, B2
    adapter_config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=2 * r, lora_alpha=2 * cfg.lora_attn_alpha,
        target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=cfg.lora_dropout, bias=bias,
        use_rslora=False, use_dora=False,
        base_model_name_or_path=base and _path(base, "base_model_name_or_path"))
    metadata = {"format": "pt", "base_fingerprint": base_fingerprint(model, bias)}
    _write_folder(folder, "adapter_model.safetensors", tensors, metadata, "adapter_config.json",
                  adapter_config)


# adapter_config.json fields that may hold anything (r and α are checked apart); any other
# (use_dora, a newer field...) must be null, false or empty.
_PEFT_FREE_FIELDS = ("r", "lora_alpha", "task_type", "auto_mapping", "peft_version",
                     "base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
                     "fan_in_fan_out", "megatron_core", "runtime_config", "qalora_group_size")


def load_adapter(model: GPT2LMModel, folder) -> GPT2LMModel:
    """Set the LoRA weights (and biases) from a PEFT adapter folder as save_adapter writes it
    (lora_attn_dim = r'/2, α/r = α'/r'). A ValueError refuses, changing nothing, what this model
    cannot hold (K rows in B', B' not block-diagonal, a field not neutral) or another base."""
    folder = _path(folder, "the adapter folder")
    cfg_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    ac = _read_json(cfg_path)
    sd, metadata = _read_safetensors(weights_path)
    cfg, r2, alpha2, bias = model.config, ac.get("r"), ac.get("lora_alpha"), ac.get("bias", "none")
    r, C, alpha = cfg.lora_attn_dim, cfg.n_embd, cfg.lora_attn_alpha
    modeled = dict(peft_type=ac.get("peft_type") != "LORA", bias=bias not in _BIAS_MODES,
                   target_modules=ac.get("target_modules") not in ("c_attn", ["c_attn"]),
                   init_lora_weights=ac.get("init_lora_weights", True)
                   not in (True, False, "gaussian"))
    for key in {**modeled, **ac}:  # modeled ones, even absent
        neutral = key in _PEFT_FREE_FIELDS or ac.get(key) in (None, False, {}, [], "")
        if modeled.get(key, not neutral):
            raise ValueError(f"{cfg_path}: {key} = {ac.get(key)!r} is not supported: this model "
                             f"holds plain LoRA on c_attn (Q, V), one r and α")
    if not (r > 0 and r2 == 2 * r and _is_real(alpha2) and math.isclose(alpha2 / r2, alpha / r)):
        raise ValueError(f"{cfg_path}: r' = {r2!r}, α' = {alpha2!r} fit a model built with "
                         f"lora_attn_dim = r'/2 (r' even) and lora_attn_alpha = α'/2; this one has "
                         f"{r} and {alpha}")
    biases = _peft_biases(model, bias)
    expected = {_PEFT_KEY.format(i, ab) for i in range(cfg.n_layer) for ab in "AB"}
    expected |= set(biases.values())
    if set(sd) != expected:
        raise ValueError(f"{weights_path}: weights this model cannot hold: "
                         f"{_short(sorted(set(sd) - expected))}; missing: "
                         f"{_short(sorted(expected - set(sd)))}")
    new = {k.removeprefix("transformer."): sd[peft] for k, peft in biases.items()}
    for i in range(cfg.n_layer):
        A2, B2 = sd[_PEFT_KEY.format(i, "A")], sd[_PEFT_KEY.format(i, "B")]   # (2r, C), (3C, 2r)
        if A2.shape != (2 * r, C) or B2.shape != (3 * C, 2 * r):
            raise ValueError(f"layer {i}: A' {tuple(A2.shape)}, B' {tuple(B2.shape)} do not fit "
                             f"this model's size")
        if B2[C:2 * C].any():
            raise ValueError(f"layer {i}: B' has non-zero K rows; this model keeps W_k frozen")
        if B2[:C, r:].any() or B2[2 * C:, :r].any():
            raise ValueError(f"layer {i}: B' is not block-diagonal; here Q and V have separate A's")
        new[f"h.{i}.attn.c_attn.lora_A"] = A2                                # [A_q; A_v] (2r, C)
        # [B_q; B_v] (2C, r)
        new[f"h.{i}.attn.c_attn.lora_B"] = torch.cat((B2[:C, :r], B2[2 * C:, r:]))
    record = metadata.get("base_fingerprint")
    why = record and base_difference(model, record, bias)
    if why:
        raise ValueError(f"{folder} does not go onto this model: {why}; load it onto its own base")
    return _load_weight(model, new)  # copies in place, and keeps a merged model merged


def _path(value, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{what} must be a path, got {value!r}")
    return os.fspath(value)


def _short(keys: List[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
