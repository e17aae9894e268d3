#!/usr/bin/env python
"""LoRA fine-tuning of GPT-2 on Tiny Shakespeare, from a laptop CPU to several GPUs.

    python train_shakespeare.py --rank 4                   # offline: char-level base, then LoRA
    python train_shakespeare.py --rank 0                   # the same run, fine-tuning every weight
    python train_shakespeare.py --init-from gpt2 --rank 8  # adapt pretrained GPT-2 (BPE tokens)
    torchrun --nproc_per_node=4 train_shakespeare.py ...   # DistributedDataParallel, same options

Two starting points:

* `--init-from scratch` (default). There is no pretrained character-level GPT-2 to download, so
  the script makes one: it pretrains a small base on the first part of the training text (all
  weights trainable), caches it in --out-dir, then freezes it and trains rank-r LoRA adapters on
  Q and V over the rest of the training text. The last 10% of the text is held out throughout.
  The base has only seen half the training text and is still improving, so adapting it on new
  text lowers the held-out loss; `--rank 0` runs the same adaptation with every weight trainable,
  for comparison.
* `--init-from gpt2|gpt2-medium|gpt2-large|gpt2-xl|PATH`: pretrained GPT-2 weights (a hub name, a
  Hugging Face folder or weights file, or a checkpoint this script wrote), adapted on the whole
  training split. Hub weights and GPT-2's BPE tokenizer need optional packages (tiktoken or
  transformers, huggingface_hub), imported only on this path.

Files in --out-dir:

    base-<key>.pt   the pretrained scratch base (full weights), reused while its settings and the
                    data stay the same (<key> hashes them)
    adapter.pt      the result of a LoRA run: only the LoRA tensors, plus the model config, the
                    tokenizer and where the base came from (`load_model` rebuilds the model)
    full.pt         the result of a --rank 0 run: every weight
    resume.pt       the training state for --resume: trainable weights, optimizer, schedule
                    step, RNG states, settings, history
    merged.pt       with --merge: ΔW folded into the weights, a plain GPT-2 (`export_merged`)

Every checkpoint is a dict of tensors, numbers, strings, lists and dicts, loadable with
torch.load(..., weights_only=True), and is written to a temporary file that then replaces the
old one, so an interrupted run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from lora_gpt2 import (HUB_MODELS, GPT2Config, GPT2LMModel, lora_state_dict,
                       mark_only_lora_as_trainable, merged_state_dict)

# The corpus. Tests point these at a loopback server (the size check goes with the URL).
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_BYTES = 1_115_394
DATA_FILE = "tinyshakespeare.txt"

FORMAT = "lora-gpt2-shakespeare/1"  # stamped into every checkpoint this script writes
VAL_FRACTION = 0.1                   # the last 10% of the text is held out

# Sizes of the character-level base of the scratch path. "small" is the default: big enough to
# learn real structure, small enough that base + LoRA take about three minutes on a 2-core CPU.
SCRATCH_PRESETS: Dict[str, Dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),      # tests, smoke runs
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),    # ~0.8M params, CPU
    "medium": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),   # ~10.7M params, a GPU
}

# Defaults of every option. Options left out of the command line are None after parsing, which
# lets --resume tell what the user asked for from what was merely defaulted.
DEFAULTS = dict(
    init_from="scratch", data=None, cache_dir=None, out_dir="out-shakespeare", resume=None,
    rank=4, alpha=16.0, lora_dropout=0.0,
    preset="small", n_layer=None, n_head=None, n_embd=None,
    base_iters=1500, base_lr=2e-3, base_split=0.5,
    block_size=128, batch_size=16, grad_accum=1, max_iters=1000, lr=None, warmup=50,
    weight_decay=0.01, grad_clip=1.0, eval_interval=100, eval_iters=8, log_interval=50,
    device="auto", dtype="auto", compile=False, seed=1337, sample=400, prompt="\n", merge=False,
)
LORA_LR, FULL_LR = 5e-3, 5e-4  # --lr defaults: adapters tolerate (and need) a larger step

# Options whose value defines the run: a --resume must keep them. All others may change.
# (Model sizes are checked on the config they produce, see check_resume_fits.)
RUN_DEFINING = ("init_from", "rank", "alpha", "lora_dropout", "base_iters", "base_lr", "base_split",
                "block_size", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
                "grad_clip", "seed")


class UsageError(Exception):
    """Bad input: reported as one line naming the problem and the fix, exit status 2."""


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss): one line, exit status 1."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: says which checkpoint survived, exit status 130."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument is one line (raised, so main() callers see it)."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> _Parser:
    d = DEFAULTS
    p = _Parser(description="LoRA fine-tuning of GPT-2 on Tiny Shakespeare (see the module "
                            "docstring for the files written to --out-dir).",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--init-from", help=f"scratch (pretrain a char-level base here), "
                   f"{', '.join(HUB_MODELS)}, or a PATH to a Hugging Face folder/weights file or a "
                   f"checkpoint of this script (default: {d['init_from']})")
    g.add_argument("--data", help="a UTF-8 text file (default: Tiny Shakespeare, downloaded once "
                   "into --cache-dir)")
    g.add_argument("--cache-dir", help="where the downloaded corpus is kept (default: data/ next "
                   "to this script)")
    g.add_argument("--out-dir", help=f"checkpoints and the cached base (default: {d['out_dir']})")
    g.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from --out-dir/resume.pt, or from PATH")
    g.add_argument("--preset", help=f"size of the scratch base: {', '.join(SCRATCH_PRESETS)} "
                   f"(default: {d['preset']})")
    g.add_argument("--n-layer", type=int, help="override the preset's number of layers")
    g.add_argument("--n-head", type=int, help="override the preset's number of heads")
    g.add_argument("--n-embd", type=int, help="override the preset's width")
    g.add_argument("--base-iters", type=int, help=f"pretraining steps of the scratch base "
                   f"(default: {d['base_iters']})")
    g.add_argument("--base-lr", type=float, help=f"peak learning rate of the base pretraining "
                   f"(default: {d['base_lr']})")
    g.add_argument("--base-split", type=float, help=f"fraction of the training split the scratch "
                   f"base is pretrained on; the adapters train on the rest (default: {d['base_split']})")

    g = p.add_argument_group("adaptation")
    g.add_argument("--rank", type=int, help=f"LoRA rank r on Q and V; 0 fine-tunes every weight "
                   f"instead (default: {d['rank']})")
    g.add_argument("--alpha", type=float, help=f"LoRA alpha; the update is scaled by alpha/r "
                   f"(default: {d['alpha']})")
    g.add_argument("--lora-dropout", type=float, help=f"dropout on the adapters' input "
                   f"(default: {d['lora_dropout']})")

    g = p.add_argument_group("training")
    g.add_argument("--block-size", type=int, help=f"context length in tokens (default: {d['block_size']})")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch, per process "
                   f"(default: {d['batch_size']})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step "
                   f"(default: {d['grad_accum']})")
    g.add_argument("--max-iters", type=int, help=f"adaptation steps (default: {d['max_iters']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate of the adaptation (default: "
                   f"{LORA_LR} with LoRA, {FULL_LR} with --rank 0)")
    g.add_argument("--warmup", type=int, help=f"linear warmup steps before the cosine decay "
                   f"(default: {d['warmup']})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices "
                   f"(default: {d['weight_decay']})")
    g.add_argument("--grad-clip", type=float, help=f"clip the gradient norm to this; 0 disables "
                   f"(default: {d['grad_clip']})")
    g.add_argument("--eval-interval", type=int, help=f"evaluate and checkpoint every N steps "
                   f"(default: {d['eval_interval']})")
    g.add_argument("--eval-iters", type=int, help=f"held-out batches per evaluation "
                   f"(default: {d['eval_iters']})")
    g.add_argument("--log-interval", type=int, help=f"print progress every N steps "
                   f"(default: {d['log_interval']})")
    g.add_argument("--seed", type=int, help=f"random seed (default: {d['seed']})")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                   "(default: auto)")
    g.add_argument("--dtype", help="auto (bfloat16 autocast where the GPU supports it, float16 "
                   "with a gradient scaler on other GPUs, float32 elsewhere), float32, bfloat16, "
                   "float16 (default: auto)")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model "
                   "for training")

    g = p.add_argument_group("output")
    g.add_argument("--sample", type=int, help=f"characters/tokens to generate at the end; 0 "
                   f"skips (default: {d['sample']})")
    g.add_argument("--prompt", help="text the sample starts from (default: a newline)")
    g.add_argument("--merge", action="store_const", const=True, help="also write merged.pt, the "
                   "adapters folded into a plain GPT-2 checkpoint")
    return p


def parse_settings(argv: Optional[Sequence[str]]) -> dict:
    """The options given on the command line (None for those left out), checked for range."""
    args = vars(build_parser().parse_args(argv))
    _check_ranges({k: v for k, v in args.items() if v is not None})
    return args


def _check_ranges(s: dict) -> None:
    """Errors that need nothing but the option values. Each names the option and the fix."""
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    if "rank" in s:
        need(s["rank"] >= 0, f"--rank must be >= 0 (LoRA rank, or 0 to fine-tune every weight), "
                             f"got {s['rank']}")
    if "alpha" in s:
        need(math.isfinite(s["alpha"]) and s["alpha"] > 0, f"--alpha must be a finite number > 0 "
                                                           f"(the update is scaled by alpha/rank), got {s['alpha']}")
    if "lora_dropout" in s:
        need(0 <= s["lora_dropout"] < 1, f"--lora-dropout must lie in [0, 1), got {s['lora_dropout']}")
    if "preset" in s:
        need(s["preset"] in SCRATCH_PRESETS, f"unknown --preset {s['preset']!r}; choose one of "
                                            f"{', '.join(SCRATCH_PRESETS)}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                 "eval_interval", "eval_iters", "log_interval"):
        if name in s:
            need(s[name] >= 1, f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    for name in ("max_iters", "base_iters", "warmup", "sample"):
        if name in s:
            need(s[name] >= 0, f"--{name.replace('_', '-')} must be >= 0, got {s[name]}")
    for name in ("lr", "base_lr"):
        if name in s:
            need(s[name] > 0 and math.isfinite(s[name]), f"--{name.replace('_', '-')} must be a "
                                                         f"positive number, got {s[name]}")
    for name in ("weight_decay", "grad_clip"):
        if name in s:
            need(s[name] >= 0, f"--{name.replace('_', '-')} must be >= 0, got {s[name]}")
    if "base_split" in s:
        need(0 < s["base_split"] < 1, f"--base-split must lie strictly between 0 and 1, got {s['base_split']}")
    if "dtype" in s:
        need(s["dtype"] in ("auto", "float32", "bfloat16", "float16"),
             f"unknown --dtype {s['dtype']!r}; choose auto, float32, bfloat16 or float16")


def resolve_settings(given: dict) -> tuple:
    """Defaults + command line, or, with --resume, the saved run + the options that may change.

    Returns (settings, resume_state or None)."""
    explicit = {k: v for k, v in given.items() if v is not None}
    state = None
    if given["resume"] is not None:
        path = given["resume"] or os.path.join(explicit.get("out_dir", DEFAULTS["out_dir"]), "resume.pt")
        state = read_checkpoint(path, "--resume", kinds=("resume",))
        saved = state["settings"]
        for name in RUN_DEFINING:
            if name in explicit and explicit[name] != saved[name]:
                raise UsageError(f"--{name.replace('_', '-')} {explicit[name]} does not fit the run in "
                                 f"{path}, which has {saved[name]}; drop the option to resume, or "
                                 f"start a new run in another --out-dir")
        # Where and how to run, and what to print, come from this command line, not the old run.
        fresh = ("device", "dtype", "compile", "sample", "prompt", "merge", "log_interval", "cache_dir")
        settings = {**DEFAULTS, **{k: v for k, v in saved.items() if k not in fresh}, **explicit}
        if "out_dir" not in explicit and given["resume"]:
            settings["out_dir"] = os.path.dirname(os.path.abspath(path))
        settings["resume"] = path
    else:
        settings = {**DEFAULTS, **explicit}
    if settings["lr"] is None:
        settings["lr"] = LORA_LR if settings["rank"] > 0 else FULL_LR
    return settings, state


# --------------------------------------------------------------------------------------------
# Data: the corpus, tokenizers, splits, batches
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def download(url: str, dest: str, expected_bytes: Optional[int] = None, timeout: float = 30.0) -> None:
    """Fetch `url` into `dest` through a temporary file, so `dest` is whole or absent."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.part-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 16):
                f.write(chunk)
        size = os.path.getsize(tmp)
        if expected_bytes is not None and size != expected_bytes:
            raise OSError(f"got {size} bytes, expected {expected_bytes}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shakespeare_path(cache_dir: str, log=print) -> str:
    """The cached corpus, downloaded first unless a file of the right size is already there."""
    path = os.path.join(cache_dir, DATA_FILE)
    if os.path.isfile(path) and os.path.getsize(path) == DATA_BYTES:
        return path
    log(f"downloading Tiny Shakespeare from {DATA_URL} to {path}")
    try:
        download(DATA_URL, path, DATA_BYTES)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"cannot download Tiny Shakespeare from {DATA_URL} ({reason}); pass "
                         f"--data PATH to a local UTF-8 text file") from None
    return path


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: no such file; pass --data PATH to an existing UTF-8 text file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); convert it to UTF-8") from None


