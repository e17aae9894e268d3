"""Export to / import from Hugging Face GPT-2 folders and PEFT LoRA adapters (issue 8).

To be pasted into lora_gpt2.py; the imports below stand in for that module's own.
"""

import json
import math
import os
from typing import Optional

import torch

from lora_gpt2 import *  # noqa: F401,F403  (the lead drops this line when pasting)
from lora_gpt2 import _is_real, _short  # noqa: F401  (idem)


# ---- Hugging Face and PEFT folders ---------------------------------------------------------

def _safetensors():  # imported here only: safetensors stays optional
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError:
        raise ValueError("Hugging Face and PEFT folders need the safetensors package: "
                         "pip install safetensors") from None
    return safe_open, save_file


def _own_copy(t: torch.Tensor) -> torch.Tensor:  # contiguous, on the CPU, no storage shared with the model
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


def _write_folder(folder, weights_name: str, tensors: dict, metadata: dict, config_name: str, config: dict):
    """Write weights and config so that an interruption never leaves a folder that loads wrong: both
    go to temporary names; then the old config goes (new weights must never meet it), the weights
    move into place, the config last, as loaders look for it. No temporary file stays behind."""
    _, save_file = _safetensors()
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} exists and is a file, not a folder; choose another path")
    os.makedirs(folder, exist_ok=True)
    names, config_path = (weights_name, config_name), os.path.join(folder, config_name)
    temps = [os.path.join(folder, f".{name}.{os.getpid()}.tmp") for name in names]
    try:
        save_file(tensors, temps[0], metadata)
        with open(temps[1], "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if os.path.exists(config_path):
            os.remove(config_path)
        for name, temp in zip(names, temps):
            os.replace(temp, os.path.join(folder, name))
    finally:
        for temp in filter(os.path.exists, temps):
            os.remove(temp)


def save_pretrained(model: "GPT2LMModel", folder) -> None:
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors), ΔW merged in, no LoRA
    tensors, the tied head stored once (as wte): transformers' GPT2LMHeadModel.from_pretrained and
    ours give this model's logits from it. The model itself is left as it was, merged or not."""
    cfg, p = model.config, model.config.fix_dropout
    tensors = {k: _own_copy(v) for k, v in merged_state_dict(model).items() if k.startswith("transformer.")}
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocabulary has it
    hf_config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions, n_ctx=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=p, embd_pdrop=p,
        attn_pdrop=p, layer_norm_epsilon=cfg.layer_norm_epsilon, initializer_range=cfg.initializer_range,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        torch_dtype=str(model.transformer.wte.weight.dtype).replace("torch.", ""))
    _write_folder(folder, "model.safetensors", tensors, {"format": "pt"}, "config.json", hf_config)


_PEFT_KEY = "base_model.model.transformer.h.{}.attn.c_attn.lora_{}.weight"


