"""Checkpoint formats for lora_gpt2: Hugging Face GPT-2 folders, PEFT LoRA adapters, the hub.

lora_gpt2.py holds the model and the LoRA math; everything about files lives here, as peft keeps
its serialization apart from its layers and litgpt its weight conversion apart from its model.
The model's Hugging Face-style methods (`GPT2LMModel.from_pretrained`, `save_pretrained`,
`save_adapter`, `load_adapter`) are one-line delegates to the functions of this module, which
lora_gpt2 imports only when one of them is called.

    Reading      safetensors, PyTorch and JSON files, each failure one ValueError naming the file.
    In           from_pretrained: a Hugging Face folder, a weights file or a hub name.
    Out          save_pretrained: a transformers GPT-2 folder with ΔW merged into W0.
    Adapters     save_adapter / load_adapter: a PEFT LoRA folder, and the record of its base
                 (base_fingerprint / base_difference) that keeps it off every other base.
    Writing      _write_folder: a folder is replaced whole, or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from lora_gpt2 import (_BIAS_MODES, HUB_MODELS, PRESETS, GPT2Config, GPT2LMModel, _is_int,
                       _is_lora_name, _is_real, _load_weight, _named_lora_layers, _short,
                       _state_dict_of, merged_state_dict)


# ---- 1. Reading files: safetensors, PyTorch, JSON ----

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


def read_weights(path) -> dict:
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


# ---- 2. In: Hugging Face folders, weights files and the hub ----

def from_pretrained(cls, source, config_overrides: Mapping) -> GPT2LMModel:
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


# ---- 3. Writing a folder whole ----

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


# ---- 4. Out: a Hugging Face GPT-2 folder, ΔW merged ----

def save_pretrained(model: GPT2LMModel, folder) -> None:
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors), ΔW merged in, the tied
    head stored once (as wte): transformers and from_pretrained give this model's logits from it.
    The model is left as it was."""
    cfg = model.config
    p = cfg.fix_dropout
    tensors = {k: v for k, v in merged_state_dict(model).items() if k.startswith("transformer.")}
    _check_finite(tensors, "save_pretrained")  # after merging, which can overflow too
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if in the vocabulary
    sizes = {k: v for k, v in cfg.to_dict().items() if not k.startswith(("lora_", "fix_"))}
    hf_config = dict(
        sizes, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_inner=None,
        activation_function="gelu_new", resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        torch_dtype=str(model.transformer.wte.weight.dtype).replace("torch.", ""))
    _write_folder(folder, "model.safetensors", tensors, {"format": "pt"}, "config.json", hf_config)


# ---- 5. The base record: which base an adapter belongs to ----
# An adapter is ΔW for one W0. On another base it loads without complaint and gives wrong
# logits, and on its own merged export (W0 + ΔW) it would add ΔW a second time. So save_adapter
# writes a record of its base into the adapter's metadata, and load_adapter compares the model
# it is given with that record:
#   dtype     the base's precision, so that a cast copy is named as such, not as "another base";
#   frozen    a SHA-256 of every frozen tensor but the adapted W0s and the biases the adapter
#             carries: those must match bit for bit;
#   adapted   for each adapted W0 (c_attn's), its norm and 8 projections uᵀ W0 v in float64, with
#             fixed cosine vectors u and v: W0 must match only within rounding, because merging
#             and unmerging (W0 + ΔW - ΔW) moves it by a few units of the last place.

