#!/usr/bin/env python
"""LoRA fine-tuning of GPT-2 on Tiny Shakespeare, from a laptop CPU to several GPUs.

    python train_shakespeare.py --rank 4                   # char-level base, then LoRA (offline)
    python train_shakespeare.py --rank 0                   # the same, fine-tuning every weight
    python train_shakespeare.py --init-from gpt2 --rank 8  # adapt pretrained GPT-2 (BPE tokens)
    python train_shakespeare.py --resume                   # continue the run in --out-dir
    torchrun --nproc_per_node=4 train_shakespeare.py ...   # DistributedDataParallel

With `--init-from scratch` (the default) there is no pretrained character-level GPT-2 to
download, so the script makes one: it pretrains a small base on the first half of the training
text, caches it in --out-dir, freezes it and trains rank-r LoRA on Q and V over the other half.
The last 10% of the text is held out throughout. `--init-from gpt2|gpt2-medium|...|PATH` starts
from pretrained weights (a hub name, a Hugging Face folder or a weights file) and adapts on the
whole training split, in GPT-2's BPE tokens (pip install tiktoken, or transformers).

Files in --out-dir, each a dict of tensors, numbers and strings that torch.load reads with
weights_only=True, written to a temporary file that then replaces the old one:

    base-<key>.pt  the scratch base, reused by every later run with the same base recipe <key>
    ckpt.pt        the run: settings, trained weights (only LoRA's with --rank > 0), optimizer,
                   step, and the fingerprint of its base. --resume continues it; load_model()
                   rebuilds the model from it.

A crash loses at most the work since the last checkpoint (every --eval-interval steps, base
pretraining included). Adapters refuse a base whose weights differ from the one they were
trained on. Nothing executes code on load.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_gpt2 import (HUB_MODELS, GPT2Config, GPT2LMModel, base_fingerprint, lora_state_dict,
                       mark_only_lora_as_trainable)

try:
    import fcntl  # locks --out-dir; Windows has none, and runs there go unlocked
except ImportError:
    fcntl = None

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_BYTES = 1_115_394  # a cached file of another size is fetched again
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FORMAT = "lora-gpt2-shakespeare/2"  # stamped into every checkpoint this script writes
LORA_LR, FULL_LR = 5e-3, 5e-4  # --lr defaults: adapters tolerate (and need) a larger step
# Options about this machine or this invocation rather than the run: --resume takes them from
# the new command line, and every other setting from ckpt.pt unless it is given again.
FRESH = ("resume", "out_dir", "device", "dtype", "compile", "log_interval", "sample", "prompt",
         "save_pretrained", "save_adapter")


class TrainingError(RuntimeError):
    """A non-finite loss or gradient: the run cannot go on."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; the message says what --resume continues from."""


# ---- Settings. Ranges are left to argparse, GPT2Config and torch: cli() makes their errors one line.

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def _integer(low, high=2 ** 62):
    def integer(text):
        if not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {text}")
        return int(text)
    return integer


