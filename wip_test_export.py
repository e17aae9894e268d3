"""Property tests for the Hugging Face / PEFT export and import (issue 8), wip_formats.py.

Each test names the law it checks. The oracles, Hugging Face `transformers` and `peft`, are
optional: those tests skip cleanly when the package is missing; the rest need only safetensors.
Once wip_formats.py is pasted into lora_gpt2.py, `fmt` below becomes `L`.
"""

import copy
import json
import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_gpt2 as L
fmt = L

settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(1)

# The largest differences seen against the oracles, by dtype; the oracle test prints them.
MAX_DIFFS = {}


def record(what, dtype, diff):
    key = f"{what} ({str(dtype).replace('torch.', '')})"
    MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), diff)
    return diff


def randomize_lora(model, seed, std=0.5):
    """Random A and B, so that ΔW ≠ 0 and every law below is not trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def tiny_lora_model(seed=0, r=2, alpha=6.0, **sizes):
    """A random GPT-2 with LoRA; initializer_range 0.3 makes every mistake show in the logits."""
    torch.manual_seed(seed)
    config = L.GPT2Config(**{**dict(vocab_size=50, n_positions=8, n_ctx=8, n_embd=12, n_layer=2, n_head=3,
                                    initializer_range=0.3, lora_attn_dim=r, lora_attn_alpha=alpha), **sizes})
    model = L.GPT2LMModel(config).eval()
    if r:
        randomize_lora(model, seed + 1)
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
def test_exported_folder_and_adapter_give_our_logits_in_transformers_and_peft(dtype, n_head, head_size,
                                                                              n_layer, r, alpha, seed):
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
        ours = L.GPT2LMModel.from_pretrained(base, lora_attn_dim=r, lora_attn_alpha=alpha).to(dtype).eval()
        randomize_lora(ours, seed)
        expected, ids = logits(ours, seed)

        fmt.save_pretrained(ours, merged)
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

        fmt.save_adapter(ours, adapter, base_model_name_or_path=base)
        hf_base = transformers.GPT2LMHeadModel.from_pretrained(base, dtype=dtype)
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(hf_base, adapter).eval()(ids).logits
        assert record("adapter vs peft", dtype, (got - expected).abs().max().item()) <= tol

        fresh = L.GPT2LMModel.from_pretrained(base, lora_attn_dim=r, lora_attn_alpha=alpha).to(dtype).eval()
        fmt.load_adapter(fresh, adapter)
        got = logits(fresh, seed)[0]
        record("adapter round trip", dtype, (got - expected).abs().max().item())
        assert torch.equal(got, expected)
        for (name, p), q in zip(ours.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), name
    print(f"\nmax |Δlogits| so far: {MAX_DIFFS}")


# ---- save_pretrained without the oracles -----------------------------------------------------

@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_leaves_the_model_bit_identical_and_reads_back_to_its_logits(tmp_path, monkeypatch, merged):
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
    fmt.save_pretrained(model, tmp_path / "out")
    fmt.save_adapter(model, tmp_path / "adapter")
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


def test_a_plain_model_has_no_adapter_to_save_and_a_file_is_no_folder(tmp_path):
    """save_adapter refuses a rank-0 model; no export writes into a path that is a file."""
    with pytest.raises(ValueError, match="lora_attn_dim = 0"):
        fmt.save_adapter(tiny_lora_model(r=0), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        fmt.save_pretrained(tiny_lora_model(), tmp_path / "file")
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
    "other module": (dict(tensors=lambda sd: sd.update({KEY_B.replace("c_attn", "c_proj"): sd[KEY_B].clone()})),
                     {}, "cannot hold: .*c_proj"),
    "other targets": (dict(config=lambda c: c.update(target_modules=["c_attn", "c_fc"])), {}, "target_modules"),
    "rsLoRA": (dict(config=lambda c: c.update(use_rslora=True)), {}, "use_rslora"),
    "DoRA": (dict(config=lambda c: c.update(use_dora=True)), {}, "use_dora"),
    "rank pattern": (dict(config=lambda c: c.update(rank_pattern={"h.0": 8})), {}, "rank_pattern"),
    "not LoRA": (dict(config=lambda c: c.update(peft_type="IA3")), {}, "peft_type = 'IA3'"),
    "odd rank": (dict(config=lambda c: c.update(r=3)), {}, r"r' = 3, .*lora_attn_dim = r'/2 \(r' even\)"),
    "other rank": ({}, dict(r=1, alpha=3.0), r"r' = 4, α' = 12.0 .*this one has 1 and 3.0"),
    "rank 0": ({}, dict(r=0), r"lora_attn_dim = r'/2 .*lora_attn_alpha = α'/2; this one has 0"),
    "other alpha": ({}, dict(alpha=5.0), "this one has 2 and 5.0"),
    "missing layer": (dict(tensors=lambda sd: [sd.pop(k) for k in list(sd) if ".h.1." in k]), {},
                      r"missing: .*h\.1\."),
    "other size": ({}, dict(n_embd=8, n_head=2), "another model size"),
    "other base": ({}, dict(seed=7), "another base"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_an_adapter_this_model_cannot_represent_is_refused_and_changes_nothing(tmp_path, case):
    """Each adapter that would not reproduce its logits here raises a ValueError naming the
    problem, and leaves the model it was loaded into untouched."""
    edit, model_args, message = UNSUPPORTED[case]
    fmt.save_adapter(tiny_lora_model(), tmp_path)
    _edit_adapter(tmp_path, **edit)
    model = tiny_lora_model(**{"r": 2, **model_args})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fmt.load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_adapter_keeps_a_merged_model_merged_with_the_new_update(tmp_path):
    """Loading into a merged model re-merges with the loaded A, B: the logits are the saver's.
    (The adapter's fingerprint is dropped here: a merged model's W0 is only known up to rounding,
    see the next test.)"""
    saver = tiny_lora_model(seed=0)
    fmt.save_adapter(saver, tmp_path)
    _edit_adapter(tmp_path, tensors=lambda sd: None, metadata={"format": "pt"})
    model = tiny_lora_model(seed=0)
    randomize_lora(model, 99)
    L.merge_lora(model)
    fmt.load_adapter(model, tmp_path)
    assert all(layer.merged for layer in L._lora_layers(model))
    torch.testing.assert_close(logits(model)[0], logits(saver)[0], rtol=0, atol=1e-5)


def test_an_adapter_saved_after_a_merge_cycle_loads_onto_its_untouched_base(tmp_path):
    """merge_lora then unmerge_lora (an evaluation, say) before save_adapter: the adapter still
    loads onto the very base it was trained on."""
    saver = tiny_lora_model(seed=0)
    L.merge_lora(saver)
    L.unmerge_lora(saver)
    fmt.save_adapter(saver, tmp_path)
    fmt.load_adapter(tiny_lora_model(seed=0), tmp_path)


# ---- optional safetensors, interrupted writes -------------------------------------------------

def test_without_safetensors_every_format_says_what_to_install(tmp_path, monkeypatch):
    """With safetensors missing, export and import raise a ValueError naming the package."""
    model = tiny_lora_model()
    fmt.save_adapter(model, tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for call in (lambda: fmt.save_pretrained(model, tmp_path / "a"), lambda: fmt.save_adapter(model, tmp_path / "b"),
                 lambda: fmt.load_adapter(model, tmp_path / "adapter")):
        with pytest.raises(ValueError, match="pip install safetensors"):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("fail_at", ["weights", "config", "replace 1", "replace 2"])
def test_an_interrupted_export_over_an_old_one_loads_old_new_or_not_at_all(tmp_path, monkeypatch, fail_at):
    """An export that dies at any step (half-way through writing a file, or moving one into
    place) leaves no temporary file, and a folder that loads as the old adapter, as the new one,
    or not at all: never the new weights with the old α."""
    import safetensors.torch
    old, new = tiny_lora_model(seed=0, alpha=6.0), tiny_lora_model(seed=0, alpha=2.0)
    randomize_lora(new, 5)
    fmt.save_adapter(old, tmp_path)
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
        fmt.save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert no_temp_files(tmp_path)
    for saver, alpha in ((old, 6.0), (new, 2.0)):
        reader = tiny_lora_model(seed=0, alpha=alpha)
        try:
            fmt.load_adapter(reader, tmp_path)
        except ValueError:  # no adapter_config.json, or the other α: nothing loads
            continue
        assert torch.equal(logits(reader)[0], logits(saver)[0])


def test_an_interrupted_first_export_leaves_no_config_and_no_temp_files(tmp_path, monkeypatch):
    """Dying between moving the weights and the config into a new folder leaves the weights
    alone, without the config.json every loader looks for first."""
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: real_replace(s, d) if d.endswith(".safetensors")
                        else (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        fmt.save_pretrained(tiny_lora_model(), tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