def _frozen_hash(state_dict: Mapping[str, torch.Tensor], skip) -> str:
    """SHA-256 of the trunk's tensors (names, shapes, float32 values), LoRA and `skip` left out."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if not key.startswith("transformer.") or "lora_" in key or key in skip:
            continue
        value = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(value.shape)};".encode() + value.numpy().tobytes())
    return digest.hexdigest()


def _probes(weight: torch.Tensor) -> List[float]:
    """‖W‖ and 8 projections uᵀWv in float64. u and v are fixed cosines, not an RNG's draws, so
    that a new torch version can never change an old record."""
    frequencies = torch.tensor([2.0, 3, 5, 7, 11, 13, 17, 19], dtype=torch.float64).sqrt()

    def cosines(n: int, phase: float) -> torch.Tensor:                         # (n, 8)
        steps = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
        return torch.cos(steps * frequencies * phase) * math.sqrt(2)

    rows, columns = weight.shape
    U = cosines(rows, 1.0)                                                     # (rows, 8)
    V = cosines(columns, math.pi)                                              # (columns, 8)
    weight = weight.detach().to("cpu", torch.float64)
    projections = (U.t() @ weight @ V).diagonal()                              # (8,)
    return [weight.norm().item()] + projections.tolist()


def base_fingerprint(model: nn.Module, bias: str = "none") -> str:
    """The record of the base an adapter keeps, as JSON: the dtype, a SHA-256 of the trunk but
    LoRA, the biases `bias` names and the W0 of LoRA layers (rank 0 too), and each W0's _probes."""
    state_dict = model.state_dict()
    adapted = {f"{name}.weight" for name in _named_lora_layers(model, adapted_only=False)}
    skip = adapted | {key for key in state_dict if _is_lora_name(model, key, bias)}
    record = dict(dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."),
                  frozen=_frozen_hash(state_dict, skip),
                  adapted={key: _probes(state_dict[key]) for key in sorted(adapted)})
    return json.dumps(record)


def _tolerance(dtype: str) -> float:
    """How far, relative to ‖W0‖, a recorded W0 may move and still be the same base.

    k merge/unmerge cycles move W (and so each probe) by about u·sqrt(2k)·‖W0 + ΔW‖, u the unit
    roundoff (2^-24 in float32, 2^-8 in bfloat16). 1e-4 lets float32 go through ~10^5 cycles at
    ‖ΔW‖ = ‖W0‖, yet refuses a merged export from ‖ΔW‖ ≈ 1e-3·‖W0‖ up; 16 bits get 2^-5."""
    return 2 ** -5 if dtype in ("float16", "bfloat16") else 1e-4


def base_difference(model: nn.Module, record: str, bias: str = "none") -> Optional[str]:
    """None if `model` is the base `record` describes (base_fingerprint's, or an older bare
    SHA-256 of the frozen parts), else what differs, in words."""
    state_dict = model.state_dict()
    if re.fullmatch("[0-9a-f]{64}", str(record)):  # an older record: the frozen parts only
        adapted = {f"{name}.weight" for name in _named_lora_layers(model)}
        if _frozen_hash(state_dict, adapted) == record:
            return None
        return "another base (its weights differ)"
    try:
        recorded = json.loads(record)
        mine = json.loads(base_fingerprint(model, bias))
        tolerance = _tolerance(recorded["dtype"])
        differs = (recorded["frozen"] != mine["frozen"]
                   or set(recorded["adapted"]) != set(mine["adapted"]))
        far = []  # adapted W0s beyond rounding; NaN is far too, as NaN <= x is False
        for key, probes in recorded["adapted"].items():
            if differs:
                break
            norm = probes[0]
            pairs = zip(probes, mine["adapted"][key], strict=True)
            if any(not abs(a - b) <= tolerance * norm for a, b in pairs):
                far.append(key)
    except (ValueError, TypeError, LookupError, AttributeError):
        return "an unreadable base record"
    if (differs or far) and recorded["dtype"] != mine["dtype"]:
        dtype = recorded["dtype"]
        return (f"another precision ({mine['dtype']}, not {dtype}): load the base in {dtype}, as "
                f"saved (a copy cast to {mine['dtype']} and back has lost bits)")
    if far:
        return f"another base: {far[0]} is not the W0 recorded, beyond rounding (a merged export?)"
    if differs:
        return "another base (its weights differ)"
    return None


# ---- 6. PEFT adapters: save_adapter, load_adapter ----
# PEFT puts one LoRA on the fused c_attn (C → 3C); ours has two, on Q and on V. The same ΔW is a
# PEFT LoRA of rank r' = 2r whose B' is block-diagonal, with the K rows zero:
#
#     A' = [A_q]   (2r, C)        B' = [B_q   0 ]   (3C, 2r)      ΔW = B' A' = [B_q A_q]
#          [A_v]                       [ 0    0 ]                              [   0   ]
#                                      [ 0   B_v]                              [B_v A_v]
#
# and α' = 2α keeps the scaling α'/r' = α/r. load_adapter reads back exactly this layout.