def build_parser() -> _Parser:
    p = _Parser(description="LoRA fine-tuning of GPT-2 on Tiny Shakespeare (see the top of the file)")
    a = p.add_argument
    a("--init-from", default="scratch", help=f"scratch, {', '.join(HUB_MODELS)} or a PATH")
    a("--data", help="a UTF-8 text file (default: Tiny Shakespeare, downloaded once into data/)")
    a("--out-dir", default="out-shakespeare", help="checkpoints and the cached base")
    a("--resume", action="store_true", help="continue the run in --out-dir (options given override it)")
    a("--n-layer", type=int, help="layers of the scratch base (default 4)")
    a("--n-head", type=int, help="heads of the scratch base (default 4)")
    a("--n-embd", type=int, help="width of the scratch base (default 128; on a GPU try 6/6/384)")
    a("--base-iters", type=_integer(0), default=1500, help="pretraining steps of the scratch base")
    a("--base-lr", type=float, default=2e-3, help="peak learning rate of the base pretraining")
    a("--rank", type=int, default=4, help="LoRA rank r on Q and V; 0 fine-tunes every weight")
    a("--alpha", type=float, default=16.0, help="LoRA alpha: the update is scaled by alpha/r")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    a("--block-size", type=_integer(1), default=128, help="context length in tokens")
    a("--batch-size", type=_integer(1), default=16, help="sequences per micro-batch, all processes together")
    a("--grad-accum", type=_integer(1), default=1, help="micro-batches per optimizer step")
    a("--max-iters", type=_integer(0), default=1000, help="adaptation steps")
    a("--lr", type=float, help=f"peak learning rate of the adaptation ({LORA_LR}; {FULL_LR} with --rank 0)")
    a("--warmup", type=_integer(0), default=50, help="linear warmup steps before the cosine decay")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay of matrices")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; 0 disables")
    a("--eval-interval", type=_integer(1), default=100, help="evaluate and checkpoint every N steps")
    a("--eval-iters", type=_integer(1), default=8, help="held-out batches per evaluation")
    a("--log-interval", type=_integer(1), default=50, help="print progress every N steps")
    a("--seed", type=_integer(0, 2 ** 32), default=1337)
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    a("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="autocast "
      "precision; auto: bfloat16 on GPUs that have it, float16 (scaled) on others, else float32")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--sample", type=_integer(0), default=400, help="tokens to generate at the end")
    a("--prompt", default="\n", help="text the sample starts from")
    a("--save-pretrained", metavar="DIR", help="also write a Hugging Face GPT-2 folder, ΔW merged")
    a("--save-adapter", metavar="DIR", help="also write the adapters as a PEFT adapter folder")
    return p


def parse_settings(argv=None) -> tuple:
    """(settings, the checkpoint to resume or None). As in nanoGPT, ckpt.pt holds the settings
    of its run: --resume reads them as if they came first on the command line."""
    parser, argv = build_parser(), sys.argv[1:] if argv is None else list(argv)
    s, resume = parser.parse_args(argv), None
    if s.resume:
        resume = read_checkpoint(os.path.join(s.out_dir, "ckpt.pt"), "ckpt")
        s = parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in resume["settings"].items()
                               if k not in FRESH and v is not None] + argv)
    s.lr = s.lr if s.lr is not None else LORA_LR if s.rank > 0 else FULL_LR
    return s, resume


# ---- Data: the corpus, tokenizers, splits, batches

def fetch_corpus(path: str, log=print) -> None:
    """Download Tiny Shakespeare to `path` unless it is there whole."""
    if os.path.isfile(path) and os.path.getsize(path) == DATA_BYTES:
        return
    log(f"downloading Tiny Shakespeare from {DATA_URL} to {path}")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=30) as response:
            body = response.read()
        if len(body) != DATA_BYTES:
            raise OSError(f"got {len(body)} bytes, expected {DATA_BYTES}")
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        raise OSError(f"cannot download Tiny Shakespeare from {DATA_URL} ({getattr(e, 'reason', e)}); "
                      f"pass --data PATH to a local UTF-8 text file") from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:  # under its real name, the file is whole or absent
        f.write(body)
    os.replace(path + ".part", path)


