#!/usr/bin/env python
"""The LoRA paper's GPT-2 findings in miniature, on train_shakespeare.py's Shakespeare setting.

    python lora_paper.py --data input.txt             # the default run, into out-paper/
    python lora_paper.py --ranks 1,4 --max-iters 100  # smaller; train_shakespeare.py's options too

Its base (train_shakespeare.py's scratch base, or --init-from) is adapted once per rank and once
in full: same steps, learning-rate rule, seed, split and held-out windows. The rank sweep (paper:
Table 18), subspace similarity of A at two ranks and seeds (Figures 3, 4), amplification (Table 7)
and latency (Table 1) go to --out-dir/report.md, with PNG figures given matplotlib. Finished runs
are kept in --out-dir/runs, and skipped when the command runs again.

What each part of the report checks, and what the paper found on GPT-2 medium and GPT-3:

- The rank sweep: the held-out loss of LoRA at each rank beside full fine-tuning. The paper
  finds a small r enough: on E2E, r = 4 is within 0.02 of r = 64.
- Subspace similarity phi(i, j) between the top-i directions of one A and the top-j of another:
  the paper finds the top direction of r = 8 and r = 64 shared (phi(1, j) high), the rest mostly
  noise, which is why a small rank suffices; two seeds at one rank share that direction too.
- Amplification: ΔW is small, yet large along the directions of W that pre-training did not
  emphasize; the factor ||ΔW||_F / ||U^T W V^T||_F was about 21 at r = 4 in the paper.
- Latency: merged LoRA adds nothing to a forward pass; unmerged, it adds two small matmuls.

A scratch base of a few layers is far from GPT-2 medium: the figures show the measurements
working and their direction, not the paper's magnitudes."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time

import torch

import bench_lora_gpt2 as bench
import train_shakespeare as ts
from checkpoint_formats import base_fingerprint
from lora_gpt2 import GPT2Config, GPT2LMModel, mark_only_lora_as_trainable, merge_lora

# train_shakespeare.py's options as this script sets them by default; options given come after.
DEFAULTS = ["--out-dir", "out-paper", "--block-size", "64", "--base-iters", "1000",
            "--max-iters", "500", "--eval-interval", "100", "--sample", "0"]
# A run's key is made of its other settings, the text and the base; these do not change what a
# run computes.
UNKEYED = ("out_dir", "data", "sample", "prompt")
# The version of the files this script writes into --out-dir/runs: in every run file and in its
# name's key, so that a file of another version is never read as a run of this one.
RUN_FORMAT = "lora-paper-run/2"
# A finished run's fields and their types; LoRA runs also hold their adapters' "weights".
RUN_FIELDS = dict(rank=int, seed=int, loss=float, accuracy=float, history=list,
                  ms_per_step=float, trainable=int, bytes=int)
# What ts.train needs to go on from an interrupted run's .part file.
PART_FIELDS = dict(step=int, history=list, optimizer=dict, scaler=dict, weights=dict)
# The figures this script draws; a run without matplotlib removes those an earlier run drew.
FIGURE_NAMES = ("rank_sweep.png", "subspace_ranks.png", "subspace_seeds.png")
# The paper's figures: Table 18 (GPT-2 M, E2E, loss by rank) and Table 7 (GPT-3; see report()).
PAPER_LOSS = {1: 1.23, 4: 1.18, 16: 1.16, 64: 1.16}
PAPER_AMP = {4: [0.32, 21.67, 0.02, 61.95, 6.91], 64: [1.90, 37.71, 0.33, 61.95, 3.57]}


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
    # A large factor: ΔW amplifies directions that W holds only weakly (the paper: about 21 at
    # r = 4 on GPT-3), rather than repeating W's own top directions.
    return dW.double().norm().item() / projected_norm(W, *top_singular(dW, r))


# ---- The options
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are ValueErrors: cli() prints them in one line."""

    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def _at_least(low):
    """An argparse type: an integer >= low, or an error naming the range."""
    def number(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return number


def parse_options(argv) -> tuple:
    """(this script's options, train_shakespeare.py's settings)."""
    description = (__doc__.split("\n")[0] + " Its options apply too, but --rank, --resume and "
                   "exports.")
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--ranks", default="1,2,4,8,16,64", help="ranks of the sweep")
    parser.add_argument("--phi-ranks", default="4,16",
                        help="two ranks phi compares; seeds: the 2nd")
    parser.add_argument("--amp-ranks", default="4,64", help="ranks of the amplification table")
    parser.add_argument("--latency-repeats", type=_at_least(1), default=5,
                        help="timed samples each")
    # Known here only to be refused: runs go on or start anew by themselves.
    parser.add_argument("--overwrite", action="store_true", help=argparse.SUPPRESS)
    # The options this script does not know are train_shakespeare.py's.
    options, rest = parser.parse_known_args(argv)
    try:
        options.ranks = sorted({int(r) for r in options.ranks.split(",")})
        options.phi_ranks = sorted({int(r) for r in options.phi_ranks.split(",")})
        options.amp_ranks = sorted({int(r) for r in options.amp_ranks.split(",")})
    except ValueError:
        raise ValueError("--ranks, --phi-ranks, --amp-ranks: ranks and commas, e.g. 1,4") from None
    every_rank = options.ranks + options.phi_ranks + options.amp_ranks
    if min(every_rank) < 1 or len(options.phi_ranks) != 2:
        raise ValueError("ranks must be integers >= 1, and --phi-ranks two different ones")
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
    # The learning rates of LoRA (rank 1 stands for any) and of full fine-tuning (rank 0).
    options.lr = [ts.parse_settings(DEFAULTS + rest + own + ["--rank", str(rank)])[0].lr
                  for rank in (1, 0)]
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


def base_model(settings, runtime, tokenizer, base_ids, data, data_sha) -> GPT2LMModel:
    """--init-from, or train_shakespeare.py's scratch base: its file name and format."""
    if settings.init_from != "scratch":
        return GPT2LMModel.from_pretrained(settings.init_from).to(runtime.device)
    # A scratch base: characters as tokens, its context the block size.
    config = GPT2Config(vocab_size=len(tokenizer["chars"]), n_layer=settings.n_layer,
                        n_head=settings.n_head, n_embd=settings.n_embd,
                        n_positions=settings.block_size, n_ctx=settings.block_size)
    # The same name as train_shakespeare.py's base of the same settings: either script reuses it.
    path = os.path.join(settings.out_dir, ts.base_file(settings, config, data_sha, runtime.dtype))
    if os.path.isfile(path):
        runtime.log(f"using the cached base {path}")
        weights = ts.read_checkpoint(path, "base")["weights"]
        return GPT2LMModel(config).load_weight(weights).to(runtime.device)
    # Not cached: pretrain it on the first half of the training text, going on from its .part
    # file if an earlier run was stopped, then save it in train_shakespeare.py's base format.
    torch.manual_seed(settings.seed)
    base = GPT2LMModel(config).to(runtime.device)
    runtime.log(f"pretraining a char-level base on {len(base_ids):,} tokens for "
                f"{settings.base_iters} steps")
    train(base, base_ids, data, settings, runtime, path, phase="base", iters=settings.base_iters,
          lr=settings.base_lr)
    record = dict(format=ts.FORMAT, kind="base", config=config.to_dict(), tokenizer=tokenizer,
                  weights=ts.trainable_weights(base))
    ts.save_atomic(record, path)
    os.remove(path + ".part")
    return base


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


def adapt(base, rank: int, seed: int, adapt_ids, data, settings, runtime, lr,
          data_sha: str) -> dict:
    """An adaptation at `rank` (0: every weight) from `seed`: its figures and adapters."""
    settings = argparse.Namespace(**{**vars(settings), "rank": rank, "seed": seed,
                                     "lr": lr[rank == 0]})
    name = f"r{rank}" if rank else "full"
    recipe = {k: v for k, v in vars(settings).items() if k not in UNKEYED}
    # One seed at two ranks would make r = 4's A the first rows of r = 16's: the init differs.
    init = 1000 * seed + rank
    # The run's file is named by a digest of all that makes it: a changed setting is a new run.
    key = repr((RUN_FORMAT, recipe, data_sha, base_fingerprint(base), init))
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
        check_run(done, path, rank, seed, model)
        runtime.log(f"done before: {path}")
        return done
    runtime.log(f"adapting: {name}, seed {seed}, lr {settings.lr:g}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    history, (loss, accuracy), ms_per_step = train(model, adapt_ids, data, settings, runtime, path,
                                                   phase=name, iters=settings.max_iters,
                                                   lr=settings.lr)
    # The checkpoint's bytes: what a file of the trained weights would take.
    weights = ts.trainable_weights(model)
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # LoRA runs keep their adapters for the analyses; full fine-tuning's weights are not needed.
    adapters_kept = {"weights": weights} if rank else {}
    result = dict(format=RUN_FORMAT, rank=rank, seed=seed, loss=loss, accuracy=accuracy,
                  history=history, ms_per_step=ms_per_step, trainable=trainable,
                  bytes=buffer.tell(), **adapters_kept)
    ts.save_atomic(result, path)
    os.remove(path + ".part")
    return result


def check_run(run, path: str, rank: int, seed: int, model) -> None:
    """Refuse a finished-run file of another version or layout, naming it and the fix, before
    the report would trip over it; `model` is the run's, whose adapters the file must hold."""
    why = ""
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        why = f"it is not a {RUN_FORMAT} run of lora_paper.py"
    elif wrong_fields(run, RUN_FIELDS):
        why = f"it lacks or mistypes {', '.join(wrong_fields(run, RUN_FIELDS))}"
    elif (run["rank"], run["seed"]) != (rank, seed):
        why = f"it holds the run of rank {run['rank']}, seed {run['seed']}"
    elif rank:
        why = wrong_weights(run.get("weights"), model)
    if why:
        raise ValueError(f"{path} is not this run's file ({why}): remove it, and the same "
                         f"command redoes the run")


# ---- The analyses
def adapters(base, run: dict, settings) -> dict:
    """A LoRA run's A and ΔW (each (q, v)) by layer, from its weights set on its base."""
    config = with_lora(base.config, run["rank"], settings)
    model = GPT2LMModel(config).load_weight(base.state_dict())
    model.load_weight(run["weights"])
    attention = [block.attn.c_attn for block in model.transformer.h]
    # lora_A stacks the adapters of Q and V: rank rows each.
    return dict(A=[c.lora_A.detach().cpu().split(run["rank"]) for c in attention], model=model,
                dW=[qv(c.delta_weight()) for c in attention], rank=run["rank"])


def phi_grids(A1: list, A2: list, layer: int) -> dict:
    """phi for 'q' and 'v': at `layer`, averaged over layers, and for Gaussian A of those shapes."""
    # A1 and A2 hold, layer by layer, the pair (A of Q, A of V); index 0 is Q's, 1 is V's.
    generator = torch.Generator().manual_seed(0)
    grids_by_matrix = {}
    for index, matrix in enumerate("qv"):
        grids = [subspace_similarity(a1[index], a2[index]) for a1, a2 in zip(A1, A2)]
        # The floor: Gaussian matrices of the same shapes, layer by layer.
        random = [subspace_similarity(*(torch.randn(a[index].shape, generator=generator)
                                        for a in pair))
                  for pair in zip(A1, A2)]
        grids_by_matrix[matrix] = dict(layer=grids[layer], mean=sum(grids) / len(grids),
                                       random=sum(random) / len(random))
    return grids_by_matrix


def amplification_rows(base, run: dict) -> list:
    """Table 7's figures, by layer: ||U^T Wq V^T||_F for U, V of ΔWq, of Wq and of a random
    matrix, then ||Wq||_F, ||ΔWq||_F and the factor."""
    # One generator for the whole table: the random baseline is the same on every run.
    generator = torch.Generator().manual_seed(0)
    rank = run["rank"]
    rows = []
    for layer, (block, (dWq, _)) in enumerate(zip(base.transformer.h, run["dW"])):
        Wq = qv(block.attn.c_attn.weight)[0]
        directions = (dWq, Wq, torch.randn(Wq.shape, generator=generator))
        projected = [projected_norm(Wq, *top_singular(M, rank)) for M in directions]
        norms = [Wq.norm().item(), dWq.norm().item(), amplification(dWq, Wq, rank)]
        rows.append([rank, layer] + projected + norms)
    return rows


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


def plots(options, runs, phis, base_loss: float, out_dir: str, log) -> list:
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
    # The rank sweep: held-out loss by rank, beside full fine-tuning and the base.
    figure, axes = plt.subplots(figsize=(5.5, 3.6), layout="tight")
    axes.plot(options.ranks, [runs[(r, 0)]["loss"] for r in options.ranks], "o-",
              label="LoRA on Q, V")
    axes.axhline(runs[(0, 0)]["loss"], color="C1", ls="--", label="full fine-tuning")
    axes.axhline(base_loss, color="gray", ls=":", label="base, not adapted")
    axes.set(xscale="log", xlabel="rank r", ylabel="held-out loss", title="Rank sweep")
    axes.set_xticks(options.ranks, map(str, options.ranks), minor=False)
    axes.minorticks_off()
    axes.legend()
    figures = [(figure, "rank_sweep.png")]
    # Subspace similarity: a grid of heat maps, Q and V by rows, layer, mean and random by columns.
    for name, (grids, r1, r2, label1, label2) in phis.items():
        figure, grid_axes = plt.subplots(2, 3, figsize=(11, 5 + 2 * (r1 == r2)), squeeze=False)
        figure.subplots_adjust(hspace=0.45, wspace=0.3, right=0.8)
        for row, matrix in enumerate("qv"):
            for column, where in enumerate(("layer", "mean", "random")):
                axes = grid_axes[row][column]
                image = axes.imshow(grids[matrix][where].numpy(), vmin=0, vmax=1, aspect="auto",
                                    extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
                # At most about 8 ticks per axis: every ceil(r / 8)-th rank.
                axes.set(title=f"ΔW{matrix}, {options.where[where]}", xlabel=f"j ({label2})",
                         ylabel=f"i ({label1})", xticks=range(1, r2 + 1, -(-r2 // 8)),
                         yticks=range(1, r1 + 1, -(-r1 // 8)))
        figure.colorbar(image, ax=grid_axes, label="φ(i, j)", fraction=0.03)
        figure.suptitle(f"Subspace similarity φ of A: {label1} vs {label2}")
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


def three_decimals(value) -> str:
    return f"{value:.3f}"


def report(options, settings, runs, phis, amps, latency_rows, base, base_figures, files) -> str:
    """The report's markdown: the four tables, each with the paper's figures beside ours."""
    config = base.config
    # The rank sweep: the base, each rank, then full fine-tuning.
    sweep = [["base, not adapted", *base_figures, "", "", "", ""]]
    for run in [runs[(rank, 0)] for rank in options.ranks + [0]]:
        name = f"LoRA r = {run['rank']}" if run["rank"] else "full fine-tuning"
        sweep.append([name, run["loss"], run["accuracy"], f"{run['trainable']:,}",
                      f"{run['bytes']:,}", round(run["ms_per_step"]),
                      PAPER_LOSS.get(run["rank"], "")])
    out = ["# The LoRA paper's GPT-2 findings, in miniature", "",
           f"Base: {settings.init_from}, {config.n_layer} layers of width {config.n_embd}. Each "
           f"run: {settings.max_iters} steps of {settings.batch_size} x {settings.block_size} "
           f"tokens, seed {settings.seed}; LoRA on Q, V at lr {options.lr[0]:g}, alpha "
           f"{settings.alpha:g}; full fine-tuning at lr {options.lr[1]:g}.", "",
           "## Rank sweep (paper: Table 18)", ""]
    out += table(["run", "held-out loss", "accuracy", "trainable", "checkpoint bytes", "ms/step",
                  "paper: GPT-2 M, E2E"],
                 [[row[0], f"{row[1]:.4f}", f"{100 * row[2]:.1f}%"] + row[3:] for row in sweep])
    out += ["ms/step: the run's wall time over its steps, evaluations included.", ""]
    out += [f"![{name}]({name})" for name in files if name.startswith("rank")]

    # Subspace similarity: phi at (1, 1), at (1, all j) and its mean, for each pair of A.
    out += ["", "## Subspace similarity of A (paper: Figures 3, 4)", "",
            "φ(i, j) = ‖U_iᵀ U_j‖²_F / min(i, j) over the top-i and the top-j right-singular",
            "vectors of two A. Random subspaces of R^d give max(i, j) / d on average;",
            f"d = {config.n_embd} here.", ""]
    similarity = []
    for grids, _, _, label1, label2 in phis.values():
        for matrix in "qv":
            for where in options.where:
                grid = grids[matrix][where]
                figures = [three_decimals(v) for v in (grid[0, 0], grid[0, -1], grid.mean())]
                similarity.append([f"{label1} vs {label2}", matrix, options.where[where]]
                                  + figures)
    out += table(["A compared", "ΔW", "where", "φ(1, 1)", "φ(1, all j)", "mean φ"], similarity)
    out += [f"![{name}]({name})" for name in files if name.startswith("subspace")]

    # Amplification: ours by rank and layer, then the paper's GPT-3 figures at layer 48.
    out += ["", "## Amplification of W_q by ΔW_q (paper: Table 7)", "",
            "‖Uᵀ Wq Vᵀ‖_F, U and V the top-r singular vectors of ΔWq, of Wq, or of a",
            "random matrix; the factor: ‖ΔWq‖_F over the first.", ""]
    rows = [row[:2] + [three_decimals(v) for v in row[2:]]
            for rank in options.amp_ranks for row in amps[rank]]
    rows += [[rank, "paper: GPT-3, 48"] + paper + [round(paper[4] / paper[0], 1)]
             for rank, paper in PAPER_AMP.items()]
    out += table(["r", "layer", "ΔWq's U, V", "Wq's U, V", "random U, V", "‖Wq‖_F", "‖ΔWq‖_F",
                  "factor"], rows)

    # Latency: the bench's rows, by batch.
    out += ["## Inference latency (paper: Table 1)", "",
            f"A forward pass of {settings.block_size} tokens, median of "
            f"{options.latency_repeats} samples. The",
            "paper: adapter layers add 20-30% at batch 1, merged LoRA nothing.", ""]
    out += table(["batch", "model", "median ms", "ratio to plain", "range"],
                 [[row["comparison"], row["candidate"], f"{row['median']:.2f}",
                   three_decimals(row["ratio"]),
                   "-".join(map(three_decimals, row["ratio_range"] or []))]
                  for row in latency_rows])
    return "\n".join(out)


def main(argv=None) -> dict:
    """Run what is not done yet, then write the report; returns its figures."""
    options, settings = parse_options(sys.argv[1:] if argv is None else argv)
    runtime = ts.setup_runtime(settings)
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
    # A scratch base reads characters; a pretrained GPT-2 reads GPT-2's BPE.
    if scratch:
        tokenizer = {"type": "char", "chars": "".join(sorted(set(text)))}
    else:
        tokenizer = {"type": "gpt2-bpe"}
    ids = torch.tensor(ts.encode(tokenizer, text, "--data"))
    base_ids, adapt_ids, *data = ts.split(ids, settings, scratch)
    base = base_model(settings, runtime, tokenizer, base_ids, data, data_sha)
    base.requires_grad_(False)
    check_ranks(options, base.config.n_embd)  # for --init-from, whose width is known only now
    base_figures = ts.evaluate(base, *data, settings, runtime)
    options.middle = base.config.n_layer // 2
    options.where = dict(layer=f"layer {options.middle}", mean="mean of layers",
                         random="random A")

    # The runs: (rank, seed offset), each its own file in --out-dir/runs, skipped when done
    # before. Each rank once, full fine-tuning (rank 0), and the second phi rank again from the
    # next seed, for the paper's Figure 4.
    r1, r2 = options.phi_ranks
    every_rank = sorted(set(options.ranks + options.phi_ranks + options.amp_ranks))
    jobs = [(rank, 0) for rank in every_rank] + [(0, 0), (r2, 1)]
    runs = {(rank, offset): adapt(base, rank, settings.seed + offset, adapt_ids, data, settings,
                                  runtime, options.lr, data_sha)
            for rank, offset in jobs}

    # The analyses of the LoRA runs.
    lora = {key: adapters(base, runs[key], settings) for key in runs if key[0]}
    phis = {"ranks": (phi_grids(lora[(r1, 0)]["A"], lora[(r2, 0)]["A"], options.middle), r1, r2,
                      f"r = {r1}", f"r = {r2}"),
            "seeds": (phi_grids(lora[(r2, 0)]["A"], lora[(r2, 1)]["A"], options.middle), r2, r2,
                      f"r = {r2}, seed {settings.seed}", f"seed {settings.seed + 1}")}
    amps = {rank: amplification_rows(base, lora[(rank, 0)]) for rank in options.amp_ranks}
    runtime.log("timing forward passes")
    # Latency is measured on the first phi rank's model: a small rank, as the paper's Table 1.
    latency_rows = latency(base, lora[(r1, 0)]["model"], settings, runtime,
                           options.latency_repeats)

    # The figures, then the report, written whole under a temporary name and renamed.
    files = plots(options, runs, phis, base_figures[0], settings.out_dir, runtime.log)
    path = os.path.join(settings.out_dir, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(report(options, settings, runs, phis, amps, latency_rows, base, base_figures,
                       files))
    os.replace(path + ".tmp", path)
    runtime.log(f"wrote {path} and {len(files)} figures in {time.perf_counter() - start:.0f}s")
    return dict(runs=runs, phi=phis, amplification=amps, latency=latency_rows, base=base_figures,
                files=files)


def cli(argv=None) -> int:
    """The command: train_shakespeare.py's, one line on stderr for each expected failure."""
    return ts.cli(argv, main)


if __name__ == "__main__":
    sys.exit(cli())
