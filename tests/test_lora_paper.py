"""Tests of lora_paper.py: the laws of the subspace similarity φ and of the amplification factor,
and the script itself at tiny sizes (tables, figures, resuming, refusals).
"""

import glob
import os
import re
import shutil
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st


import train_shakespeare as ts

from helpers import (TRAIN_TINY, copy_run, seeds, without)

from helpers import (_hf_folder, byte_tokens)


import lora_paper as paper  # noqa: E402


@st.composite
def two_matrices(draw, max_d=12):
    """Two Gaussian matrices (r1, d) and (r2, d) with r1, r2 <= d, float64."""
    d = draw(st.integers(2, max_d))
    r1, r2 = draw(st.integers(1, d)), draw(st.integers(1, d))
    g = torch.Generator().manual_seed(draw(seeds))
    return (torch.randn(r1, d, generator=g, dtype=torch.float64),
            torch.randn(r2, d, generator=g, dtype=torch.float64))


@given(pair=two_matrices())
def test_phi_lies_in_zero_one_and_is_symmetric(pair):
    """0 <= phi(A1, A2, i, j) <= 1 for all i <= r1, j <= r2, and phi(A2, A1, j, i) equals it."""
    A1, A2 = pair
    grid = paper.subspace_similarity(A1, A2)
    assert grid.shape == (len(A1), len(A2))
    assert grid.min() >= -1e-12 and grid.max() <= 1 + 1e-12
    torch.testing.assert_close(paper.subspace_similarity(A2, A1), grid.T)


@given(pair=two_matrices())
def test_phi_is_one_for_identical_subspaces_and_zero_for_orthogonal_ones(pair):
    """phi(A, A, i, j) = 1 for all i, j (the top-min(i, j) directions are shared); phi = 1 at
    i = j = r for another basis M A of the same row space; 0 for rows spanning orthogonal spaces."""
    A, other = pair
    ones = torch.ones(len(A), len(A), dtype=A.dtype)
    torch.testing.assert_close(paper.subspace_similarity(A, A), ones)
    mix = torch.randn(len(A), len(A), generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    M = torch.linalg.qr(mix)[0] * torch.arange(1.0, len(A) + 1, dtype=A.dtype)  # invertible
    assert abs(paper.subspace_similarity(M @ A, A)[-1, -1].item() - 1) < 1e-9
    Q = torch.linalg.qr(torch.cat([A.T, other.T], 1))[0].T  # orthonormal rows
    k = min(len(A), len(Q) - 1)
    assert paper.subspace_similarity(Q[:k], Q[k:]).abs().max() < 1e-9


@given(pair=two_matrices())
def test_phi_takes_the_top_singular_directions_first(pair):
    """A = diag(s) Q, Q with orthonormal rows and s decreasing: the top-i right-singular subspace
    of A is the span of Q's first i rows, so phi(A, Q_1, i, 1) = 1 for every i, and
    phi(A, Q_r, 1, 1) = 0 for the last row Q_r."""
    A, _ = pair
    Q = torch.linalg.qr(A.T)[0].T  # (r, d), orthonormal rows
    scaled = torch.arange(len(Q), 0, -1, dtype=Q.dtype)[:, None] * Q
    ones = torch.ones(len(Q), 1, dtype=Q.dtype)
    torch.testing.assert_close(paper.subspace_similarity(scaled, Q[:1]), ones)
    if len(Q) > 1:
        assert paper.subspace_similarity(scaled, Q[-1:])[0, 0] < 1e-9


@given(pair=two_matrices(), data=st.data())
def test_phi_is_invariant_to_the_sign_and_order_of_the_basis_vectors(pair, data):
    """Permuting the rows of A1 and flipping their signs keeps its row space, so the grid of phi."""
    A1, A2 = pair
    order = data.draw(st.permutations(range(len(A1))))
    signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(A1), max_size=len(A1)))
    moved = (A1 * torch.tensor(signs, dtype=A1.dtype)[:, None])[list(order)]
    expected = paper.subspace_similarity(A1, A2)
    torch.testing.assert_close(paper.subspace_similarity(moved, A2), expected)


