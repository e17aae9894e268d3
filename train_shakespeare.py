#!/usr/bin/env python
"""LoRA fine-tuning of GPT-2 on Tiny Shakespeare, from a laptop CPU to several GPUs.

    python train_shakespeare.py --rank 4                     # char-level base, then LoRA (offline)
    python train_shakespeare.py --rank 0 --out-dir out-full  # the same, fine-tuning every weight
    python train_shakespeare.py --init-from gpt2 --rank 8    # adapt GPT-2 (pip install tiktoken)
    python train_shakespeare.py --resume --prompt "ROMEO:"   # go on with the run, or sample it
    torchrun --nproc_per_node=4 train_shakespeare.py ...     # DistributedDataParallel

No character-level GPT-2 is published, so `--init-from scratch` pretrains one on the first half of
the training text, then adapts it on the other half; 10% is held out. --out-dir holds the run
(ckpt.pt) and the cached base."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import urllib.request

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint_formats import base_difference, base_fingerprint
from lora_gpt2 import GPT2Config, GPT2LMModel, lora_state_dict, mark_only_lora_as_trainable

try:
    import fcntl  # locks --out-dir; Windows has none, and runs there go unlocked
except ImportError:
    fcntl = None

DATA_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt")
DATA_BYTES = 1_115_394  # a cached file of another size is fetched again
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FORMAT = "lora-gpt2-shakespeare/2"  # in every checkpoint this script writes
# --resume takes these from the command line, the rest from ckpt.pt
FRESH = ("resume", "overwrite", "out_dir", "device", "dtype", "compile", "sample", "prompt",
         "save_pretrained", "save_adapter")


# ---- Settings: ranges are left to argparse, GPT2Config and torch
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{message} (see --help)")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)"
        no_default = action.default is None or action.default is False
        return action.help if no_default else super()._get_help_string(action)


def _number(low, high=2 ** 62, kind=int):
    def number(text):  # NaN fails every comparison
        if not low <= kind(text) <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {text}")
        return kind(text)
    return number


def parse_settings(argv=None) -> tuple:
    """(settings, checkpoint to resume or None)."""
    p = _Parser(description=__doc__, formatter_class=_Help)
    a, real = p.add_argument, _number(0, 1e300, float)
    a("--init-from", default="scratch", help="scratch, gpt2[-medium|-large|-xl] or a PATH")
    a("--data", help="UTF-8 text (default: Tiny Shakespeare, fetched into data/)")
    a("--out-dir", default="out-shakespeare", help="checkpoints and the cached base")
    a("--resume", action="store_true", help="go on with the run in --out-dir (options given "
      "override it); a finished run is only evaluated and sampled")
    a("--overwrite", action="store_true", help="start anew over a run, reusing its cached base")
    a("--n-layer", type=int, default=4, help="layers of the scratch base")
    a("--n-head", type=int, default=4, help="heads of the scratch base")
    a("--n-embd", type=int, default=128, help="width of the scratch base")
    a("--base-iters", type=_number(0), default=1500, help="pretraining steps of the scratch base")
    a("--base-lr", type=real, default=2e-3, help="peak learning rate of the base")
    a("--rank", type=int, default=4, help="LoRA rank r on Q and V; 0 fine-tunes every weight")
    a("--alpha", type=float, default=16.0, help="LoRA alpha: ΔW is scaled by alpha/r")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    a("--block-size", type=_number(1), default=64, help="context length in tokens")
    a("--batch-size", type=_number(1), default=16, help="sequences per micro-batch, all processes")
    a("--grad-accum", type=_number(1), default=1, help="micro-batches per optimizer step")
    a("--max-iters", type=_number(0), default=1000, help="adaptation steps")
    a("--lr", type=real, help="peak learning rate of adaptation (5e-3; with --rank 0, 5e-4)")
    a("--warmup", type=_number(0), default=50, help="warmup steps before the cosine decay")
    a("--weight-decay", type=real, default=0.01, help="AdamW weight decay of matrices")
    a("--grad-clip", type=real, default=1.0, help="max gradient norm; 0: no clipping")
    a("--eval-interval", type=_number(1), default=100, help="evaluate and checkpoint every N steps")
    a("--eval-iters", type=_number(1), default=8, help="held-out batches per evaluation")
    a("--seed", type=_number(0, 2 ** 32), default=1337, help="of the init, batches and sample")
    a("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    a("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
      help="autocast precision")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--sample", type=_number(0), default=400, help="tokens to generate at the end")
    a("--prompt", default="\n", help="text the sample starts from (default: %(default)r)")
    a("--save-pretrained", metavar="DIR", help="also write a Hugging Face GPT-2 folder, ΔW merged")
    a("--save-adapter", metavar="DIR", help="also write the adapters as a PEFT adapter folder")
    argv = sys.argv[1:] if argv is None else list(argv)
    s, resume = p.parse_args(argv), None
    path = os.path.join(s.out_dir, "ckpt.pt")
    if os.path.isfile(s.out_dir):  # checked by every process
        raise ValueError(f"--out-dir {s.out_dir} is a file; pass a folder")
    if s.resume:
        resume = read_checkpoint(path, "ckpt")
        saved = resume["settings"]
        s = p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in saved.items()
                          if k not in FRESH and v is not None] + argv)
        for k in ("block_size", "n_layer", "n_head", "n_embd", "rank", "alpha"):
            if getattr(s, k) != saved.get(k, getattr(s, k)):
                raise ValueError(f"--{k.replace('_', '-')} {getattr(s, k)}: the run in {s.out_dir} "
                                 f"was trained with {saved[k]}, which --resume keeps")
    elif not s.overwrite and os.path.isfile(path):
        raise ValueError(f"--out-dir {s.out_dir} holds a run: --resume it, or start over with "
                         f"--overwrite or in another --out-dir")
    s.lr = s.lr if s.lr is not None else 5e-3 if s.rank > 0 else 5e-4  # adapters take a larger step
    return s, resume


# ---- Data
def read_text(s, rt) -> str:
    """--data, or Tiny Shakespeare: fetched by process 0 unless cached."""
    path = s.data or os.path.join(CACHE_DIR, "tinyshakespeare.txt")
    if not (s.data or rt.rank or os.path.isfile(path) and os.path.getsize(path) == DATA_BYTES):
        rt.log(f"downloading Tiny Shakespeare from {DATA_URL} to {path}")
        part = path + ".part"  # under its real name, the corpus is whole or absent
        try:
            os.makedirs(CACHE_DIR, exist_ok=True)
            urllib.request.urlretrieve(DATA_URL, part)
            if os.path.getsize(part) != DATA_BYTES:
                raise OSError(f"got {os.path.getsize(part)} bytes")
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise OSError(f"cannot download {DATA_URL} ({getattr(e, 'reason', e)}); pass --data "
                          f"PATH") from None
        os.replace(part, path)
    if rt.world > 1:
        dist.barrier()
    if not os.path.isfile(path):  # a FIFO or a device would block
        why = "not a regular file" if os.path.exists(path) else "no such file"
        raise ValueError(f"--data {path}: {why}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"--data {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path} is not UTF-8 ({e})") from None


@functools.cache
def gpt2_bpe() -> tuple:
    """(encode, decode) of GPT-2's BPE, from tiktoken."""
    try:
        import tiktoken
    except ImportError:
        raise ValueError("GPT-2's tokenizer needs a package: pip install tiktoken") from None
    try:
        bpe = tiktoken.get_encoding("gpt2")
    except Exception as e:  # e.g. offline
        raise OSError(f"tiktoken cannot load GPT-2's tokenizer ({one_line(e)}): go online once, or "
                      f"copy its $TIKTOKEN_CACHE_DIR here") from None
    return bpe.encode_ordinary, bpe.decode


