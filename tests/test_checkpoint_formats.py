"""Tests of the checkpoints: state dicts, microsoft's load_weight and checkpoint_formats.py.

State-dict keys and shapes as microsoft/LoRA's, LoRA-only and merged state dicts, Hugging Face
folders and weight files (from_pretrained, the hub), and the exports: save_pretrained (a
transformers folder) and save_adapter / load_adapter (a PEFT adapter), checked against
transformers and peft when they are installed, and refused onto any base but their own.
"""

import builtins
import copy
import json
import os
import sys
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


import checkpoint_formats as formats
import lora_gpt2 as L

from helpers import (needs_safetensors, randomize_lora, seeds, tiny_configs, tiny_model,
                     token_batch)

from helpers import (tiny_lora_model)


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
    shapes = formats._config_from_shapes(meta, {})
    assert shapes == dict(vocab_size=50257, n_embd=1024, n_positions=1024, n_ctx=1024,
                          n_layer=24, n_head=16)
    cfg = formats._config_from_hf_json({"n_embd": 32, "n_head": 4, "n_layer": 1,
                                        "n_positions": 64, "n_ctx": 128,
                                        "layer_norm_epsilon": 1e-6}, "config.json")
    assert cfg["n_ctx"] == 64 and cfg["layer_norm_epsilon"] == 1e-6
    with pytest.raises(ValueError, match="activation_function"):
        formats._config_from_hf_json({"activation_function": "relu"}, "config.json")

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


# ---- 8. Hugging Face and PEFT formats: save_pretrained, save_adapter, load_adapter ----------

# The largest differences seen against the oracles, by dtype; the oracle test prints them.
MAX_DIFFS = {}


def record(what, dtype, diff):
    key = f"{what} ({str(dtype).replace('torch.', '')})"
    MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), diff)
    return diff


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

        formats.save_pretrained(ours, merged)
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

        formats.save_adapter(ours, adapter, base_model_name_or_path=base)
        hf_base = transformers.GPT2LMHeadModel.from_pretrained(base, dtype=dtype)
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(hf_base, adapter).eval()(ids).logits
        assert record("adapter vs peft", dtype, (got - expected).abs().max().item()) <= tol

        fresh = L.GPT2LMModel.from_pretrained(base, lora_attn_dim=r,
                                              lora_attn_alpha=alpha).to(dtype).eval()
        formats.load_adapter(fresh, adapter)
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
    formats.save_pretrained(model, tmp_path / "out")
    formats.save_adapter(model, tmp_path / "adapter")
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
        formats.save_pretrained(model, tmp_path / "hf")
        formats.save_adapter(model, tmp_path / "peft")
    finally:
        os.umask(previous)
    for path in sorted(tmp_path.glob("*/*")):
        assert path.stat().st_mode & 0o777 == 0o644, path


@needs_safetensors
def test_a_plain_model_has_no_adapter_to_save_and_a_file_is_no_folder(tmp_path):
    """save_adapter refuses a rank-0 model; no export writes into a path that is a file."""
    with pytest.raises(ValueError, match="lora_attn_dim = 0"):
        formats.save_adapter(tiny_lora_model(r=0), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        formats.save_pretrained(tiny_lora_model(), tmp_path / "file")
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
    formats.save_adapter(tiny_lora_model(), tmp_path)
    _edit_adapter(tmp_path, **edit)
    model = tiny_lora_model(**{"r": 2, **model_args})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        formats.load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_safetensors
def test_load_adapter_keeps_a_merged_model_merged_with_the_new_update(tmp_path):
    """Loading into a merged model re-merges with the loaded A, B: the logits are the saver's.
    (The adapter's fingerprint is dropped here: a merged model's W0 is only known up to rounding,
    see the next test.)"""
    saver = tiny_lora_model(seed=0)
    formats.save_adapter(saver, tmp_path)
    _edit_adapter(tmp_path, tensors=lambda sd: None, metadata={"format": "pt"})
    model = tiny_lora_model(seed=0)
    randomize_lora(model, 99)
    L.merge_lora(model)
    formats.load_adapter(model, tmp_path)
    assert all(layer.merged for layer in L._lora_layers(model))
    torch.testing.assert_close(logits(model)[0], logits(saver)[0], rtol=0, atol=1e-5)


@needs_safetensors
def test_an_adapter_saved_after_a_merge_cycle_loads_onto_its_untouched_base(tmp_path):
    """merge_lora then unmerge_lora (an evaluation, say) before save_adapter: the adapter still
    loads onto the very base it was trained on, and gives the saver's logits."""
    saver = tiny_lora_model(seed=0)
    L.merge_lora(saver)
    L.unmerge_lora(saver)
    formats.save_adapter(saver, tmp_path)
    loaded = tiny_lora_model(seed=0)
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if "lora_" in name:
                p.zero_()  # so that only the loaded adapter can give the saver's logits
    formats.load_adapter(loaded, tmp_path)
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
    for call in (lambda: formats.save_pretrained(model, tmp_path / "a"),
                 lambda: formats.save_adapter(model, tmp_path / "b"),
                 lambda: formats.load_adapter(model, tmp_path / "adapter")):
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
    formats.save_adapter(old, tmp_path)
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
        formats.save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert no_temp_files(tmp_path)
    for saver, alpha in ((old, 6.0), (new, 2.0)):
        reader = tiny_lora_model(seed=0, alpha=alpha)
        try:
            formats.load_adapter(reader, tmp_path)
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
        formats.save_pretrained(tiny_lora_model(), tmp_path / "out")
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
    assert "an unreadable base record" in formats.base_difference(saver, "{not json")


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
    # As for another user's file (the tests may run as root, who may read anything).
    monkeypatch.setattr(formats, "open", denied, raising=False)
    with pytest.raises(ValueError, match="Permission denied"):
        L.GPT2LMModel.from_pretrained(tmp_path / "hf")
    monkeypatch.undo()
    os.rename(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "model-00001-of-00002.bin")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ValueError, match="hf: sharded checkpoints are not read"):
        L.GPT2LMModel.from_pretrained(tmp_path / "hf")


@needs_safetensors
def test_exports_refuse_weights_that_are_not_finite_naming_the_key(tmp_path):
    """An infinite or NaN weight (in W0, in B, or made by merging) is refused when an adapter or
    a Hugging Face folder is written, naming the tensor; nothing is written."""
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.lora_B"):
        for value in (float("inf"), float("nan")):
            model = tiny_lora_model()
            with torch.no_grad():
                model.state_dict()[key].view(-1)[0] = value
            for export in (formats.save_adapter, formats.save_pretrained):
                folder = tmp_path / f"{export.__name__}-{value}"
                with pytest.raises(ValueError, match="NaN or infinite"):
                    export(model, folder)
                assert not folder.exists() or not any(folder.iterdir())
