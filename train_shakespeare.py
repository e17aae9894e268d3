#!/usr/bin/env python
"""LoRA fine-tuning of GPT-2 on Tiny Shakespeare, from a laptop CPU to several GPUs.

    python train_shakespeare.py --rank 4                     # char-level base, then LoRA (offline)
    python train_shakespeare.py --rank 0 --out-dir out-full  # the same, fine-tuning every weight
    python train_shakespeare.py --init-from gpt2 --rank 8    # adapt GPT-2 (pip install tiktoken)
    python train_shakespeare.py --resume --prompt "ROMEO:"   # go on with the run, or sample it
    torchrun --nproc_per_node=4 train_shakespeare.py ...     # DistributedDataParallel

No character-level GPT-2 is published, so `--init-from scratch` pretrains one on the first half of
the training text, then adapts it on the other half; 10% is held out. --out-dir holds the run
(ckpt.pt) and the cached base.

The main path reads top to bottom: settings, data, device, then run() (base, LoRA, train,
report), the training loop and the report. Run management (checkpoints, the lock on --out-dir,
resume and export checks, the download) follows in its own section, then the command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
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
FRESH = ("resume", "overwrite", "out_dir", "device", "dtype", "compile", "checkpoint_activations",
         "sample", "prompt", "save_pretrained", "save_adapter")
# --resume refuses a change of these: they shape the weights in ckpt.pt
SHAPING = ("block_size", "n_layer", "n_head", "n_embd", "rank", "alpha")


# ---- Settings: ranges are left to argparse, GPT2Config and torch
# argparse's errors are raised, not printed with an exit, so that cli() reports them
# on one line like every other refusal
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"{message} (see --help)")


# help that shows each option's default and keeps the description's line breaks
class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # no "(default: None)" or "(default: False)"
        no_default = action.default is None or action.default is False
        return action.help if no_default else super()._get_help_string(action)


def _number(low, high=2 ** 62, kind=int):
    """An argparse type: a number of `kind` in [low, high]."""
    def number(text):
        # NaN fails every comparison, so it is refused too
        if not low <= kind(text) <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {text}")
        return kind(text)
    return number


def make_parser() -> argparse.ArgumentParser:
    """The command line's options, with their defaults and help."""
    parser = _Parser(description=__doc__, formatter_class=_Help)
    # learning rates, weight decay and clipping: finite, and not negative
    real = _number(0, 1e300, float)
    # the base, the text and the run's folder
    parser.add_argument("--init-from", default="scratch",
                        help="scratch, gpt2[-medium|-large|-xl] or a PATH")
    parser.add_argument("--data", help="UTF-8 text (default: Tiny Shakespeare, fetched into data/)")
    parser.add_argument("--out-dir", default="out-shakespeare",
                        help="checkpoints and the cached base")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the run in --out-dir (options given override it); a "
                             "finished run is only evaluated and sampled")
    parser.add_argument("--overwrite", action="store_true",
                        help="start anew over a run, reusing its cached base")
    # the scratch base
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the scratch base")
    parser.add_argument("--n-head", type=int, default=4, help="heads of the scratch base")
    parser.add_argument("--n-embd", type=int, default=128, help="width of the scratch base")
    parser.add_argument("--base-iters", type=_number(0), default=1500,
                        help="pretraining steps of the scratch base")
    parser.add_argument("--base-lr", type=real, default=2e-3, help="peak learning rate of the base")
    # LoRA
    parser.add_argument("--rank", type=int, default=4,
                        help="LoRA rank r on Q and V; 0 fine-tunes every weight")
    parser.add_argument("--alpha", type=float, default=16.0,
                        help="LoRA alpha: ΔW is scaled by alpha/r")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="dropout on the adapters' input")
    # the schedule
    parser.add_argument("--block-size", type=_number(1), default=64,
                        help="context length in tokens")
    parser.add_argument("--batch-size", type=_number(1), default=16,
                        help="sequences per micro-batch, all processes")
    parser.add_argument("--grad-accum", type=_number(1), default=1,
                        help="micro-batches per optimizer step")
    parser.add_argument("--max-iters", type=_number(0), default=1000, help="adaptation steps")
    parser.add_argument("--lr", type=real,
                        help="peak learning rate of adaptation (5e-3; with --rank 0, 5e-4)")
    parser.add_argument("--warmup", type=_number(0), default=50,
                        help="warmup steps before the cosine decay")
    parser.add_argument("--weight-decay", type=real, default=0.01,
                        help="AdamW weight decay of matrices")
    parser.add_argument("--grad-clip", type=real, default=1.0,
                        help="max gradient norm; 0: no clipping")
    parser.add_argument("--eval-interval", type=_number(1), default=100,
                        help="evaluate and checkpoint every N steps")
    parser.add_argument("--eval-iters", type=_number(1), default=8,
                        help="held-out batches per evaluation")
    parser.add_argument("--seed", type=_number(0, 2 ** 32), default=1337,
                        help="of the init, batches and sample")
    # the machine
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"),
                        help="autocast precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--checkpoint-activations", action="store_true",
                        help="recompute each block's activations in backward: less memory, "
                             "about a third more time per step, the same results")
    # the end of the run
    parser.add_argument("--sample", type=_number(0), default=400,
                        help="tokens to generate at the end")
    parser.add_argument("--prompt", default="\n",
                        help="text the sample starts from (default: %(default)r)")
    parser.add_argument("--save-pretrained", metavar="DIR",
                        help="also write a Hugging Face GPT-2 folder, ΔW merged")
    parser.add_argument("--save-adapter", metavar="DIR",
                        help="also write the adapters as a PEFT adapter folder")
    return parser


def parse_settings(argv=None) -> tuple:
    """(settings, checkpoint to resume or None)."""
    parser = make_parser()
    # the command line alone first: it says whether to resume, and where the run is
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parser.parse_args(argv)
    resume = None
    # the run's checkpoint: its settings, weights and training state
    path = os.path.join(settings.out_dir, "ckpt.pt")
    # checked by every process
    if os.path.isfile(settings.out_dir):
        raise ValueError(f"--out-dir {settings.out_dir} is a file; pass a folder")
    # options that contradict each other are refused before the checkpoint is read
    check_flags(settings, given_options(argv))
    if settings.resume:
        # the run's own settings first, then the command line's over them
        resume = read_checkpoint(path, "ckpt")
        saved = resume["settings"]
        saved_argv = [f"--{key.replace('_', '-')}={value}" for key, value in saved.items()
                      if key not in FRESH and value is not None]
        settings = parser.parse_args(saved_argv + argv)
        check_resumed_settings(settings, resume)
    # a new run never writes over one in --out-dir unless --overwrite says so
    elif not settings.overwrite and os.path.isfile(path):
        refuse_a_second_run(settings.out_dir)
    # adapters take a larger step than full fine-tuning
    if settings.lr is None:
        settings.lr = 5e-3 if settings.rank > 0 else 5e-4
    # a rate that would overflow the optimizer is refused now, not at the first step
    check_learning_rates(settings)
    return settings, resume