_PEFT_KEY = "base_model.model.transformer.h.{}.attn.c_attn.lora_{}.weight"

# adapter_config.json fields this model holds, each checked for a value it can represent.
_PEFT_MODELED_FIELDS = {
    "peft_type": lambda value: value == "LORA",
    "bias": lambda value: value in _BIAS_MODES,
    "target_modules": lambda value: value in ("c_attn", ["c_attn"]),
    "init_lora_weights": lambda value: value in (True, False, "gaussian"),
}
# Defaults of the modeled fields when a config leaves them out.
_PEFT_DEFAULTS = {"peft_type": None, "bias": "none", "target_modules": None,
                  "init_lora_weights": True}
# Fields that describe the adapter without changing its ΔW: any value is fine (r and α are
# checked apart). Every other field, including those of newer peft versions (use_dora,
# layers_to_transform, ...), must be neutral: null, false or empty.
_PEFT_DESCRIPTIVE_FIELDS = ("r", "lora_alpha", "task_type", "auto_mapping", "peft_version",
                            "base_model_name_or_path", "revision", "inference_mode",
                            "lora_dropout", "fan_in_fan_out", "megatron_core", "runtime_config",
                            "qalora_group_size")


def _peft_biases(model: GPT2LMModel, bias: str) -> Dict[str, str]:
    """{our key: PEFT's key} of the biases an adapter carries in bias mode `bias`."""
    keys = [k for k in model.state_dict() if _is_lora_name(model, k, bias) and "lora_" not in k]
    return {k: "base_model.model." + k.replace("c_attn.bias", "c_attn.base_layer.bias")
            for k in keys}