def save_adapter(model: "GPT2LMModel", folder, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the LoRA weights as a PEFT adapter folder: peft.PeftModel.from_pretrained(hf_gpt2,
    folder) gives this model's logits on the Hugging Face base, and load_adapter reads it back exactly.

    PEFT puts one LoRA on the whole fused c_attn, ΔW = B'A' on Q, K and V; we have two, B_q A_q on
    Q and B_v A_v on V. They are the same update with A' = [A_q; A_v] (2r × C, our lora_A as it is)
    and B' (3C × 2r) block-diagonal: Q rows hold B_q against A_q's half, K rows are zero, V rows hold
    B_v against A_v's half; so B'A' stacks B_q A_q, 0, B_v A_v. A rank-2r LoRA: r' = 2r, α' = 2α,
    α'/r' = α/r. The base fingerprint goes in the safetensors metadata (PEFT warns of unknown keys)."""
    cfg, r, C = model.config, model.config.lora_attn_dim, model.config.n_embd
    if r == 0:
        raise ValueError("the model has no LoRA adapters (lora_attn_dim = 0); save_pretrained saves it whole")
    tensors = {}
    for i, block in enumerate(model.transformer.h):
        A, B = block.attn.c_attn.lora_A.detach(), block.attn.c_attn.lora_B.detach()  # (2r, C), (2C, r)
        B2 = B.new_zeros(3 * C, 2 * r)                                        # (3C, 2r), K rows stay 0
        B2[:C, :r], B2[2 * C:, r:] = B[:C], B[C:]                             # B_q on A_q, B_v on A_v
        tensors[_PEFT_KEY.format(i, "A")], tensors[_PEFT_KEY.format(i, "B")] = _own_copy(A), _own_copy(B2)
    adapter_config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=2 * r, lora_alpha=2 * cfg.lora_attn_alpha,
        target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=cfg.lora_dropout, bias="none",
        use_rslora=False, use_dora=False,
        base_model_name_or_path=base_model_name_or_path or getattr(model, "name_or_path", None))
    metadata = {"format": "pt", "base_fingerprint": base_fingerprint(model)}
    _write_folder(folder, "adapter_model.safetensors", tensors, metadata, "adapter_config.json", adapter_config)


def load_adapter(model: "GPT2LMModel", folder) -> "GPT2LMModel":
    """Set the LoRA weights from a PEFT adapter folder as save_adapter writes it (its identity read
    backwards); the model needs lora_attn_dim = r'/2 and α/r = α'/r'. A ValueError refuses what it
    cannot represent: K rows in B', a B' not block-diagonal, other modules, rsLoRA, DoRA, per-layer
    r or α, a rank that does not fit, another base (by fingerprint). Nothing changes unless all fit."""
    safe_open, _ = _safetensors()
    cfg_path, weights_path = (os.path.join(folder, f)
                              for f in ("adapter_config.json", "adapter_model.safetensors"))
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights_path)):
        raise ValueError(f"{folder} is no PEFT adapter: it lacks adapter_config.json or adapter_model.safetensors")
    with open(cfg_path, encoding="utf-8") as f:
        ac = json.load(f)
    with safe_open(weights_path, framework="pt") as f:
        metadata, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    cfg, r2, alpha2 = model.config, ac.get("r"), ac.get("lora_alpha")
    r, C = cfg.lora_attn_dim, cfg.n_embd
    if ac.get("peft_type") != "LORA" or ac.get("target_modules") not in ("c_attn", ["c_attn"]):
        raise ValueError(f"{cfg_path}: peft_type {ac.get('peft_type')!r}, target_modules "
                         f"{ac.get('target_modules')!r}; this model holds only LORA on c_attn (Q and V)")
    for flag in ("use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern"):
        if ac.get(flag):
            raise ValueError(f"{cfg_path}: {flag} = {ac[flag]!r} is not supported (plain LoRA, one r and α)")
    if not (r > 0 and r2 == 2 * r and _is_real(alpha2)   # r' even: A' stacks A_q and A_v
            and math.isclose(alpha2 / r2, cfg.lora_attn_alpha / r, rel_tol=1e-9)):
        raise ValueError(f"{cfg_path}: r' = {r2!r}, α' = {alpha2!r} fit a model built with lora_attn_dim = r'/2 "
                         f"(r' even) and lora_attn_alpha = α'/2; this one has {r} and {cfg.lora_attn_alpha}")
    expected = {_PEFT_KEY.format(i, ab) for i in range(cfg.n_layer) for ab in "AB"}
    if set(sd) != expected:
        raise ValueError(f"{weights_path}: weights this model cannot hold: {_short(sorted(set(sd) - expected))}; "
                         f"missing: {_short(sorted(expected - set(sd)))}")
    new = {}
    for i in range(cfg.n_layer):
        A2, B2 = sd[_PEFT_KEY.format(i, "A")], sd[_PEFT_KEY.format(i, "B")]   # (2r, C), (3C, 2r)
        if tuple(A2.shape) != (2 * r, C) or tuple(B2.shape) != (3 * C, 2 * r):
            raise ValueError(f"layer {i}: A' {tuple(A2.shape)}, B' {tuple(B2.shape)} are not {(2 * r, C)}, "
                             f"{(3 * C, 2 * r)}: the adapter is for another model size")
        if B2[C:2 * C].any():
            raise ValueError(f"layer {i}: B' has non-zero K rows; this model keeps W_k frozen (LoRA on Q, V only)")
        if B2[:C, r:].any() or B2[2 * C:, :r].any():
            raise ValueError(f"layer {i}: B' is not block-diagonal (Q rows read A_v's half of A', or V rows "
                             f"A_q's); this model gives Q and V separate A's")
        new[f"h.{i}.attn.c_attn.lora_A"] = A2                                 # [A_q; A_v] (2r, C)
        new[f"h.{i}.attn.c_attn.lora_B"] = torch.cat((B2[:C, :r], B2[2 * C:, r:]))  # [B_q; B_v] (2C, r)
    if metadata.get("base_fingerprint") not in (None, base_fingerprint(model)):
        raise ValueError(f"{folder} was saved on another base model (its base_fingerprint differs); "
                         f"load it onto the base it was trained on")
    return model.load_weight(new)  # copies in place, and keeps a merged model merged
