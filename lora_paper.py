#!/usr/bin/env python
"""The LoRA paper's GPT-2 findings in miniature, on train_shakespeare.py's Shakespeare setting.

    python lora_paper.py --data input.txt             # the default run, into out-paper/
    python lora_paper.py --ranks 1,4 --seeds 2        # smaller; train_shakespeare.py's options too

The base is train_shakespeare.py's scratch base (or --init-from), pretrained on the first half of
the text as it is written. The task it is adapted to is a shift such a base can express with a
small update: the same text in lower case (no capitals, speaker names included), scored on the
held-out tenth in lower case. Adapting on the base's own half, the gain is the shift alone, not
more text. Each rank is adapted from --seeds seeds, full fine-tuning at each of --full-lrs (the
best then from the other seeds), and, as a baseline for the subspace comparison, adapters of the
second --phi-ranks rank are trained on a different task: the other half of the text, as written.

What the report checks, and what the paper found on GPT-2 medium and GPT-3:

- The rank sweep (Table 18): held-out loss by rank beside full fine-tuning, mean and spread over
  seeds, every held-out window scored. The paper finds a small r enough: on E2E, r = 4 is within
  0.02 of r = 64. Each rank's share of full fine-tuning's gain, and ||ΔWq|| / ||Wq|| (paper 0.11).
- Subspace similarity phi(i, j) between the top-i directions of one A and the top-j of another
  (Figures 3, 4): the paper finds the top directions of two ranks, or two seeds, shared and the
  rest mostly noise. Beside the trained pairs: adapters trained on other data, random A drawn
  from the covariance of the layer's inputs, and Gaussian A. Only the first of these could show
  the sharing to be the task's rather than the inputs'.
- Amplification (Table 7): ΔW is small, yet large along directions W does not emphasize; the
  factor ||ΔW||_F / ||U^T W V^T||_F was 21.5 at r = 4 in the paper. Ranks small against the
  width, random directions averaged over --draws draws.
- Latency (Table 1): merged LoRA adds nothing to a forward pass; unmerged, two small matmuls.

A scratch base of two layers of width 128 is far from GPT-2 medium: the figures show the
measurements working and their direction, not the paper's magnitudes."""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import time

import torch

import bench_lora_gpt2 as bench
import train_shakespeare as ts
from checkpoint_formats import base_fingerprint
from lora_gpt2 import GPT2Config, GPT2LMModel, mark_only_lora_as_trainable, merge_lora

# train_shakespeare.py's options as this script sets them by default; options given come after.
DEFAULTS = ["--out-dir", "out-paper", "--n-layer", "2", "--block-size", "64", "--base-iters",
            "2000", "--max-iters", "200", "--eval-interval", "100", "--sample", "0"]
# A run's key is made of its other settings, the text and the base; these do not change what a
# run computes.
UNKEYED = ("out_dir", "data", "sample", "prompt", "checkpoint_activations")
# The version of the files this script writes into --out-dir/runs: in every run file and in its
# name's key, so that a file of another version is never read as a run of this one.
RUN_FORMAT = "lora-paper-run/3"
# A finished run's fields and their types. Every run keeps its trained weights: the adapters, or
# all of full fine-tuning's, so that each figure can be computed again from the files.
RUN_FIELDS = dict(task=str, rank=int, seed=int, lr=float, loss=float, accuracy=float,
                  history=list, ms_per_step=float, trainable=int, bytes=int, weights=dict)
# What ts.train needs to go on from an interrupted run's .part file.
PART_FIELDS = dict(step=int, history=list, optimizer=dict, scaler=dict, weights=dict)
# The two tasks: the shift the report is about, and the other data of the subspace baseline.
TASKS = {"lowercase": "the base's half of the text in lower case",
         "other-half": "the other half of the text, as written"}
# The figures this script draws; a run without matplotlib removes those an earlier run drew.
FIGURE_NAMES = ("rank_sweep.png", "subspace_ranks.png", "subspace_seeds.png")
# The paper's figures. Table 18: GPT-2 M on E2E, validation loss by rank.
PAPER_LOSS = {1: 1.23, 2: 1.21, 4: 1.18, 8: 1.17, 16: 1.16, 64: 1.16}
# Table 7: GPT-3, layer 48: ||U^T Wq V^T||_F for U, V of ΔWq, of Wq and random; ||Wq||_F,
# ||ΔWq||_F. The paper states the factor at r = 4 as 21.5 (6.91 / 0.32); at r = 64 the table
# gives 3.57 / 1.90 = 1.88.
PAPER_AMP = {4: [0.32, 21.67, 0.02, 61.95, 6.91], 64: [1.90, 37.71, 0.33, 61.95, 3.57]}
PAPER_FACTOR = {4: "21.5", 64: "1.88"}
# phi is drawn and summarized for the top i <= 8 directions of the first A, as in Figure 3.
PHI_TOP = 8


# ---- Statistics
def spread(values) -> dict:
    """The mean, its standard error (the sample standard deviation over sqrt(n); 0 for one
    value), the lowest and the highest of `values`, and their number."""
    values = [float(v) for v in values]
    count = len(values)
    mean = sum(values) / count
    variance = sum((v - mean) ** 2 for v in values) / (count - 1) if count > 1 else 0.0
    return dict(mean=mean, se=math.sqrt(variance / count), low=min(values), high=max(values),
                n=count)


def differs(first: dict, second: dict) -> bool:
    """Whether two means differ by more than their spread: the sum of their standard errors
    (about two standard errors of the difference) and the gap their ranges leave."""
    gap = abs(first["mean"] - second["mean"])
    ranges_apart = first["high"] < second["low"] or second["high"] < first["low"]
    return gap > first["se"] + second["se"] and ranges_apart


def shown(stats: dict, digits: int = 4) -> str:
    """'mean ± standard error (lowest–highest)', or the value alone for one value."""
    mean = f"{stats['mean']:.{digits}f}"
    if stats["n"] == 1:
        return mean
    return (f"{mean} ± {stats['se']:.{digits}f} "
            f"({stats['low']:.{digits}f}–{stats['high']:.{digits}f})")


# ---- The math
def right_singular(A: torch.Tensor) -> torch.Tensor:
    """U (d, min(r, d)): A's right-singular vectors in columns, largest first."""
    # In float64: the small singular values of a trained A are close, and float32 would order
    # their vectors by rounding.
    return torch.linalg.svd(A.double(), full_matrices=False)[2].T


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """The grid phi[i-1, j-1] = phi(A1, A2, i, j) = ||U_i^T U_j||_F^2 / min(i, j), i <= r1, j <= r2.

    U_i holds the top-i right-singular vectors of A1 (r1, d), U_j the top-j of A2 (r2, d). phi lies
    in [0, 1]: 1 where one subspace holds the other, 0 where they are orthogonal; for random
    subspaces it averages max(i, j) / d. The sign and order of A1's, A2's rows do not change it."""
    overlap = (right_singular(A1).T @ right_singular(A2)) ** 2  # (r1, r2): squared cosines
    # ||U_i^T U_j||_F^2 is the sum of the top-left i x j block: two running sums give every one.
    rows_i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype)  # (r1,)
    columns_j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype)  # (r2,)
    return overlap.cumsum(0).cumsum(1) / torch.minimum(rows_i[:, None], columns_j[None, :])