@given(pair=two_matrices(), c=st.floats(0.01, 100) | st.floats(-100, -0.01), r=st.integers(1, 12))
def test_amplification_of_a_multiple_of_W(pair, c, r):
    """dW = c W: ||dW||_F / ||U^T W V^T||_F = |c| ||W||_F / ||W_r||_F, with W_r the best rank-r part
    of W (its norm: that of the top r singular values); exactly |c| when W has rank <= r."""
    W, B = pair
    r = min(r, min(W.shape))
    top = torch.linalg.svdvals(W)[:r].square().sum().sqrt().item()
    expected = abs(c) * W.norm().item() / top
    assert paper.amplification(c * W, W, r) == pytest.approx(expected, rel=1e-9)
    assert paper.projected_norm(W, *paper.top_singular(W, r)) == pytest.approx(top, rel=1e-9)
    low = B[:r].T @ B[:r]  # (d, d) of rank <= r
    assert paper.amplification(c * low, low, r) == pytest.approx(abs(c), rel=1e-6)


def test_spread_is_the_mean_its_standard_error_and_range():
    """spread: the mean, sample standard deviation over sqrt(n), lowest and highest; a single
    value has no error. differs: only when the gap exceeds both errors and the ranges part."""
    stats = paper.spread([1.0, 2.0, 3.0, 6.0])
    assert stats["mean"] == 3.0 and stats["low"] == 1.0 and stats["high"] == 6.0
    assert stats["se"] == pytest.approx((14 / 3) ** 0.5 / 2)
    assert paper.spread([5.0])["se"] == 0.0
    assert paper.shown(paper.spread([1.0, 3.0]), 1) == "2.0 ± 1.0 (1.0–3.0)"
    apart, overlapping = paper.spread([0.0, 0.1]), paper.spread([0.05, 1.0])
    assert paper.differs(apart, paper.spread([1.0, 1.1]))
    assert not paper.differs(apart, overlapping)  # ranges overlap
    assert not paper.differs(paper.spread([1.0] * 3), paper.spread([1.0] * 3))


def test_gaussian_phi_averages_max_i_j_over_d():
    """For independent Gaussian A1, A2 in R^d, phi(i, j) averages max(i, j) / d: the chance level
    the Gaussian baseline draws. 400 draws at d = 12 put the mean within 0.02."""
    generator = torch.Generator().manual_seed(0)
    d, r1, r2 = 12, 3, 5
    grids = [paper.subspace_similarity(torch.randn(r1, d, generator=generator),
                                       torch.randn(r2, d, generator=generator))
             for _ in range(400)]
    mean = sum(grids) / len(grids)
    i, j = torch.meshgrid(torch.arange(1, r1 + 1), torch.arange(1, r2 + 1), indexing="ij")
    expected = torch.maximum(i, j).double() / d
    assert (mean - expected).abs().max() < 0.02