class CharTokenizer:
    """One token per character, over a fixed alphabet (the sorted characters of the corpus)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> List[int]:
        missing = sorted(set(text) - set(self._ids))
        if missing:
            shown = "".join(missing[:10])
            raise UsageError(f"the text has {len(missing)} character(s) outside the model's "
                             f"vocabulary ({shown!r}); use a text in the same alphabet, or --init-from scratch")
        return [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def describe(self) -> dict:
        return {"type": "char", "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's byte-level BPE, from tiktoken or else from transformers (both optional)."""

    vocab_size = 50257

    def __init__(self):
        try:
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
            self.encode = lambda text: enc.encode_ordinary(text)
            self.decode = lambda ids: enc.decode(list(ids))
            return
        except ImportError:
            pass
        except Exception as e:  # tiktoken fetches its BPE files on first use
            raise UsageError(f"tiktoken could not load the GPT-2 BPE files ({_first_line(e)}); "
                             f"connect once to the network, or use --init-from scratch") from None
        try:
            from transformers import GPT2TokenizerFast
            tok = GPT2TokenizerFast.from_pretrained("gpt2")
        except ImportError:
            raise UsageError("--init-from GPT-2 needs its BPE tokenizer: pip install tiktoken "
                             "(or transformers)") from None
        except Exception as e:
            raise UsageError(f"transformers could not load the GPT-2 tokenizer ({_first_line(e)}); "
                             f"pip install tiktoken, or use --init-from scratch") from None
        self.encode = lambda text: tok.encode(text)
        self.decode = lambda ids: tok.decode(list(ids))

    def describe(self) -> dict:
        return {"type": "gpt2-bpe"}


