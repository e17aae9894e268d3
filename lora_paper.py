#!/usr/bin/env python
"""The LoRA paper's GPT-2 findings in miniature, on train_shakespeare.py's Shakespeare setting.

    python lora_paper.py --data input.txt             # the default run, into out-paper/
    python lora_paper.py --ranks 1,4 --max-iters 100  # smaller; train_shakespeare.py's options too

Its base (train_shakespeare.py's scratch base, or --init-from) is adapted once per rank and once
in full: same steps, learning-rate rule, seed, split and held-out windows. The rank sweep (paper:
Table 18), subspace similarity of A at two ranks and seeds (Figures 3, 4), amplification (Table 7)
and latency (Table 1) go to --out-dir/report.md, with PNG figures given matplotlib. Finished runs
are kept in --out-dir/runs, and skipped when the command runs again."""

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
UNKEYED = ("out_dir", "data", "sample", "prompt")  # a run's key: its other settings, text and base
# The paper's figures: Table 18 (GPT-2 M, E2E, loss by rank) and Table 7 (see report()).
PAPER_LOSS = {1: 1.23, 4: 1.18, 16: 1.16, 64: 1.16}
PAPER_AMP = {4: [0.32, 21.67, 0.02, 61.95, 6.91], 64: [1.90, 37.71, 0.33, 61.95, 3.57]}


# ---- The math
def right_singular(A: torch.Tensor) -> torch.Tensor:
    """U (d, min(r, d)): A's right-singular vectors in columns, largest first."""
    return torch.linalg.svd(A.double(), full_matrices=False)[2].T


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """The grid phi[i-1, j-1] = phi(A1, A2, i, j) = ||U_i^T U_j||_F^2 / min(i, j), i <= r1, j <= r2.

    U_i holds the top-i right-singular vectors of A1 (r1, d), U_j the top-j of A2 (r2, d). phi lies
    in [0, 1]: 1 where one subspace holds the other, 0 where they are orthogonal; for random
    subspaces it averages max(i, j) / d. The sign and order of A1's, A2's rows do not change it."""
    overlap = (right_singular(A1).T @ right_singular(A2)) ** 2  # (r1, r2): squared cosines
    i, j = (torch.arange(1, n + 1, dtype=overlap.dtype) for n in overlap.shape)
    return overlap.cumsum(0).cumsum(1) / torch.minimum(i[:, None], j[None, :])


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
    return dW.double().norm().item() / projected_norm(W, *top_singular(dW, r))