@given(d=st.integers(3, 12), k=st.integers(1, 3), r=st.integers(1, 6), seed=seeds)
def test_a_drawn_from_the_inputs_covariance_lies_in_their_span(d, k, r, seed):
    """Inputs in a k-dimensional subspace: a random A drawn from their covariance has its rows in
    it (phi against its basis is 1 for the top min(r, k) directions); a Gaussian A does not.
    Their effective dimensions: k."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, d - 1)
    basis = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))[0].T
    inputs = torch.randn(200, k, generator=generator, dtype=torch.float64) @ basis  # (200, d)
    sigma = paper.second_moment(inputs)
    assert paper.effective_dimensions(torch.eye(d, dtype=torch.float64)) == pytest.approx(d)
    assert 1 - 1e-9 <= paper.effective_dimensions(sigma) <= k + 1e-9
    A = paper.draw_like_inputs(sigma, r, generator)
    top = min(r, k)
    grid = paper.subspace_similarity(A, basis)
    assert grid[:top, -1].min() > 1 - 1e-6
    gaussian = torch.randn(r, d, generator=generator, dtype=torch.float64)
    assert paper.subspace_similarity(gaussian, basis)[0, -1] < 1 - 1e-3


def test_random_directions_are_orthonormal_and_hold_r_squared_over_d_squared_of_w():
    """Random U (d_out, r), V (r, d_in) are orthonormal, and ||U^T W V^T||_F^2 averages
    r^2 ||W||_F^2 / (d_out d_in) over draws: the share of W that directions knowing nothing of it
    hold. 600 draws put the mean within 10%."""
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    r = 2
    U, V = paper.random_directions(6, 9, r, generator)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=U.dtype))
    torch.testing.assert_close(V @ V.T, torch.eye(r, dtype=V.dtype))
    squares = [paper.projected_norm(W, *paper.random_directions(6, 9, r, generator)) ** 2
               for _ in range(600)]
    expected = r ** 2 * W.norm().item() ** 2 / (6 * 9)
    assert sum(squares) / len(squares) == pytest.approx(expected, rel=0.1)


@given(pair=two_matrices(), r=st.integers(1, 12))
def test_energy_in_top_is_one_for_a_matrix_of_rank_at_most_r(pair, r):
    """The share of ||dW||^2 in the top-r singular values: 1 for rank <= r, growing with r."""
    A, B = pair
    r = min(r, len(A))
    low = A[:r].T @ B[:r] if len(B) >= r else A[:len(B)].T @ B
    assert paper.energy_in_top(low, r) == pytest.approx(1.0, abs=1e-9)
    full = A.T @ A
    assert paper.energy_in_top(full, r) <= paper.energy_in_top(full, r + 1) + 1e-12


def test_lowercase_ids_keep_positions_and_windows_cover_the_held_out_text():
    """The lower-case task maps each character to its lower case, position for position, as
    encoding the lowered text does; every_window tiles the held-out text without overlap."""
    text = "ROMEO:\nBut Soft, what Light? romeo bells! Q"
    tokenizer = {"type": "char", "chars": "".join(sorted(set(text)))}
    ids = torch.tensor(ts.encode(tokenizer, text, "text"))
    lowered = paper.lowercase_ids(tokenizer, text, ids)
    # "q" is not in the alphabet: "Q" stays
    assert lowered.tolist() == ts.encode(tokenizer, text.lower()[:-1] + "Q", "text")
    val = torch.arange(1000)
    settings = ts.parse_settings(["--block-size", "16"])[0]
    starts = paper.every_window(val, settings)
    assert len(starts) == (1000 - 17) // 16 + 1 and starts[0] == 0 and starts[-1] == 1000 - 17
    assert (starts.diff() >= 16).all()


PAPER_SETTINGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                  "--batch-size", "4", "--base-iters", "6", "--max-iters", "4", "--warmup", "1",
                  "--eval-interval", "2", "--eval-iters", "2", "--device", "cpu",
                  "--latency-repeats", "1"]
PAPER_TINY = PAPER_SETTINGS + ["--ranks", "1,2,4", "--phi-ranks", "2,4", "--amp-ranks", "1,4",
                               "--seeds", "2", "--full-lrs", "1e-3,3e-3", "--draws", "3"]
# The runs of PAPER_TINY: (task, rank, seed, lr); rank 0 is full fine-tuning.
SEEDS = (1337, 1338)
TINY_RUNS = ({("lowercase", r, s, 5e-3) for r in (1, 2, 4) for s in SEEDS}
             | {("lowercase", 0, 1337, lr) for lr in (1e-3, 3e-3)}
             | {("other-half", 4, s, 5e-3) for s in SEEDS})


def stop_at_the_first_part_file(monkeypatch):
    """Make the script stop (as if interrupted) right after it writes its first .part file;
    returns the real save, to put back."""
    save = ts.save_atomic

    def stop(obj, path):
        save(obj, path)
        if path.endswith(".part"):
            raise KeyboardInterrupt
    monkeypatch.setattr(ts, "save_atomic", stop)
    return save


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("paper")
    return paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)]), out


def test_paper_script_writes_every_table(paper_run):
    result, out = paper_run
    text = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("Rank sweep", "Subspace similarity", "Amplification", "Inference latency"):
        assert f"## {heading}" in text
    full_lr = result["full_lr"]
    assert set(result["runs"]) == TINY_RUNS | {("lowercase", 0, 1338, full_lr)}
    # rank 2 on Q and V of 2 layers of width 16; every run keeps its weights
    assert result["runs"][("lowercase", 2, 1337, 5e-3)]["trainable"] == 2 * 2 * (16 + 16) * 2
    assert all(run["weights"] for run in result["runs"].values())
    assert result["phi"]["ranks"]["trained"]["q"]["grid"].shape == (2, 4)
    assert result["phi"]["ranks"]["Gaussian"]["q"]["summary"]["mean phi"]["n"] == 3  # draws
    assert result["sweep"]["ranks"][4]["loss"]["n"] == 2  # seeds
    # every held-out window scored: (1115 bytes of held-out text - 17) // 16 + 1 of them
    assert result["windows"] > 2 * 4
    assert set(result["amplification"]) == {1, 4}
    assert "± " in text and text.count("Reading:") == 2 and "the highest baseline" in text


def test_paper_script_draws_every_figure_with_matplotlib(paper_run):
    pytest.importorskip("matplotlib")
    result, out = paper_run
    text = (out / "report.md").read_text(encoding="utf-8")
    assert result["files"] == ["rank_sweep.png", "subspace_ranks.png", "subspace_seeds.png"]
    for name in result["files"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text


def test_paper_script_again_trains_nothing_and_keeps_its_tables_without_matplotlib(
        paper_run, text_file, monkeypatch, capsys):
    result, out = paper_run
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    again = paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)])
    assert again["files"] == [] and "pip install matplotlib" in capsys.readouterr().out
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| LoRA r = 4 |" in text and "| full fine-tuning |" in text and "![" not in text
    losses = {k: r["loss"] for k, r in result["runs"].items()}
    assert {k: r["loss"] for k, r in again["runs"].items()} == losses


def test_paper_script_names_the_run_files_of_an_earlier_version_and_the_fix(
        paper_run, text_file, tmp_path, monkeypatch, capsys):
    """A run file of lora-paper-run/2 (named r4-seed1337-KEY.pt) is not read: one line names it
    and the fix, and the runs of this version are used."""
    out = _copy_paper_run(paper_run[1], tmp_path / "out")
    (out / "runs" / "r4-seed1337-0123456789ab.pt").write_bytes(b"an earlier version's")
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)])
    [line] = [line for line in capsys.readouterr().out.splitlines() if "not used" in line]
    assert "1 run file(s)" in line and "r4-seed1337-0123456789ab.pt" in line
    assert "remove them" in line


def test_paper_script_goes_on_from_an_interrupted_run(paper_run, text_file, tmp_path, monkeypatch,
                                                      capsys):
    """Stopped at the first checkpoint of its first adaptation (r = 1), then run again: the same
    figures as a run never stopped. Runs are keyed by their settings, not by --ranks."""
    result, out = paper_run
    copy_run(str(out), tmp_path)  # the cached base
    argv = PAPER_TINY + ["--ranks", "1", "--phi-ranks", "1,2", "--amp-ranks", "1",
                         "--data", text_file, "--out-dir", str(tmp_path)]
    save = stop_at_the_first_part_file(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the figures are tested above
    assert paper.cli(argv) == 130
    assert "interrupted: run the same command again" in capsys.readouterr().err
    [part] = os.listdir(tmp_path / "runs")
    assert part.startswith("lowercase-r1-seed1337-") and part.endswith(".part")
    monkeypatch.setattr(ts, "save_atomic", save)
    again = paper.main(argv)
    key = ("lowercase", 1, 1337, 5e-3)
    for name in ("loss", "accuracy", "history"):
        assert again["runs"][key][name] == result["runs"][key][name]


def test_paper_script_adapts_the_base_given_by_init_from(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _hf_folder(tmp_path / "hf", seed=0)  # 2 layers of width 32
    out = tmp_path / "out"
    result = paper.main(PAPER_TINY + ["--ranks", "1", "--phi-ranks", "1,2", "--amp-ranks", "2",
                                      "--data", text_file, "--init-from", str(tmp_path / "hf"),
                                      "--out-dir", str(out)])
    assert not glob.glob(str(out / "base-*.pt"))  # nothing pretrained
    assert result["runs"][("lowercase", 1, 1337, 5e-3)]["trainable"] == 1 * 2 * (32 + 32) * 2
    assert (f"Base: {tmp_path / 'hf'}, 2 layers of width 32"
            in (out / "report.md").read_text("utf-8"))


@pytest.mark.parametrize("option, message", [(["--rank", "4"], "use --ranks"),
                                             (["--phi-ranks", "4"], "two different"),
                                             (["--ranks", "1,x"], "ranks and commas")])
def test_paper_script_bad_options_are_one_line(option, message, capsys):
    assert paper.cli(PAPER_TINY + option) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_paper_script_reuses_the_base_train_shakespeare_cached_for_the_same_settings(
        finished_run, text_file, tmp_path, monkeypatch, capsys):
    """Both scripts name a scratch base with ts.base_file: given train_shakespeare.py's settings,
    lora_paper.py loads the base that run cached instead of pretraining its own."""
    class Loaded(Exception):
        pass

    def stop(*args):
        raise Loaded
    copy_run(finished_run[1], tmp_path)
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("pretrained a base again"))
    monkeypatch.setattr(ts, "evaluate", stop)  # the base's first evaluation: far enough
    with pytest.raises(Loaded):
        paper.main(without(TRAIN_TINY, "--rank") + ["--data", text_file, "--out-dir",
                                                    str(tmp_path)])
    assert "using the cached base" in capsys.readouterr().out


def test_paper_script_names_a_damaged_run_file_and_the_fix(tmp_path):
    """A run file cut short or foreign is a ValueError naming it (cli makes it one line), never a
    traceback of whichever unpickling error it raises."""
    for i, data in enumerate((b"not a checkpoint", b"PK\x03\x04cut")):
        path = tmp_path / f"run{i}.pt"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"cannot read {re.escape(str(path))} .*delete it"):
            paper.load(str(path))
    assert paper.load(str(tmp_path / "absent.pt")) is None


def _copy_paper_run(out, dest):
    """The paper run's folder, its runs included, in another folder."""
    shutil.copytree(out, dest)
    return dest