def top_singular(M: torch.Tensor, r: int) -> tuple:
    """(U (d_out, r), V (r, d_in)): the top-r left- and right-singular vectors of M."""
    U, _, V = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :r], V[:r]


def projected_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W V^T||_F: the size of W in the directions U (output side) and V (input side)."""
    return (U.T @ W.double() @ V.T).norm().item()


def amplification(dW: torch.Tensor, W: torch.Tensor, r: int) -> float:
    """The amplification factor ||dW||_F / ||U^T W V^T||_F, U and V the top-r singular vectors
    of dW: how much larger dW is than W in the directions dW lies in. For dW = c W it is
    |c| ||W||_F / ||W_r||_F, W_r the best rank-r part of W; |c| when W has rank <= r."""
    # A large factor: ΔW amplifies directions that W holds only weakly (the paper: 21.5 at
    # r = 4 on GPT-3), rather than repeating W's own top directions.
    return dW.double().norm().item() / projected_norm(W, *top_singular(dW, r))


def random_directions(d_out: int, d_in: int, r: int, generator) -> tuple:
    """(U (d_out, r), V (r, d_in)) with orthonormal columns and rows, uniformly distributed:
    the QR factors of Gaussian matrices, signs fixed by R's diagonal."""
    def orthonormal(d):
        Q, R = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=torch.float64))
        return Q * torch.sign(torch.diagonal(R))
    return orthonormal(d_out), orthonormal(d_in).T


def random_projected_norm(W: torch.Tensor, r: int, draws: int, generator) -> float:
    """The mean of ||U^T W V^T||_F over `draws` random r-dimensional U and V: how much of W
    directions that know nothing of it hold. Its square averages r^2 ||W||_F^2 / (d_out d_in)."""
    norms = [projected_norm(W, *random_directions(*W.shape, r, generator)) for _ in range(draws)]
    return sum(norms) / draws


def second_moment(inputs: torch.Tensor) -> torch.Tensor:
    """Sigma (d, d) = X^T X / n of the inputs X (n, d), in float64: the gradient of A lies in
    the span of the inputs, weighted so."""
    inputs = inputs.double()
    return inputs.T @ inputs / len(inputs)


def effective_dimensions(sigma: torch.Tensor) -> float:
    """The participation ratio tr(Sigma)^2 / tr(Sigma^2): d for isotropic inputs, k for inputs
    spread evenly over k directions."""
    return (torch.trace(sigma) ** 2 / torch.trace(sigma @ sigma)).item()


def draw_like_inputs(sigma: torch.Tensor, r: int, generator) -> torch.Tensor:
    """A random A (r, d) whose rows are Gaussian with covariance sigma: Z sigma^(1/2)."""
    values, vectors = torch.linalg.eigh(sigma)
    root = vectors * values.clamp(min=0).sqrt() @ vectors.T  # (d, d), symmetric
    return torch.randn(r, len(sigma), generator=generator, dtype=torch.float64) @ root


def phi_summary(grid: torch.Tensor) -> dict:
    """phi(1, 1): the top directions against each other; phi(1, all j): the top direction of
    the first against all of the second; the mean of phi over i <= 8 and every j."""
    return {"phi(1, 1)": grid[0, 0].item(), "phi(1, all j)": grid[0, -1].item(),
            "mean phi": grid[:PHI_TOP].mean().item()}


# ---- The options
def _at_least(low):
    """An argparse type: an integer >= low, or an error naming the range."""
    def number(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return number


def _listed(kind, what):
    """An argparse type: comma-separated values of `kind`, sorted, each once."""
    def values(text):
        try:
            parsed = sorted({kind(value) for value in text.split(",")})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} and commas, e.g. {text.split(',')[0]}"
                                             f" -> 1,4") from None
        return parsed
    return values


def help_text() -> tuple:
    """(description, epilog) of --help: what runs, and the defaults this script gives
    train_shakespeare.py's options."""
    description = (
        "The LoRA paper's GPT-2 findings in miniature, on Tiny Shakespeare.\n\n"
        "It pretrains a base on half of the text, adapts it to the same text in lower case\n"
        "with LoRA at each rank and seed, fine-tunes it in full, and writes report.md and its\n"
        "figures (PNG, with matplotlib) to --out-dir. Finished runs are kept in\n"
        "--out-dir/runs: the same command skips them, and goes on from an interrupted one.")
    # The defaults this script gives train_shakespeare.py's options, one option a line.
    pairs = [DEFAULTS[i:i + 2] for i in range(0, len(DEFAULTS), 2)]
    given = "\n".join(f"  {option} {value}" for option, value in pairs)
    epilog = (
        "train_shakespeare.py's options apply too (see python train_shakespeare.py --help),\n"
        "except --rank, --resume, --save-pretrained and --save-adapter. This script sets:\n"
        f"{given}\n"
        "--lr is LoRA's learning rate, the same at every rank (default 5e-3, with --alpha 16:\n"
        "ΔW is scaled by alpha / r); full fine-tuning's is the best of --full-lrs.\n"
        "--data PATH reads the text from PATH (default: Tiny Shakespeare, fetched into data/).")
    return description, epilog


def parse_options(argv) -> tuple:
    """(this script's options, train_shakespeare.py's settings)."""
    description, epilog = help_text()
    # train_shakespeare.py's parser: errors as ValueErrors, --help with the defaults
    parser = ts._Parser(description=description, epilog=epilog, allow_abbrev=False,
                        formatter_class=ts._Help)
    ranks = _listed(int, "ranks")
    parser.add_argument("--ranks", type=ranks, default="1,4,16,64",
                        help="LoRA ranks of the rank sweep")
    parser.add_argument("--seeds", type=_at_least(2), default=3,
                        help="seeds per rank and for full fine-tuning (--seed, --seed + 1, ...)")
    parser.add_argument("--phi-ranks", type=ranks, default="4,16",
                        help="the two ranks whose A the subspace similarity compares")
    parser.add_argument("--amp-ranks", type=ranks, default="1,4,16",
                        help="ranks of the amplification table")
    parser.add_argument("--full-lrs", type=_listed(float, "learning rates"),
                        default="1e-4,3e-4,1e-3",
                        help="full fine-tuning's learning rates, tried from --seed")
    parser.add_argument("--draws", type=_at_least(1), default=20,
                        help="random draws per layer for each random baseline")
    parser.add_argument("--threads", type=_at_least(1), default=1,
                        help="CPU threads (1: the figures do not depend on the machine's cores)")
    parser.add_argument("--latency-repeats", type=_at_least(1), default=5,
                        help="timed samples of each forward pass")
    # Known here only to be refused: runs go on or start anew by themselves.
    parser.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)
    # The options this script does not know are train_shakespeare.py's.
    options, rest = parser.parse_known_args(argv)
    every_rank = options.ranks + options.phi_ranks + options.amp_ranks
    if min(every_rank) < 1 or len(options.phi_ranks) != 2:
        raise ValueError("ranks must be integers >= 1, and --phi-ranks two different ones")
    if min(options.full_lrs) <= 0 or not all(map(math.isfinite, options.full_lrs)):
        raise ValueError("--full-lrs: learning rates > 0")
    if options.overwrite:
        raise ValueError("--overwrite: lora_paper.py redoes only the runs whose settings changed; "
                         "to redo every run, remove the folder runs in its --out-dir")
    # --rank -1 marks a --rank given by the user: this script sets the rank of each run itself.
    # --overwrite: a train_shakespeare.py run (ckpt.pt) in --out-dir is no concern of this
    # script, which neither reads nor writes ckpt.pt; it may share that run's cached base.
    own = ["--overwrite"]
    settings = ts.parse_settings(DEFAULTS + ["--rank", "-1"] + rest + own)[0]
    settings.overwrite = False
    given = settings.rank != -1 or settings.resume
    if given or settings.save_pretrained or settings.save_adapter:
        raise ValueError("use --ranks, not --rank, --resume or exports (runs resume by themselves)")
    # LoRA's learning rate, --lr or train_shakespeare.py's default for adapters (rank 1 stands
    # for any rank).
    options.lr = ts.parse_settings(DEFAULTS + rest + own + ["--rank", "1"])[0].lr
    # A scratch base's width is known now: ranks beyond it are refused before anything runs.
    if settings.init_from == "scratch":
        check_ranks(options, settings.n_embd)
    return options, settings