def read_text(path: str) -> str:
    if not os.path.isfile(path):  # never open a FIFO or a device: reading one may block for ever
        raise ValueError(f"--data {path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"--data {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); convert it to UTF-8") from None


class CharTokenizer:
    """One token per character of a fixed alphabet: the sorted characters of the corpus."""

    def __init__(self, chars: str):
        self.chars, self.vocab_size, self.ids = chars, len(chars), {c: i for i, c in enumerate(chars)}

    def encode(self, text: str, what: str = "the text") -> list:
        missing = sorted(set(text) - set(self.ids))
        if missing:
            raise ValueError(f"{what} has {len(missing)} character(s) outside the alphabet of the "
                             f"corpus: {''.join(missing[:10])!r}")
        return [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def describe(self) -> dict:
        return {"type": "char", "chars": self.chars}


class BPETokenizer:
    """GPT-2's byte-level BPE, from tiktoken or else transformers, imported only when needed."""

    def __init__(self):
        try:
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
            self._encode, self.decode, self.vocab_size = enc.encode_ordinary, enc.decode, enc.n_vocab
        except ImportError:
            try:
                from transformers import GPT2TokenizerFast
            except ImportError:
                raise ValueError("GPT-2's tokenizer needs a package: pip install tiktoken") from None
            tok = GPT2TokenizerFast.from_pretrained("gpt2")
            self._encode, self.decode, self.vocab_size = tok.encode, tok.decode, len(tok)

    def encode(self, text: str, what: str = "the text") -> list:
        return list(self._encode(text))

    def describe(self) -> dict:
        return {"type": "gpt2-bpe"}


def split(ids: torch.Tensor, s, scratch: bool) -> tuple:
    """(base, adapt, val, windows): val is the last 10%; a scratch base pretrains on the first
    half of the rest and the adaptation trains on the second (without one, on all of it).
    `windows` start the held-out windows every evaluation of the run sees, so figures compare."""
    n_train = len(ids) - len(ids) // 10
    cut = n_train // 2 if scratch else 0
    parts = {"base": ids[:cut], "adapt": ids[cut:n_train], "val": ids[n_train:]}
    for name, part in parts.items():
        if (scratch or name != "base") and len(part) < s.block_size + 1:
            raise ValueError(f"the text is too short: its {name} part has {len(part)} tokens, but "
                             f"--block-size {s.block_size} needs {s.block_size + 1}")
    last = len(parts["val"]) - s.block_size - 1
    n = min(s.eval_iters * s.batch_size, last // s.block_size + 1)  # windows do not overlap
    return parts["base"], parts["adapt"], parts["val"], torch.linspace(0, last, n).round().long()


def batch(ids: torch.Tensor, starts: torch.Tensor, s, rt) -> tuple:
    """Inputs and next-token targets (B, T) from the windows of T + 1 tokens at `starts`."""
    windows = ids[starts[:, None] + torch.arange(s.block_size + 1)].to(rt.device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


# ---- Where the run executes: device, precision, processes. Process 0 alone prints and writes.

@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # of autocast; float32 means none
    rank: int = 0
    world: int = 1

    @classmethod
    def setup(cls, s) -> "Runtime":
        """Pick device and precision; under torchrun, join the process group (NCCL or Gloo)."""
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        if s.batch_size % world:
            raise ValueError(f"--batch-size {s.batch_size} does not split evenly over {world} processes")
        mps = torch.backends.mps.is_available()
        dev = torch.device(s.device if s.device != "auto" else
                           "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
        if {"cpu": False, "cuda": not torch.cuda.is_available(), "mps": not mps}.get(dev.type, True):
            raise ValueError(f"--device {s.device} is not available here; use auto or cpu")
        if world > 1:
            if dev.type == "cuda":
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # a GPU per process
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        auto = torch.float32 if dev.type != "cuda" else (  # MPS too: its autocast still varies
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return cls(dev, auto if s.dtype == "auto" else getattr(torch, s.dtype), rank, world)

    def autocast(self):
        return (contextlib.nullcontext() if self.dtype == torch.float32
                else torch.autocast(self.device.type, dtype=self.dtype))

    def log(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def all_sum(self, values: list) -> list:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


# ---- Checkpoints

REQUIRED = {"base": ("config", "tokenizer", "weights"),
            "ckpt": ("phase", "settings", "data_sha", "config", "tokenizer", "base", "weights",
                     "optimizer", "scaler", "step", "history")}


def save_atomic(obj: dict, path: str) -> None:
    """torch.save into `path`.tmp, then rename that over `path`: readers see the old file or the
    new one, never part of one. A killed save leaves the .tmp, for the next save or claim()."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except RuntimeError as e:  # torch's own write errors, e.g. of a full disk
        raise OSError(f"cannot write {path}: {one_line(e)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ".tmp")


def read_checkpoint(path: str, *kinds: str) -> dict:
    """A checkpoint of this script of one of `kinds`, read as plain data (weights_only)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and zip errors come in many types
        raise ValueError(f"{path} is not a readable checkpoint ({one_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("kind") not in kinds:
        raise ValueError(f"{path} is not a {' or '.join(kinds)} checkpoint of this script")
    missing = [k for k in REQUIRED[ckpt["kind"]] if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return ckpt


@contextlib.contextmanager
def claim(out_dir: str, rt: Runtime):
    """Hold --out-dir for this run, so that a second run into it is refused rather than let
    overwrite it. The kernel drops a flock when its process ends, however it ends."""
    if rt.rank > 0:
        yield
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "w")
    except OSError as e:
        raise OSError(f"--out-dir {out_dir} cannot hold checkpoints ({e.strerror or e})") from None
    with lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another run is using --out-dir {out_dir}; wait for it to end, "
                                 f"or pass another --out-dir") from None
            for leftover in glob.glob(os.path.join(out_dir, "*.tmp")):  # of a killed save
                os.remove(leftover)
        yield


def load_model(path: str, device="cpu") -> tuple:
    """(model, tokenizer) from a ckpt.pt or base-*.pt of this script, in eval mode. Adapters go
    back onto their base, which must be the very one they were trained on."""
    ckpt = read_checkpoint(path, "ckpt", "base")
    model = GPT2LMModel(GPT2Config.from_dict(ckpt["config"]))
    if model.config.lora_attn_dim > 0:
        info = ckpt["base"]
        base = (pretrained(info["source"]) if info["source"] != "scratch" else
                load_model(os.path.join(os.path.dirname(os.path.abspath(path)), info["file"]))[0])
        check_base(base, info, f"the base of {path}")
        model.load_weight(base.state_dict())
    tokenizer = CharTokenizer(ckpt["tokenizer"]["chars"]) if ckpt["tokenizer"]["type"] == "char" else BPETokenizer()
    return model.load_weight(ckpt["weights"]).to(device).eval(), tokenizer


def check_base(base: GPT2LMModel, info: dict | None, what: str) -> str:
    """The fingerprint of `base`, refused if `info` (a checkpoint's record of its base) has another."""
    fingerprint = base_fingerprint(base)
    if info is not None and info["fingerprint"] != fingerprint:
        raise ValueError(f"{what} ({info.get('file') or info['source']}) is not the base the checkpoint "
                         f"was trained on (the weights differ); restore that base, or train anew")
    return fingerprint


def trainable_weights(model: nn.Module) -> dict:
    """What training changes: the LoRA tensors, or every weight without adapters. (lm_head is wte
    under another name: copied off a GPU, it would be stored twice.)"""
    sd = lora_state_dict(model) if model.config.lora_attn_dim > 0 else model.state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if not k.startswith("lm_head.")}


# ---- Models: the scratch base's recipe, a pretrained base, the model to train

def base_key(config: GPT2Config, s, data_sha: str, dtype: torch.dtype) -> str:
    """A hash of all the scratch base's weights depend on, precision included. Not the number of
    processes: a step's samples do not depend on it (see train_step)."""
    recipe = dict(config=config.to_dict(), data=data_sha, dtype=str(dtype), **{
        k: getattr(s, k) for k in ("base_iters", "base_lr", "warmup", "block_size", "batch_size",
                                   "grad_accum", "weight_decay", "grad_clip", "seed")})
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def pretrained(source: str) -> GPT2LMModel:
    """GPT-2 weights for --init-from other than scratch: a hub name, a folder or a file."""
    hub = source in HUB_MODELS and not os.path.exists(source)
    if not hub and not os.path.exists(source):
        raise ValueError(f"--init-from {source}: no such file or folder; give scratch, "
                         f"{', '.join(HUB_MODELS)} or a path")
    try:
        return GPT2LMModel.from_pretrained(source)
    except ValueError:
        raise
    except Exception as e:  # the hub download (network, a missing package), or damaged files
        hint = "check the network, or give a local folder" if hub else "is the folder whole?"
        raise ValueError(f"--init-from {source}: cannot load the weights ({one_line(e)}); {hint}") from None


def with_lora(base: GPT2LMModel, lora_config) -> GPT2LMModel:
    """The base with adapters on Q and V and all else frozen; with --rank 0 (no lora_config),
    the base itself with every weight trainable."""
    if lora_config is None:
        return base.requires_grad_(True)
    model = GPT2LMModel(lora_config).to(next(base.parameters()).device)
    model.load_weight(base.state_dict())
    mark_only_lora_as_trainable(model)
    return model


# ---- Training

def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak`, then a cosine down to peak/10 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.45 * peak * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: GPT2LMModel, val, windows, s, rt: Runtime) -> tuple:
    """(loss, accuracy) of next-token prediction on the held-out windows, which the processes
    share out among themselves."""
    model.eval()
    loss_sum = hits = n = 0.0
    for starts in windows[rt.rank::rt.world].split(s.batch_size):
        x, y = batch(val, starts, s, rt)
        with rt.autocast():
            logits, loss = model(x, y)[:2]
        loss_sum, hits, n = loss_sum + loss.item() * len(starts), hits + (logits.argmax(-1) == y).sum().item(), n + len(starts)
    loss_sum, hits, n = rt.all_sum([loss_sum, hits, n])
    return loss_sum / n, hits / (n * s.block_size)


def train(model: GPT2LMModel, ids, val, windows, s, rt: Runtime, *, phase: str, iters: int, lr: float,
          save, resume: dict | None = None) -> list:
    """Train the weights of `model` that require grad up to step `iters`, continuing checkpoint
    `resume` if given. Every --eval-interval steps and at the end, evaluate and save(state).
    Returns the history of evaluations.

    Each step seeds its random draws from (seed, step), and dropout's also from the process, so
    a resumed run draws what the uninterrupted one drew. The processes draw the same batch
    positions and each takes its share: a step's samples do not depend on their number."""
    params = [p for p in model.parameters() if p.requires_grad]  # matrices decay, vectors do not
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step, history = 0, []
    if resume is not None:
        try:
            model.load_weight(resume["weights"])
            optimizer.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
            step, history = int(resume["step"]), list(resume["history"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{s.out_dir}/ckpt.pt does not fit this run ({one_line(e)}); start "
                             f"a new run in another --out-dir") from None
    runner = torch.compile(model) if s.compile else model
    if rt.world > 1:  # frozen weights do not require grad, so DDP leaves them alone
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    losses, t0 = [], time.perf_counter()
    while step < iters:
        model.train()
        step_lr = learning_rate(step, lr, s.warmup, iters)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        starts = torch.randint(len(ids) - s.block_size, (s.grad_accum, s.batch_size),
                               generator=torch.Generator().manual_seed(s.seed + step))
        torch.manual_seed(s.seed + step + 1_000_003 * (rt.rank + 1))
        total = torch.zeros((), device=rt.device)
        for i in range(s.grad_accum):
            x, y = batch(ids, starts[i, rt.rank::rt.world], s, rt)
            # DDP averages gradients over the processes on backward: only the last micro-batch needs it.
            with runner.no_sync() if rt.world > 1 and i < s.grad_accum - 1 else contextlib.nullcontext():
                with rt.autocast():
                    loss = runner(x, y)[1] / s.grad_accum
                scaler.scale(loss).backward()
            total += loss.detach()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else math.inf).item()
        loss = rt.all_sum([total.item()])[0] / rt.world
        if not math.isfinite(loss) or not (math.isfinite(norm) or scaler.is_enabled()):  # float16's scaler skips overflows
            knobs = [f"--{'base-lr' if phase == 'base' else 'lr'} ({step_lr:.1e} at this step)", f"--weight-decay ({s.weight_decay:g})"]
            knobs += [f"--alpha ({s.alpha:g}; the adapters' output is scaled by alpha/rank)"] if phase == "adapt" and s.rank else []
            knobs += [f"--dtype ({str(rt.dtype)[6:]}; float32 has more range)"] if rt.dtype != torch.float32 else []
            raise TrainingError(f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} became "
                                f"{loss if not math.isfinite(loss) else norm} at step {step + 1} of the {phase} "
                                f"phase; check {', '.join(knobs)}; then --resume or start over")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss)
        if step % s.eval_interval == 0 or step == iters or step % s.log_interval == 0:
            sec, train_loss = (time.perf_counter() - t0) / len(losses), sum(losses) / len(losses)
            val_loss = evaluate(model, val, windows, s, rt)[0] if step % s.eval_interval == 0 or step == iters else None
            rt.log(f"[{phase}] step {step:>5}/{iters} | train {train_loss:.4f} | val " + (f"{val_loss:.4f}" if val_loss else "  -   ")
                   + f" | {1000 * sec:5.0f} ms/step | {duration((iters - step) * sec)} left")
            if val_loss is not None:
                history.append(dict(step=step, train_loss=train_loss, val_loss=val_loss))
                save({"step": step, "history": history, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
            losses, t0 = [], time.perf_counter()
    if iters == 0:
        save({"step": 0, "history": history, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
    return history


# ---- The run

def main(argv=None) -> dict:
    """Run the script and return the figures of its report. Raises ValueError (bad input),
    OSError, TrainingError or Interrupted."""
    s, resume = parse_settings(argv)
    rt = Runtime.setup(s)
    last = {"phase": resume.get("phase"), "step": resume.get("step")} if resume else {}
    try:
        with claim(s.out_dir, rt):
            return run(s, resume, rt, last)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: " + (f"{os.path.join(s.out_dir, 'ckpt.pt')} holds step {last['step']} of the "
                          f"{last['phase']} phase; continue with --resume" if last else "nothing was saved yet")) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(s, resume, rt: Runtime, last: dict) -> dict:
    t_start = time.perf_counter()
    path = s.data or os.path.join(CACHE_DIR, "tinyshakespeare.txt")
    if s.data is None and rt.rank == 0:
        fetch_corpus(path, rt.log)
    if rt.world > 1:
        dist.barrier()  # the others wait for the download
    text = read_text(path)
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    if resume and resume["data_sha"] != data_sha:
        raise ValueError(f"--data is not the text the run in {s.out_dir} trained on; give that text")

    # Everything that can be refused is refused here, before the first step.
    scratch, adapting = s.init_from == "scratch", resume is not None and resume["phase"] == "adapt"
    if not scratch and (s.n_layer or s.n_head or s.n_embd):
        raise ValueError("--n-layer, --n-head and --n-embd size a scratch base; drop them with --init-from")
    base = None if scratch else pretrained(s.init_from)
    tokenizer = CharTokenizer("".join(sorted(set(text)))) if scratch else BPETokenizer()
    # A scratch base has exactly --block-size positions: sampling meets no untrained one.
    config = base.config if base else GPT2Config(vocab_size=tokenizer.vocab_size, n_layer=s.n_layer or 4, n_head=s.n_head or 4,
                                                 n_embd=s.n_embd or 128, n_positions=s.block_size, n_ctx=s.block_size)
    ids = torch.tensor(tokenizer.encode(text, "--data"))
    if int(ids.max()) >= config.vocab_size:  # checked once here, not on every batch
        raise ValueError(f"the tokenizer makes token ids up to {int(ids.max())}, beyond the model's "
                         f"vocabulary of {config.vocab_size}")
    base_ids, adapt_ids, val, windows = split(ids, s, scratch)
    prompt = tokenizer.encode(s.prompt, "--prompt") or [0]
    if s.block_size > config.n_ctx:
        raise ValueError(f"--block-size {s.block_size} exceeds the model's context of {config.n_ctx}")
    lora_config = None if s.rank == 0 else GPT2Config.from_dict(
        {**config.to_dict(), "lora_attn_dim": s.rank, "lora_attn_alpha": s.alpha, "lora_dropout": s.lora_dropout})
    for option in ("save_pretrained", "save_adapter"):
        if getattr(s, option) and not hasattr(GPT2LMModel, option):
            raise ValueError(f"--{option.replace('_', '-')} needs GPT2LMModel.{option}, which this lora_gpt2 lacks")
    if s.save_adapter and s.rank == 0:
        raise ValueError("--save-adapter needs adapters (--rank > 0); use --save-pretrained")
    torch.manual_seed(s.seed)

    def save(phase, model, state):
        if rt.rank == 0:
            save_atomic({"format": FORMAT, "kind": "ckpt", "phase": phase, "settings": vars(s), "data_sha": data_sha,
                         "config": model.config.to_dict(), "base": base_info, "tokenizer": tokenizer.describe(),
                         "weights": trainable_weights(model), **state}, os.path.join(s.out_dir, "ckpt.pt"))
        last.update(phase=phase, step=state["step"])

    # The base: pretrained; for scratch the cached one, or one pretrained now (and checkpointed).
    if scratch:
        name = resume["base"]["file"] if adapting else f"base-{base_key(config, s, data_sha, rt.dtype)}.pt"
        base_info, path = {"source": "scratch", "file": name}, os.path.join(s.out_dir, name)
        if os.path.isfile(path):
            rt.log(f"using the cached base {path}")
            base = GPT2LMModel(config).load_weight(read_checkpoint(path, "base")["weights"])
        elif adapting:
            raise ValueError(f"{path}, the base of the run to resume, is missing")
        else:
            torch.manual_seed(s.seed)
            base = GPT2LMModel(config).to(rt.device)
            rt.log(f"pretraining a char-level base ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M "
                   f"parameters) on {len(base_ids):,} tokens for {s.base_iters} steps")
            train(base, base_ids, val, windows, s, rt, phase="base", iters=s.base_iters, lr=s.base_lr,
                  save=lambda state: save("base", base, state), resume=resume)
            if rt.rank == 0:
                save_atomic({"format": FORMAT, "kind": "base", "config": config.to_dict(),
                             "tokenizer": tokenizer.describe(), "weights": trainable_weights(base)}, path)
    else:
        base_info = {"source": s.init_from if s.init_from in HUB_MODELS and not os.path.exists(s.init_from)
                     else os.path.abspath(s.init_from)}
    base_seconds = time.perf_counter() - t_start
    base = base.to(rt.device)
    base_info["fingerprint"] = check_base(base, resume["base"] if adapting else None, "the base now")

    # The adaptation. The base is measured now, on the windows of the report.
    base_loss, base_acc = evaluate(base, val, windows, s, rt)
    torch.manual_seed(s.seed)  # the same adapter init on every process
    model = with_lora(base, lora_config)
    rt.log(f"adapting {base_info['source']} with " + (f"LoRA rank {s.rank} (alpha {s.alpha:g}) on Q and V" if s.rank
           else "every weight trainable (--rank 0)") + f" on {len(adapt_ids):,} tokens; held-out loss of the "
           f"base {base_loss:.4f}; {rt.device}, {str(rt.dtype)[6:]}, {rt.world} process(es)")
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.perf_counter()
    history = train(model, adapt_ids, val, windows, s, rt, phase="adapt", iters=s.max_iters, lr=s.lr,
                    save=lambda state: save("adapt", model, state), resume=resume if adapting else None)
    loss, acc = evaluate(model, val, windows, s, rt)
    figures = dict(base_loss=base_loss, adapted_loss=loss, base_accuracy=base_acc, adapted_accuracy=acc,
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   total=sum(p.numel() for p in model.parameters()), history=history,
                   timings=dict(base=base_seconds, adapt=time.perf_counter() - t0, total=time.perf_counter() - t_start))
    if rt.rank == 0:
        report(model, tokenizer, prompt, figures, s, rt)
    return figures


def report(model: GPT2LMModel, tokenizer, prompt: list, f: dict, s, rt: Runtime) -> None:
    """Print what the adaptation did and a sample; write the exports. (Process 0.)"""
    t = f["timings"]
    memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2 ** 30:.2f} GB" if rt.device.type == "cuda" else ""
    print("\n".join([
        "", "=" * 72,
        f"trainable parameters   {f['trainable']:,} of {f['total']:,} ({100 * f['trainable'] / f['total']:.2f}%)",
        f"held-out loss          base {f['base_loss']:.4f} -> {'adapted' if s.rank else 'fine-tuned'} "
        f"{f['adapted_loss']:.4f} ({f['adapted_loss'] - f['base_loss']:+.4f})",
        f"accuracy               {100 * f['base_accuracy']:.1f}% -> {100 * f['adapted_accuracy']:.1f}% (next token, held out)",
        f"time                   base {duration(t['base'])}, adaptation {duration(t['adapt'])}, total {duration(t['total'])}{memory}",
        "=" * 72]), flush=True)
    model.eval()
    if s.sample:
        x = torch.tensor([prompt[-model.config.n_ctx:]], device=rt.device)
        g = torch.Generator(device=rt.device).manual_seed(s.seed)
        f["sample"] = tokenizer.decode(model.generate(x, s.sample, temperature=0.8, top_k=200, generator=g)[0].tolist())
        print(f"sample ({s.sample} tokens):\n{f['sample']}", flush=True)
    for option in ("save_pretrained", "save_adapter"):
        if getattr(s, option):
            getattr(model, option)(getattr(s, option))
            print(f"wrote {getattr(s, option)}", flush=True)


# ---- Helpers and the command line

def duration(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s" if seconds >= 60 else f"{seconds:.0f}s"


def one_line(e: BaseException) -> str:
    """The first line of an error, without torch's advice to load with weights_only=False (which
    would let the file run code)."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text.split("Weights only load failed")[0] + "it holds more than tensors and plain data" \
        if "Weights only load failed" in text else text


def cli(argv=None) -> int:
    """The command: one line on stderr and a non-zero exit status for every expected failure."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)  # `kill` stops a run as Ctrl-C does
    try:
        main(argv)
        return 0
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(cli())