def _trained_bias_mode(model: GPT2LMModel) -> str:
    """Which of PEFT's bias modes the trainable parameters describe; anything else is refused."""
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
    this model's logits, in the layout pictured above. Trained biases go too; other trainable
    weights are refused. The base record goes in the safetensors metadata (PEFT warns of
    unknown config keys)."""
    config = model.config
    r = config.lora_attn_dim
    C = config.n_embd
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    if r == 0:
        raise ValueError("the model has no LoRA adapters (lora_attn_dim = 0); save_pretrained "
                         "saves it whole")
    # The base too: its record would not match the same base once loaded (inf - inf is NaN).
    _check_finite(model.state_dict(), "save_adapter")
    bias = _trained_bias_mode(model)
    state_dict = model.state_dict()
    tensors = {peft_key: state_dict[key] for key, peft_key in _peft_biases(model, bias).items()}
    for i, block in enumerate(model.transformer.h):
        A = block.attn.c_attn.lora_A.detach()                                  # (2r, C)
        B = block.attn.c_attn.lora_B.detach()                                  # (2C, r)
        B_peft = B.new_zeros(3 * C, 2 * r)                                     # (3C, 2r)
        B_peft[:C, :r] = B[:C]                                                 # B_q on A_q
        B_peft[2 * C:, r:] = B[C:]                                             # B_v on A_v
        tensors[_PEFT_KEY.format(i, "A")] = A
        tensors[_PEFT_KEY.format(i, "B")] = B_peft
    adapter_config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=2 * r, lora_alpha=2 * config.lora_attn_alpha,
        target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=config.lora_dropout,
        bias=bias, use_rslora=False, use_dora=False,
        base_model_name_or_path=base and _path(base, "base_model_name_or_path"))
    metadata = {"format": "pt", "base_fingerprint": base_fingerprint(model, bias)}
    _write_folder(folder, "adapter_model.safetensors", tensors, metadata, "adapter_config.json",
                  adapter_config)


def load_adapter(model: GPT2LMModel, folder) -> GPT2LMModel:
    """Set the LoRA weights (and biases) from a PEFT adapter folder as save_adapter writes it
    (lora_attn_dim = r'/2, α/r = α'/r'). A ValueError refuses, changing nothing, what this model
    cannot hold (K rows in B', B' not block-diagonal, a field not neutral) or another base."""
    folder = _path(folder, "the adapter folder")
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    adapter_config = _read_json(config_path)
    state_dict, metadata = _read_safetensors(weights_path)
    _check_adapter_config(adapter_config, model.config, config_path)
    bias = adapter_config.get("bias", "none")
    r = model.config.lora_attn_dim
    C = model.config.n_embd
    biases = _peft_biases(model, bias)
    expected = {_PEFT_KEY.format(i, ab) for i in range(model.config.n_layer) for ab in "AB"}
    expected |= set(biases.values())
    if set(state_dict) != expected:
        raise ValueError(f"{weights_path}: weights this model cannot hold: "
                         f"{_short(sorted(set(state_dict) - expected))}; missing: "
                         f"{_short(sorted(expected - set(state_dict)))}")
    new = {key.removeprefix("transformer."): state_dict[peft_key]
           for key, peft_key in biases.items()}
    for i in range(model.config.n_layer):
        A_peft = state_dict[_PEFT_KEY.format(i, "A")]                          # (2r, C)
        B_peft = state_dict[_PEFT_KEY.format(i, "B")]                          # (3C, 2r)
        if A_peft.shape != (2 * r, C) or B_peft.shape != (3 * C, 2 * r):
            raise ValueError(f"layer {i}: A' {tuple(A_peft.shape)}, B' {tuple(B_peft.shape)} do "
                             f"not fit this model's size")
        if B_peft[C:2 * C].any():
            raise ValueError(f"layer {i}: B' has non-zero K rows; this model keeps W_k frozen")
        if B_peft[:C, r:].any() or B_peft[2 * C:, :r].any():
            raise ValueError(f"layer {i}: B' is not block-diagonal; here Q and V have separate A's")
        new[f"h.{i}.attn.c_attn.lora_A"] = A_peft                              # [A_q; A_v]
        B_q = B_peft[:C, :r]                                                   # (C, r)
        B_v = B_peft[2 * C:, r:]                                               # (C, r)
        new[f"h.{i}.attn.c_attn.lora_B"] = torch.cat((B_q, B_v))               # (2C, r)
    record = metadata.get("base_fingerprint")
    why = record and base_difference(model, record, bias)
    if why:
        raise ValueError(f"{folder} does not go onto this model: {why}; load it onto its own base")
    return _load_weight(model, new)  # copies in place, and keeps a merged model merged


def _check_adapter_config(adapter_config: dict, config: GPT2Config, config_path: str) -> None:
    """The adapter's fields: modeled ones hold values this model represents, descriptive ones
    anything, every other one a neutral value; r' and α' fit this model's r and α."""
    for key in {**_PEFT_MODELED_FIELDS, **adapter_config}:  # the modeled ones even when absent
        value = adapter_config.get(key, _PEFT_DEFAULTS.get(key))
        if key in _PEFT_MODELED_FIELDS:
            fits = _PEFT_MODELED_FIELDS[key](value)
        else:
            fits = key in _PEFT_DESCRIPTIVE_FIELDS or value in (None, False, {}, [], "")
        if not fits:
            raise ValueError(f"{config_path}: {key} = {value!r} is not supported: this model "
                             f"holds plain LoRA on c_attn (Q, V), one r and α")
    r = config.lora_attn_dim
    alpha = config.lora_attn_alpha
    r_peft = adapter_config.get("r")
    alpha_peft = adapter_config.get("lora_alpha")
    fits = (r > 0 and r_peft == 2 * r and _is_real(alpha_peft)
            and math.isclose(alpha_peft / r_peft, alpha / r))
    if not fits:
        raise ValueError(f"{config_path}: r' = {r_peft!r}, α' = {alpha_peft!r} fit a model built "
                         f"with lora_attn_dim = r'/2 (r' even) and lora_attn_alpha = α'/2; this "
                         f"one has {r} and {alpha}")


def _path(value, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{what} must be a path, got {value!r}")
    return os.fspath(value)


def _check_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """No export holds NaN or infinity: they load without complaint and give NaN logits."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ValueError(f"{what}: {key} holds NaN or infinite values (an overflow in "
                             f"training?); an export of it would give NaN logits")
