"""What the test files share: Hypothesis strategies, tiny models, and the tiny training runs."""

import argparse
import importlib.util
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

import lora_gpt2 as L
import train_shakespeare as ts


# The Hugging Face and PEFT formats are safetensors files: without the package, those tests skip.
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="needs safetensors (pip install safetensors)")


# ---- strategies and tiny models ----

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


# ---- tiny runs of train_shakespeare.py ----

# The repository root, where the scripts are.
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


# ---- small models and folders more than one file builds ----

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