# ---- Data
def read_text(settings, runtime) -> str:
    """--data, or Tiny Shakespeare: fetched by process 0 unless cached."""
    # --data as given, or the cached corpus, which counts only if it is whole
    path = settings.data or os.path.join(CACHE_DIR, "tinyshakespeare.txt")
    cached = os.path.isfile(path) and os.path.getsize(path) == DATA_BYTES
    # process 0 fetches the corpus unless it is whole; the others wait until it is there
    if not settings.data and runtime.rank == 0 and not cached:
        download_corpus(path, runtime)
    if runtime.world > 1:
        dist.barrier()
    # a FIFO or a device would block
    if not os.path.isfile(path):
        why = "not a regular file" if os.path.exists(path) else "no such file"
        raise ValueError(f"--data {path}: {why}")
    # the whole file, which must be non-empty UTF-8
    with open(path, "rb") as file:
        raw = file.read()
    if not raw:
        raise ValueError(f"--data {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--data {path} is not UTF-8 ({error})") from None


@functools.cache
def gpt2_bpe() -> tuple:
    """(encode, decode) of GPT-2's BPE, from tiktoken."""
    try:
        # imported here: only GPT-2 bases need tiktoken
        import tiktoken
    except ImportError:
        raise ValueError("GPT-2's tokenizer needs a package: pip install tiktoken") from None
    try:
        # its vocabulary files are downloaded once, then read from tiktoken's cache
        bpe = tiktoken.get_encoding("gpt2")
    except Exception as error:  # e.g. offline
        raise OSError(f"tiktoken cannot load GPT-2's tokenizer ({one_line(error)}): go online "
                      f"once, or copy its $TIKTOKEN_CACHE_DIR here") from None
    return bpe.encode_ordinary, bpe.decode


def encode(tokenizer: dict, text: str, what: str) -> list:
    """Token ids: one per character of the corpus's alphabet, or GPT-2's BPE."""
    # GPT-2's BPE takes any text
    if tokenizer["type"] != "char":
        return gpt2_bpe()[0](text)
    # a character's id is its place in the sorted alphabet; one the corpus lacks has none
    ids = {character: i for i, character in enumerate(tokenizer["chars"])}
    unknown = "".join(set(text) - set(ids))
    if unknown:
        raise ValueError(f"{what} has characters outside the corpus's alphabet: {unknown[:10]!r}")
    return [ids[character] for character in text]