# ---- The runs
def settings(argv) -> tuple:
    """(this script's options, train_shakespeare.py's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Its options apply too, but "
                                "--rank, --resume and exports.", allow_abbrev=False)
    p.error = lambda message: ts._Parser.error(p, message)
    p.add_argument("--ranks", default="1,2,4,8,16,64", help="ranks of the sweep")
    p.add_argument("--phi-ranks", default="4,16", help="two ranks phi compares; seeds: the 2nd")
    p.add_argument("--amp-ranks", default="4,64", help="ranks of the amplification table")
    p.add_argument("--latency-repeats", type=ts._number(1), default=5, help="timed samples each")
    o, rest = p.parse_known_args(argv)
    try:
        o.ranks, o.phi_ranks, o.amp_ranks = (sorted({int(r) for r in v.split(",")})
                                             for v in (o.ranks, o.phi_ranks, o.amp_ranks))
    except ValueError:
        raise ValueError("--ranks, --phi-ranks, --amp-ranks: ranks and commas, e.g. 1,4") from None
    if min(o.ranks + o.phi_ranks + o.amp_ranks) < 1 or len(o.phi_ranks) != 2:
        raise ValueError("ranks must be integers >= 1, and --phi-ranks two different ones")
    s = ts.parse_settings(DEFAULTS + ["--rank", "-1"] + rest)[0]
    if s.rank != -1 or s.resume or s.save_pretrained or s.save_adapter:
        raise ValueError("use --ranks, not --rank, --resume or exports (runs resume by themselves)")
    o.lr = [ts.parse_settings(DEFAULTS + rest + ["--rank", str(r)])[0].lr for r in (1, 0)]
    return o, s


def load(path: str):
    """A finished run or checkpoint at `path`, or None; a damaged one is named, in one line."""
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, unpickling errors: many types
        raise ValueError(f"cannot read {path} ({ts.one_line(e)}); delete it to redo it") from None


def train(model, ids, data, s, rt, path: str, **kw) -> tuple:
    """ts.train, going on from path.part if there; (history, (loss, accuracy), ms per step)."""
    part, t0 = path + ".part", time.perf_counter()
    resume = load(part)

    def save(phase, model, state):
        ts.save_atomic({**state, "weights": ts.trainable_weights(model)}, part)
    history, evaluation = ts.train(model, ids, *data, s, rt, save=save, resume=resume, **kw)
    steps = max(1, kw["iters"] - (resume["step"] if resume else 0))
    return history, evaluation, 1000 * (time.perf_counter() - t0) / steps


def base_model(s, rt, tokenizer, base_ids, data, data_sha) -> GPT2LMModel:
    """--init-from, or train_shakespeare.py's scratch base: its file name and format."""
    if s.init_from != "scratch":
        return GPT2LMModel.from_pretrained(s.init_from).to(rt.device)
    config = GPT2Config(vocab_size=len(tokenizer["chars"]), n_layer=s.n_layer, n_head=s.n_head,
                        n_embd=s.n_embd, n_positions=s.block_size, n_ctx=s.block_size)
    path = os.path.join(s.out_dir, ts.base_file(s, config, data_sha, rt.dtype))
    if os.path.isfile(path):
        rt.log(f"using the cached base {path}")
        weights = ts.read_checkpoint(path, "base")["weights"]
        return GPT2LMModel(config).load_weight(weights).to(rt.device)
    torch.manual_seed(s.seed)
    base = GPT2LMModel(config).to(rt.device)
    rt.log(f"pretraining a char-level base on {len(base_ids):,} tokens for {s.base_iters} steps")
    train(base, base_ids, data, s, rt, path, phase="base", iters=s.base_iters, lr=s.base_lr)
    ts.save_atomic(dict(format=ts.FORMAT, kind="base", config=config.to_dict(), tokenizer=tokenizer,
                        weights=ts.trainable_weights(base)), path)
    os.remove(path + ".part")
    return base


def with_lora(config: GPT2Config, rank: int, s) -> GPT2Config:
    return GPT2Config.from_dict({**config.to_dict(), "lora_attn_dim": rank,
                                 "lora_attn_alpha": s.alpha, "lora_dropout": s.lora_dropout})


def qv(W: torch.Tensor) -> tuple:
    """(W_q, W_v), each (out, in), from a fused c_attn weight (in, 3 out)."""
    W = W.detach().cpu()
    return W[:, :len(W)].T, W[:, 2 * len(W):].T


def adapt(base, rank: int, seed: int, adapt_ids, data, s, rt, lr, data_sha: str) -> dict:
    """An adaptation at `rank` (0: every weight) from `seed`: its figures and adapters."""
    s = argparse.Namespace(**{**vars(s), "rank": rank, "seed": seed, "lr": lr[rank == 0]})
    name = f"r{rank}" if rank else "full"
    recipe = {k: v for k, v in vars(s).items() if k not in UNKEYED}
    init = 1000 * seed + rank  # one seed at two ranks would make r = 4's A r = 16's first rows
    key = repr((recipe, data_sha, base_fingerprint(base), init))
    run_key = hashlib.sha1(key.encode()).hexdigest()
    path = os.path.join(s.out_dir, "runs", f"{name}-seed{seed}-{run_key[:12]}.pt")
    done = load(path)
    if done is not None:
        rt.log(f"done before: {path}")
        return done
    torch.manual_seed(init)  # the adapters' init
    model = GPT2LMModel(with_lora(base.config, rank, s)).to(rt.device)
    model.load_weight(base.state_dict())
    if rank:
        mark_only_lora_as_trainable(model)
    rt.log(f"adapting: {name}, seed {seed}, lr {s.lr:g}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    history, (loss, acc), ms = train(model, adapt_ids, data, s, rt, path, phase=name,
                                     iters=s.max_iters, lr=s.lr)
    weights, buffer = ts.trainable_weights(model), io.BytesIO()
    torch.save(weights, buffer)
    result = dict(rank=rank, seed=seed, loss=loss, accuracy=acc, history=history, ms_per_step=ms,
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  bytes=buffer.tell(), **({"weights": weights} if rank else {}))
    ts.save_atomic(result, path)
    os.remove(path + ".part")
    return result