def _run_file(out, name):
    [path] = glob.glob(str(out / "runs" / f"{name}-seed1337-*.pt"))
    return path


@pytest.mark.parametrize("damage", ["other layout", "older version", "other rank's adapters"])
def test_paper_script_refuses_a_run_file_it_did_not_write_naming_it_and_the_fix(
        paper_run, text_file, tmp_path, monkeypatch, damage):
    """A run file of another layout or version, or holding another run's adapters, is refused in
    one line naming it, before the report (it used to end in a KeyError or TypeError traceback
    after every run, or to be read as a run of this version)."""
    out = _copy_paper_run(paper_run[1], tmp_path / "out")
    path = _run_file(out, "lowercase-r1")
    run = torch.load(path, weights_only=True)
    if damage == "other layout":
        run = {"rank": 1, "loss": "low"}
    elif damage == "older version":
        run.pop("format", None)
    else:
        run["weights"] = torch.load(_run_file(out, "lowercase-r2"),
                                    weights_only=True)["weights"]
    torch.save(run, path)
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=f"{re.escape(path)} is not this run's file .*remove it"):
        paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)])


def test_paper_script_without_matplotlib_removes_the_figures_of_an_earlier_run(
        paper_run, text_file, tmp_path, monkeypatch, capsys):
    """The figures of an earlier run show other ranks and seeds: a run that cannot draw its own
    removes them rather than leave them beside its report."""
    out = _copy_paper_run(paper_run[1], tmp_path / "out")
    for name in ("rank_sweep.png", "subspace_ranks.png", "subspace_seeds.png"):
        (out / name).write_bytes(b"\x89PNG\r\n\x1a\n an earlier run's")
    (out / "mine.png").write_bytes(b"the user's")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paper.main(PAPER_TINY + ["--data", text_file, "--out-dir", str(out)])
    assert sorted(p.name for p in out.glob("*.png")) == ["mine.png"]
    assert "removed the earlier figures rank_sweep.png" in capsys.readouterr().out