def load_gpt2_tokenizer():
    """GPT-2's BPE tokenizer (a function of its own so tests can stand in a fake one)."""
    return GPT2Tokenizer()


def tokenizer_from(description: dict):
    if description.get("type") == "char":
        return CharTokenizer(description["chars"])
    if description.get("type") == "gpt2-bpe":
        return load_gpt2_tokenizer()
    raise UsageError(f"unknown tokenizer {description!r} in the checkpoint")


@dataclass
class Splits:
    """Token ids of the parts of the text. `adapt` is what the adapters (or --rank 0) train on;
    `base` is what the scratch base is pretrained on; `val` is the held-out last 10%."""
    adapt: torch.Tensor
    val: torch.Tensor
    base: Optional[torch.Tensor] = None


def split_tokens(ids: torch.Tensor, block_size: int, base_split: Optional[float]) -> Splits:
    n_val = int(len(ids) * VAL_FRACTION)
    train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    if base_split is None:
        splits = Splits(adapt=train, val=val)
    else:
        cut = int(len(train) * base_split)
        splits = Splits(base=train[:cut], adapt=train[cut:], val=val)
    for name in ("base", "adapt", "val"):
        part = getattr(splits, name)
        if part is not None and len(part) < block_size + 1:
            raise UsageError(f"the text is too short: its {name} part has {len(part)} tokens, but "
                             f"--block-size {block_size} needs {block_size + 1} in each part "
                             f"({len(ids)} tokens in all); use a longer text or a smaller --block-size")
    return splits