def encode(tokenizer: dict, text: str, what: str) -> list:
    """Token ids: one per character of the corpus's alphabet, or GPT-2's BPE."""
    if tokenizer["type"] != "char":
        return gpt2_bpe()[0](text)
    ids = {c: i for i, c in enumerate(tokenizer["chars"])}
    unknown = "".join(set(text) - set(ids))
    if unknown:
        raise ValueError(f"{what} has characters outside the corpus's alphabet: {unknown[:10]!r}")
    return [ids[c] for c in text]


def split(ids: torch.Tensor, s, scratch: bool) -> tuple:
    """(base, adapt, val, windows): all evaluations see the same held-out windows."""
    n_train = len(ids) - len(ids) // 10
    cut = n_train // 2 if scratch else 0
    parts = {"base": ids[:cut], "adapt": ids[cut:n_train], "val": ids[n_train:]}
    for name, part in parts.items():
        if (scratch or name != "base") and len(part) < s.block_size + 1:
            raise ValueError(f"the text is too short: its {name} part has {len(part)} tokens, "
                             f"--block-size {s.block_size} needs {s.block_size + 1}")
    last = len(parts["val"]) - s.block_size - 1
    n = min(s.eval_iters * s.batch_size, last // s.block_size + 1)  # windows do not overlap
    return *parts.values(), torch.linspace(0, last, n).round().long()


def batch(ids: torch.Tensor, starts: torch.Tensor, s, rt) -> tuple:
    """Inputs and targets (B, T) from the windows at `starts`."""
    windows = ids[starts[:, None] + torch.arange(s.block_size + 1)].to(rt.device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


# ---- Device, precision, processes: process 0 alone prints and writes
def setup_runtime(s) -> argparse.Namespace:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if s.batch_size % world:
        raise ValueError(f"--batch-size {s.batch_size} does not split over {world} processes")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    dev = torch.device(s.device if s.device != "auto" else "cuda" if cuda else "mps" if mps else
                       "cpu")
    if {"cpu": False, "cuda": not cuda, "mps": not mps}.get(dev.type, True):
        raise ValueError(f"--device {s.device} is not available; use auto or cpu")
    if world > 1:  # under torchrun: NCCL with a GPU per process, or Gloo on CPUs
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    auto = torch.float32 if dev.type != "cuda" else (  # MPS's autocast varies by release
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    dtype = auto if s.dtype == "auto" else getattr(torch, s.dtype)
    log = functools.partial(print, flush=True) if rank == 0 else lambda *args: None
    ctx = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    return argparse.Namespace(device=dev, dtype=dtype, rank=rank, world=world, ctx=ctx, log=log)


# ---- Checkpoints
REQUIRED = {"base": ("config", "tokenizer", "weights"),
            "ckpt": ("phase", "settings", "data_sha", "config", "tokenizer", "base", "weights")}


def save_atomic(obj: dict, path: str) -> None:
    """Write path.tmp, then rename it: readers see the old or the new file, never half."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except RuntimeError as e:  # torch's own write errors, e.g. of a full disk
        raise OSError(f"cannot write {path}: {one_line(e)}") from None


def read_checkpoint(path: str, *kinds: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing file, unpickling and zip errors
        raise ValueError(f"cannot read the checkpoint {path} ({one_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("kind") not in kinds:
        raise ValueError(f"{path} is not a {' or '.join(kinds)} checkpoint of this script")
    missing = [k for k in REQUIRED[ckpt["kind"]] if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return ckpt


def base_file(s, config: GPT2Config, data_sha: str, dtype: torch.dtype) -> str:
    """The scratch base's name: a digest of what makes its weights (not the process count)."""
    recipe = [config.to_dict(), data_sha, str(dtype)] + [getattr(s, k) for k in (
        "base_iters", "base_lr", "warmup", "block_size", "batch_size", "grad_accum", "weight_decay",
        "grad_clip", "seed")]
    return f"base-{hashlib.sha1(repr(recipe).encode()).hexdigest()[:12]}.pt"


@contextlib.contextmanager
def claim(out_dir: str):
    """Hold --out-dir against a second run (the kernel drops a flock with its process)."""
    created, lock_path = not os.path.isdir(out_dir), os.path.join(out_dir, ".lock")
    os.makedirs(out_dir, exist_ok=True)
    try:
        with open(lock_path, "w") as lock:
            if fcntl is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ValueError(f"another run is using --out-dir {out_dir}") from None
                for name in os.listdir(out_dir):  # the leftovers of a killed save
                    if name.endswith(".tmp"):
                        os.remove(os.path.join(out_dir, name))
            yield
    finally:
        if created and os.listdir(out_dir) == [".lock"]:  # a refused run leaves nothing
            os.remove(lock_path)
            os.rmdir(out_dir)


def load_model(path: str) -> tuple:
    """(model in eval mode, tokenizer) from a ckpt.pt or base-*.pt, on its very base."""
    ckpt = read_checkpoint(path, "ckpt", "base")
    model = GPT2LMModel(GPT2Config.from_dict(ckpt["config"]))
    if model.config.lora_attn_dim > 0:
        info = ckpt["base"]
        base = (GPT2LMModel.from_pretrained(info["source"]) if info["source"] != "scratch" else
                load_model(os.path.join(os.path.dirname(path), info["file"]))[0])
        check_base(base, info)
        model.load_weight(base.state_dict())
    return model.load_weight(ckpt["weights"]).eval(), ckpt["tokenizer"]


def pretrained(source: str) -> GPT2LMModel:
    """GPT-2 weights, refusing this script's own checkpoints with what to do."""
    try:
        return GPT2LMModel.from_pretrained(source)
    except ValueError as e:
        try:
            read_checkpoint(source, "ckpt", "base")
        except ValueError:
            raise e from None
    raise ValueError(f"--init-from {source} is a checkpoint of this script, not GPT-2 weights; "
                     f"--resume --out-dir {os.path.dirname(source) or '.'} samples or exports it")


def check_base(base: GPT2LMModel, info: dict | None) -> str:
    """The fingerprint of `base`, refused if `info` records another base."""
    why = info is not None and base_difference(base, info["fingerprint"])
    if why:
        raise ValueError(f"{info.get('file') or info['source']} is not the base the checkpoint "
                         f"was trained on ({why}); restore it, or train anew")
    return base_fingerprint(base)


def check_exports(s) -> None:
    """Refuse an export that cannot be written or would overwrite the base, run or other export."""
    if s.save_adapter and not s.rank:
        raise ValueError("--save-adapter needs adapters (--rank > 0); use --save-pretrained")
    given = {"--save-pretrained": s.save_pretrained, "--save-adapter": s.save_adapter}
    paths = {option: os.path.realpath(path) for option, path in given.items() if path}
    if len(paths) == 2 and os.path.commonpath(list(paths.values())) in paths.values():
        raise ValueError("--save-pretrained and --save-adapter need separate folders")
    base = os.path.realpath(s.init_from) if s.init_from != "scratch" else ""
    for option, path in paths.items():
        if os.path.exists(base) and (os.path.commonpath([path, base]) == base
                                     if os.path.isdir(base) else path == os.path.dirname(base)):
            raise ValueError(f"{option} would write into the --init-from base")
        if path == os.path.realpath(s.out_dir):
            raise ValueError(f"{option} is --out-dir (the checkpoints)")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        try:  # the nearest folder that exists must take a file
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            why = (e.strerror or str(e)).lower()
            raise OSError(f"{option}: cannot write in {parent} ({why})") from None


def trainable_weights(model: nn.Module) -> dict:
    # lm_head is wte under another name: copies off a GPU would store it twice.
    sd = lora_state_dict(model) if model.config.lora_attn_dim > 0 else model.state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if not k.startswith("lm_head.")}


# ---- Training
def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak`, then a cosine down to peak/10 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.45 * peak * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: GPT2LMModel, val, windows, s, rt) -> tuple:
    """(loss, accuracy) of next-token prediction on the held-out windows."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss x windows, right guesses
    for starts in windows[rt.rank::rt.world].split(s.batch_size):
        x, y = batch(val, starts, s, rt)
        with rt.ctx:
            logits, loss = model(x, y)[:2]
        sums += torch.stack([loss * len(starts), (logits.argmax(-1) == y).sum()])
    if rt.world > 1:
        dist.all_reduce(sums)
    return sums[0].item() / len(windows), sums[1].item() / (len(windows) * s.block_size)


def train(model, ids, val, windows, s, rt, *, phase, iters, lr, save, resume=None) -> tuple:
    """Train what requires grad up to step `iters`, evaluating and saving every --eval-interval
    steps; step k draws from (seed, k), so a resumed run draws what an uninterrupted one drew."""
    params = [p for p in model.parameters() if p.requires_grad]  # matrices decay, vectors do not
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step, history = 0, []
    if resume is not None:
        try:
            model.load_weight(resume["weights"])
            optimizer.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
            step, history = int(resume["step"]), list(resume["history"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{s.out_dir}/ckpt.pt does not fit this run ({one_line(e)})") from None
        rt.log(f"[{phase}] resuming from step {step} of {iters}")
    runner = torch.compile(model) if s.compile else model
    if rt.world > 1:  # frozen weights do not require grad, so DDP leaves them alone
        runner = nn.parallel.DistributedDataParallel(runner)
    losses, t0, evaluation = [], time.perf_counter(), None
    log_interval = min(s.eval_interval, max(1, iters // 10))
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
            sync = rt.world == 1 or i == s.grad_accum - 1  # DDP averages gradients on backward
            with contextlib.nullcontext() if sync else runner.no_sync():
                with rt.ctx:
                    loss = runner(x, y)[1] / s.grad_accum
                scaler.scale(loss).backward()
            total += loss.detach()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else math.inf)
        loss, norm = torch.stack([total, norm.to(total)]).tolist()  # one device sync per step
        finite = math.isfinite(norm) or scaler.is_enabled()  # fp16's scaler skips overflows
        if not (finite and math.isfinite(loss)):
            raise RuntimeError(f"the loss ({loss}) or gradient ({norm}) is not finite at step "
                               f"{step + 1} of the {phase} phase, at lr {step_lr:.1e}, weight "
                               f"decay {s.weight_decay:g}: lower what is too large")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, losses = step + 1, losses + [loss]
        if step % log_interval and step % s.eval_interval and step < iters:
            continue
        sec, train_loss = (time.perf_counter() - t0) / len(losses), sum(losses) / len(losses)
        if rt.world > 1:  # the mean over the processes
            mean = torch.tensor(train_loss, dtype=torch.float64, device=rt.device)
            dist.all_reduce(mean)
            train_loss = mean.item() / rt.world
        line = f"[{phase}] step {step:>5}/{iters} | train {train_loss:.4f} | "
        if step % s.eval_interval == 0 or step == iters:
            evaluation = val_loss, val_accuracy = evaluate(model, val, windows, s, rt)
            line += f"val {val_loss:.4f} | "
            history.append(dict(step=step, train_loss=train_loss, val_loss=val_loss,
                                val_accuracy=val_accuracy))
            save(phase, model, dict(step=step, history=history, optimizer=optimizer.state_dict(),
                                    scaler=scaler.state_dict()))
        rt.log(f"{line}{1000 * sec:5.0f} ms/step | {(iters - step) * sec:.0f}s left")
        losses, t0 = [], time.perf_counter()
    return history, evaluation or evaluate(model, val, windows, s, rt)


# ---- The run
def main(argv=None) -> dict:
    """Run the script; returns its report's figures."""
    s, resume = parse_settings(argv)
    rt = setup_runtime(s)
    last = {k: resume.get(k) for k in ("phase", "step")} if resume else {}
    try:
        with claim(s.out_dir) if rt.rank == 0 else contextlib.nullcontext():
            return run(s, resume, rt, last)
    except KeyboardInterrupt:
        if not last:
            raise KeyboardInterrupt("interrupted before a checkpoint") from None
        raise KeyboardInterrupt(f"interrupted; {s.out_dir}/ckpt.pt has step {last['step']} of the "
                                f"{last['phase']} phase: go on with --resume") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(s, resume, rt, last: dict) -> dict:
    t_start, text = time.perf_counter(), read_text(s, rt)
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    if resume and resume["data_sha"] != data_sha:
        raise ValueError(f"--data is not the text the run in {s.out_dir} trained on")

    # All that can be refused is refused before the first step.
    scratch, adapting = s.init_from == "scratch", resume and resume["phase"] == "adapt"
    base = None if scratch else pretrained(s.init_from)
    chars = "".join(sorted(set(text)))
    tokenizer = {"type": "char", "chars": chars} if scratch else {"type": "gpt2-bpe"}
    config = base.config if base else GPT2Config(  # sampling meets no untrained position
        vocab_size=len(chars), n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
        n_positions=s.block_size, n_ctx=s.block_size)
    ids = torch.tensor(encode(tokenizer, text, "--data"))
    if int(ids.max()) >= config.vocab_size:  # once here, not on every batch
        raise ValueError(f"token id {int(ids.max())} is beyond the vocabulary of {s.init_from}")
    base_ids, adapt_ids, val, windows = split(ids, s, scratch)
    prompt = encode(tokenizer, s.prompt, "--prompt") or [0]
    lora = {"lora_attn_dim": s.rank, "lora_attn_alpha": s.alpha, "lora_dropout": s.lora_dropout}
    lora_config = s.rank and GPT2Config.from_dict({**config.to_dict(), **lora})
    check_exports(s)

    def write(path, kind, model, **more):
        if rt.rank == 0:
            save_atomic(dict(format=FORMAT, kind=kind, config=model.config.to_dict(),
                             tokenizer=tokenizer, weights=trainable_weights(model), **more), path)

    def save(phase, model, state):
        write(os.path.join(s.out_dir, "ckpt.pt"), "ckpt", model, phase=phase, settings=vars(s),
              data_sha=data_sha, base=base_info, **state)
        last.update(phase=phase, step=state["step"])
    base_evaluation = None
    if scratch:
        name = resume["base"]["file"] if adapting else base_file(s, config, data_sha, rt.dtype)
        base_info, path = {"source": "scratch", "file": name}, os.path.join(s.out_dir, name)
        if os.path.isfile(path):
            rt.log(f"using the cached base {path}")
            base = GPT2LMModel(config).load_weight(read_checkpoint(path, "base")["weights"])
        else:
            torch.manual_seed(s.seed)
            base = GPT2LMModel(config).to(rt.device)
            rt.log(f"pretraining a char-level base on {len(base_ids):,} tokens for "
                   f"{s.base_iters} steps")
            base_evaluation = train(base, base_ids, val, windows, s, rt, phase="base",
                                    iters=s.base_iters, lr=s.base_lr,
                                    resume=None if adapting else resume, save=save)[1]
            write(path, "base", base)
    else:  # a path made absolute; a hub name as it is
        source = os.path.abspath(s.init_from) if os.path.exists(s.init_from) else s.init_from
        base_info = {"source": source}
    base_seconds, base = time.perf_counter() - t_start, base.to(rt.device)
    base_info["fingerprint"] = check_base(base, resume["base"] if adapting else None)

    base_loss, base_acc = base_evaluation or evaluate(base, val, windows, s, rt)
    torch.manual_seed(s.seed)  # the same adapter init on every process
    model = base
    if s.rank:
        model = GPT2LMModel(lora_config).to(rt.device).load_weight(base.state_dict())
        mark_only_lora_as_trainable(model)
    base = None  # one copy of the weights in memory, not two
    how = f"LoRA rank {s.rank} on Q and V" if s.rank else "all weights"
    rt.log(f"adapting {base_info['source']} with {how} on {len(adapt_ids):,} tokens; {rt.device}, "
           f"{str(rt.dtype)[6:]}, {rt.world} process(es)")
    t0 = time.perf_counter()
    history, (loss, acc) = train(model, adapt_ids, val, windows, s, rt, phase="adapt",
                                 iters=s.max_iters, lr=s.lr, resume=resume if adapting else None,
                                 save=save)
    now = time.perf_counter()
    figures = dict(base_loss=base_loss, adapted_loss=loss, base_accuracy=base_acc,
                   adapted_accuracy=acc, history=history,
                   seconds=dict(base=base_seconds, adapt=now - t0, total=now - t_start),
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   total=sum(p.numel() for p in model.parameters()))
    if rt.rank == 0:
        report(model, tokenizer, prompt, figures, s, rt, base_info)
    return figures


def report(model: GPT2LMModel, tokenizer: dict, prompt: list, f: dict, s, rt, base: dict) -> None:
    """Print what the adaptation did and a sample; write the exports."""
    t, n, chars = f["seconds"], f["trainable"], tokenizer.get("chars")
    was, now, verb = f["base_loss"], f["adapted_loss"], "adapted" if s.rank else "fine-tuned"
    rt.log("\n".join([
        "", "=" * 72,
        f"trainable parameters   {n:,} of {f['total']:,} ({100 * n / f['total']:.2f}%)",
        f"held-out loss          base {was:.4f} -> {verb} {now:.4f} ({now - was:+.4f})",
        f"accuracy               {100 * f['base_accuracy']:.1f}% -> "
        f"{100 * f['adapted_accuracy']:.1f}% (next token)",
        f"time                   base {t['base']:.0f}s, adaptation {t['adapt']:.0f}s, "
        f"total {t['total']:.0f}s",
        "=" * 72]))
    if s.sample:  # in eval mode since its last evaluation
        x = torch.tensor([prompt[-model.config.n_ctx:]], device=rt.device)
        g = torch.Generator(device=rt.device).manual_seed(s.seed)
        out = model.generate(x, s.sample, temperature=0.8, top_k=200, generator=g)[0].tolist()
        f["sample"] = "".join(chars[i] for i in out) if chars else gpt2_bpe()[1](out)
        rt.log(f"sample ({s.sample} tokens):\n{f['sample']}")
    if s.save_pretrained:
        model.save_pretrained(s.save_pretrained)
    if s.save_adapter:
        name = s.init_from
        if name == "scratch":  # its base goes inside, where the adapter's name for it leads peft
            name = os.path.join(s.save_adapter, "base")
            load_model(os.path.join(s.out_dir, base["file"]))[0].save_pretrained(name)
        model.save_adapter(s.save_adapter, name)
    for folder in filter(None, (s.save_pretrained, s.save_adapter) if chars else ()):
        path = os.path.join(folder, "chars.json")  # token id i is the character chars[i]
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            json.dump({"chars": chars}, file)
        os.replace(path + ".tmp", path)


# ---- The command line
def one_line(e: BaseException) -> str:
    """The first line of an error, less torch's advice to load unsafely."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    cut = text.find("Weights only load failed")
    return text if cut < 0 else text[:cut] + "it holds more than tensors and plain data"


def cli(argv=None, main=main) -> int:
    """One line on stderr and an exit status > 0 for each expected failure."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` acts as Ctrl-C
    try:
        main(argv)
        return 0
    except KeyboardInterrupt as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(cli())