def check_ranks(options, width: int) -> None:
    """Refuse ranks above the base's width: A (r, width) of rank r > width adds nothing, its
    singular vectors stop at width, and a huge r would fail to allocate after the other runs."""
    every_rank = options.ranks + options.phi_ranks + options.amp_ranks
    too_large = sorted({rank for rank in every_rank if rank > width})
    if too_large:
        listed = ", ".join(map(str, too_large))
        raise ValueError(f"--ranks, --phi-ranks, --amp-ranks: {listed} exceed the base's width "
                         f"n_embd {width}; choose ranks <= {width}")


# ---- The runs
def load(path: str):
    """A finished run or checkpoint at `path`, or None; a damaged one is named, in one line."""
    if not os.path.isfile(path):
        return None
    # weights_only: a run file holds tensors and plain data; nothing in it is executed.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, unpickling errors: many types
        raise ValueError(f"cannot read {path} ({ts.one_line(e)}); delete it to redo it") from None


def wrong_fields(record: dict, fields: dict) -> list:
    """The names of `fields` that `record` lacks or holds with another type (a bool is not an
    int, an int is a float)."""
    wrong = []
    for name, kind in fields.items():
        value = record.get(name)
        kinds = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, kinds):
            wrong.append(name)
    return wrong


def wrong_weights(weights, model) -> str:
    """Why `weights` are not the trainable weights of `model` (names and shapes), or ""."""
    expected = {name: tuple(w.shape) for name, w in ts.trainable_weights(model).items()}
    if not isinstance(weights, dict):
        return "its weights are not a dict"
    found = {name: tuple(getattr(w, "shape", ())) for name, w in weights.items()}
    if found != expected:
        differing = sorted(set(found.items()) ^ set(expected.items()))
        return f"its weights are not this run's (first difference: {differing[0][0]})"
    return ""


def check_part(state, part: str, model, iters: int) -> None:
    """Refuse a .part file this run cannot go on from, naming it and the fix, before ts.train
    reads it."""
    why = ""
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        why = f"it is not a {RUN_FORMAT} checkpoint of lora_paper.py"
    elif wrong_fields(state, PART_FIELDS):
        why = f"it lacks or mistypes {', '.join(wrong_fields(state, PART_FIELDS))}"
    elif not 0 <= state["step"] <= iters:
        why = f"its step {state['step']} is outside 0 to {iters}"
    else:
        why = wrong_weights(state["weights"], model)
    if not why:
        # AdamW's state holds one entry per trainable parameter, in two groups.
        trainable = sum(1 for p in model.parameters() if p.requires_grad)
        groups = state["optimizer"].get("param_groups", [])
        saved = sum(len(group.get("params", [])) for group in groups)
        if saved != trainable:
            why = f"its optimizer holds {saved} parameters, this run trains {trainable}"
    if why:
        raise ValueError(f"{part} does not fit this run ({why}): remove it, and the same command "
                         f"starts this run anew")


def train(model, ids, data, settings, runtime, path: str, **keywords) -> tuple:
    """ts.train, going on from path.part if there; (history, (loss, accuracy), ms per step)."""
    part = path + ".part"
    start = time.perf_counter()
    resume = load(part)
    if resume is not None:
        check_part(resume, part, model, keywords["iters"])

    def save(phase, model, state):
        # Each checkpoint of the run replaces path.part: an interrupted run goes on from it.
        record = {**state, "weights": ts.trainable_weights(model), "format": RUN_FORMAT}
        ts.save_atomic(record, part)
    history, evaluation = ts.train(model, ids, *data, settings, runtime, save=save, resume=resume,
                                   **keywords)
    # The time per step counts the steps this process ran.
    steps = max(1, keywords["iters"] - (resume["step"] if resume else 0))
    return history, evaluation, 1000 * (time.perf_counter() - start) / steps


def base_model(settings, runtime, tokenizer, base_ids, data, data_sha) -> tuple:
    """(--init-from, or train_shakespeare.py's scratch base: its file name and format; the
    scratch base's held-out loss by step, [] where not recorded)."""
    if settings.init_from != "scratch":
        return GPT2LMModel.from_pretrained(settings.init_from).to(runtime.device), []
    # A scratch base: characters as tokens, its context the block size.
    config = GPT2Config(vocab_size=len(tokenizer["chars"]), n_layer=settings.n_layer,
                        n_head=settings.n_head, n_embd=settings.n_embd,
                        n_positions=settings.block_size, n_ctx=settings.block_size)
    # The same name as train_shakespeare.py's base of the same settings: either script reuses it.
    path = os.path.join(settings.out_dir, ts.base_file(settings, config, data_sha, runtime.dtype))
    if os.path.isfile(path):
        runtime.log(f"using the cached base {path}")
        cached = ts.read_checkpoint(path, "base")
        # A base train_shakespeare.py cached holds no history.
        history = cached.get("history", [])
        base = GPT2LMModel(config).load_weight(cached["weights"]).to(runtime.device)
        return base, history if isinstance(history, list) else []
    # Not cached: pretrain it on the first half of the training text, going on from its .part
    # file if an earlier run was stopped, then save it in train_shakespeare.py's base format.
    torch.manual_seed(settings.seed)
    base = GPT2LMModel(config).to(runtime.device)
    runtime.log(f"pretraining a char-level base on {len(base_ids):,} tokens for "
                f"{settings.base_iters} steps")
    history = train(base, base_ids, data, settings, runtime, path, phase="base",
                    iters=settings.base_iters, lr=settings.base_lr)[0]
    # Its held-out loss by step goes with it: the report shows where it stopped improving.
    record = dict(format=ts.FORMAT, kind="base", config=config.to_dict(), tokenizer=tokenizer,
                  weights=ts.trainable_weights(base), history=history)
    ts.save_atomic(record, path)
    os.remove(path + ".part")
    return base, history


