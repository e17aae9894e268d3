"""GPT-2 with LoRA (Low-Rank Adaptation), in one file.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained
weight matrix W0 frozen and learns a low-rank update next to it:

    h = W0 x + ΔW x,    ΔW = B A,    B ∈ R^{d_out × r},  A ∈ R^{r × d_in},  r ≪ min(d_in, d_out)

scaled by α/r, so that changing r does not force a new learning rate. A starts random and B at
zero: before training ΔW = 0. Once trained, ΔW can be added into W0 ("merged"), at no extra cost.

This module follows microsoft/LoRA: its `loralib` layers (`Linear`, `MergedLinear`, with the same
parameter names and shapes) and its `examples/NLG` GPT-2 (the same state-dict keys and forward
arguments), so that checkpoints and scripts move freely between the two. Its numbered sections
read top to bottom like the paper:

     1  the config                        7  the head, tied to the token embedding
     2  the LoRA layers (start here)      8  GPT2LMModel: forward, accuracy, generation
     3  Conv1D, GPT-2's linear layer      9  microsoft's loss, over chunks of positions
     4  attention, LoRA on Q and V       10  presets
     5  MLP and block                    11  loralib's helpers: what to train, merging
     6  GPT2Model, the trunk             12  microsoft's load_weight

and end with the argument checks (13), kept apart so that the model reads as math. File formats
(Hugging Face folders, PEFT adapters, the hub) live in checkpoint_formats.py.

Shapes in comments use B (batch), T (time), C (n_embd), nh (heads), hs (head size), V (vocab),
r (LoRA rank), m (number of LoRA-enabled groups in a MergedLinear).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import InitVar, asdict, dataclass, fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
    lora_attn_dim       the LoRA rank r on Q and V; 0 means no adapters, plain GPT-2. The paper
                        adapts W_q and W_v (section 7.1) and finds r as small as 1 to 4 enough
                        (section 7.2); microsoft's GPT-2 E2E runs use r = 4.
    lora_attn_alpha     α; the update ΔW = BA is scaled by α / r (section 4.1), so that a new r
                        needs no new learning rate. microsoft's E2E runs use α = 32.
    lora_dropout        dropout on the adapter's input x, before A (as in loralib); 0.1 in the
                        paper's GPT-2 runs (appendix D, Table 11).

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
    # microsoft's name for vocab_size, accepted as an alias (not a field, not saved).
    vocab_size_or_config_json_file: InitVar[Optional[int]] = None

    def __post_init__(self, vocab_size_or_config_json_file):
        if vocab_size_or_config_json_file is not None:
            _set_vocab_size_alias(self, vocab_size_or_config_json_file)
        # Checked once, as a config never changes: sizes are positive integers, n_embd a multiple
        # of n_head, n_ctx ≤ n_positions, ε > 0, every dropout in [0, 1), α > 0 when r > 0.
        _check_config(self)

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
        # Sizes are positive integers, enable_lora one flag per equal slice of the output.
        _check_layer_arguments(in_features, out_features, enable_lora)
        # r ≥ 0; α > 0 with α/r in a range AdamW can train; dropouts in [0, 1).
        _check_lora(r, lora_alpha, lora_dropout, lora_r_dropout)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        # ΔW is scaled by α/r (section 4.1 of the paper): with Adam, a new r needs no new
        # learning rate, so α is set once and r varied.
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.fan_in_fan_out = fan_in_fan_out
        self.merge_weights = merge_weights
        self.merged = False
        # The output is k groups of d rows each; the m groups flagged in enable_lora are adapted.
        self.enable_lora = [bool(flag) for flag in enable_lora]
        self.group_size = out_features // len(enable_lora)                      # d
        self.lora_groups = [g for g, on in enumerate(self.enable_lora) if on]   # m plain ints
        self.has_lora = r > 0 and len(self.lora_groups) > 0
        d = self.group_size
        m = len(self.lora_groups)
        factory = dict(device=device, dtype=dtype)
        # With an adapter, W0 is frozen: only A and B (and whatever the caller marks) train.
        if fan_in_fan_out:
            weight_shape = (in_features, out_features)
        else:
            weight_shape = (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory),
                                   requires_grad=not self.has_lora)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.has_lora:
            self.lora_A = nn.Parameter(torch.empty(r * m, in_features, **factory))   # (r·m, in)
            self.lora_B = nn.Parameter(torch.empty(d * m, r, **factory))             # (d·m, r)
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
        r = self.r
        d = self.group_size
        delta = self.lora_A.new_zeros((self.out_features, self.in_features))  # (out, in)
        for j, g in enumerate(self.lora_groups):
            B_g = self.lora_B[j * d:(j + 1) * d]                              # (d, r)
            A_g = self.lora_A[j * r:(j + 1) * r]                              # (r, in)
            delta[g * d:(g + 1) * d] = B_g @ A_g                              # (d, in)
        return self._T(delta) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._T(self.weight), self.bias)                  # (..., out)
        if not self.has_lora:
            return result
        if self.merged:
            _check_merged_forward(self)  # a merged layer would train W, never A and B
            return result
        r = self.r
        d = self.group_size
        # x Aᵀ once for all groups, scaled on the thin side: r·m numbers per token, not out.
        h = self.lora_dropout(x) @ self.lora_A.t()                             # (..., r·m)
        h = self.lora_r_dropout(h) * self.scaling
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
    """k projections side by side in one layer, each enabled group g with its own rank-r update
    scaling · B_g A_g. GPT-2's c_attn computes Q, K and V at once (k = 3, d = C, in = C):

        output   [   Q    |   K    |   V    ]     enable_lora = [True, False, True], m = 2
        ΔW       [B_q A_q |   0    | B_v A_v]     (out, in) = (3C, C), never formed in forward
        lora_A   [A_q; A_v]                       (r·m, in)  = (2r, C)
        lora_B   [B_q; B_v]                       (d·m, r)   = (2C, r)

    loralib rebuilds the whole ΔW on every call (a grouped 1-D convolution of B over A, then
    zero rows scattered in for K) and multiplies x by it: an (out × in) tensor and its gradient
    each step. Here x Aᵀ is computed once for all groups, r·m numbers per token, and each group
    adds (x A_gᵀ) B_gᵀ to its own slice of the output: two thin products. The parameters, their
    names and shapes, and the outputs are loralib's."""

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
        nh = self.n_head
        hs = C // nh
        # Q, K and V in one product; LoRA adds B_q A_q x to Q and B_v A_v x to V.
        q, k, v = self.c_attn(x).split(C, dim=2)                               # (B, T, C) each
        q = q.view(B, T, nh, hs).transpose(1, 2)                               # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)                               # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)                               # (B, nh, T, hs)
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
    the hidden states (B, T, C) and one cache per layer (None when use_cache is False).

    Its arguments are microsoft's: `position_ids` (B, T) or (T,) replace the default positions
    past_length, past_length + 1, ...; `token_type_ids` (B, T) are embedded with wte too and added,
    as microsoft's GPT-2 does. With `checkpoint_activations = True`, training keeps only each
    block's input and recomputes the block in backward: the same results, less memory, about one
    more forward pass of time."""

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
        self.checkpoint_activations = False

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                past: Optional[Sequence[torch.Tensor]] = None,
                len_past: Optional[torch.Tensor] = None, use_cache: bool = True):
        past_length = _check_model_inputs(self, input_ids, position_ids, token_type_ids, past,
                                          len_past)
        B, T = input_ids.shape
        if len_past is not None:
            # One new token per row, at the row's own position (microsoft's beam search).
            position_ids = len_past.view(B, 1)                                 # (B, 1)
        elif position_ids is None:
            position_ids = torch.arange(past_length, past_length + T,
                                        device=input_ids.device)               # (T,)
        x = self.wte(input_ids) + self.wpe(position_ids)                       # (B, T, C)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)                                   # (B, T, C)
        x = self.drop(x)
        # Recomputing a block in backward only pays when there is a backward pass.
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        presents = []
        for i, block in enumerate(self.h):
            layer_past = None if past is None else past[i]
            if recompute:
                # Dropout draws the same masks again: torch saves and restores the RNG state.
                x, present = checkpoint(block, x, layer_past, len_past, use_cache,
                                        use_reentrant=False)
            else:
                x, present = block(x, layer_past, len_past, use_cache)
            presents.append(present)
        return self.ln_f(x), presents                                          # (B, T, C)


# ---- 7. The language-model head, tied to the token embedding ----
class GPT2LMHead(nn.Module):
    """logits = h wteᵀ. `decoder.weight` is the very Parameter `wte.weight` (one storage, one
    gradient): the tying of the GPT-2 paper, no parameters of its own."""

    def __init__(self, wte_weight: nn.Parameter):
        super().__init__()
        V, C = wte_weight.shape
        self.decoder = nn.Linear(C, V, bias=False, device="meta")  # allocate nothing ...
        self.set_embeddings_weights(wte_weight)                    # ... then share wte's

    def set_embeddings_weights(self, wte_weight: nn.Parameter) -> None:
        self.decoder.weight = wte_weight

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.decoder(hidden_state)                                      # (B, T, V)


# ---- 8. GPT2LMModel: the full model, its loss, accuracy and generation ----
class GPT2LMModel(nn.Module):
    """GPT-2 language model with optional LoRA adapters on Q and V (rank config.lora_attn_dim).

    forward takes microsoft's arguments in its order and returns (logits (B, T, V), caches)
    without labels, for decoding with `past` / `len_past`; with labels (logits, loss), or (logits,
    loss, t1_acc, all_acc) with is_report_accuracy. As in microsoft/LoRA, lm_labels[b, t] is the
    target of position t (the inputs shifted left by one); a negative label (-1, -100) is none.
    lm_mask[b, t] weighs position t in the loss (0 drops it; fractions weigh it less).

    With return_logits=False (labels needed) the model never holds the (B, T, V) logits: the
    head and the loss run over chunks of positions, and forward returns (None, loss). The loss
    and its gradients are the same; the memory of the logits, often most of a LoRA step's, is not
    spent (docs/performance-memory.md)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = GPT2LMHead(self.transformer.wte.weight)
        self.apply(self._init_weights)
        # load_state_dict(..., assign=True) puts new tensors in the places of wte and the head:
        # tie them again after every load, as set_tied() does.
        self.register_load_state_dict_post_hook(_tie_after_load)

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

    def set_tied(self) -> None:
        """Make the head share the token embedding again (microsoft's name)."""
        self.lm_head.set_embeddings_weights(self.transformer.wte.weight)

    def forward(self, input_ids: torch.Tensor, lm_labels: Optional[torch.Tensor] = None,
                lm_mask: Optional[torch.Tensor] = None, past=None,
                len_past: Optional[torch.Tensor] = None, label_smooth: float = 0.0,
                is_report_accuracy: bool = False, return_logits: bool = True):
        # The cache is for decoding: a call with labels (training) keeps none.
        hidden, presents = self.transformer(input_ids, past=past, len_past=len_past,
                                            use_cache=lm_labels is None)      # (B, T, C)
        if lm_labels is None:
            return self.lm_head(hidden), presents                              # (B, T, V)
        _check_loss_inputs(self.config, input_ids, lm_labels, lm_mask, label_smooth,
                           return_logits)
        mask_dtype = torch.promote_types(hidden.dtype, torch.float32)
        mask = (lm_labels >= 0).to(mask_dtype)                                 # (B, T)
        if lm_mask is not None:
            mask = mask * lm_mask.to(mask_dtype)
        if return_logits:
            logits = self.lm_head(hidden)                                      # (B, T, V)
            loss, predicted = lm_loss(logits, lm_labels, mask, label_smooth,
                                      predict=is_report_accuracy)
        else:
            logits = None
            head = self.lm_head.decoder.weight                                 # (V, C)
            loss, predicted = lm_loss_from_hidden(hidden, head, lm_labels, mask, label_smooth,
                                                  predict=is_report_accuracy)
        if not is_report_accuracy:
            return logits, loss
        return (logits, loss) + _accuracy(predicted, lm_labels, mask)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ... may give wte and the head new tensors each: tie them again.
        super()._apply(fn, recurse)
        self.set_tied()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Before anything is loaded: a head that is not the embedding cannot be held here.
        _check_tied_head(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- checkpoints: microsoft's load_weight here; file formats in checkpoint_formats.py

    def load_weight(self, state_dict: Union[Mapping[str, torch.Tensor], _Path]) -> "GPT2LMModel":
        """Load GPT-2 and/or LoRA weights (Hugging Face, microsoft/LoRA or ours) from a state dict
        or a file; base and LoRA weights must each be all present or all absent."""
        return _load_weight(self, _state_dict_of(state_dict))

    @classmethod
    def from_pretrained(cls, source: _Path, **config_overrides) -> "GPT2LMModel":
        """A model from a Hugging Face folder, a weights file or a hub name; `config_overrides` set
        the LoRA rank and the rest: from_pretrained("gpt2", lora_attn_dim=4, lora_attn_alpha=32)."""
        import checkpoint_formats
        return checkpoint_formats.from_pretrained(cls, source, config_overrides)

    def save_pretrained(self, folder: _Path) -> None:
        """Write a Hugging Face GPT-2 folder, ΔW merged into W0 (transformers loads it)."""
        import checkpoint_formats
        checkpoint_formats.save_pretrained(self, folder)

    def save_adapter(self, folder: _Path, base_model_name_or_path: Optional[str] = None) -> None:
        """Write the LoRA weights as a PEFT adapter folder, with the record of their base."""
        import checkpoint_formats
        checkpoint_formats.save_adapter(self, folder, base_model_name_or_path)

    def load_adapter(self, folder: _Path) -> "GPT2LMModel":
        """Set the LoRA weights from a folder save_adapter wrote, if this model is its base."""
        import checkpoint_formats
        return checkpoint_formats.load_adapter(self, folder)

    # ---- generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append `max_new_tokens` tokens to `input_ids` (B, T): the most likely (temperature 0), or
        drawn from softmax(logits / temperature) among the `top_k` most likely. With the cache, a
        step feeds the newest token; past n_ctx the model re-reads the last n_ctx tokens."""
        _check_generate_arguments(input_ids, max_new_tokens, temperature, top_k)
        idx = input_ids
        past = None
        n_ctx = self.config.n_ctx
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


# ---- 9. microsoft's loss, over chunks of positions ----
# The loss is Σ_i m_i·ℓ_i / (Σ_i m_i + 1e-4) over positions i with mask m_i, where ℓ_i is the
# cross-entropy of position i, (1-ε)·(-log p_i[y_i]) + ε·mean_v(-log p_i[v]) with label_smooth ε.
# Computing it at once holds a float32 copy of all the logits, and their float32 gradient: at 8
# windows of 1,024 tokens and GPT-2's 50,257 tokens, 1.5 GiB each. So the positions are taken a
# chunk at a time, in float32 per chunk, and the gradient of each chunk is written straight
# into the gradient of the logits (or, from the hidden states, of h and the head).

# Numbers per chunk of logits: 32 MiB in float32, 166 positions of GPT-2's vocabulary. A chunk
# holds two such tensors at a time (its logits and their log-softmax, which becomes the gradient),
# and frees them before the next chunk: 64 MiB of working memory in float32, whatever the batch
# (16-bit logits add their 16-bit copies).
LOSS_CHUNK_ELEMENTS = 2 ** 23


def lm_loss(logits, lm_labels, mask, label_smooth=0.0, predict=False,
            chunk_elements=LOSS_CHUNK_ELEMENTS):
    """microsoft's masked mean of the cross-entropy from logits (B, T, V) in any dtype, with
    weights `mask` (B, T) and no target where a label is negative. Returns (loss, the argmax of
    each position (B, T) if `predict`, else None)."""
    logits_2d = logits.flatten(0, 1)                                           # (B·T, V)
    targets = lm_labels.reshape(-1).clamp(min=0).long()                        # (B·T,)
    weights = _loss_weights(mask, lm_labels)                                   # (B·T,)
    chunk = max(1, chunk_elements // logits.shape[-1])
    loss = _CrossEntropyOverChunks.apply(logits_2d, targets, weights, label_smooth, chunk)
    predicted = logits.argmax(dim=-1) if predict else None                     # (B, T)
    return loss, predicted


def lm_loss_from_hidden(hidden, head_weight, lm_labels, mask, label_smooth=0.0, predict=False,
                        chunk_elements=LOSS_CHUNK_ELEMENTS):
    """The same loss from the hidden states (B, T, C) and the head (V, C), the logits of one
    chunk of positions at a time; none are kept. Returns (loss, argmax (B, T) or None)."""
    B, T, C = hidden.shape
    hidden_2d = hidden.reshape(B * T, C)                                       # (B·T, C)
    targets = lm_labels.reshape(-1).clamp(min=0).long()                        # (B·T,)
    weights = _loss_weights(mask, lm_labels)                                   # (B·T,)
    chunk = max(1, chunk_elements // head_weight.shape[0])
    predicted = torch.empty(B * T, dtype=torch.long, device=hidden.device) if predict else None
    loss = _HeadAndCrossEntropyOverChunks.apply(hidden_2d, head_weight, targets, weights,
                                                label_smooth, chunk, predicted)
    return loss, None if predicted is None else predicted.view(B, T)


def _loss_weights(mask: torch.Tensor, lm_labels: torch.Tensor) -> torch.Tensor:
    """m_i / (Σ m + 1e-4), with m = 0 where the label is negative: the masked mean as a weighted
    sum (no targets: loss 0)."""
    mask = _at_least_float32(mask.reshape(-1)) * (lm_labels.reshape(-1) >= 0)  # (B·T,)
    return mask / (mask.sum() + 1e-4)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """16-bit logits in float32 for the softmax; float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                label_smooth: float, with_gradient: bool):
    """Σ_i w_i·ℓ_i over one chunk of logits (n, V), and if asked its gradient w_i·dℓ_i/dlogits =
    w_i·(softmax - (1-ε)·onehot(y) - ε/V), built in place: two (n, V) tensors at most."""
    log_probs = torch.log_softmax(_at_least_float32(logits), dim=-1)           # (n, V)
    rows = torch.arange(len(targets), device=logits.device)
    losses = -log_probs[rows, targets]                                         # (n,)
    if label_smooth > 0:
        losses = (1.0 - label_smooth) * losses - label_smooth * log_probs.mean(dim=-1)
    loss = (losses * weights).sum()
    if not with_gradient:
        return loss, None
    gradient = log_probs.exp_()                                                # softmax (n, V)
    gradient[rows, targets] -= 1.0 - label_smooth
    if label_smooth > 0:
        gradient -= label_smooth / logits.shape[-1]
    gradient *= weights[:, None]
    return loss, gradient