def make_batch(ids: torch.Tensor, starts: torch.Tensor, block_size: int, device) -> tuple:
    """Inputs and next-token targets (B, T) from windows of T + 1 tokens beginning at `starts`."""
    windows = ids[starts[:, None] + torch.arange(block_size + 1)]              # (B, T + 1)
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def eval_starts(n_tokens: int, block_size: int, n_windows: int) -> torch.Tensor:
    """Fixed, evenly spread windows of the held-out split: every evaluation (base, adapted,
    merged, reloaded) sees exactly the same tokens, so their losses compare exactly."""
    last = n_tokens - block_size - 1
    n = min(n_windows, last // block_size + 1)  # no more windows than fit without overlapping
    return torch.linspace(0, last, n).round().long()


# --------------------------------------------------------------------------------------------
# Where and how the run executes: device, precision, processes
# --------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype          # autocast dtype; float32 means no autocast
    rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def log(self, *args, **kwargs) -> None:
        if self.master:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Sum `values` over processes (the identity in a single process)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def setup_runtime(device: str, dtype: str) -> Runtime:
    """Pick the device and precision; join the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank if world > 1 else None)
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    return Runtime(device=dev, dtype=_pick_dtype(dtype, dev), rank=rank, world=world)


def _pick_device(name: str, local_rank: Optional[int]) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
        if local_rank is not None:  # torchrun: one GPU per process
            dev = torch.device("cuda", local_rank)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps, but MPS is not available; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported --device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    return dev


def _pick_dtype(name: str, dev: torch.device) -> torch.dtype:
    if name == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU, and MPS where autocast support still varies by release
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def save_atomic(obj: dict, path: str) -> None:
    """torch.save into a temporary file in the same folder, then rename it over `path`: readers
    see the old file or the new one, never a partial write, even if the process is killed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_out_dir(path: str) -> None:
    """Fail at once, not after minutes of training, when --out-dir cannot take checkpoints."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out-dir {path} cannot hold checkpoints ({e.strerror or e}); pass "
                         f"--out-dir PATH to a writable folder") from None


def read_checkpoint(path: str, what: str, kinds: Sequence[str]) -> dict:
    """A checkpoint of this script, of one of `kinds`, or a one-line UsageError saying why not."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: no such checkpoint; check the path (or --out-dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{what} {path} is not a readable checkpoint ({_first_line(e)}); "
                         f"give a checkpoint this script wrote") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{what} {path} was not written by this script; give one of its checkpoints")
    if ckpt.get("kind") not in kinds:
        hint = " (continue a LoRA run with --resume)" if ckpt.get("kind") == "adapter" else ""
        raise UsageError(f"{what} {path} is a {ckpt.get('kind')!r} checkpoint, but a "
                         f"{' or '.join(map(repr, kinds))} one is needed here{hint}")
    return ckpt


def trainable_weights(model: GPT2LMModel) -> Dict[str, torch.Tensor]:
    """What a run changes: the LoRA tensors, or every weight when there are no adapters."""
    if model.config.lora_attn_dim > 0:
        return _to_cpu(lora_state_dict(model))
    return _to_cpu(model.state_dict())