def with_lora(config: GPT2Config, rank: int, settings) -> GPT2Config:
    """The base's config with LoRA of `rank` on Q and V, alpha and dropout as --alpha and
    --lora-dropout say."""
    return GPT2Config.from_dict({**config.to_dict(), "lora_attn_dim": rank,
                                 "lora_attn_alpha": settings.alpha,
                                 "lora_dropout": settings.lora_dropout})


def qv(W: torch.Tensor) -> tuple:
    """(W_q, W_v), each (out, in), from a fused c_attn weight (in, 3 out)."""
    W = W.detach().cpu()
    # Conv1D stores (in, out): the columns are Q's, then K's, then V's, each `width` wide.
    width = len(W)
    return W[:, :width].T, W[:, 2 * width:].T


def adapt(base, task: str, rank: int, seed: int, lr: float, train_ids, data, every_window,
          settings, runtime, data_sha: str) -> dict:
    """An adaptation to `task` at `rank` (0: every weight) from `seed` at `lr`: its figures on
    every held-out window, and its trained weights."""
    settings = argparse.Namespace(**{**vars(settings), "rank": rank, "seed": seed, "lr": lr})
    name = f"{task}-r{rank}" if rank else f"{task}-full-lr{lr:g}"
    recipe = {k: v for k, v in vars(settings).items() if k not in UNKEYED}
    # Each task, rank and seed starts its adapters from its own draw: one seed at two ranks
    # would make r = 4's A the first rows of r = 16's, and one draw for both tasks would make
    # their A alike before any training.
    init = 1000 * seed + rank + 100_000 * list(TASKS).index(task)
    # The run's file is named by a digest of all that makes it: a changed setting is a new run.
    key = repr((RUN_FORMAT, task, recipe, data_sha, base_fingerprint(base), init))
    run_key = hashlib.sha1(key.encode()).hexdigest()
    path = os.path.join(settings.out_dir, "runs", f"{name}-seed{seed}-{run_key[:12]}.pt")
    torch.manual_seed(init)  # the adapters' init
    model = GPT2LMModel(with_lora(base.config, rank, settings)).to(runtime.device)
    model.load_weight(base.state_dict())
    if rank:
        mark_only_lora_as_trainable(model)
    # A run done before is read, checked against this run, and not trained again.
    done = load(path)
    if done is not None:
        check_run(done, path, task, rank, seed, model)
        runtime.log(f"done before: {path}")
        return done
    runtime.log(f"adapting to {task}: {name}, seed {seed}, lr {lr:g}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    history, _, ms_per_step = train(model, train_ids, data, settings, runtime, path, phase=name,
                                    iters=settings.max_iters, lr=lr)
    # Every held-out window is scored once the run is done; the history's evaluations, during
    # the run, score --eval-iters batches of them.
    loss, accuracy = evaluate_all(model, data[0], every_window, settings, runtime)
    # The checkpoint's bytes: what a file of the trained weights would take.
    weights = ts.trainable_weights(model)
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = dict(format=RUN_FORMAT, task=task, rank=rank, seed=seed, lr=lr, loss=loss,
                  accuracy=accuracy, history=history, ms_per_step=ms_per_step,
                  trainable=trainable, bytes=buffer.tell(), weights=weights)
    ts.save_atomic(result, path)
    os.remove(path + ".part")
    return result


def check_run(run, path: str, task: str, rank: int, seed: int, model) -> None:
    """Refuse a finished-run file of another version or layout, naming it and the fix, before
    the report would trip over it; `model` is the run's, whose weights the file must hold."""
    why = ""
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        why = f"it is not a {RUN_FORMAT} run of lora_paper.py"
    elif wrong_fields(run, RUN_FIELDS):
        why = f"it lacks or mistypes {', '.join(wrong_fields(run, RUN_FIELDS))}"
    elif (run["task"], run["rank"], run["seed"]) != (task, rank, seed):
        why = f"it holds the run of {run['task']}, rank {run['rank']}, seed {run['seed']}"
    else:
        why = wrong_weights(run["weights"], model)
    if why:
        raise ValueError(f"{path} is not this run's file ({why}): remove it, and the same "
                         f"command redoes the run")