class _CrossEntropyOverChunks(torch.autograd.Function):
    """Σ_i w_i·ℓ_i from logits (N, V). Forward and backward each hold one chunk's float32 copy;
    backward computes the softmax of each chunk again instead of keeping them all."""

    @staticmethod
    def forward(ctx, logits, targets, weights, label_smooth, chunk):
        loss = logits.new_zeros((), dtype=weights.dtype)
        for start in range(0, logits.shape[0], chunk):
            part = slice(start, start + chunk)
            loss += _chunk_loss(logits[part], targets[part], weights[part], label_smooth,
                                with_gradient=False)[0]
        ctx.save_for_backward(logits, targets, weights)
        ctx.label_smooth = label_smooth
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, weights = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)                                 # (N, V)
        for start in range(0, logits.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            gradient = _chunk_loss(logits[part], targets[part], weights[part] * grad_loss,
                                   ctx.label_smooth, with_gradient=True)[1]    # (n, V)
            grad_logits[part] = gradient
            del gradient  # freed before the next chunk makes its own
        return grad_logits, None, None, None, None


class _HeadAndCrossEntropyOverChunks(torch.autograd.Function):
    """Σ_i w_i·ℓ_i with the logits of chunk c computed as h_c Wᵀ. The gradients of h and W are
    computed in forward, chunk by chunk, and only scaled in backward: the logits are never kept,
    and no matrix product is done twice. `predicted`, if given, receives each position's argmax."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, label_smooth, chunk, predicted):
        # Inside forward autograd is off; whether a backward will come is read from the inputs.
        wants_hidden = ctx.needs_input_grad[0]
        wants_weight = ctx.needs_input_grad[1]
        with_gradient = wants_hidden or wants_weight
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None       # (N, C)
        gradient_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=gradient_dtype) if wants_weight else None
        loss = hidden.new_zeros((), dtype=weights.dtype)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = F.linear(hidden[part], weight)                            # (n, V)
            if predicted is not None:
                predicted[part] = logits.argmax(dim=-1)
            chunk_loss, gradient = _chunk_loss(logits, targets[part], weights[part],
                                               label_smooth, with_gradient)
            loss += chunk_loss
            if with_gradient:
                gradient = gradient.to(logits.dtype)                           # (n, V)
                if wants_hidden:
                    grad_hidden[part] = gradient @ weight.to(logits.dtype)     # (n, C)
                if wants_weight:
                    # W's gradient += gradientᵀ h, in place where the dtypes allow: no (V, C) copy.
                    h = hidden[part].to(logits.dtype)                          # (n, C)
                    if grad_weight.dtype == logits.dtype:
                        grad_weight.addmm_(gradient.t(), h)                    # (V, C)
                    else:  # 16-bit logits: the product in 16 bits, the sum in float32
                        grad_weight += gradient.t() @ h                        # (V, C)
            # This chunk's two (n, V) tensors go before the next chunk makes its own.
            del logits, gradient
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


@torch.no_grad()
def _accuracy(predicted, lm_labels, mask) -> Tuple[torch.Tensor, torch.Tensor]:
    """microsoft's two accuracies, float (B,): t1_acc[b] = 1 when the prediction is right at row
    b's first position with mask 1; all_acc[b] = 1 when it is right at every such position."""
    counted = mask >= 1                                                        # (B, T)
    hit = (predicted == lm_labels) & counted                                   # (B, T)
    first = counted.int().argmax(dim=1, keepdim=True)                          # (B, 1): first True
    t1_acc = hit.gather(1, first).squeeze(1)                                   # (B,)
    all_acc = (hit | ~counted).all(dim=1)                                      # (B,)
    return t1_acc.float(), all_acc.float()


# ---- 10. Presets: the four published GPT-2 sizes ----
PRESETS: Dict[str, Dict[str, int]] = {
    "gpt2.sm": dict(n_embd=768, n_layer=12, n_head=12),    # 124M, "gpt2"
    "gpt2.md": dict(n_embd=1024, n_layer=24, n_head=16),   # 355M, "gpt2-medium"
    "gpt2.lg": dict(n_embd=1280, n_layer=36, n_head=20),   # 774M, "gpt2-large"
    "gpt2.xl": dict(n_embd=1600, n_layer=48, n_head=25),   # 1558M, "gpt2-xl"
}

# Hugging Face hub names of the same sizes.
HUB_MODELS: Dict[str, str] = {n: f"openai-community/{n}"
                              for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


# ---- 11. Helpers: what to train, what to save, merging ----
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
    """Make lora_A / lora_B (and biases, as `bias` says) trainable and freeze everything else.
    A merged model is refused: its A and B would get no gradient (unmerge_lora first)."""
    _check_not_merged(model)
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


# ---- 12. microsoft's load_weight: state-dict keys of every GPT-2 checkpoint ----
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of HF / microsoft
_HEAD_KEYS = ("lm_head.weight", "lm_head.decoder.weight")  # tied to wte


def _state_dict_of(source) -> Dict[str, torch.Tensor]:
    """A state dict (or the file holding one) keyed relative to GPT2Model, "h.0.attn.c_attn.weight",
    whatever wrapper or prefix it had; a head not tied to wte is refused: this model has none."""
    if isinstance(source, (str, os.PathLike)):
        from checkpoint_formats import read_weights  # file formats live there
        source = read_weights(source)
    sd = source
    if isinstance(sd, Mapping) and "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got "
                         f"{type(sd).__name__}")
    out = {}
    head = None
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


def _tie_after_load(model: GPT2LMModel, incompatible_keys) -> None:
    """load_state_dict's last step: the head is the embedding again, whatever was assigned."""
    model.set_tied()


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


# ---- 13. Argument checks ----
# Each rule is one ValueError naming the argument, what it got and the fix. They sit here, after the
# model, so that the sections above read as the math: each class calls one named check.

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite real number, not a bool (True would pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_tensor(x, dim: int, dtypes=None) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == dim and (dtypes is None or x.dtype in dtypes)


def _describe(x) -> str:
    """What the caller passed, for a message: a tensor's shape and dtype, else its type."""
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def _short(keys: List[str], n: int = 6) -> str:
    """The first n keys of a list, and how many there are in all."""
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _check_dropout(p, what: str) -> None:
    if not _is_real(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{what} is a dropout probability and must lie in [0, 1), got {p!r}")


# A's and B's gradients grow with α/r, and AdamW squares them: beyond these bounds the square
# overflows (or underflows) float32 and bfloat16, and B would silently never move.
_SCALING_RANGE = (1e-18, 1e18)


def _check_lora(r, alpha, dropout, r_dropout, r_name="LoRA rank r", alpha_name="lora_alpha (α)"):
    """r an integer ≥ 0; when r > 0, α a finite number > 0 with α/r inside _SCALING_RANGE."""
    if not _is_int(r) or r < 0:
        raise ValueError(f"{r_name} must be an integer >= 0 (0 disables LoRA), got {r!r}")
    if r > 0:
        if not (_is_real(alpha) and alpha > 0):
            raise ValueError(f"{alpha_name} must be a finite number > 0 when r > 0, got {alpha!r}")
        low, high = _SCALING_RANGE
        if not low <= alpha / r <= high:
            raise ValueError(f"the LoRA scaling α/r = {alpha}/{r} lies outside [{low:g}, "
                             f"{high:g}], where AdamW overflows float32; choose {alpha_name} "
                             f"nearer to r")
    _check_dropout(dropout, "lora_dropout")
    _check_dropout(r_dropout, "lora_r_dropout")


def _check_config(config) -> None:
    """GPT2Config's rules, each a ValueError naming the field. Numbers become plain Python ints and
    floats first (not numpy's), as JSON and torch expect."""
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            plain = int(value) if _is_int(value) else float(value)
            object.__setattr__(config, field.name, plain)  # the dataclass is frozen
    for name in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head"):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head:
        raise ValueError(f"GPT2Config.n_embd ({config.n_embd}) must be divisible by n_head "
                         f"({config.n_head})")
    if config.n_ctx > config.n_positions:
        raise ValueError(f"GPT2Config.n_ctx ({config.n_ctx}) must not exceed n_positions "
                         f"({config.n_positions})")
    epsilon = config.layer_norm_epsilon
    if not (_is_real(epsilon) and epsilon > 0):
        raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number > 0, got {epsilon!r}")
    std = config.initializer_range
    if not (_is_real(std) and std >= 0):
        raise ValueError(f"GPT2Config.initializer_range must be a number >= 0, got {std!r}")
    _check_lora(config.lora_attn_dim, config.lora_attn_alpha, config.lora_dropout,
                config.lora_r_dropout, "GPT2Config.lora_attn_dim (the LoRA rank r)",
                "GPT2Config.lora_attn_alpha (α)")
    _check_dropout(config.fix_dropout, "GPT2Config.fix_dropout")


def _check_layer_arguments(in_features, out_features, enable_lora) -> None:
    """A LoRA layer's sizes, and one enable_lora flag per equal slice of its output."""
    if not all(_is_int(n) and n > 0 for n in (in_features, out_features)):
        raise ValueError(f"in_features, out_features must be positive integers: "
                         f"{in_features!r}, {out_features!r}")
    is_flag_list = (isinstance(enable_lora, Sequence) and not isinstance(enable_lora, (str, bytes))
                    and len(enable_lora) > 0 and all(e in (0, 1) for e in enable_lora))
    if not is_flag_list:
        raise ValueError(f"enable_lora must be a list of booleans, one per output group, at "
                         f"least one, e.g. [True, False, True]; got {enable_lora!r}")
    if out_features % len(enable_lora):
        raise ValueError(f"len(enable_lora) = {len(enable_lora)} must divide out_features = "
                         f"{out_features}: each flag stands for an equal slice of the output")


def _check_id_range(ids: torch.Tensor, n: int, what: str, fix: str, negative_ok=False) -> None:
    """A clear error instead of an index error deep inside. On the CPU only: on a GPU reading the
    minimum and maximum would stall every step on a device-to-host copy (a device-side assert
    reports a bad id there)."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low = int(ids.min())
    high = int(ids.max())
    if (low < 0 and not negative_ok) or high >= n:
        bound = f"vocab_size = {n}" if what in ("token ids", "lm_labels") else n
        raise ValueError(f"{what} must lie in [0, {bound}), got values in [{low}, {high}]; {fix}")


def _check_model_inputs(model, input_ids, position_ids, token_type_ids, past, len_past) -> int:
    """GPT2Model.forward's inputs: integer ids within the vocabulary, positions within
    n_positions, a cache of this model's shape, dtype, device and batch, at most n_ctx positions
    in all, and len_past with one new token per row. Returns the length of the cache."""
    config = model.config
    device = model.wte.weight.device
    dtype = model.wte.weight.dtype
    if not _is_tensor(input_ids, 2, (torch.long, torch.int32)) or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty integer tensor (batch, time), got "
                         f"{_describe(input_ids)}")
    B, T = input_ids.shape
    _check_id_range(input_ids, config.vocab_size, "token ids",
                    "check that the tokenizer matches the model")
    if past is None and len_past is not None:
        raise ValueError("len_past needs past: a first call without len_past gives the cache")
    if position_ids is not None:
        if len_past is not None:
            raise ValueError("position_ids and len_past cannot go together: with len_past the "
                             "new token of row b sits at position len_past[b]")
        is_positions = (isinstance(position_ids, torch.Tensor)
                        and position_ids.dtype in (torch.long, torch.int32))
        if not is_positions or tuple(position_ids.shape) not in ((T,), (1, T), (B, T)):
            raise ValueError(f"position_ids must be an integer tensor of shape ({B}, {T}) or "
                             f"({T},), got {_describe(position_ids)}")
        _check_id_range(position_ids, config.n_positions, "position_ids",
                        f"positions index the {config.n_positions} rows of wpe")
    if token_type_ids is not None:
        is_types = _is_tensor(token_type_ids, 2, (torch.long, torch.int32))
        if not is_types or token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must be an integer tensor of input_ids' shape "
                             f"({B}, {T}), got {_describe(token_type_ids)}")
        _check_id_range(token_type_ids, config.vocab_size, "token_type_ids",
                        "token types are embedded with wte, as in microsoft's GPT-2")
    nh = config.n_head
    hs = config.n_embd // config.n_head
    # Under autocast the cache comes back in the autocast dtype.
    autocast_dtype = dtype
    if torch.is_autocast_enabled(device.type):
        autocast_dtype = torch.get_autocast_dtype(device.type)
    if past is not None:
        is_cache = isinstance(past, Sequence) and len(past) == config.n_layer and all(
            _is_tensor(p, 5) and p.shape == past[0].shape and p.dtype in (dtype, autocast_dtype)
            and p.device == device for p in past)
        if not is_cache or (past[0].shape[0], past[0].shape[2], past[0].shape[4]) != (2, nh, hs):
            raise ValueError(f"past must be the {config.n_layer} caches (2, B, {nh}, T, {hs}) a "
                             f"previous call returned ({dtype}, on {device})")
        if past[0].shape[1] != B:
            raise ValueError(f"past was computed for a batch of {past[0].shape[1]}, not {B}; "
                             f"feed the same batch")
    past_length = 0 if past is None else past[0].shape[-2]
    new_positions = T if len_past is None else 0  # with len_past the cache has a fixed size
    if past_length + new_positions > config.n_ctx:
        raise ValueError(f"sequence length {past_length + T} (past {past_length} + new {T}) "
                         f"must lie in [1, n_ctx = {config.n_ctx}]; crop the input to the last "
                         f"{config.n_ctx} tokens")
    if len_past is not None:
        is_len_past = (_is_tensor(len_past, 1, (torch.long,)) and len_past.shape == (B,)
                       and T == 1 and len_past.device == device)
        if not is_len_past:
            raise ValueError(f"len_past must be a torch.long tensor on {device} of shape (batch,) "
                             f"= ({B},), with exactly one new token per row; got "
                             f"{_describe(len_past)} and {T} new tokens")
        _check_id_range(len_past, past_length, "len_past values (rows of the cache)",
                        "pad the prompts to leave room for the tokens to generate")
    return past_length


def _check_generate_arguments(input_ids, max_new_tokens, temperature, top_k) -> None:
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


def _check_loss_inputs(config, input_ids, lm_labels, lm_mask, label_smooth, return_logits) -> None:
    """lm_labels integer ids of input_ids' shape (negative: no target), lm_mask of that shape with
    finite weights ≥ 0, label_smooth in [0, 1)."""
    shape = tuple(input_ids.shape)
    if not _is_tensor(lm_labels, 2, (torch.long, torch.int32)) or lm_labels.shape != shape:
        raise ValueError(f"lm_labels must be an integer tensor of the shape of input_ids "
                         f"{shape}, got {_describe(lm_labels)}")
    if lm_mask is not None and not (_is_tensor(lm_mask, 2) and lm_mask.shape == shape):
        raise ValueError(f"lm_mask must have input_ids' shape {shape}, got {_describe(lm_mask)}")
    if not (_is_real(label_smooth) and 0.0 <= label_smooth < 1.0):
        raise ValueError(f"label_smooth must lie in [0, 1), got {label_smooth!r}")
    if not isinstance(return_logits, bool):
        raise ValueError(f"return_logits must be True or False, got {return_logits!r}")
    _check_id_range(lm_labels, config.vocab_size, "lm_labels",
                    "a negative label marks a position without target", negative_ok=True)
    # The mask weighs each position: a negative or non-finite weight makes the loss meaningless.
    # On the CPU only, as for the ids (reading values from a GPU would stall every step).
    if lm_mask is not None and lm_mask.device.type == "cpu" and lm_mask.numel() > 0 \
            and not torch.compiler.is_compiling():
        weights = lm_mask.float()
        if not bool(weights.isfinite().all()) or float(weights.min()) < 0:
            raise ValueError(f"lm_mask must hold finite weights >= 0 (1 counts a position, 0 "
                             f"drops it), got values in [{float(weights.min())}, "
                             f"{float(weights.max())}]")


def _check_tied_head(state_dict, prefix) -> None:
    """A state dict's head must be its token embedding: GPT-2 ties them, this model holds one."""
    head = state_dict.get(prefix + "lm_head.decoder.weight")
    wte = state_dict.get(prefix + "transformer.wte.weight")
    if head is None or wte is None or head is wte:
        return
    if head.shape != wte.shape or not torch.equal(head.nan_to_num(), wte.nan_to_num()):
        raise ValueError("the state dict's lm_head.decoder.weight differs from its "
                         "transformer.wte.weight (an untied head): GPT-2 ties them, this model "
                         "too; load a state dict whose head is its embedding")


def _check_merged_forward(layer) -> None:
    """A merged layer holds W0 + ΔW in one weight: training through it would move W, never A, B."""
    if layer.training and torch.is_grad_enabled() and layer.lora_A.requires_grad:
        raise ValueError("a merged LoRA layer cannot train its adapters (ΔW is inside the "
                         "weight, A and B get no gradient): unmerge_lora(model) before training, "
                         "or evaluate under torch.no_grad()")


def _check_not_merged(model) -> None:
    merged = [name for name, layer in _named_lora_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"{_short(merged)} hold merged weights, whose adapters cannot train: "
                         f"unmerge_lora(model) first")


def _set_vocab_size_alias(config, value) -> None:
    """GPT2Config(vocab_size_or_config_json_file=V), microsoft's spelling of vocab_size=V."""
    default = GPT2Config.__dataclass_fields__["vocab_size"].default
    if config.vocab_size not in (default, value):
        raise ValueError(f"vocab_size = {config.vocab_size} and vocab_size_or_config_json_file "
                         f"= {value!r} disagree; give one of them")
    if not _is_int(value):
        raise ValueError(f"vocab_size_or_config_json_file is microsoft's name for vocab_size and "
                         f"must be a positive integer here (a JSON file is not read), got "
                         f"{value!r}")
    object.__setattr__(config, "vocab_size", value)  # the dataclass is frozen