def split(ids: torch.Tensor, settings, scratch: bool) -> tuple:
    """(base, adapt, val, windows): all evaluations see the same held-out windows."""
    # the last tenth of the tokens is held out for evaluation
    n_train = len(ids) - len(ids) // 10
    # a scratch base pretrains on the first half of the training part
    cut = n_train // 2 if scratch else 0
    parts = {"base": ids[:cut], "adapt": ids[cut:n_train], "val": ids[n_train:]}
    # a window is block_size inputs and one more token, the last target; every part in use
    # must hold one (a GPT-2 base pretrains nothing here, so its base part is empty)
    needed = settings.block_size + 1
    for name, part in parts.items():
        if (scratch or name != "base") and len(part) < needed:
            raise ValueError(f"the text is too short: its {name} part has {len(part)} tokens, "
                             f"--block-size {settings.block_size} needs {needed}")
    # evaluation windows spread over the held-out part, and do not overlap
    last = len(parts["val"]) - needed
    n_windows = min(settings.eval_iters * settings.batch_size, last // settings.block_size + 1)
    windows = torch.linspace(0, last, n_windows).round().long()
    return parts["base"], parts["adapt"], parts["val"], windows


def batch(ids: torch.Tensor, starts: torch.Tensor, settings, runtime) -> tuple:
    """Inputs and targets (B, T) from the windows at `starts`."""
    # each row is a window of T + 1 tokens: the targets are the inputs shifted by one
    offsets = torch.arange(settings.block_size + 1)
    windows = ids[starts[:, None] + offsets].to(runtime.device, non_blocking=True)  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


# ---- Device, precision, processes: process 0 alone prints and writes
def setup_runtime(settings) -> argparse.Namespace:
    """(device, dtype, rank, world, autocast, log) of this process."""
    # torchrun sets WORLD_SIZE and RANK; a plain run is process 0 of 1
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    # every process takes an equal share of each batch
    if settings.batch_size % world:
        raise ValueError(f"--batch-size {settings.batch_size} does not split over {world} "
                         f"processes")
    # the device asked for, or the best one present; an absent or unknown type is refused
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if settings.device != "auto":
        device = torch.device(settings.device)
    else:
        device = torch.device("cuda" if cuda else "mps" if mps else "cpu")
    unavailable = {"cpu": False, "cuda": not cuda, "mps": not mps}.get(device.type, True)
    if unavailable:
        raise ValueError(f"--device {settings.device} is not available; use auto or cpu")
    # under torchrun: NCCL with a GPU per process, or Gloo on CPUs
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # autocast to a 16-bit type on CUDA only: MPS's autocast varies by release
    if device.type != "cuda":
        automatic = torch.float32
    elif torch.cuda.is_bf16_supported():
        automatic = torch.bfloat16
    else:
        automatic = torch.float16
    # --dtype overrides the automatic choice
    dtype = automatic if settings.dtype == "auto" else getattr(torch, settings.dtype)
    # process 0 alone prints; autocast is off in float32
    log = functools.partial(print, flush=True) if rank == 0 else lambda *args: None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return argparse.Namespace(device=device, dtype=dtype, rank=rank, world=world,
                              autocast=autocast, log=log)


# ---- The run
def main(argv=None) -> dict:
    """Run the script; returns its report's figures."""
    # the settings are checked before any device or process group is set up
    settings, resume = parse_settings(argv)
    runtime = setup_runtime(settings)
    # the last checkpoint written, for the message of an interrupt
    last = {}
    if resume:
        last = {"phase": resume.get("phase"), "step": resume.get("step")}
    try:
        # process 0 locks --out-dir for the whole run, so that a second run there is refused
        with claim(settings.out_dir) if runtime.rank == 0 else contextlib.nullcontext():
            return run(settings, resume, runtime, last)
    except KeyboardInterrupt:
        # Ctrl-C (or kill, see cli): the message names the checkpoint to go on from
        if not last:
            raise KeyboardInterrupt("interrupted before a checkpoint") from None
        raise KeyboardInterrupt(f"interrupted; {settings.out_dir}/ckpt.pt has step {last['step']} "
                                f"of the {last['phase']} phase: go on with --resume") from None
    finally:
        # the process group is closed however the run ends
        if dist.is_initialized():
            dist.destroy_process_group()


def run(settings, resume, runtime, last: dict) -> dict:
    """Data, base, LoRA, training and report of one run."""
    t_start = time.perf_counter()

    # The data: the text, its tokenizer and its parts.
    text = read_text(settings, runtime)
    # the text's hash ties the run to its data: every process must read the same text, and
    # a resume the text it began with
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    check_same_text(data_sha, settings, runtime)
    if resume and resume["data_sha"] != data_sha:
        raise ValueError(f"--data is not the text the run in {settings.out_dir} trained on")
    scratch = settings.init_from == "scratch"
    # a resumed run is either still pretraining its base, or already adapting
    adapting = resume and resume["phase"] == "adapt"
    # a scratch base reads characters of the text's alphabet; GPT-2 reads its own BPE
    chars = "".join(sorted(set(text)))
    tokenizer = {"type": "char", "chars": chars} if scratch else {"type": "gpt2-bpe"}

    # The base's shape: GPT-2's, or a scratch one whose context is the block size, so that
    # sampling meets no untrained position.
    base = None if scratch else pretrained(settings.init_from)
    if base:
        config = base.config
    else:
        config = GPT2Config(vocab_size=len(chars), n_layer=settings.n_layer,
                            n_head=settings.n_head, n_embd=settings.n_embd,
                            n_positions=settings.block_size, n_ctx=settings.block_size)
    # the rank and block size must fit the base
    check_sizes(settings, config)
    # the whole text as token ids; an empty prompt starts from token 0
    ids = torch.tensor(encode(tokenizer, text, "--data"))
    prompt = encode(tokenizer, settings.prompt, "--prompt") or [0]
    # checked once here, not on every batch
    if int(ids.max()) >= config.vocab_size:
        raise ValueError(f"token id {int(ids.max())} is beyond the vocabulary of "
                         f"{settings.init_from}")
    # the base's, the adaptation's and the held-out tokens, and the evaluation windows
    base_ids, adapt_ids, val, windows = split(ids, settings, scratch)
    # the adapted model's shape: the base's, with LoRA of --rank on Q and V
    lora = {"lora_attn_dim": settings.rank, "lora_attn_alpha": settings.alpha,
            "lora_dropout": settings.lora_dropout}
    lora_config = None
    if settings.rank:
        try:
            lora_config = GPT2Config.from_dict({**config.to_dict(), **lora})
        except ValueError as error:
            raise ValueError(f"--rank {settings.rank}, --alpha {settings.alpha:g}, --lora-dropout "
                             f"{settings.lora_dropout:g}: {error}") from None
    # The scratch base's file: the one the run records once it adapts, else the recipe's name.
    # All that can be refused is refused before the first step.
    base_name = None
    base_path = None
    if scratch:
        if adapting:
            base_name = resume["base"]["file"]
        else:
            base_name = base_file(settings, config, data_sha, runtime.dtype)
        base_path = os.path.join(settings.out_dir, base_name)
        if resume:
            check_resumed_base(resume, base_name, base_path, settings)
    check_exports(settings, runtime.log)

    def write(path, kind, model, **more):
        """A checkpoint of `model`'s trainable weights, by process 0."""
        if runtime.rank == 0:
            save_atomic(dict(format=FORMAT, kind=kind, config=model.config.to_dict(),
                             tokenizer=tokenizer, weights=trainable_weights(model), **more), path)

    def save(phase, model, state):
        """ckpt.pt: the run's settings, its base and its training state."""
        write(os.path.join(settings.out_dir, "ckpt.pt"), "ckpt", model, phase=phase,
              settings=vars(settings), data_sha=data_sha, base=base_info,
              dtype=str(runtime.dtype)[6:], **state)
        last.update(phase=phase, step=state["step"])

    # The base: the cached scratch base, a new one pretrained here, or GPT-2. An adapting run
    # never pretrains (its base's file was checked above), so ckpt.pt never goes back to the
    # base phase.
    base_evaluation = None
    if scratch:
        base_info = {"source": "scratch", "file": base_name}
        # a base of this recipe, pretrained before in --out-dir, is loaded rather than trained again
        if os.path.isfile(base_path):
            runtime.log(f"using the cached base {base_path}")
            weights = read_checkpoint(base_path, "base")["weights"]
            base = GPT2LMModel(config).load_weight(weights)
        else:
            # a new base, the same init on every process, pretrained on the first half
            torch.manual_seed(settings.seed)
            base = GPT2LMModel(config).to(runtime.device)
            runtime.log(f"pretraining a char-level base on {len(base_ids):,} tokens for "
                        f"{settings.base_iters} steps")
            base_evaluation = train(base, base_ids, val, windows, settings, runtime,
                                    phase="base", iters=settings.base_iters, lr=settings.base_lr,
                                    resume=resume, save=save)[1]
            # cached under its recipe's name for later runs
            write(base_path, "base", base)
    else:
        # a path made absolute; a hub name as it is
        if os.path.exists(settings.init_from):
            source = os.path.abspath(settings.init_from)
        else:
            source = settings.init_from
        base_info = {"source": source}
    # the time until the base is ready, reading the data included, for the report
    base_seconds = time.perf_counter() - t_start
    base = base.to(runtime.device)
    # the base's record: an adapting resume must find the very base it was trained on
    base_info["fingerprint"] = check_base(base, resume["base"] if adapting else None)
    # the base's held-out figures, from its last evaluation if it was just pretrained
    base_loss, base_accuracy = base_evaluation or evaluate(base, val, windows, settings, runtime)

    # LoRA: the adapters on a copy of the base, the same init on every process.
    torch.manual_seed(settings.seed)
    # at --rank 0 the base itself is fine-tuned
    model = base
    if settings.rank:
        model = GPT2LMModel(lora_config).to(runtime.device).load_weight(base.state_dict())
        mark_only_lora_as_trainable(model)
    # one copy of the weights in memory, not two
    base = None
    # what is trained, on what, where
    how = f"LoRA rank {settings.rank} on Q and V" if settings.rank else "all weights"
    runtime.log(f"adapting {base_info['source']} with {how} on {len(adapt_ids):,} tokens; "
                f"{runtime.device}, {str(runtime.dtype)[6:]}, {runtime.world} process(es)")

    # Train: the adapters, or every weight at --rank 0, on the other half of the training text.
    t_adapt = time.perf_counter()
    history, (loss, accuracy) = train(model, adapt_ids, val, windows, settings, runtime,
                                      phase="adapt", iters=settings.max_iters, lr=settings.lr,
                                      resume=resume if adapting else None, save=save)
    now = time.perf_counter()

    # Report, sample and export.
    # the report's figures, also returned to the caller; a resumed run that had finished
    # trained nothing, and the report says so
    figures = dict(base_loss=base_loss, adapted_loss=loss, base_accuracy=base_accuracy,
                   adapted_accuracy=accuracy, history=history,
                   seconds=dict(base=base_seconds, adapt=now - t_adapt, total=now - t_start),
                   trained=not adapting or int(resume["step"]) < settings.max_iters,
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   total=sum(p.numel() for p in model.parameters()))
    # process 0 alone prints the report and the sample, and writes the exports
    if runtime.rank == 0:
        report(model, tokenizer, prompt, figures, settings, runtime, base_info)
    return figures


# ---- Training
def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak`, then a cosine down to peak/10 at step `total`."""
    # warmup: from peak/warmup at step 0 up to peak at step warmup - 1
    if step < warmup:
        return peak * (step + 1) / warmup
    # after warmup, progress goes from 0 to 1 at step `total`, and stays at 1 past it; the
    # cosine term falls from 0.9·peak to 0, on top of a floor of peak/10
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.45 * peak * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: GPT2LMModel, val, windows, settings, runtime) -> tuple:
    """(loss, accuracy) of next-token prediction on the held-out windows."""
    # dropout off; the training loop turns it back on at its next step
    model.eval()
    # loss times windows, and right guesses; each process takes every world-th window
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    mine = windows[runtime.rank::runtime.world]
    # batches of up to --batch-size windows: a batch's mean loss counts once per window in it,
    # right guesses once per token
    for starts in mine.split(settings.batch_size):
        inputs, targets = batch(val, starts, settings, runtime)
        with runtime.autocast:
            logits, loss = model(inputs, targets)[:2]
        right = (logits.argmax(-1) == targets).sum()
        sums += torch.stack([loss * len(starts), right])
    # the sums of all processes, then the means over all windows and all tokens
    if runtime.world > 1:
        dist.all_reduce(sums)
    loss = sums[0].item() / len(windows)
    accuracy = sums[1].item() / (len(windows) * settings.block_size)
    return loss, accuracy


def train(model, ids, val, windows, settings, runtime, *, phase, iters, lr, save,
          resume=None) -> tuple:
    """Train what requires grad up to step `iters`, evaluating and saving every --eval-interval
    steps; step k draws from (seed, k), so a resumed run draws what an uninterrupted one drew."""
    # AdamW: matrices decay, vectors do not
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2],
               "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    # float16 needs loss scaling; bfloat16 and float32 do not
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    step = 0
    history = []
    # a resumed run takes the weights, moments and step of its checkpoint
    if resume is not None:
        try:
            model.load_weight(resume["weights"])
            optimizer.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
            step = int(resume["step"])
            history = list(resume["history"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{settings.out_dir}/ckpt.pt does not fit this run "
                             f"({one_line(error)})") from None
        if step >= iters:
            runtime.log(f"[{phase}] the run has done its {iters} steps: nothing to train")
        else:
            runtime.log(f"[{phase}] resuming from step {step} of {iters}")
    # Activation checkpointing changes memory and time, never the numbers.
    model.transformer.checkpoint_activations = settings.checkpoint_activations
    # the compiled or DDP-wrapped model runs the steps; `model` is what is evaluated and saved
    runner = torch.compile(model) if settings.compile else model
    # frozen weights do not require grad, so DDP leaves them alone
    if runtime.world > 1:
        runner = nn.parallel.DistributedDataParallel(runner)
    # the training losses and the time since the last log line
    losses = []
    t_interval = time.perf_counter()
    # the time left comes from the phase so far, not from the last interval alone
    t_phase = t_interval
    first_step = step
    # the last evaluation, returned at the end so that it is not run twice; a log line about
    # ten times a phase, and at least at every evaluation
    evaluation = None
    log_interval = min(settings.eval_interval, max(1, iters // 10))
    while step < iters:
        model.train()
        # the learning rate of this step, on the warmup and cosine schedule
        step_lr = learning_rate(step, lr, settings.warmup, iters)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        # the batch of step k depends on (seed, k) alone, the dropout on (seed, k, rank)
        generator = torch.Generator().manual_seed(settings.seed + step)
        starts = torch.randint(len(ids) - settings.block_size,
                               (settings.grad_accum, settings.batch_size), generator=generator)
        torch.manual_seed(settings.seed + step + 1_000_003 * (runtime.rank + 1))
        # the loss of the step, summed over its micro-batches
        total = torch.zeros((), device=runtime.device)
        for i in range(settings.grad_accum):
            # this process's share of the micro-batch's sequences
            inputs, targets = batch(ids, starts[i, runtime.rank::runtime.world], settings, runtime)
            # DDP averages gradients on the last micro-batch's backward only
            sync = runtime.world == 1 or i == settings.grad_accum - 1
            with contextlib.nullcontext() if sync else runner.no_sync():
                with runtime.autocast:
                    # The loss alone: the head and loss run over chunks of positions, and the
                    # (batch, time, vocabulary) logits are never held.
                    loss = runner(inputs, lm_labels=targets, return_logits=False)[1]
                    # divided, so that the gradients summed over the micro-batches make their mean
                    loss = loss / settings.grad_accum
                scaler.scale(loss).backward()
            total += loss.detach()
        # clip the gradient's norm, then refuse a step that diverged
        scaler.unscale_(optimizer)
        max_norm = settings.grad_clip if settings.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # one device sync per step
        loss, norm = torch.stack([total, norm.to(total)]).tolist()
        # fp16's scaler skips overflowing steps itself
        finite = math.isfinite(norm) or scaler.is_enabled()
        if not (finite and math.isfinite(loss)):
            raise RuntimeError(f"the loss ({loss}) or gradient ({norm}) is not finite at step "
                               f"{step + 1} of the {phase} phase, at lr {step_lr:.1e}, weight "
                               f"decay {settings.weight_decay:g}: lower what is too large")
        # the optimizer's step (which fp16's scaler skips after an overflow), then the gradients
        # are dropped for the next step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss)
        # a line every log interval, an evaluation and a checkpoint every --eval-interval
        if step % log_interval and step % settings.eval_interval and step < iters:
            continue
        # the time per step and the mean training loss since the last line
        seconds_per_step = (time.perf_counter() - t_interval) / len(losses)
        train_loss = sum(losses) / len(losses)
        # the mean over the processes
        if runtime.world > 1:
            mean = torch.tensor(train_loss, dtype=torch.float64, device=runtime.device)
            dist.all_reduce(mean)
            train_loss = mean.item() / runtime.world
        line = f"[{phase}] step {step:>5}/{iters} | train {train_loss:.4f} | "
        # an evaluation, recorded in the history and saved in ckpt.pt: a resume goes on from here
        if step % settings.eval_interval == 0 or step == iters:
            evaluation = evaluate(model, val, windows, settings, runtime)
            val_loss, val_accuracy = evaluation
            line += f"val {val_loss:.4f} | "
            history.append(dict(step=step, train_loss=train_loss, val_loss=val_loss,
                                val_accuracy=val_accuracy))
            save(phase, model, dict(step=step, history=history, optimizer=optimizer.state_dict(),
                                    scaler=scaler.state_dict()))
        seconds_left = (iters - step) * (time.perf_counter() - t_phase) / (step - first_step)
        runtime.log(f"{line}{1000 * seconds_per_step:5.0f} ms/step | {seconds_left:.0f}s left")
        losses = []
        t_interval = time.perf_counter()
    # the last evaluation, or one now if the phase ran no step
    return history, evaluation or evaluate(model, val, windows, settings, runtime)


# ---- Report and exports
def time_line(figures: dict, settings) -> str:
    """What the run's time went to; a resumed finished run trained nothing, and says so."""
    seconds = figures["seconds"]
    if not figures["trained"]:
        return (f"nothing trained (the run had done its {settings.max_iters} steps); "
                f"evaluation {seconds['total']:.0f}s")
    return (f"base {seconds['base']:.0f}s, adaptation {seconds['adapt']:.0f}s, "
            f"total {seconds['total']:.0f}s")


def report(model: GPT2LMModel, tokenizer: dict, prompt: list, figures: dict, settings, runtime,
           base: dict) -> None:
    """Print what the adaptation did and a sample; write the exports."""
    trainable = figures["trainable"]
    chars = tokenizer.get("chars")
    was = figures["base_loss"]
    now = figures["adapted_loss"]
    verb = "adapted" if settings.rank else "fine-tuned"
    # the summary: the share of weights trained, held-out loss and accuracy before and after,
    # and the time
    runtime.log("\n".join([
        "", "=" * 72,
        f"trainable parameters   {trainable:,} of {figures['total']:,} "
        f"({100 * trainable / figures['total']:.2f}%)",
        f"held-out loss          base {was:.4f} -> {verb} {now:.4f} ({now - was:+.4f})",
        f"accuracy               {100 * figures['base_accuracy']:.1f}% -> "
        f"{100 * figures['adapted_accuracy']:.1f}% (next token)",
        f"time                   {time_line(figures, settings)}",
        "=" * 72]))
    # in eval mode since its last evaluation
    if settings.sample:
        # the prompt's last n_ctx tokens, and a generator of its own seeded with --seed, so that
        # the sample does not depend on what ran before
        context = torch.tensor([prompt[-model.config.n_ctx:]], device=runtime.device)
        generator = torch.Generator(device=runtime.device).manual_seed(settings.seed)
        out = model.generate(context, settings.sample, temperature=0.8, top_k=200,
                             generator=generator)[0].tolist()
        # ids back to text: characters, or GPT-2's BPE
        if chars:
            figures["sample"] = "".join(chars[i] for i in out)
        else:
            figures["sample"] = gpt2_bpe()[1](out)
        runtime.log(f"sample ({settings.sample} tokens):\n{figures['sample']}")
    # then the folders asked for
    export(model, settings, runtime, base, chars)


def export(model: GPT2LMModel, settings, runtime, base: dict, chars: str | None) -> None:
    """Write the exports asked for, each folder whole (write_whole), and say what went where."""
    def add_chars(folder):
        # token id i is the character chars[i]
        if chars:
            with open(os.path.join(folder, "chars.json"), "w", encoding="utf-8") as file:
                json.dump({"chars": chars}, file)
    with_chars = ", chars.json" if chars else ""
    if settings.save_pretrained:
        # the merged weights, and the alphabet of a char-level base
        def fill_merged(folder):
            model.save_pretrained(folder)
            add_chars(folder)
        verb = write_whole("--save-pretrained", settings.save_pretrained, fill_merged)
        runtime.log(f"{verb} {settings.save_pretrained}: a Hugging Face GPT-2 folder with ΔW "
                    f"merged (config.json, model.safetensors{with_chars})")
    if settings.save_adapter:
        target = os.path.realpath(settings.save_adapter)
        # a scratch base goes inside, under the path it will have, wherever peft is run from
        scratch = base["source"] == "scratch"
        base_name = os.path.join(target, "base") if scratch else base["source"]

        # the scratch base's weights as a Hugging Face folder, then the adapters and the alphabet
        def fill_adapter(folder):
            if scratch:
                base_path = os.path.join(settings.out_dir, base["file"])
                load_model(base_path)[0].save_pretrained(os.path.join(folder, "base"))
            model.save_adapter(folder, base_name)
            add_chars(folder)
        verb = write_whole("--save-adapter", settings.save_adapter, fill_adapter)
        inside = f", and its base in {os.path.join(settings.save_adapter, 'base')}"
        runtime.log(f"{verb} {settings.save_adapter}: a PEFT adapter (adapter_config.json, "
                    f"adapter_model.safetensors{with_chars}){inside if scratch else ''}")


# ==== Run management: checkpoints, the lock on --out-dir, resume and export checks, download ====

# What each kind of checkpoint must hold
REQUIRED = {"base": ("config", "tokenizer", "weights"),
            "ckpt": ("phase", "settings", "data_sha", "config", "tokenizer", "base", "weights")}


def save_atomic(obj: dict, path: str) -> None:
    """Write path.tmp, then rename it: readers see the old or the new file, never half."""
    try:
        # synced to disk before the rename, so that a crash cannot leave half a file under the
        # real name
        with open(path + ".tmp", "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(path + ".tmp", path)
    except RuntimeError as error:  # torch's own write errors, e.g. of a full disk
        raise OSError(f"cannot write {path}: {one_line(error)}") from None


def read_checkpoint(path: str, *kinds: str) -> dict:
    """A checkpoint of one of `kinds` that this script wrote, or a ValueError naming the file."""
    try:
        # weights_only: tensors and plain data, so that loading a file runs no code from it
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a missing file, unpickling and zip errors
        raise ValueError(f"cannot read the checkpoint {path} ({one_line(error)})") from None
    # this script's format, one of the kinds asked for, with every entry that kind needs
    ours = isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT
    if not ours or checkpoint.get("kind") not in kinds:
        raise ValueError(f"{path} is not a {' or '.join(kinds)} checkpoint of this script")
    missing = [key for key in REQUIRED[checkpoint["kind"]] if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return checkpoint


# The settings that make a scratch base's weights (not the process count): its file's name
# digests them in this order, and --resume in the base phase refuses a change of them.
BASE_RECIPE = ("base_iters", "base_lr", "warmup", "block_size", "batch_size", "grad_accum",
               "weight_decay", "grad_clip", "seed")


def base_file(settings, config: GPT2Config, data_sha: str, dtype: torch.dtype) -> str:
    """The scratch base's name: a digest of what makes its weights."""
    recipe = [config.to_dict(), data_sha, str(dtype)]
    recipe += [getattr(settings, key) for key in BASE_RECIPE]
    return f"base-{hashlib.sha1(repr(recipe).encode()).hexdigest()[:12]}.pt"


# what save_atomic writes ckpt.pt and a cached base through
SAVE_TEMPORARY = re.compile(r"(ckpt|base-[0-9a-f]{12})\.pt\.tmp")


def take_lock(lock) -> bool:
    """Lock the open file `lock` for this process alone, or say False if a run holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def claim(out_dir: str):
    """Hold --out-dir against a second run (the kernel drops a flock with its process)."""
    # whether this run made the folder, so that a refused run can remove it again
    created = not os.path.isdir(out_dir)
    lock_path = os.path.join(out_dir, ".lock")
    os.makedirs(out_dir, exist_ok=True)
    try:
        # an exclusive lock, or a refusal naming the run that holds it
        with open(lock_path, "w") as lock:
            if fcntl is not None:
                if not take_lock(lock):
                    raise ValueError(f"another run is using --out-dir {out_dir} (it is training "
                                     f"now): wait for it, or use another --out-dir")
                # the leftovers of a killed save: this script's own names only (the lock
                # says no other run is writing them)
                for name in os.listdir(out_dir):
                    if SAVE_TEMPORARY.fullmatch(name):
                        os.remove(os.path.join(out_dir, name))
            # the run happens here, with the lock held
            yield
    finally:
        # a refused run leaves nothing
        if created and os.listdir(out_dir) == [".lock"]:
            os.remove(lock_path)
            os.rmdir(out_dir)


def out_dir_is_live(out_dir: str) -> bool:
    """Whether a run holds the lock on `out_dir` now."""
    lock_path = os.path.join(out_dir, ".lock")
    if fcntl is None or not os.path.isfile(lock_path):
        return False
    # a lock this process can take is held by no run; it is let go at once
    with open(lock_path, "a") as lock:
        if not take_lock(lock):
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def refuse_a_second_run(out_dir: str) -> None:
    """The refusal of a new run into an --out-dir that holds one, live or not."""
    if out_dir_is_live(out_dir):
        raise ValueError(f"--out-dir {out_dir} holds a run that is training now (another process "
                         f"holds it): wait for it, or use another --out-dir")
    raise ValueError(f"--out-dir {out_dir} holds a run: --resume it, or start over with "
                     f"--overwrite or in another --out-dir")


# ---- Settings a run cannot take
def given_options(argv: list) -> set:
    """The settings the command line names (not those left at their default)."""
    parser = make_parser()
    # with every default suppressed, parse_args returns only the options given
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_flags(settings, given: set) -> None:
    """Refuse options that contradict each other."""
    if settings.resume and settings.overwrite:
        raise ValueError(f"--resume goes on with the run in --out-dir {settings.out_dir} and "
                         f"--overwrite starts a new one there: give one of them")
    if settings.resume and "init_from" in given:
        raise ValueError(f"--init-from {settings.init_from}: --resume keeps the base of the run in "
                         f"--out-dir {settings.out_dir}; drop --init-from, or adapt another base "
                         f"with --overwrite or in another --out-dir")


def check_resumed_settings(settings, resume: dict) -> None:
    """Refuse what --resume cannot change: the shapes of the weights, and the recipe of a base in
    pretraining (finishing it with another would cache a base of two recipes)."""
    saved = resume["settings"]
    changeless = SHAPING + (BASE_RECIPE if resume["phase"] == "base" else ())
    # a setting the checkpoint does not record is not compared
    for key in changeless:
        if key in saved and getattr(settings, key) != saved[key]:
            option = f"--{key.replace('_', '-')} {getattr(settings, key)}"
            if key in SHAPING:
                raise ValueError(f"{option}: the run in {settings.out_dir} was trained with "
                                 f"{saved[key]}, which --resume keeps")
            raise ValueError(f"{option}: the run in {settings.out_dir} is pretraining its base "
                             f"with {saved[key]}, which --resume keeps; drop the option, or start "
                             f"anew with --overwrite")


def check_learning_rates(settings) -> None:
    """Refuse learning rates that overflow AdamW's float32 arithmetic (its first step moves a
    weight by 10·lr, and weight decay multiplies by 1 - lr·decay)."""
    largest = torch.finfo(torch.float32).max
    limit = largest / 10
    if settings.weight_decay > 0:
        limit = min(limit, largest / settings.weight_decay)
    for option, value in (("--lr", settings.lr), ("--base-lr", settings.base_lr)):
        if value > limit:
            raise ValueError(f"{option} {value:g} overflows the optimizer's float32 arithmetic "
                             f"(with --weight-decay {settings.weight_decay:g}): pass at most "
                             f"{limit:.1e}")


def check_sizes(settings, config: GPT2Config) -> None:
    """Refuse a rank or block size the base cannot take, naming the option."""
    if settings.rank < 0:
        raise ValueError(f"--rank {settings.rank}: must be 0 (fine-tune every weight) or more")
    # ΔW is n_embd × n_embd: a larger rank adds nothing, and its tensors may not fit in memory
    if settings.rank > config.n_embd:
        raise ValueError(f"--rank {settings.rank} exceeds the width {config.n_embd} of the base "
                         f"(ΔW is {config.n_embd}×{config.n_embd}): pass at most {config.n_embd}")
    if settings.block_size > config.n_ctx:
        raise ValueError(f"--block-size {settings.block_size} is longer than the n_ctx = "
                         f"{config.n_ctx} positions of --init-from {settings.init_from}: pass "
                         f"at most {config.n_ctx}")


def check_same_text(data_sha: str, settings, runtime, all_gather=None) -> None:
    """Refuse processes that read different texts: each would train on its own."""
    if runtime.world == 1:
        return
    if all_gather is None:
        all_gather = dist.all_gather_object
    # every process's hash of the text it read, in the order of the ranks
    gathered = [None] * runtime.world
    all_gather(gathered, data_sha)
    others = [rank for rank, sha in enumerate(gathered) if sha != gathered[0]]
    if others:
        raise ValueError(f"--data {settings.data or 'Tiny Shakespeare'}: process {others[0]} read "
                         f"another text than process 0; give every process the same file")


def check_resumed_base(resume: dict, name: str, path: str, settings) -> None:
    """Refuse at once a resume whose scratch base is missing or another: nothing is written."""
    if resume["phase"] == "adapt" and not os.path.isfile(path):
        raise ValueError(f"--resume: {path} is missing, the base the adapters in "
                         f"{settings.out_dir}/ckpt.pt were trained on; restore it, or start anew "
                         f"with --overwrite")
    # the name holds the precision too: another --dtype gives another name
    recorded = resume["base"].get("file")
    if resume["phase"] == "base" and recorded not in (None, name):
        precision = resume.get("dtype")
        if precision:
            began = f"in {precision}; resume with --dtype {precision}"
        else:
            began = "in another precision; resume with the --dtype it began with"
        raise ValueError(f"--dtype {settings.dtype}: the run in {settings.out_dir} is pretraining "
                         f"its base ({recorded}) {began}")


def load_model(path: str) -> tuple:
    """(model in eval mode, tokenizer) from a ckpt.pt or base-*.pt, on its very base."""
    checkpoint = read_checkpoint(path, "ckpt", "base")
    model = GPT2LMModel(GPT2Config.from_dict(checkpoint["config"]))
    # adapters need their base: GPT-2's weights, or the scratch base beside the checkpoint
    if model.config.lora_attn_dim > 0:
        info = checkpoint["base"]
        if info["source"] != "scratch":
            base = GPT2LMModel.from_pretrained(info["source"])
        else:
            base = load_model(os.path.join(os.path.dirname(path), info["file"]))[0]
        check_base(base, info)
        model.load_weight(base.state_dict())
    # then the checkpoint's own weights on top: the adapters, or every weight
    return model.load_weight(checkpoint["weights"]).eval(), checkpoint["tokenizer"]


def pretrained(source: str) -> GPT2LMModel:
    """GPT-2 weights, refusing this script's own checkpoints with what to do."""
    try:
        return GPT2LMModel.from_pretrained(source)
    except ValueError as error:
        try:
            # not GPT-2 weights: if it is a checkpoint of this script, say how to use it; if not,
            # the loader's own error
            read_checkpoint(source, "ckpt", "base")
        except ValueError:
            raise error from None
    raise ValueError(f"--init-from {source} is a checkpoint of this script, not GPT-2 weights; "
                     f"--resume --out-dir {os.path.dirname(source) or '.'} samples or exports it")


def check_base(base: GPT2LMModel, info: dict | None) -> str:
    """The fingerprint of `base`, refused if `info` records another base."""
    # with no record there is nothing to compare; with one, what differs, in words, if anything
    why = info is not None and base_difference(base, info["fingerprint"])
    if why:
        raise ValueError(f"{info.get('file') or info['source']} is not the base the checkpoint "
                         f"was trained on ({why}); restore it, or train anew")
    return base_fingerprint(base)


def check_exports(settings, log=print) -> None:
    """Refuse an export that cannot be written, would overwrite the base or the run, or would
    replace a folder holding anything but an export of its kind; announce a replacement."""
    if settings.save_adapter and not settings.rank:
        raise ValueError("--save-adapter needs adapters (--rank > 0); use --save-pretrained")
    # the two exports go to two folders, neither inside the other
    given = {"--save-pretrained": settings.save_pretrained,
             "--save-adapter": settings.save_adapter}
    paths = {option: os.path.realpath(path) for option, path in given.items() if path}
    if len(paths) == 2 and os.path.commonpath(list(paths.values())) in paths.values():
        raise ValueError("--save-pretrained and --save-adapter need separate folders")
    # the --init-from base, a folder or a file, which no export may write into
    base = os.path.realpath(settings.init_from) if settings.init_from != "scratch" else ""
    for option, path in paths.items():
        # an export inside a base folder, or beside a base file
        if os.path.isdir(base):
            into_base = os.path.commonpath([path, base]) == base
        else:
            into_base = os.path.exists(base) and path == os.path.dirname(base)
        if into_base:
            raise ValueError(f"{option} would write into the --init-from base")
        if path == os.path.realpath(settings.out_dir):
            raise ValueError(f"{option} is --out-dir (the checkpoints)")
        problem = export_problem(option, given[option])
        if problem:
            raise ValueError(problem)
        # the nearest folder that exists must take a file
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        try:
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as error:
            why = (error.strerror or str(error)).lower()
            raise OSError(f"{option}: cannot write in {parent} ({why})") from None
        # a folder export_problem let through that is not empty holds an earlier export
        if os.path.isdir(path) and os.listdir(path):
            log(f"{option} {given[option]} holds an export: the run replaces it whole at the end")


# ---- Exports: a folder is written whole or not at all
# What each export folder may hold; anything else in it is the user's, and refused
EXPORT_NAMES = {"--save-pretrained": ("config.json", "model.safetensors", "chars.json"),
                "--save-adapter": ("adapter_config.json", "adapter_model.safetensors",
                                   "chars.json", "base")}
BASE_NAMES = ("config.json", "model.safetensors")
# the temporary files of checkpoint_formats' _write_folder
WRITE_FOLDER_TEMPORARY = re.compile(r"\.(model\.safetensors|adapter_model\.safetensors|"
                                    r"config\.json|adapter_config\.json)\.\d+\.tmp")
# the other kind's config, which transformers would load as one model with this one
OTHER_KIND = {"--save-pretrained": ("adapter_config.json", "a PEFT adapter"),
              "--save-adapter": ("config.json", "a Hugging Face model")}


def export_problem(option: str, folder: str) -> str | None:
    """Why `folder` cannot take the export of `option`, or None. It must be new, empty, or hold
    only what an export of that kind writes, since the export replaces it whole."""
    if not os.path.lexists(folder):
        return None
    if not os.path.isdir(folder):
        return f"{option} {folder} is a file, not a folder: pass a new or empty folder"
    # refused by name: the other kind's config, or a file where an adapter keeps its base;
    # then anything no export of this kind writes
    names = sorted(os.listdir(folder))
    other_config, other_kind = OTHER_KIND[option]
    if other_config in names:
        return (f"{option} {folder} holds {other_kind} ({other_config}): pass a new or empty "
                f"folder")
    base = os.path.join(folder, "base")
    if option == "--save-adapter" and os.path.lexists(base) and not os.path.isdir(base):
        return (f"{option} {folder} holds a file named base, where an adapter keeps its base "
                f"folder: move it, or pass a new or empty folder")
    foreign = [name for name in names
               if name not in EXPORT_NAMES[option] and not WRITE_FOLDER_TEMPORARY.fullmatch(name)]
    if option == "--save-adapter" and os.path.isdir(base):
        foreign += [f"base/{name}" for name in sorted(os.listdir(base))
                    if name not in BASE_NAMES and not WRITE_FOLDER_TEMPORARY.fullmatch(name)]
    if foreign:
        return (f"{option} {folder} holds {foreign[0]}, which no export writes (an export "
                f"replaces its folder whole): move it, or pass a new or empty folder")
    return None


def process_is_alive(pid: int) -> bool:
    """Whether another process of this id runs (this one's own leftovers are dead ones)."""
    if pid == os.getpid():
        return False
    try:
        # signal 0 only asks whether the process exists; PermissionError says it does, under
        # another user
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def write_whole(option: str, target: str, fill) -> str:
    """Assemble an export in a sibling folder `.NAME.PID.export.tmp` with fill(folder), then put
    it in place by renames: `target` holds the old export, the new one, or (after a kill between
    the two renames) nothing, never a mix. Returns "wrote" or "replaced"."""
    real = os.path.realpath(target)
    parent, name = os.path.split(real)
    os.makedirs(parent, exist_ok=True)
    # the staging folders of killed exports into this target, whose process is gone
    leftover = re.compile(rf"\.{re.escape(name)}\.(\d+)\.(export|old)\.tmp")
    for entry in os.listdir(parent):
        match = leftover.fullmatch(entry)
        if match and not process_is_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry))
    # this process's staging folder, and where the old export waits while they swap
    staging = os.path.join(parent, f".{name}.{os.getpid()}.export.tmp")
    retired = os.path.join(parent, f".{name}.{os.getpid()}.old.tmp")
    os.mkdir(staging)
    replacing = False
    try:
        try:
            # an error here leaves the target as it was
            fill(staging)
        except OSError as error:
            # name the target, not the staging folder
            reason = one_line(error).replace(f"cannot write {staging}: ", "")
            raise OSError(f"cannot write {target}: {reason}") from None
        # checked again: the user may have put a file there during the run
        problem = export_problem(option, target)
        if problem:
            raise ValueError(problem)
        # a non-empty target moves aside first, then the new folder takes its name
        replacing = os.path.isdir(real) and bool(os.listdir(real))
        if replacing:
            os.rename(real, retired)
        # over an empty folder, or where none is
        os.rename(staging, real)
    except BaseException:
        # an interrupt between the renames puts the old export back
        if replacing and os.path.isdir(retired) and not os.path.lexists(real):
            os.rename(retired, real)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # the old export goes only once the new one is in place
    if replacing:
        shutil.rmtree(retired)
    return "replaced" if replacing else "wrote"


def trainable_weights(model: nn.Module) -> dict:
    """What a checkpoint keeps of `model`: its adapters, or every weight at rank 0, on the CPU."""
    if model.config.lora_attn_dim > 0:
        state = lora_state_dict(model)
    else:
        state = model.state_dict()
    # lm_head is wte under another name: copies off a GPU would store it twice
    return {key: value.detach().cpu() for key, value in state.items()
            if not key.startswith("lm_head.")}


def download_corpus(path: str, runtime) -> None:
    """Fetch Tiny Shakespeare to `path`: under its real name, the corpus is whole or absent."""
    runtime.log(f"downloading Tiny Shakespeare from {DATA_URL} to {path}")
    # fetched under a .part name, and renamed only once its size is right
    part = path + ".part"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        urllib.request.urlretrieve(DATA_URL, part)
        if os.path.getsize(part) != DATA_BYTES:
            raise OSError(f"got {os.path.getsize(part)} bytes")
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
        reason = getattr(error, "reason", error)
        raise OSError(f"cannot download {DATA_URL} ({reason}); pass --data PATH") from None
    os.replace(part, path)


# ---- The command line
def one_line(error: BaseException) -> str:
    """The first line of an error, less torch's advice to load unsafely."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    cut = text.find("Weights only load failed")
    if cut < 0:
        return text
    return text[:cut] + "it holds more than tensors and plain data"


def cli(argv=None, main=main) -> int:
    """One line on stderr and an exit status > 0 for each expected failure."""
    # `kill` acts as Ctrl-C
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main(argv)
        return 0
    except KeyboardInterrupt as error:
        print(f"\n{error}", file=sys.stderr)
        # 128 + SIGINT, the shell's status of a run ended by Ctrl-C
        return 130
    except (ValueError, OSError, RuntimeError) as error:
        # expected failures (bad settings or files, a diverged loss): one line, no traceback
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        # the previous handler back, for a program that calls cli() and goes on
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(cli())
