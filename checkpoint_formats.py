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
    cfg, p = model.config, model.config.fix_dropout
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


# ---- 6. PEFT adapters: save_adapter, load_adapter ----

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
    # The base too: its record would not match the same base once loaded (inf - inf is NaN).
    _check_finite(model.state_dict(), "save_adapter")
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


def _check_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """No export holds NaN or infinity: they load without complaint and give NaN logits."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ValueError(f"{what}: {key} holds NaN or infinite values (an overflow in "
                             f"training?); an export of it would give NaN logits")