def test_paper_script_shares_an_out_dir_with_a_train_shakespeare_run(
        finished_run, text_file, tmp_path, monkeypatch, capsys):
    """A train_shakespeare.py run (ckpt.pt) in --out-dir is left alone, and its cached base used;
    the advice to --resume it, an option this script refuses, is gone. --overwrite is refused
    with advice this script follows."""
    class Loaded(Exception):
        pass

    def stop(*args):
        raise Loaded
    copy_run(finished_run[1], tmp_path, everything=True)
    checkpoint = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("pretrained a base again"))
    monkeypatch.setattr(ts, "evaluate", stop)
    argv = without(TRAIN_TINY, "--rank") + ["--data", text_file, "--out-dir", str(tmp_path)]
    with pytest.raises(Loaded):
        paper.main(argv)
    assert (tmp_path / "ckpt.pt").read_bytes() == checkpoint
    assert paper.cli(argv + ["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --overwrite") and "remove the folder runs" in err
    assert "--resume" not in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["no optimizer", "older version", "other weights"])
def test_paper_script_names_a_part_file_that_does_not_fit_and_the_fix(
        paper_run, text_file, tmp_path, monkeypatch, damage):
    """An interrupted run's .part file that this run cannot go on from is named, with the fix;
    it used to be reported as OUT/ckpt.pt, a file that does not exist."""
    copy_run(str(paper_run[1]), tmp_path)  # the cached base
    argv = PAPER_TINY + ["--ranks", "1", "--phi-ranks", "1,2", "--amp-ranks", "1",
                         "--data", text_file, "--out-dir", str(tmp_path)]
    save = stop_at_the_first_part_file(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert paper.cli(argv) == 130
    [part] = glob.glob(str(tmp_path / "runs" / "*.part"))
    state = torch.load(part, weights_only=True)
    if damage == "no optimizer":
        del state["optimizer"]
    elif damage == "older version":
        state.pop("format", None)
    else:
        state["weights"] = {name: torch.zeros(3) for name in state["weights"]}
    torch.save(state, part)
    monkeypatch.setattr(ts, "save_atomic", save)
    with pytest.raises(ValueError, match=f"{re.escape(part)} does not fit this run .*remove it"):
        paper.main(argv)


@pytest.mark.parametrize("option", [["--ranks", "1,100000000000"], ["--amp-ranks", "1,17"],
                                    ["--phi-ranks", "2,17"]])
def test_paper_script_refuses_ranks_above_the_width_before_any_run(option, text_file, tmp_path,
                                                                   monkeypatch, capsys):
    """A rank above the base's width (16 here) adds nothing and, when huge, cannot be allocated:
    refused in one line before the base or any adaptation trains."""
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("trained"))
    argv = PAPER_TINY + option + ["--data", text_file, "--out-dir", str(tmp_path / "out")]
    assert paper.cli(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exceed the base's width n_embd 16" in err
    assert err.count("\n") == 1


def test_paper_script_help_shows_every_default(capsys):
    """--help names each default: the ranks, seeds, learning rates, the output folder and the
    settings this script gives train_shakespeare.py's options."""
    with pytest.raises(SystemExit) as stopped:
        paper.parse_options(["--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 1,4,16,64)", "(default: 3)", "(default: 4,16)", "(default: 1,4,16)",
                  "(default: 1e-4,3e-4,1e-3)", "--out-dir out-paper", "--base-iters 2000",
                  "except --rank, --resume", "--data PATH"):
        assert shown in text