def _to_cpu(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # lm_head.decoder.weight is wte.weight under another name; storing it again would double
    # the embedding once the tensors are copied off a GPU, and every loader ignores it.
    return {k: v.detach().cpu() for k, v in state_dict.items() if not k.startswith("lm_head.")}


def model_checkpoint(model: GPT2LMModel, kind: str, tokenizer, base: dict, **extra) -> dict:
    weights = (merged_state_dict(model) if kind == "merged" else
               lora_state_dict(model) if kind == "adapter" else model.state_dict())
    config = model.config.to_dict()
    if kind == "merged":
        config.update(lora_attn_dim=0)
    return {"format": FORMAT, "kind": kind, "config": config, "tokenizer": tokenizer.describe(),
            "base": base, "weights": _to_cpu(weights), **extra}


def checkpoint_bytes(obj: dict) -> int:
    """The size `obj` takes on disk, without writing it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def load_model(path: str, device="cpu") -> tuple:
    """(model, tokenizer) from any checkpoint this script writes. An adapter is put back on its
    base: the cached scratch base next to it, or the pretrained weights it names."""
    ckpt = read_checkpoint(path, "checkpoint", kinds=("adapter", "full", "merged", "base", "resume"))
    config = GPT2Config.from_dict(ckpt["config"])
    model = GPT2LMModel(config)
    if config.lora_attn_dim > 0:
        base_weights = _base_weights(ckpt["base"], os.path.dirname(os.path.abspath(path)))
        model.load_weight(base_weights)
    model.load_weight(ckpt["weights"])
    return model.to(device).eval(), tokenizer_from(ckpt["tokenizer"])


def _base_weights(base: dict, folder: str) -> Dict[str, torch.Tensor]:
    source = base["init_from"]
    if source == "scratch":
        return read_checkpoint(os.path.join(folder, base["file"]), "base", kinds=("base",))["weights"]
    if os.path.isfile(source):
        with contextlib.suppress(UsageError):
            return read_checkpoint(source, "base", kinds=("base", "full", "merged"))["weights"]
    return GPT2LMModel.from_pretrained(source).state_dict()


def export_merged(adapter_path: str, out_path: str) -> str:
    """Write the adapted model of `adapter_path` as one plain GPT-2 checkpoint (rank 0, ΔW folded
    into W): inference then costs exactly what the base costs. Loads with load_model(), or with
    GPT2LMModel(GPT2Config.from_dict(c["config"])).load_weight(c["weights"])."""
    model, tokenizer = load_model(adapter_path)
    ckpt = model_checkpoint(model, "merged", tokenizer, base={"init_from": adapter_path})
    save_atomic(ckpt, out_path)
    return out_path


# --------------------------------------------------------------------------------------------
# Models: the scratch base, pretrained GPT-2, the adapted model
# --------------------------------------------------------------------------------------------

def scratch_config(s: dict, vocab_size: int) -> GPT2Config:
    """The base's config. Its context n_ctx is the block size it trains on: generate() then
    never reaches position embeddings that training did not touch."""
    sizes = dict(SCRATCH_PRESETS[s["preset"]])
    sizes.update({k: s[k] for k in ("n_layer", "n_head", "n_embd") if s[k] is not None})
    if s["block_size"] > sizes["n_positions"]:
        raise UsageError(f"--block-size {s['block_size']} is larger than the model's n_positions "
                         f"({sizes['n_positions']}); pass --block-size {sizes['n_positions']} or less")
    sizes["n_ctx"] = s["block_size"]
    try:
        return GPT2Config(vocab_size=vocab_size, **sizes)
    except ValueError as e:
        raise UsageError(f"the base model sizes do not fit: {e} (check --preset/--n-layer/--n-head/--n-embd)") from None


def base_key(config: GPT2Config, s: dict, data_sha: str, world: int) -> str:
    """A hash of everything the scratch base depends on; a change means a new base."""
    recipe = dict(config=config.to_dict(), data=data_sha, base_split=s["base_split"],
                  iters=s["base_iters"], lr=s["base_lr"], warmup=s["warmup"],
                  block_size=s["block_size"], batch_size=s["batch_size"],
                  micro_batches=s["grad_accum"] * world,  # the same samples per step
                  weight_decay=s["weight_decay"], grad_clip=s["grad_clip"], seed=s["seed"])
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def with_lora(base: GPT2LMModel, s: dict) -> GPT2LMModel:
    """The model to train: the base with rank-r adapters on Q and V and everything else frozen,
    or, with --rank 0, the base itself with every weight trainable."""
    if s["rank"] == 0:
        for p in base.parameters():
            p.requires_grad = True
        return base
    config = GPT2Config.from_dict({**base.config.to_dict(), "lora_attn_dim": s["rank"],
                                   "lora_attn_alpha": s["alpha"], "lora_dropout": s["lora_dropout"]})
    model = GPT2LMModel(config).to(next(base.parameters()).device)
    try:
        model.load_weight(base.state_dict())
    except ValueError as e:  # e.g. a base that already holds adapters of another rank
        raise UsageError(f"--init-from {s['init_from']} does not fit --rank {s['rank']}: "
                         f"{_first_line(e)}") from None
    mark_only_lora_as_trainable(model)
    return model


def pretrained_base(s: dict) -> tuple:
    """(model, tokenizer description or None, base info) for --init-from other than scratch."""
    source = s["init_from"]
    if os.path.isfile(source):
        try:
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
        except Exception:
            ckpt = None  # not ours: a plain weights file, for from_pretrained
        if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
            ckpt = read_checkpoint(source, "--init-from", kinds=("base", "full", "merged"))
            try:
                model = GPT2LMModel(GPT2Config.from_dict(ckpt["config"])).load_weight(ckpt["weights"])
            except ValueError as e:
                raise UsageError(f"--init-from {source} is damaged: {_first_line(e)}") from None
            return model, ckpt["tokenizer"], {"init_from": os.path.abspath(source)}
    elif not os.path.isdir(source) and source not in HUB_MODELS:
        raise UsageError(f"--init-from {source}: no such file or folder; give scratch, "
                         f"{', '.join(HUB_MODELS)}, or the path of a checkpoint")
    try:
        model = GPT2LMModel.from_pretrained(source)
    except ValueError as e:
        raise UsageError(f"--init-from {source}: {_first_line(e)}") from None
    except Exception as e:  # the hub download: network, authentication, missing files
        raise UsageError(f"--init-from {source}: cannot fetch the weights ({_first_line(e)}); "
                         f"check the network, or give a local folder") from None
    info = {"init_from": source if source in HUB_MODELS and not os.path.exists(source)
            else os.path.abspath(source)}
    return model, None, info


def check_sizes_fit(config: GPT2Config, s: dict, given: dict) -> None:
    """Sizes asked for on the command line must match a pretrained model's."""
    if given.get("preset") is not None:
        raise UsageError(f"--preset sizes a scratch base only; drop it with --init-from {s['init_from']}")
    for name in ("n_layer", "n_head", "n_embd"):
        if given.get(name) is not None and given[name] != getattr(config, name):
            raise UsageError(f"--{name.replace('_', '-')} {given[name]} does not fit --init-from "
                             f"{s['init_from']}, whose {name} is {getattr(config, name)}; drop the option")
    if s["block_size"] > config.n_ctx:
        limit = (f"n_positions ({config.n_positions})" if config.n_ctx == config.n_positions
                 else f"context n_ctx ({config.n_ctx}, of n_positions {config.n_positions})")
        raise UsageError(f"--block-size {s['block_size']} is larger than the model's {limit}; "
                         f"pass --block-size {config.n_ctx} or less")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak`, then a cosine down to peak/10 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak / 10
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; matrices decay, vectors (biases, norms) don't."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.99))


@torch.no_grad()
def evaluate(model: GPT2LMModel, ids: torch.Tensor, starts: torch.Tensor, s: dict, rt: Runtime) -> float:
    """Mean next-token loss over the fixed held-out windows, shared out among the processes."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in starts[rt.rank::rt.world].split(s["batch_size"]):
        x, y = make_batch(ids, chunk, s["block_size"], rt.device)
        with rt.autocast():
            _, loss = model(x, y)
        total += loss.item() * len(chunk)
        count += len(chunk)
    total, count = rt.all_sum([total, count])
    model.train(was_training)
    return total / count


@dataclass
class TrainState:
    """Everything a run needs to continue exactly: restored by --resume."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: torch.Generator            # draws the batch positions, the same on every process
    step: int = 0
    history: List[dict] = field(default_factory=list)

    def snapshot(self, rt: Runtime) -> dict:
        torch_rng = torch.get_rng_state()  # dropout masks: one stream per process
        if rt.distributed:
            gathered = [None] * rt.world
            torch.distributed.all_gather_object(gathered, torch_rng)
            torch_rng = gathered
        else:
            torch_rng = [torch_rng]
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "history": self.history,
                "rng": {"batches": self.batches.get_state(), "torch": torch_rng,
                        "cuda": torch.cuda.get_rng_state() if rt.device.type == "cuda" else None},
                "world_size": rt.world}

    def restore(self, saved: dict, rt: Runtime) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.step, self.history = saved["step"], list(saved["history"])
        self.batches.set_state(saved["rng"]["batches"])
        if saved["world_size"] == rt.world:
            torch.set_rng_state(saved["rng"]["torch"][rt.rank])
            if saved["rng"]["cuda"] is not None and rt.device.type == "cuda":
                torch.cuda.set_rng_state(saved["rng"]["cuda"])
        else:
            rt.log(f"note: resuming with {rt.world} process(es) instead of {saved['world_size']}: "
                   f"batches are split differently from here on")


def train_step(model: nn.Module, state: TrainState, params: List[nn.Parameter], ids: torch.Tensor,
               s: dict, rt: Runtime, lr: float) -> float:
    """One optimizer step over grad_accum micro-batches per process; returns the mean loss.

    The positions of all micro-batches of all processes are drawn at once from a generator that
    every process holds in the same state; process r takes its own share. So one process with
    --grad-accum 2 sees the same samples per step as two processes with --grad-accum 1."""
    T, accum = s["block_size"], s["grad_accum"]
    starts = torch.randint(len(ids) - T, (accum, rt.world, s["batch_size"]), generator=state.batches)
    total = torch.zeros((), device=rt.device)
    for i in range(accum):
        x, y = make_batch(ids, starts[i, rt.rank], T, rt.device)
        # DDP averages gradients across processes on backward; only the last micro-batch needs it.
        sync = i == accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else model.no_sync():
            with rt.autocast():
                _, loss = model(x, y)
            state.scaler.scale(loss / accum).backward()
        total += loss.detach()
    loss_value = rt.all_sum([total.item() / accum])[0] / rt.world
    if not math.isfinite(loss_value):
        raise TrainingError(f"the loss became {loss_value} at step {state.step + 1}; lower --lr "
                            f"(it was {lr:.2e}) or use --dtype float32, then --resume or start over")
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if s["grad_clip"] > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_value


def train(model: GPT2LMModel, ids: torch.Tensor, val: torch.Tensor, starts: torch.Tensor, s: dict,
          rt: Runtime, *, phase: str, iters: int, lr: float, saved: Optional[dict] = None,
          on_eval=None) -> TrainState:
    """Train the parameters of `model` that require grad for `iters` steps; evaluate (and call
    `on_eval(state, val_loss)`, the checkpoint hook) every --eval-interval steps and at the end."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    state = TrainState(optimizer=make_optimizer(model, lr, s["weight_decay"]),
                       scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16),
                       batches=torch.Generator().manual_seed(s["seed"]))
    if saved is not None:
        state.restore(saved, rt)
    runner = torch.compile(model) if s["compile"] else model
    if rt.distributed:  # frozen weights have requires_grad=False, so DDP leaves them alone
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    tokens_per_step = s["batch_size"] * s["grad_accum"] * rt.world * s["block_size"]
    recent, step_times = [], []
    while state.step < iters:
        t0 = time.perf_counter()
        step_lr = learning_rate(state.step, lr, s["warmup"], iters)
        recent.append(train_step(runner, state, params, ids, s, rt, step_lr))
        state.step += 1
        step_times.append(time.perf_counter() - t0)
        is_eval = state.step % s["eval_interval"] == 0 or state.step == iters
        if is_eval or state.step % s["log_interval"] == 0:
            val_loss = evaluate(model, val, starts, s, rt) if is_eval else None
            train_loss = sum(recent) / len(recent)
            sec = sum(step_times[-20:]) / len(step_times[-20:])
            rt.log(f"[{phase}] step {state.step:>5}/{iters} | train {train_loss:.4f} | val "
                   + (f"{val_loss:.4f}" if val_loss is not None else "  -   ")
                   + f" | lr {step_lr:.2e} | {1000 * sec:6.0f} ms/step | {tokens_per_step / sec:7.0f} tok/s"
                   f" | {_duration((iters - state.step) * sec)} left")
            recent = []
            if is_eval:
                state.history.append({"step": state.step, "train_loss": train_loss, "val_loss": val_loss})
                if on_eval is not None:
                    on_eval(state, val_loss)
    return state


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where the last intact checkpoint is, for the message after an interruption."""
    resume_path: Optional[str] = None
    step: Optional[int] = None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the script; returns the numbers of the final report (for tests and notebooks).

    Raises UsageError (bad input), TrainingError (non-finite loss) or Interrupted."""
    given = parse_settings(argv)
    s, resume_state = resolve_settings(given)
    rt = setup_runtime(s["device"], s["dtype"])
    progress = Progress()
    try:
        return run(s, given, resume_state, rt, progress)
    except KeyboardInterrupt:
        where = (f"the checkpoint of step {progress.step} in {progress.resume_path} is intact; "
                 f"continue with --resume" if progress.step is not None else "no checkpoint was written yet")
        raise Interrupted(f"interrupted: {where}") from None
    finally:
        if rt.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(s: dict, given: dict, resume_state: Optional[dict], rt: Runtime, progress: Progress) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(s["seed"])
    out_dir = s["out_dir"]
    check_out_dir(out_dir)
    text, data_path = load_corpus(s, rt)
    data_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if resume_state is not None and resume_state["settings"]["data_sha"] != data_sha:
        raise UsageError(f"the text differs from the one the run in {s['resume']} trained on; pass "
                         f"the same --data (it was {resume_state['settings']['data']})")
    s = {**s, "data": data_path, "data_sha": data_sha}

    # The base model and its tokenizer.
    if s["init_from"] == "scratch":
        tokenizer = CharTokenizer.from_text(text)
        config = scratch_config(s, tokenizer.vocab_size)
        if resume_state is not None:
            check_resume_fits(resume_state, config, s)
        splits = split_tokens(torch.tensor(tokenizer.encode(text)), s["block_size"], s["base_split"])
        starts = eval_starts(len(splits.val), s["block_size"], s["eval_iters"] * s["batch_size"])
        base, base_info, base_seconds = scratch_base(config, tokenizer, splits, starts, s, data_sha, rt)
    else:
        base, tok_description, base_info = pretrained_base(s)
        tokenizer = tokenizer_from(tok_description) if tok_description else load_gpt2_tokenizer()
        check_sizes_fit(base.config, s, given)
        if resume_state is not None:
            check_resume_fits(resume_state, base.config, s)
        if tokenizer.vocab_size > base.config.vocab_size:
            raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but --init-from "
                             f"{s['init_from']} only {base.config.vocab_size}; use a model with GPT-2's vocabulary")
        splits = split_tokens(torch.tensor(tokenizer.encode(text)), s["block_size"], None)
        starts = eval_starts(len(splits.val), s["block_size"], s["eval_iters"] * s["batch_size"])
        base, base_seconds = base.to(rt.device), 0.0

    # The model to adapt; before any training it computes exactly what the base computes.
    torch.manual_seed(s["seed"])  # the same adapter init on every process
    model = with_lora(base, s)
    if resume_state is not None:
        model.load_weight(resume_state["weights"])
        base_loss = resume_state["base_val_loss"]
    else:
        base_loss = evaluate(model, splits.val, starts, s, rt)
    torch.manual_seed(s["seed"] + rt.rank)  # dropout: its own stream per process
    describe_run(model, splits, base_info, s, rt)
    rt.log(f"held-out loss of the base before adaptation: {base_loss:.4f}")

    kind = "adapter" if s["rank"] > 0 else "full"
    result_path = os.path.join(out_dir, "adapter.pt" if kind == "adapter" else "full.pt")
    resume_path = os.path.join(out_dir, "resume.pt")

    def checkpoint(state: TrainState, val_loss: float) -> None:
        snapshot = state.snapshot(rt)  # a collective: every process takes part
        if rt.master:
            weights = trainable_weights(model)
            save_atomic({"format": FORMAT, "kind": "resume", "settings": s, "config": model.config.to_dict(),
                         "tokenizer": tokenizer.describe(), "base": base_info, "weights": weights,
                         "base_val_loss": base_loss, **snapshot}, resume_path)
            save_atomic(model_checkpoint(model, kind, tokenizer, base_info, step=state.step,
                                         val_loss=val_loss), result_path)
        progress.resume_path, progress.step = resume_path, state.step

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t_adapt = time.perf_counter()
    state = train(model, splits.adapt, splits.val, starts, s, rt, phase="lora" if kind == "adapter" else "full",
                  iters=s["max_iters"], lr=s["lr"],
                  saved=resume_state, on_eval=checkpoint)
    adapt_seconds = time.perf_counter() - t_adapt
    if state.step == 0 or not state.history or state.history[-1]["step"] != state.step:
        checkpoint(state, evaluate(model, splits.val, starts, s, rt))  # --max-iters 0, or nothing new
    rt.barrier()

    report = final_report(model, tokenizer, base_loss, splits, starts, s, rt, result_path, kind,
                          timings=dict(base=base_seconds, adapt=adapt_seconds,
                                       total=time.perf_counter() - t_start))
    report["history"] = state.history
    return report


def load_corpus(s: dict, rt: Runtime) -> tuple:
    """(text, path): --data, or Tiny Shakespeare from the cache, downloaded by process 0 only."""
    path = s["data"]
    if path is None:
        cache_dir = s["cache_dir"] or default_cache_dir()
        error = None
        if rt.master:
            try:
                path = shakespeare_path(cache_dir, log=rt.log)
            except UsageError as e:
                error = str(e)
        if rt.distributed:  # the others wait for the download, and fail with process 0
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise UsageError(error)
        path = os.path.join(cache_dir, DATA_FILE)
    return read_text(path), os.path.abspath(path)


def scratch_base(config: GPT2Config, tokenizer: CharTokenizer, splits: Splits, starts: torch.Tensor,
                 s: dict, data_sha: str, rt: Runtime) -> tuple:
    """The pretrained char-level base: from its cache file, or pretrained now and cached."""
    key = base_key(config, s, data_sha, rt.world)
    name = f"base-{key}.pt"
    path = os.path.join(s["out_dir"], name)
    info = {"init_from": "scratch", "file": name, "key": key}
    if os.path.isfile(path):
        ckpt = read_checkpoint(path, "cached base", kinds=("base",))
        model = GPT2LMModel(config).load_weight(ckpt["weights"]).to(rt.device)
        rt.log(f"using the cached base {path} (pretrained for {s['base_iters']} steps; delete it to redo)")
        return model, info, 0.0

    t0 = time.perf_counter()
    torch.manual_seed(s["seed"])
    model = GPT2LMModel(config).to(rt.device)
    rt.log(f"pretraining a char-level base ({_sizes(config)}, {_millions(model)} parameters) on "
           f"{len(splits.base):,} tokens for {s['base_iters']} steps")
    train(model, splits.base, splits.val, starts, s, rt, phase="base", iters=s["base_iters"], lr=s["base_lr"])
    if rt.master:
        save_atomic(model_checkpoint(model, "base", tokenizer, info, settings=s), path)
        rt.log(f"saved the base to {path}")
    rt.barrier()
    return model, info, time.perf_counter() - t0


def check_resume_fits(saved: dict, config: GPT2Config, s: dict) -> None:
    """The base built now must be the one the checkpoint trained on (sizes, vocabulary). Checked
    before any pretraining; the adapter options were compared with RUN_DEFINING already."""
    now = {k: v for k, v in config.to_dict().items() if not k.startswith("lora_")}
    diff = [f"{k} {saved['config'].get(k)} vs {v}" for k, v in now.items() if saved["config"].get(k) != v]
    if diff:
        raise UsageError(f"the checkpoint {s['resume']} does not fit the model asked for "
                         f"({', '.join(diff)}: checkpoint vs now); resume with the sizes of the run "
                         f"(drop --preset/--n-layer/--n-head/--n-embd), or start a new --out-dir")


def describe_run(model: GPT2LMModel, splits: Splits, base_info: dict, s: dict, rt: Runtime) -> None:
    c = model.config
    what = (f"LoRA rank {c.lora_attn_dim} (alpha {c.lora_attn_alpha:g}) on Q and V"
            if c.lora_attn_dim > 0 else "full fine-tuning (--rank 0)")
    source = "the scratch base" if base_info["init_from"] == "scratch" else base_info["init_from"]
    rt.log(f"adapting {source} ({_sizes(c)}) with {what} on {len(splits.adapt):,} "
           f"tokens; held out: {len(splits.val):,} tokens; device {rt.device}, "
           f"{str(rt.dtype).replace('torch.', '')}, {rt.world} process(es)")


def final_report(model, tokenizer, base_loss, splits, starts, s, rt, result_path, kind, timings) -> dict:
    """The numbers that show what LoRA did, printed by process 0 and returned."""
    adapted_loss = evaluate(model, splits.val, starts, s, rt)
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # A merged, plain GPT-2 must compute what base + adapters compute.
    merged_ckpt = model_checkpoint(model, "merged", tokenizer, {"init_from": result_path})
    merged_model = GPT2LMModel(GPT2Config.from_dict(merged_ckpt["config"])).to(rt.device)
    merged_model.load_weight(merged_ckpt["weights"])
    merged_loss = evaluate(merged_model, splits.val, starts, s, rt)
    del merged_model
    full_bytes = checkpoint_bytes(merged_ckpt)
    if s["merge"] and rt.master:
        save_atomic(merged_ckpt, os.path.join(s["out_dir"], "merged.pt"))
    result_bytes = os.path.getsize(result_path) if rt.master else 0

    report = dict(trainable=n_trainable, total=n_total, result_path=result_path,
                  result_bytes=result_bytes, full_bytes=full_bytes, base_loss=base_loss,
                  adapted_loss=adapted_loss, merged_loss=merged_loss, timings=timings,
                  peak_memory=torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else None)
    if not rt.master:
        return report

    tolerance = 1e-4 if rt.dtype == torch.float32 else 2e-2
    merged_ok = abs(merged_loss - adapted_loss) <= tolerance
    lines = [
        "",
        "=" * 72,
        f"trainable parameters   {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.2f}% of the model)",
        f"checkpoint             {os.path.basename(result_path)} {_bytes(result_bytes)}; a full checkpoint "
        f"{_bytes(full_bytes)} ({100 * result_bytes / full_bytes:.2f}%)",
        f"held-out loss          base {base_loss:.4f} -> {'adapted' if kind == 'adapter' else 'fine-tuned'} "
        f"{adapted_loss:.4f} ({adapted_loss - base_loss:+.4f})",
        f"merged model           held-out loss {merged_loss:.4f}, |merged - unmerged| = "
        f"{abs(merged_loss - adapted_loss):.1e} ({'OK' if merged_ok else 'MISMATCH'})",
        "peak accelerator mem   " + (_bytes(report["peak_memory"]) if report["peak_memory"] is not None
                                      else f"n/a ({rt.device.type})"),
        f"time                   base {_duration(timings['base'])}"
        f"{' (cached)' if timings['base'] == 0 else ''}, adaptation {_duration(timings['adapt'])}, "
        f"total {_duration(timings['total'])}",
        "=" * 72,
    ]
    rt.log("\n".join(lines))
    if s["sample"] > 0:
        report["sample"] = sample_text(model, tokenizer, s, rt)
        rt.log(f"sample ({s['sample']} tokens):\n{report['sample']}")
    return report


@torch.no_grad()
def sample_text(model: GPT2LMModel, tokenizer, s: dict, rt: Runtime) -> str:
    model.eval()
    prompt = tokenizer.encode(s["prompt"]) or [0]
    x = torch.tensor([prompt[-model.config.n_ctx:]], device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(s["seed"])
    out = model.generate(x, s["sample"], temperature=0.8, top_k=200, generator=generator)
    return tokenizer.decode(out[0].tolist())


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _sizes(c: GPT2Config) -> str:
    return f"{c.n_layer} layers, {c.n_head} heads, width {c.n_embd}"


def _millions(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The command: one line and an exit status for every expected failure."""
    # `kill` (SIGTERM) ends the run the way Ctrl-C does, between two atomic checkpoint writes.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as e:  # OSError: e.g. the disk filled up mid-run
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