def every_window(val: torch.Tensor, settings) -> torch.Tensor:
    """The start of every non-overlapping held-out window, as ts.split spaces them."""
    last = len(val) - settings.block_size - 1
    return torch.linspace(0, last, last // settings.block_size + 1).round().long()


def evaluate_all(model, val, windows, settings, runtime) -> tuple:
    """(loss, accuracy) on every window of `windows`, in batches of 128 windows."""
    larger = argparse.Namespace(**{**vars(settings), "batch_size": 128})
    return ts.evaluate(model, val, windows, larger, runtime)


def lowercase_ids(tokenizer: dict, text: str, ids: torch.Tensor) -> torch.Tensor:
    """The token ids of `text` in lower case, position for position: each character whose lower
    case is a character of the alphabet becomes it, every other stays (in Tiny Shakespeare every
    letter has its lower case). GPT-2's BPE encodes the lowered text anew."""
    if tokenizer["type"] != "char":
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
        return torch.tensor(ts.encode(tokenizer, lowered, "--data"))
    chars = tokenizer["chars"]
    index = {c: i for i, c in enumerate(chars)}
    lower = torch.tensor([index.get(c.lower(), i) for i, c in enumerate(chars)])
    return lower[ids]


# ---- The analyses
def lora_model(base, run: dict, settings) -> GPT2LMModel:
    """The base with a LoRA run's trained adapters set on it."""
    config = with_lora(base.config, run["rank"], settings)
    model = GPT2LMModel(config).load_weight(base.state_dict())
    return model.load_weight(run["weights"])


def adapters(base, run: dict, settings) -> dict:
    """A LoRA run's A and ΔW (each (q, v)) by layer, from its weights set on its base."""
    attention = [block.attn.c_attn for block in lora_model(base, run, settings).transformer.h]
    # lora_A stacks the adapters of Q and V: rank rows each.
    return dict(A=[c.lora_A.detach().cpu().split(run["rank"]) for c in attention],
                dW=[qv(c.delta_weight()) for c in attention], rank=run["rank"])


def full_delta(base, run: dict) -> list:
    """Full fine-tuning's ΔW (q, v) by layer: its trained weights less the base's."""
    deltas = []
    for layer, block in enumerate(base.transformer.h):
        trained = run["weights"][f"transformer.h.{layer}.attn.c_attn.weight"]
        deltas.append(tuple(t - w for t, w in zip(qv(trained), qv(block.attn.c_attn.weight))))
    return deltas


def layer_inputs(base, ids: torch.Tensor, settings, runtime) -> list:
    """Sigma of each layer's attention input (after its LayerNorm) on --eval-iters batches of
    `ids`, evenly spaced: what the adapters' A see."""
    captured = [[] for _ in base.transformer.h]
    hooks = [block.attn.c_attn.register_forward_hook(
                 lambda module, args, output, layer=layer: captured[layer].append(
                     args[0].detach().flatten(0, -2).cpu()))
             for layer, block in enumerate(base.transformer.h)]
    last = len(ids) - settings.block_size - 1
    starts = torch.linspace(0, last, settings.eval_iters * settings.batch_size).round().long()
    try:
        ts.evaluate(base, ids, starts, settings, runtime)
    finally:
        for hook in hooks:
            hook.remove()
    return [second_moment(torch.cat(inputs)) for inputs in captured]


def phi_of_pairs(pairs: list) -> dict:
    """phi for 'q' and 'v' over pairs of adapters' A (each a list by layer of (A_q, A_v)),
    averaged over layers: the grid (i <= 8) averaged over pairs, and each pair's summary."""
    # Each A1, A2 holds, layer by layer, the pair (A of Q, A of V); index 0 is Q's, 1 is V's.
    by_matrix = {}
    for index, matrix in enumerate("qv"):
        grids = []
        for A1, A2 in pairs:
            by_layer = [subspace_similarity(a1[index], a2[index]) for a1, a2 in zip(A1, A2)]
            grids.append(sum(by_layer) / len(by_layer))
        summaries = [phi_summary(grid) for grid in grids]
        by_matrix[matrix] = dict(grid=(sum(grids) / len(grids))[:PHI_TOP],
                                 summary={name: spread([s[name] for s in summaries])
                                          for name in summaries[0]})
    return by_matrix


def random_pairs(shapes: tuple, sigmas: list, draws: int, seed: int) -> tuple:
    """(Gaussian pairs, pairs drawn from the inputs' covariance): `draws` pairs of random A of
    the shapes (r1, r2), each a list by layer of (A_q, A_v), as phi_of_pairs takes them."""
    generator = torch.Generator().manual_seed(seed)
    gaussian, like_inputs = [], []
    for _ in range(draws):
        gaussian.append(tuple([tuple(torch.randn(r, len(sigma), generator=generator,
                                                 dtype=torch.float64) for _ in "qv")
                               for sigma in sigmas] for r in shapes))
        like_inputs.append(tuple([tuple(draw_like_inputs(sigma, r, generator) for _ in "qv")
                                  for sigma in sigmas] for r in shapes))
    return gaussian, like_inputs


def amplification_table(base, lora_runs: list, rank: int, draws: int) -> dict:
    """Table 7's figures at `rank`, each the mean over layers, with its spread over seeds:
    ||U^T Wq V^T||_F for U, V of ΔWq, of Wq, and random (the mean of `draws` draws); ||Wq||_F,
    ||ΔWq||_F, their ratio, the factor, and how many times more of Wq ΔWq's directions hold
    than random ones."""
    # One generator for the table: the random baseline is the same on every run.
    generator = torch.Generator().manual_seed(0)
    weights = [qv(block.attn.c_attn.weight)[0] for block in base.transformer.h]
    random = [random_projected_norm(Wq, rank, draws, generator) for Wq in weights]
    per_seed = []
    for run in lora_runs:
        rows = []
        for Wq, random_norm, (dWq, _) in zip(weights, random, run["dW"]):
            delta = projected_norm(Wq, *top_singular(dWq, rank))
            rows.append({"ΔWq's U, V": delta,
                         "Wq's U, V": projected_norm(Wq, *top_singular(Wq, rank)),
                         "random U, V": random_norm, "‖Wq‖": Wq.norm().item(),
                         "‖ΔWq‖": dWq.norm().item(),
                         "‖ΔWq‖ / ‖Wq‖": dWq.norm().item() / Wq.norm().item(),
                         "factor": amplification(dWq, Wq, rank),
                         "ΔWq's / random": delta / random_norm})
        per_seed.append({name: sum(row[name] for row in rows) / len(rows) for name in rows[0]})
    return {name: spread([seed[name] for seed in per_seed]) for name in per_seed[0]}


def energy_in_top(dW: torch.Tensor, r: int) -> float:
    """The share of ||dW||_F^2 in its top-r singular values: 1 for a matrix of rank <= r."""
    values = torch.linalg.svdvals(dW.double()) ** 2
    return (values[:r].sum() / values.sum()).item()


def latency(base, lora, settings, runtime, repeats: int) -> list:
    """Table 1: a forward pass of --block-size tokens, batch 1 and 16, timed as the bench does."""
    # A copy with ΔW folded into W0: the same function, without the adapters' extra matmuls.
    merged = GPT2LMModel(lora.config).load_weight(lora.state_dict()).to(runtime.device).eval()
    merge_lora(merged)
    rank = lora.config.lora_attn_dim
    rows = []
    models = (("plain", base.eval()), (f"LoRA r={rank} merged", merged),
              (f"LoRA r={rank} unmerged", lora.to(runtime.device).eval()))
    for batch in (1, 16):
        tokens = torch.randint(base.config.vocab_size, (batch, settings.block_size),
                               device=runtime.device)  # (batch, T)
        functions = {name: torch.no_grad()(lambda model=model: model(tokens))
                     for name, model in models}
        milliseconds = bench.time_interleaved(functions, repeats, runtime.device)
        rows += bench.make_rows(batch, milliseconds, "plain", "ms")
    return rows


# ---- The figures
def plots(options, results: dict, out_dir: str, log) -> list:
    """The figures as PNG files in out_dir; none, and a line saying so, without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        # An earlier run's figures show other ranks and seeds: none stays beside this report.
        stale = [name for name in FIGURE_NAMES if os.path.isfile(os.path.join(out_dir, name))]
        for name in stale:
            os.remove(os.path.join(out_dir, name))
        removed = f"; removed the earlier figures {', '.join(stale)}" if stale else ""
        log(f"no figures without matplotlib (pip install matplotlib); the report has "
            f"tables{removed}")
        return []
    plt.rcParams.update({"font.size": 11})
    sweep = results["sweep"]
    ranks = options.ranks
    # The rank sweep: the mean held-out loss by rank, bars from the lowest seed to the highest,
    # beside full fine-tuning's mean and range and the base; then each rank's share of full
    # fine-tuning's gain.
    figure, (loss_axes, share_axes) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for axes, name, label in ((loss_axes, "loss", "held-out loss, lower case"),
                              (share_axes, "share", "share of full fine-tuning's gain")):
        stats = [sweep["ranks"][rank][name] for rank in ranks]
        means = [s["mean"] for s in stats]
        below = [s["mean"] - s["low"] for s in stats]
        above = [s["high"] - s["mean"] for s in stats]
        axes.errorbar(ranks, means, yerr=[below, above], fmt="o-", capsize=4,
                      label=f"LoRA on Q, V (mean, range of {options.seeds} seeds)")
        full = sweep["full"][name]
        axes.axhline(full["mean"], color="C1", ls="--", label="full fine-tuning")
        axes.axhspan(full["low"], full["high"], color="C1", alpha=0.2)
        axes.set(xscale="log", xlabel="rank r", ylabel=label)
        axes.set_xticks(ranks, map(str, ranks), minor=False)
        axes.minorticks_off()
    loss_axes.axhline(sweep["base"]["lowercase"], color="gray", ls=":", label="base, not adapted")
    loss_axes.set_title("Held-out loss by rank")
    share_axes.set_title("Share of full fine-tuning's gain")
    loss_axes.legend(fontsize=9)
    figures = [(figure, "rank_sweep.png")]
    # Subspace similarity, as Figure 3 draws it: phi(i, j) for i <= 8 and every j, Q and V by
    # rows; the trained pairs, then the three baselines, by columns.
    columns = (("trained", "trained on the task"), ("other data", "adapters, other data"),
               ("inputs' covariance", "random, inputs' covariance"),
               ("Gaussian", "random, Gaussian"))
    for name, comparison in results["phi"].items():
        r1, r2 = comparison["ranks"]
        rows_shown = min(r1, PHI_TOP)
        figure, grid_axes = plt.subplots(2, 4, figsize=(15, 5.8), squeeze=False,
                                         layout="constrained")
        for row, matrix in enumerate("qv"):
            for column, (where, title) in enumerate(columns):
                axes = grid_axes[row][column]
                grid = comparison[where][matrix]["grid"]
                image = axes.imshow(grid.numpy(), vmin=0, vmax=1, aspect="auto", cmap="viridis",
                                    extent=(0.5, r2 + 0.5, rows_shown + 0.5, 0.5))
                # At most about 8 ticks per axis: every ceil(r / 8)-th rank.
                axes.set(title=f"ΔW{matrix}: {title}", xlabel=f"j ({comparison['labels'][1]})",
                         ylabel=f"i ({comparison['labels'][0]})",
                         xticks=range(1, r2 + 1, -(-r2 // 8)), yticks=range(1, rows_shown + 1))
        figure.colorbar(image, ax=grid_axes, label="φ(i, j)", fraction=0.02)
        figure.suptitle(f"Subspace similarity φ of A, {comparison['labels'][0]} against "
                        f"{comparison['labels'][1]}: mean of layers and of {comparison['pairs']} "
                        f"pairs")
        figures.append((figure, f"subspace_{name}.png"))
    # Each file is written whole under a temporary name, then renamed.
    for figure, name in figures:
        figure.savefig(os.path.join(out_dir, name + ".tmp"), format="png", dpi=80)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    plt.close("all")
    return [name for _, name in figures]


# ---- The report
def table(header: list, rows: list) -> list:
    """A markdown table's lines, and a blank line after it."""
    rows = [header, ["---"] * len(header)] + rows
    return ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def sweep_reading(options, sweep: dict) -> list:
    """Sentences that read each step of the sweep, a difference only where it exceeds the
    spread."""
    lines = []
    ranks = options.ranks
    for smaller, larger in zip(ranks, ranks[1:]):
        first, second = sweep["ranks"][smaller]["loss"], sweep["ranks"][larger]["loss"]
        change = second["mean"] - first["mean"]
        verdict = "beyond" if differs(first, second) else "within"
        lines.append(f"- r = {larger} against r = {smaller}: {change:+.4f}, {verdict} the "
                     f"spread of the seeds.")
    full = sweep["full"]["loss"]
    for rank in ranks:
        if not differs(sweep["ranks"][rank]["loss"], full):
            lines.append(f"- r = {rank} is within the spread of full fine-tuning.")
    smallest = [rank for rank in ranks
                if not differs(sweep["ranks"][rank]["loss"], sweep["ranks"][ranks[-1]]["loss"])]
    lines.append(f"- The smallest rank within the spread of r = {ranks[-1]}: r = {smallest[0]}.")
    return lines + [""]


def phi_reading(results: dict) -> list:
    """Sentences that set each summary of the trained pairs against the highest of its
    baselines: above it only where even the lowest pair is."""
    lines = []
    baselines = ("other data", "inputs' covariance", "Gaussian")
    for comparison in results["phi"].values():
        for matrix in "qv":
            trained = comparison["trained"][matrix]["summary"]
            for figure, stats in trained.items():
                means = {where: comparison[where][matrix]["summary"][figure]["mean"]
                         for where in baselines}
                highest = max(means, key=means.get)
                verdict = "above" if stats["low"] > means[highest] else "not above"
                lines.append(f"- {' vs '.join(comparison['labels'])}, W{matrix}, {figure}: "
                             f"{stats['mean']:.3f} (lowest pair {stats['low']:.3f}), {verdict} "
                             f"the highest baseline, {highest} ({means[highest]:.3f}).")
    return lines + [""]


def report(options, settings, results: dict, base, files: list) -> str:
    """The report's markdown: each table with the paper's figures beside ours."""
    config = base.config
    sweep = results["sweep"]
    full_lr = results["full_lr"]
    out = ["# The LoRA paper's GPT-2 findings, in miniature", "",
           f"Base: {settings.init_from}, {config.n_layer} layers of width {config.n_embd}, "
           f"{settings.base_iters} steps. Task: {TASKS['lowercase']}, scored on every one of "
           f"the {results['windows']:,} held-out windows of {settings.block_size} tokens, in "
           f"lower case. Each run: {settings.max_iters} steps of {settings.batch_size} x "
           f"{settings.block_size} tokens; seeds {settings.seed} to "
           f"{settings.seed + options.seeds - 1}. LoRA on Q, V at lr {options.lr:g}, alpha "
           f"{settings.alpha:g} (ΔW scaled by alpha / r, the same at every rank); full "
           f"fine-tuning at lr {full_lr:g}, the best of {', '.join(map(str, options.full_lrs))}"
           f" from seed {settings.seed}.", "",
           "Spread: mean ± standard error over seeds (lowest–highest). A difference is read as "
           "one only where the means differ by more than their two standard errors together "
           "and the ranges do not overlap.", ""]

    # The base: where its held-out loss stopped, and the task's shift.
    out += ["## The base and the task", ""]
    history = results["base_history"]
    if history:
        steps = [f"{h['step']}: {h['val_loss']:.4f}" for h in history[-5:]]
        out += [f"The base's held-out loss (--eval-iters batches) at its last evaluations, by "
                f"step: {'; '.join(steps)}.", ""]
    else:
        out += ["The base's held-out loss by step was not recorded (a base cached by "
                "train_shakespeare.py).", ""]
    out += table(["base, not adapted", "held-out loss", "accuracy"],
                 [["text as written", f"{sweep['base']['original']:.4f}",
                   f"{100 * sweep['base']['original accuracy']:.1f}%"],
                  ["text in lower case (the task)", f"{sweep['base']['lowercase']:.4f}",
                   f"{100 * sweep['base']['lowercase accuracy']:.1f}%"]])
    other = sweep["other half"]
    out += [f"LoRA r = {options.phi_ranks[1]} trained on {TASKS['other-half']} (the subspace "
            f"baseline) reaches {shown(other)} on the held-out text as written: what more "
            f"text adds to this base.", ""]

    # The rank sweep.
    out += ["## Rank sweep (paper: Table 18)", ""]
    rows = []
    for rank in options.ranks:
        stats = sweep["ranks"][rank]
        run = results["runs"][("lowercase", rank, settings.seed, options.lr)]
        rows.append([f"LoRA r = {rank}", shown(stats["loss"]), shown(stats["share"], 2),
                     shown(stats["ratio"], 3), f"{sweep['full energy'][rank]:.2f}",
                     f"{run['trainable']:,}", PAPER_LOSS.get(rank, "")])
    full = sweep["full"]
    rows.append(["full fine-tuning", shown(full["loss"]), "1", shown(full["ratio"], 3), "1",
                 f"{results['runs'][('lowercase', 0, settings.seed, full_lr)]['trainable']:,}",
                 ""])
    out += table(["run", "held-out loss", "share of full FT's gain", "‖ΔWq‖ / ‖Wq‖",
                  "full FT's ΔWq in its top r", "trainable", "paper: GPT-2 M, E2E"], rows)
    out += ["Share of full FT's gain: (base − run) / (base − full fine-tuning's mean), on the "
            "lower-case held-out text. ‖ΔWq‖ / ‖Wq‖: mean of layers (the paper's, GPT-3 "
            "layer 48: 6.91 / 61.95 = 0.11 at r = 4). Full FT's ΔWq in its top r: the share of "
            "full fine-tuning's ‖ΔWq‖²_F in its top-r singular values, mean of layers and "
            "seeds.", ""]
    tuning = [[f"{lr:g}", f"{loss:.4f}", f"{final:.4f}"]
              for lr, (loss, final) in results["full_tuning"].items()]
    out += [f"Full fine-tuning's learning rate, seed {settings.seed}, the same steps: chosen by "
            "the held-out loss of the run's last evaluation (--eval-iters batches of the "
            "held-out windows).", ""]
    out += table(["lr", "last evaluation", "every window"], tuning)
    out += ["Reading:", ""] + sweep_reading(options, sweep)
    out += [f"![{name}]({name})" for name in files if name.startswith("rank")]

    # Subspace similarity.
    out += ["", "## Subspace similarity of A (paper: Figures 3, 4)", "",
            "φ(i, j) = ‖U_iᵀ U_j‖²_F / min(i, j) over the top-i and the top-j right-singular",
            "vectors of two A, averaged over layers. Random subspaces of R^d give max(i, j) / d",
            f"on average; d = {config.n_embd} here. The layers' inputs fill "
            f"{results['effective dimensions']} effective dimensions (participation ratio).",
            f"Mean φ: over i ≤ {PHI_TOP} and every j. Trained pairs: mean ± standard error "
            "(lowest–highest) over pairs; baselines: mean over draws or pairs.", ""]
    rows = []
    for comparison in results["phi"].values():
        for matrix in "qv":
            for where in ("trained", "other data", "inputs' covariance", "Gaussian"):
                summary = comparison[where][matrix]["summary"]
                # The trained pairs with their spread; the baselines' means.
                if where == "trained":
                    cells = [shown(summary[name], 3) for name in summary]
                else:
                    cells = [f"{summary[name]['mean']:.3f}" for name in summary]
                rows.append([" vs ".join(comparison["labels"]), f"W{matrix}", where] + cells)
    out += table(["A compared", "ΔW", "pairs", "φ(1, 1)", "φ(1, all j)", "mean φ"], rows)
    out += ["The paper: between r = 8 and r = 64 (GPT-3, layer 48) the top direction has",
            "φ > 0.5 and the rest is mostly noise; two seeds at r = 64 share their top",
            "directions, more for Wq than for Wv.", ""]
    out += ["Reading:", ""] + phi_reading(results)
    out += [f"![{name}]({name})" for name in files if name.startswith("subspace")]

    # Amplification.
    out += ["", "## Amplification of W_q by ΔW_q (paper: Table 7)", "",
            "‖Uᵀ Wq Vᵀ‖_F, U and V the top-r singular vectors of ΔWq, of Wq, or random ones (the",
            f"mean of {options.draws} draws); the factor: ‖ΔWq‖_F over the first. Mean of "
            "layers; ± over seeds.", ""]
    names = ["ΔWq's U, V", "Wq's U, V", "random U, V", "‖Wq‖", "‖ΔWq‖", "factor",
             "ΔWq's / random"]
    rows = [[rank] + [shown(results["amplification"][rank][name], 2) for name in names]
            for rank in options.amp_ranks]
    # The paper's rows: its figures, its factor, and ΔWq's over random computed from them.
    rows += [[f"{rank}, paper: GPT-3, 48", *paper, PAPER_FACTOR[rank],
              f"{paper[0] / paper[2]:.0f}"]
             for rank, paper in PAPER_AMP.items()]
    out += table(["r"] + names, rows)

    # Latency: the bench's rows, by batch.
    out += ["## Inference latency (paper: Table 1)", "",
            f"A forward pass of {settings.block_size} tokens, median of "
            f"{options.latency_repeats} samples. The",
            "paper: adapter layers add 20-30% at batch 1, merged LoRA nothing.", ""]
    out += table(["batch", "model", "median ms", "ratio to plain", "range"],
                 [[row["comparison"], row["candidate"], f"{row['median']:.2f}",
                   f"{row['ratio']:.3f}",
                   "-".join(f"{value:.3f}" for value in row["ratio_range"] or [])]
                  for row in results["latency"]])
    return "\n".join(out)


def main(argv=None) -> dict:
    """Run what is not done yet, then write the report; returns its figures."""
    options, settings = parse_options(sys.argv[1:] if argv is None else argv)
    runtime = ts.setup_runtime(settings)
    torch.set_num_threads(options.threads)
    try:
        with ts.claim(settings.out_dir):
            return run(options, settings, runtime)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted: run the same command again to go on") from None


def run(options, settings, runtime) -> dict:
    """The base, every run not done yet, the analyses, the figures and the report."""
    start = time.perf_counter()
    text = ts.read_text(settings, runtime)
    scratch = settings.init_from == "scratch"
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    # A scratch base reads characters, as train_shakespeare.py's (whose cached base it shares);
    # a pretrained GPT-2 reads GPT-2's BPE.
    if scratch:
        tokenizer = {"type": "char", "chars": "".join(sorted(set(text)))}
    else:
        tokenizer = {"type": "gpt2-bpe"}
    ids = torch.tensor(ts.encode(tokenizer, text, "--data"))
    base_ids, other_ids, val, windows = ts.split(ids, settings, scratch)
    low_base_ids, low_other_ids, low_val, low_windows = ts.split(
        lowercase_ids(tokenizer, text, ids), settings, scratch)
    base, base_history = base_model(settings, runtime, tokenizer, base_ids, (val, windows),
                                    data_sha)
    base.requires_grad_(False)
    check_ranks(options, base.config.n_embd)  # for --init-from, whose width is known only now
    # Every held-out window, as written and in lower case.
    every, low_every = every_window(val, settings), every_window(low_val, settings)
    base_original = evaluate_all(base, val, every, settings, runtime)
    base_lowercase = evaluate_all(base, low_val, low_every, settings, runtime)

    # The task's text: the base's own half in lower case (all of it for a pretrained base).
    task_ids = low_base_ids if scratch else low_other_ids
    task = dict(train_ids=task_ids, data=(low_val, low_windows), every_window=low_every,
                settings=settings, runtime=runtime, data_sha=data_sha)
    other = dict(train_ids=other_ids, data=(val, windows), every_window=every,
                 settings=settings, runtime=runtime, data_sha=data_sha)
    seeds = [settings.seed + k for k in range(options.seeds)]
    # Run files of an earlier version of this script have other names: never read, named once.
    runs_folder = os.path.join(settings.out_dir, "runs")
    ours = tuple(f"{name}-" for name in TASKS)
    older = sorted(name for name in (os.listdir(runs_folder) if os.path.isdir(runs_folder) else [])
                   if not name.startswith(ours))
    if older:
        runtime.log(f"not used: {len(older)} run file(s) in {runs_folder} of an earlier version of "
                    f"lora_paper.py (such as {older[0]}); remove them")
    lora_ranks = sorted(set(options.ranks + options.phi_ranks + options.amp_ranks))
    runs = {}

    # The runs, each its own file in --out-dir/runs, skipped when done before: every rank from
    # every seed; full fine-tuning at each learning rate from the first seed, then the best
    # from the others; adapters on the other data at the second phi rank.
    for rank in lora_ranks:
        for seed in seeds:
            runs[("lowercase", rank, seed, options.lr)] = adapt(
                base, "lowercase", rank, seed, options.lr, **task)
    tuning = {}
    for lr in options.full_lrs:
        done = runs[("lowercase", 0, seeds[0], lr)] = adapt(base, "lowercase", 0, seeds[0], lr,
                                                            **task)
        tuning[lr] = (done["history"][-1]["val_loss"], done["loss"])
    full_lr = min(options.full_lrs, key=lambda lr: tuning[lr][0])
    for seed in seeds[1:]:
        runs[("lowercase", 0, seed, full_lr)] = adapt(base, "lowercase", 0, seed, full_lr,
                                                      **task)
    r1, r2 = options.phi_ranks
    for seed in seeds:
        runs[("other-half", r2, seed, options.lr)] = adapt(base, "other-half", r2, seed,
                                                           options.lr, **other)

    # The analyses of the LoRA runs.
    runtime.log("comparing the adapters")
    lora = {key: adapters(base, run, settings) for key, run in runs.items() if key[1]}
    full = [full_delta(base, runs[("lowercase", 0, seed, full_lr)]) for seed in seeds]
    results = dict(runs=runs, full_lr=full_lr, full_tuning=tuning, base_history=base_history,
                   windows=len(low_every))
    results["sweep"] = sweep_figures(options, base, runs, lora, full, seeds, full_lr,
                                     base_original, base_lowercase)
    sigmas = layer_inputs(base, task_ids, settings, runtime)
    dimensions = [effective_dimensions(sigma) for sigma in sigmas]
    results["effective dimensions"] = "–".join(f"{d:.1f}" for d in (min(dimensions),
                                                                    max(dimensions)))
    # phi: the two ranks from the same seed, and two seeds at the second rank; each beside
    # the adapters on other data, compared the same way, and the random baselines.
    task_A = {(rank, seed): lora[("lowercase", rank, seed, options.lr)]["A"]
              for rank in (r1, r2) for seed in seeds}
    other_A = {seed: lora[("other-half", r2, seed, options.lr)]["A"] for seed in seeds}
    # Each seed against the next, the last against the first; two seeds make one pair.
    seed_pairs = list(zip(seeds, seeds[1:] + seeds[:1]))[:len(seeds) if len(seeds) > 2 else 1]
    comparisons = {
        "ranks": ((r1, r2), (f"r = {r1}", f"r = {r2}"),
                  [(task_A[(r1, seed)], task_A[(r2, seed)]) for seed in seeds],
                  [(task_A[(r1, seed)], other_A[seed]) for seed in seeds]),
        "seeds": ((r2, r2), (f"r = {r2}, seed s", "seed s + 1"),
                  [(task_A[(r2, first)], task_A[(r2, second)]) for first, second in seed_pairs],
                  [(task_A[(r2, first)], other_A[second]) for first, second in seed_pairs])}
    results["phi"] = {}
    for name, (shapes, labels, trained, other_data) in comparisons.items():
        gaussian, like_inputs = random_pairs(shapes, sigmas, options.draws, seed=shapes[0])
        results["phi"][name] = {"ranks": shapes, "labels": labels, "pairs": len(trained),
                                "trained": phi_of_pairs(trained),
                                "other data": phi_of_pairs(other_data),
                                "inputs' covariance": phi_of_pairs(like_inputs),
                                "Gaussian": phi_of_pairs(gaussian)}
    results["amplification"] = {
        rank: amplification_table(base, [lora[("lowercase", rank, seed, options.lr)]
                                         for seed in seeds], rank, options.draws)
        for rank in options.amp_ranks}
    runtime.log("timing forward passes")
    # Latency is measured on the first phi rank's model: a small rank, as the paper's Table 1.
    timed = lora_model(base, runs[("lowercase", r1, seeds[0], options.lr)], settings)
    results["latency"] = latency(base, timed, settings, runtime, options.latency_repeats)

    # The figures, then the report, written whole under a temporary name and renamed.
    results["files"] = plots(options, results, settings.out_dir, runtime.log)
    path = os.path.join(settings.out_dir, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(report(options, settings, results, base, results["files"]))
    os.replace(path + ".tmp", path)
    runtime.log(f"wrote {path} and {len(results['files'])} figures in "
                f"{time.perf_counter() - start:.0f}s")
    return results


def sweep_figures(options, base, runs, lora, full, seeds, full_lr, base_original,
                  base_lowercase) -> dict:
    """The rank sweep's figures: by rank and for full fine-tuning, each a spread over seeds."""
    def loss(key):
        return runs[key]["loss"]
    full_losses = [loss(("lowercase", 0, seed, full_lr)) for seed in seeds]
    full_gain = base_lowercase[0] - sum(full_losses) / len(full_losses)
    weights = [qv(block.attn.c_attn.weight)[0] for block in base.transformer.h]

    def ratio(deltas):
        """||ΔWq|| / ||Wq||, the mean of layers."""
        return sum(d[0].norm().item() / w.norm().item()
                   for d, w in zip(deltas, weights)) / len(weights)
    by_rank = {}
    for rank in options.ranks:
        keys = [("lowercase", rank, seed, options.lr) for seed in seeds]
        by_rank[rank] = dict(loss=spread([loss(key) for key in keys]),
                             share=spread([(base_lowercase[0] - loss(key)) / full_gain
                                           for key in keys]),
                             ratio=spread([ratio(lora[key]["dW"]) for key in keys]))
    # How much of full fine-tuning's ΔWq lies in its top-r singular values, by rank.
    energy = {rank: sum(energy_in_top(d[0], rank) for deltas in full for d in deltas)
              / sum(len(deltas) for deltas in full) for rank in options.ranks}
    other = [runs[("other-half", options.phi_ranks[1], seed, options.lr)]["loss"]
             for seed in seeds]
    full_figures = dict(loss=spread(full_losses),
                        share=spread([(base_lowercase[0] - loss) / full_gain
                                      for loss in full_losses]),
                        ratio=spread([ratio(deltas) for deltas in full]))
    base_figures = {"original": base_original[0], "original accuracy": base_original[1],
                    "lowercase": base_lowercase[0], "lowercase accuracy": base_lowercase[1]}
    return {"ranks": by_rank, "full": full_figures, "base": base_figures,
            "full energy": energy, "other half": spread(other)}


def cli(argv=None) -> int:
    """The command: train_shakespeare.py's, one line on stderr for each expected failure."""
    return ts.cli(argv, main)


if __name__ == "__main__":
    sys.exit(cli())