# ---- The analyses
def adapters(base, run: dict, s) -> dict:
    """A LoRA run's A and ΔW (each (q, v)) by layer, from its weights set on its base."""
    model = GPT2LMModel(with_lora(base.config, run["rank"], s)).load_weight(base.state_dict())
    attn = [block.attn.c_attn for block in model.load_weight(run["weights"]).transformer.h]
    return dict(A=[c.lora_A.detach().cpu().split(run["rank"]) for c in attn], model=model,
                dW=[qv(c.delta_weight()) for c in attn], rank=run["rank"])


def phi_grids(A1: list, A2: list, layer: int) -> dict:
    """phi for 'q' and 'v': at `layer`, averaged over layers, and for Gaussian A of those shapes."""
    g, out = torch.Generator().manual_seed(0), {}
    for m, w in enumerate("qv"):
        grids = [subspace_similarity(a1[m], a2[m]) for a1, a2 in zip(A1, A2)]
        rand = [subspace_similarity(*(torch.randn(a[m].shape, generator=g) for a in pair))
                for pair in zip(A1, A2)]
        out[w] = dict(layer=grids[layer], mean=sum(grids) / len(grids),
                      random=sum(rand) / len(rand))
    return out


def amplification_rows(base, run: dict) -> list:
    """Table 7's figures, by layer."""
    g, r, rows = torch.Generator().manual_seed(0), run["rank"], []
    for layer, (block, (dWq, _)) in enumerate(zip(base.transformer.h, run["dW"])):
        Wq = qv(block.attn.c_attn.weight)[0]
        rows.append([r, layer] + [projected_norm(Wq, *top_singular(M, r)) for M in
                                  (dWq, Wq, torch.randn(Wq.shape, generator=g))]
                    + [Wq.norm().item(), dWq.norm().item(), amplification(dWq, Wq, r)])
    return rows


def latency(base, lora, s, rt, repeats: int) -> list:
    """Table 1: a forward pass of --block-size tokens, batch 1 and 16, timed as the bench does."""
    merged = GPT2LMModel(lora.config).load_weight(lora.state_dict()).to(rt.device).eval()
    merge_lora(merged)
    r, rows = lora.config.lora_attn_dim, []
    models = (("plain", base.eval()), (f"LoRA r={r} merged", merged),
              (f"LoRA r={r} unmerged", lora.to(rt.device).eval()))
    for batch in (1, 16):
        x = torch.randint(base.config.vocab_size, (batch, s.block_size), device=rt.device)
        fns = {name: torch.no_grad()(lambda m=m: m(x)) for name, m in models}
        ms = bench.time_interleaved(fns, repeats, rt.device)
        rows += bench.make_rows(batch, ms, "plain", "ms")
    return rows


def plots(o, runs, phis, base_loss: float, out_dir: str, log) -> list:
    """The figures as PNG files in out_dir; none, and a line saying so, without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no figures without matplotlib (pip install matplotlib); the report has tables")
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="tight")
    ax.plot(o.ranks, [runs[(r, 0)]["loss"] for r in o.ranks], "o-", label="LoRA on Q, V")
    ax.axhline(runs[(0, 0)]["loss"], color="C1", ls="--", label="full fine-tuning")
    ax.axhline(base_loss, color="gray", ls=":", label="base, not adapted")
    ax.set(xscale="log", xlabel="rank r", ylabel="held-out loss", title="Rank sweep")
    ax.set_xticks(o.ranks, map(str, o.ranks), minor=False)
    ax.minorticks_off()
    ax.legend()
    figures = [(fig, "rank_sweep.png")]
    for name, (grids, r1, r2, label1, label2) in phis.items():
        fig, axes = plt.subplots(2, 3, figsize=(11, 5 + 2 * (r1 == r2)), squeeze=False)
        fig.subplots_adjust(hspace=0.45, wspace=0.3, right=0.8)
        for row, w in enumerate("qv"):
            for col, k in enumerate(("layer", "mean", "random")):
                ax = axes[row][col]
                im = ax.imshow(grids[w][k].numpy(), vmin=0, vmax=1, aspect="auto",
                               extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
                ax.set(title=f"ΔW{w}, {o.where[k]}", xlabel=f"j ({label2})", ylabel=f"i ({label1})",
                       xticks=range(1, r2 + 1, -(-r2 // 8)), yticks=range(1, r1 + 1, -(-r1 // 8)))
        fig.colorbar(im, ax=axes, label="φ(i, j)", fraction=0.03)
        fig.suptitle(f"Subspace similarity φ of A: {label1} vs {label2}")
        figures.append((fig, f"subspace_{name}.png"))
    for fig, name in figures:
        fig.savefig(os.path.join(out_dir, name + ".tmp"), format="png", dpi=80)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    plt.close("all")
    return [name for _, name in figures]


# ---- The report
def table(header: list, rows: list) -> list:
    rows = [header, ["---"] * len(header)] + rows
    return ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def report(o, s, runs, phis, amps, lat, base, base_figures, files) -> str:
    c, x = base.config, "{:.3f}".format
    rows = [["base, not adapted", *base_figures, "", "", "", ""]]
    rows += [[f"LoRA r = {r['rank']}" if r["rank"] else "full fine-tuning", r["loss"],
              r["accuracy"], f"{r['trainable']:,}", f"{r['bytes']:,}", round(r["ms_per_step"]),
              PAPER_LOSS.get(r["rank"], "")] for r in [runs[(r, 0)] for r in o.ranks + [0]]]
    out = ["# The LoRA paper's GPT-2 findings, in miniature", "",
           f"Base: {s.init_from}, {c.n_layer} layers of width {c.n_embd}. Each run: {s.max_iters} "
           f"steps of {s.batch_size} x {s.block_size} tokens, seed {s.seed}; LoRA on Q, V at lr "
           f"{o.lr[0]:g}, alpha {s.alpha:g}; full fine-tuning at lr {o.lr[1]:g}.", "",
           "## Rank sweep (paper: Table 18)", ""]
    out += table(["run", "held-out loss", "accuracy", "trainable", "checkpoint bytes", "ms/step",
                  "paper: GPT-2 M, E2E"],
                 [[row[0], f"{row[1]:.4f}", f"{100 * row[2]:.1f}%"] + row[3:] for row in rows])
    out += ["ms/step: the run's wall time over its steps, evaluations included.", ""]
    out += [f"![{n}]({n})" for n in files if n.startswith("rank")]
    out += ["", "## Subspace similarity of A (paper: Figures 3, 4)", "",
            "φ(i, j) = ‖U_iᵀ U_j‖²_F / min(i, j) over the top-i and the top-j right-singular",
            "vectors of two A. Random subspaces of R^d give max(i, j) / d on average;",
            f"d = {c.n_embd} here.", ""]
    out += table(["A compared", "ΔW", "where", "φ(1, 1)", "φ(1, all j)", "mean φ"],
                 [[f"{a} vs {b}", w, o.where[k]] + [x(v) for v in (g[0, 0], g[0, -1], g.mean())]
                  for grids, _, _, a, b in phis.values() for w in "qv" for k in o.where
                  for g in [grids[w][k]]])
    out += [f"![{n}]({n})" for n in files if n.startswith("subspace")]
    out += ["", "## Amplification of W_q by ΔW_q (paper: Table 7)", "",
            "‖Uᵀ Wq Vᵀ‖_F, U and V the top-r singular vectors of ΔWq, of Wq, or of a",
            "random matrix; the factor: ‖ΔWq‖_F over the first.", ""]
    rows = [row[:2] + [x(v) for v in row[2:]] for r in o.amp_ranks for row in amps[r]]
    rows += [[r, "paper: GPT-3, 48"] + p + [round(p[4] / p[0], 1)] for r, p in PAPER_AMP.items()]
    out += table(["r", "layer", "ΔWq's U, V", "Wq's U, V", "random U, V", "‖Wq‖_F", "‖ΔWq‖_F",
                  "factor"], rows)
    out += ["## Inference latency (paper: Table 1)", "",
            f"A forward pass of {s.block_size} tokens, median of {o.latency_repeats} samples. The",
            "paper: adapter layers add 20-30% at batch 1, merged LoRA nothing.", ""]
    out += table(["batch", "model", "median ms", "ratio to plain", "range"],
                 [[row["comparison"], row["candidate"], f"{row['median']:.2f}", x(row["ratio"]),
                   "-".join(map(x, row["ratio_range"] or []))] for row in lat])
    return "\n".join(out)


def main(argv=None) -> dict:
    """Run what is not done yet, then write the report; returns its figures."""
    o, s = settings(sys.argv[1:] if argv is None else argv)
    rt = ts.setup_runtime(s)
    try:
        with ts.claim(s.out_dir):
            return run(o, s, rt)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted: run the same command again to go on") from None


def run(o, s, rt) -> dict:
    t0, text = time.perf_counter(), ts.read_text(s, rt)
    scratch, data_sha = s.init_from == "scratch", hashlib.sha256(text.encode()).hexdigest()
    tokenizer = {"type": "gpt2-bpe"} if not scratch else {"type": "char",
                                                         "chars": "".join(sorted(set(text)))}
    ids = torch.tensor(ts.encode(tokenizer, text, "--data"))
    base_ids, adapt_ids, *data = ts.split(ids, s, scratch)
    base = base_model(s, rt, tokenizer, base_ids, data, data_sha).requires_grad_(False)
    base_figures, o.middle = ts.evaluate(base, *data, s, rt), base.config.n_layer // 2
    o.where = dict(layer=f"layer {o.middle}", mean="mean of layers", random="random A")
    r1, r2 = o.phi_ranks
    jobs = [(r, 0) for r in sorted(set(o.ranks + o.phi_ranks + o.amp_ranks))] + [(0, 0), (r2, 1)]
    runs = {(r, i): adapt(base, r, s.seed + i, adapt_ids, data, s, rt, o.lr, data_sha)
            for r, i in jobs}
    lora = {k: adapters(base, runs[k], s) for k in runs if k[0]}
    phis = {"ranks": (phi_grids(lora[(r1, 0)]["A"], lora[(r2, 0)]["A"], o.middle), r1, r2,
                      f"r = {r1}", f"r = {r2}"),
            "seeds": (phi_grids(lora[(r2, 0)]["A"], lora[(r2, 1)]["A"], o.middle), r2, r2,
                      f"r = {r2}, seed {s.seed}", f"seed {s.seed + 1}")}
    amps = {r: amplification_rows(base, lora[(r, 0)]) for r in o.amp_ranks}
    rt.log("timing forward passes")
    lat = latency(base, lora[(r1, 0)]["model"], s, rt, o.latency_repeats)
    files = plots(o, runs, phis, base_figures[0], s.out_dir, rt.log)
    path = os.path.join(s.out_dir, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(report(o, s, runs, phis, amps, lat, base, base_figures, files))
    os.replace(path + ".tmp", path)
    rt.log(f"wrote {path} and {len(files)} figures in {time.perf_counter() - t0:.0f}s")
    return dict(runs=runs, phi=phis, amplification=amps, latency=lat, base=base_figures,
                files=files)


def cli(argv=None) -> int:
    """The command: train_shakespeare.py's, one line on stderr for each expected failure."""
    return ts.cli(argv, main)


if __name__ == "__main__":
    sys.exit(cli())
