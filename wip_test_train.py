"""Tests of train_shakespeare.py (to be merged back into test_lora_gpt2.py as its section 8).

Tiny end-to-end runs on a text the tests write themselves: in-process through main() and cli(),
in a subprocess only where the exit status, the absence of a traceback or several processes
matter."""

import argparse
import contextlib
import glob
import http.server
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import lora_gpt2 as L
import train_shakespeare as ts

# Every model here is tiny: one thread is faster, and leaves a shared CI machine's cores alone.
torch.set_num_threads(1)


# ==============================================================================================
# 8. train_shakespeare.py: tiny end-to-end runs on a text the tests write themselves
# ==============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_shakespeare.py")

# A tiny model and a short schedule: a whole base + LoRA run takes about a second.
SIZES = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64"]  # of the scratch base
SCHEDULE = ["--block-size", "32", "--batch-size", "8", "--base-iters", "30", "--base-lr", "3e-3", "--max-iters", "20",
            "--warmup", "2", "--eval-interval", "5", "--eval-iters", "4",
            "--rank", "2", "--alpha", "8", "--lora-dropout", "0.1", "--lr", "1e-2", "--sample", "16",
            "--device", "cpu", "--seed", "7"]
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


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "play.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file):
    """One complete scratch base + LoRA run, shared read-only by several tests."""
    out = str(tmp_path_factory.mktemp("run"))
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    return report, out


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
    ids = torch.tensor(ts.encode({"type": "char", "chars": "".join(sorted(set(text)))}, text, "text"))
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


# ---- an end-to-end run ------------------------------------------------------------------------

def test_lora_run_lowers_held_out_loss_and_reports_accuracy(finished_run, text_file):
    report, out = finished_run
    assert report["adapted_loss"] < report["base_loss"] - 0.01
    assert [h["step"] for h in report["history"]] == [5, 10, 15, 20]
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"]
    # rank 2 on Q and V of 2 layers of width 64: 2 layers x 2 projections x (64 + 64) x 2
    assert report["trainable"] == 2 * 2 * (64 + 64) * 2
    assert report["sample"].startswith("\n") and len(report["sample"]) == 1 + 16
    # accuracy: the share of held-out positions whose most likely next token is the right one
    base, _ = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])
    adapted, _ = ts.load_model(os.path.join(out, "ckpt.pt"))
    for model, name in ((base, "base"), (adapted, "adapted")):
        figures = (report[f"{name}_loss"], report[f"{name}_accuracy"])
        assert held_out(model, text_file) == pytest.approx(figures, rel=1e-5)
    assert 0 < report["base_accuracy"] < report["adapted_accuracy"] < 1


def test_checkpoint_holds_the_trained_tensors_and_the_fingerprint_of_its_base(finished_run):
    _, out = finished_run
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["kind"] == "ckpt" and ckpt["format"] == ts.FORMAT and ckpt["phase"] == "adapt"
    assert ckpt["weights"] and all("lora_" in k for k in ckpt["weights"])
    assert ckpt["config"]["lora_attn_dim"] == 2 and ckpt["tokenizer"]["type"] == "char"
    # the context is the trained block size, so sampling never uses an untrained position
    assert ckpt["config"]["n_ctx"] == ckpt["config"]["n_positions"] == 32
    assert ckpt["settings"]["rank"] == 2 and ckpt["step"] == 20
    base_file = os.path.join(out, ckpt["base"]["file"])
    assert ckpt["base"]["source"] == "scratch" and os.path.isfile(base_file)
    assert ckpt["base"]["fingerprint"] == L.base_fingerprint(ts.load_model(base_file)[0])
    assert sorted(os.listdir(out)) == [".lock", ckpt["base"]["file"], "ckpt.pt"]  # no temporary file left


def test_base_is_cached_and_stays_frozen(finished_run):
    _, out = finished_run
    bases = glob.glob(os.path.join(out, "base-*.pt"))
    assert len(bases) == 1
    base = torch.load(bases[0], weights_only=True)
    assert base["kind"] == "base" and not any("lora_" in k for k in base["weights"])
    sd = ts.load_model(os.path.join(out, "ckpt.pt"))[0].state_dict()
    for k, v in base["weights"].items():
        assert torch.equal(sd[k], v), k


def test_full_fine_tuning_with_rank_0(text_file, tmp_path, finished_run, capsys):
    out = copy_run(finished_run[1], tmp_path)
    report = ts.main(without(TRAIN_TINY, "--lr") + ["--data", text_file, "--out-dir", out,
                                                    "--rank", "0", "--sample", "0"])
    assert "using the cached base" in capsys.readouterr().out
    assert report["trainable"] == report["total"]
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["lora_attn_dim"] == 0 and "transformer.wte.weight" in ckpt["weights"]


def test_a_base_pretrained_in_another_precision_is_not_reused(finished_run, text_file, tmp_path, capsys,
                                                              monkeypatch):
    """bfloat16 and float32 pretraining give different weights: a bfloat16 run pretrains its own base."""
    def stop(*a):
        raise KeyboardInterrupt  # at its first step: enough to see which base the run took
    monkeypatch.setattr(ts, "learning_rate", stop)
    with pytest.raises(KeyboardInterrupt, match="interrupted before a checkpoint"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", copy_run(finished_run[1], tmp_path),
                              "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "pretraining a char-level base" in out and "using the cached base" not in out


@pytest.mark.skipif(not hasattr(L.GPT2LMModel, "save_adapter"), reason="lora_gpt2 has no save_adapter yet")
def test_exports_reproduce_the_adapted_model(text_file, tmp_path, finished_run):
    out = copy_run(finished_run[1], tmp_path / "out")
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--max-iters", "5", "--sample", "0",
                                   "--save-pretrained", str(tmp_path / "hf"), "--save-adapter", str(tmp_path / "peft")])
    figures = (report["adapted_loss"], report["adapted_accuracy"])
    assert held_out(L.GPT2LMModel.from_pretrained(tmp_path / "hf"), text_file) == pytest.approx(figures, rel=1e-5)
    base = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])[0]
    adapted = L.GPT2LMModel(L.GPT2Config.from_dict({**base.config.to_dict(), "lora_attn_dim": 2, "lora_attn_alpha": 8}))
    adapted.load_weight(base.state_dict()).load_adapter(tmp_path / "peft")
    assert held_out(adapted, text_file) == pytest.approx(figures, rel=1e-5)


# ---- resume -------------------------------------------------------------------------------------

def test_resume_after_interrupts_in_pretraining_and_adaptation_is_bit_exact(finished_run, text_file, tmp_path,
                                                                            monkeypatch):
    """A crash loses at most the work since the last checkpoint, in the base pretraining as in
    the adaptation; and the message after an interrupted resumed run names the checkpoint."""
    uninterrupted, run_dir = finished_run
    out = str(tmp_path)
    real_lr, calls = ts.learning_rate, []

    def interrupt_at(n):  # Ctrl-C during the n-th step of the next run
        calls.clear()

        def lr(*a):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_lr(*a)
        monkeypatch.setattr(ts, "learning_rate", lr)

    interrupt_at(13)  # base step 13; the last checkpoint is base step 10
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    assert not glob.glob(os.path.join(out, "base-*.pt"))
    interrupt_at(2)  # a resumed run interrupted before its first checkpoint
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(["--resume", "--out-dir", out])
    interrupt_at(20 + 13)  # base steps 11-30, then adaptation step 13
    with pytest.raises(KeyboardInterrupt, match="step 10 of the adapt phase"):
        ts.main(["--resume", "--out-dir", out])
    monkeypatch.setattr(ts, "learning_rate", real_lr)
    resumed = ts.main(["--resume", "--out-dir", out, "--sample", "16"])

    assert resumed["history"] == uninterrupted["history"]
    for key in ("base_loss", "adapted_loss", "base_accuracy", "adapted_accuracy", "sample"):
        assert resumed[key] == uninterrupted[key], key
    for name in ["ckpt.pt"] + [f for f in os.listdir(run_dir) if f.startswith("base-")]:
        a = torch.load(os.path.join(out, name), weights_only=True)["weights"]
        b = torch.load(os.path.join(run_dir, name), weights_only=True)["weights"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_report_after_resume_measures_base_and_adapted_on_the_same_windows(finished_run, text_file, tmp_path):
    """--resume with another --eval-iters: both figures come from the new windows."""
    report, run_dir = finished_run
    out = copy_run(run_dir, tmp_path, everything=True)
    resumed = ts.main(["--resume", "--out-dir", out, "--eval-iters", "2", "--sample", "0"])
    base = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])[0]
    assert held_out(base, text_file, eval_iters=2) == pytest.approx(
        (resumed["base_loss"], resumed["base_accuracy"]), rel=1e-5)
    assert held_out(ts.load_model(os.path.join(out, "ckpt.pt"))[0], text_file, eval_iters=2) == pytest.approx(
        (resumed["adapted_loss"], resumed["adapted_accuracy"]), rel=1e-5)
    assert abs(resumed["base_loss"] - report["base_loss"]) > 1e-4  # the windows did change


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    ts.save_atomic({"x": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ts.save_atomic({"x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    monkeypatch.undo()
    ts.save_atomic({"x": torch.zeros(3)}, path)  # the next save replaces what the failed one left
    assert os.listdir(tmp_path) == ["ck.pt"] and torch.equal(torch.load(path, weights_only=True)["x"], torch.zeros(3))


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_run(finished_run, tmp_path):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    for name in ("ckpt.pt.tmp", "base-0123456789ab.pt.tmp"):  # what kill -9 mid-save leaves
        (tmp_path / name).write_bytes(b"partial")
    ts.main(["--resume", "--out-dir", out, "--sample", "0"])
    assert not glob.glob(os.path.join(out, "*.tmp"))


@pytest.mark.skipif(ts.fcntl is None, reason="no fcntl: runs go unlocked")
def test_a_second_run_into_the_same_out_dir_is_refused(text_file, tmp_path, capsys):
    with open(tmp_path / ".lock", "w") as lock:  # as a run in progress holds it
        ts.fcntl.flock(lock, ts.fcntl.LOCK_EX | ts.fcntl.LOCK_NB)
        err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path)], capsys)
    assert "another run is using --out-dir" in err
    assert sorted(os.listdir(tmp_path)) == [".lock"]


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/missing.txt"], "no such file"),
    (["--data", "{tmp}"], "not a regular file"),
    (["--data", "{fifo}"], "not a regular file"),
    (["--data", "{empty}"], "is empty"),
    (["--data", "{short}"], "too short"),
    (["--data", "{latin1}"], "not UTF-8"),
    (["--rank", "-1"], "lora_attn_dim"),
    (["--rank", "four"], "invalid"),
    (["--alpha", "0"], "lora_attn_alpha"),
    (["--alpha", "inf"], "lora_attn_alpha"),
    (["--alpha", "1e25"], "α/r"),
    (["--n-embd", "63"], "divisible"),
    (["--eval-interval", "0"], "must lie in [1, "),
    (["--batch-size", "0"], "must lie in [1, "),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--prompt", "€"], "--prompt has characters outside the corpus's alphabet"),
    (["--resume"], "No such file"),
    (["--init-from", "{tmp}/missing"], "no checkpoint at"),
    (["--save-adapter", "{tmp}/peft", "--rank", "0"], "--save-adapter"),
    (["--resume", "--out-dir", "{run}", "--data", "{other}"], "not the text"),
    (["--resume", "--out-dir", "{run}", "--rank", "4"], "does not fit this run"),
    (["--resume", "--out-dir", "{run}", "--n-embd", "32"], "shape"),
    (["--out-dir", "{short}/sub"], "Not a directory"),
])
def test_bad_input_is_one_line_and_nonzero_before_any_training(extra, message, finished_run, text_file,
                                                               tmp_path, capsys):
    if "{fifo}" in extra and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 2)
    (tmp_path / "latin1.txt").write_bytes("Sé bien\n".encode("latin-1") * 100)
    (tmp_path / "other.txt").write_text(make_text(seed=1))
    (tmp_path / "empty.txt").write_text("")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")  # opening it for reading would block: it must not be opened
    subs = dict(tmp=tmp_path, run=finished_run[1], short=tmp_path / "short.txt", fifo=tmp_path / "fifo",
                latin1=tmp_path / "latin1.txt", other=tmp_path / "other.txt", empty=tmp_path / "empty.txt")
    argv = SCHEDULE if "--init-from" in extra else TRAIN_TINY
    argv = argv + ["--data", text_file, "--out-dir", str(tmp_path / "out")]
    argv += [e.format(**subs) for e in extra]
    assert message in one_line_error(argv, capsys)
    assert not glob.glob(str(tmp_path / "out" / "*.pt"))  # refused before any training step


def test_bad_input_in_a_real_process_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=HERE)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: --data") and proc.stderr.count("\n") == 1, proc.stderr


def _craft(ckpt):
    """Ways to damage a ckpt.pt, each with what the one-line error must say."""
    other_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    rank8 = L.GPT2LMModel(L.GPT2Config.from_dict({**ckpt["config"], "lora_attn_dim": 8, "lora_attn_alpha": 8}))
    return [
        ({**ckpt, "weights": {k: v.cpu() for k, v in L.lora_state_dict(rank8).items()}}, "does not fit this run"),
        ({k: v for k, v in ckpt.items() if k != "settings"}, "lacks settings"),
        ({**ckpt, "optimizer": other_optimizer}, "does not fit this run"),
        ({**ckpt, "step": "ten"}, "does not fit this run"),
        ({**ckpt, "base": {**ckpt["base"], "fingerprint": "0" * 64}}, "is not the base"),
        ({**ckpt, "settings": {**ckpt["settings"], "bogus": 1}}, "unrecognized arguments"),
        ({**ckpt, "settings": {**ckpt["settings"], "rank": "four"}}, "invalid"),
        ({**ckpt, "format": "something else"}, "not a ckpt checkpoint of this script"),
        ({**ckpt, "settings": argparse.Namespace()}, "holds more than tensors"),  # refused by weights_only
    ]


def test_damaged_checkpoints_are_one_line_errors(finished_run, text_file, tmp_path, capsys, monkeypatch):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    for crafted, message in _craft(ckpt):
        torch.save(crafted, path)
        assert message in one_line_error(["--resume", "--out-dir", out, "--sample", "0"], capsys), message
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    assert "cannot read the checkpoint" in one_line_error(["--resume", "--out-dir", out], capsys)

    # a cached base of another size under the name this run's base would have
    torch.save(ckpt, path)
    base_path = glob.glob(os.path.join(out, "base-*.pt"))[0]
    small = L.GPT2LMModel(L.GPT2Config.from_dict({**ckpt["config"], "n_embd": 32, "lora_attn_dim": 0}))
    torch.save({**torch.load(base_path, weights_only=True), "weights": small.state_dict()}, base_path)
    assert "shape" in one_line_error(["--resume", "--out-dir", out], capsys)

    # a full disk: torch.save raises its own RuntimeError, not an OSError
    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path / "new")], capsys)
    assert "cannot write" in err and "inline_container" in err


def test_non_finite_loss_stops_the_run_with_a_message_about_the_settings_that_matter(text_file, tmp_path, capsys):
    args = TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path), "--warmup", "0", "--grad-clip", "0"]
    err = one_line_error(args + ["--base-lr", "1e30"], capsys)
    assert "is not finite" in err and "base phase, at lr 1.0e+30" in err
    err = one_line_error(args + ["--weight-decay", "1e9"], capsys)
    assert "weight decay 1e+09" in err and "float" not in err  # the run is in float32 already


# ---- schedule -----------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [ts.learning_rate(step, 1.0, 10, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert ts.learning_rate(100, 1.0, 10, 100) == pytest.approx(0.1)


# ---- pretrained GPT-2 path, with a stand-in tokenizer ------------------------------------------

def byte_tokens():
    """Stands in for GPT-2's BPE (which needs a package and network access to fetch its files)."""
    return (lambda text: list(text.encode("utf-8"))), (lambda ids: bytes(ids).decode("utf-8", errors="replace"))


def _hf_folder(folder, seed):
    folder.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    model = L.GPT2LMModel(L.GPT2Config(vocab_size=256, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=2))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, '
                                        '"n_embd": 32, "n_layer": 2, "n_head": 2}')
    return model


def test_init_from_a_hugging_face_folder_and_refusing_a_changed_one(text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder, out = tmp_path / "hf", str(tmp_path / "out")
    model = _hf_folder(folder, seed=0)
    args = SCHEDULE + [
        "--data", text_file, "--init-from", str(folder), "--max-iters", "10"]
    report = ts.main(args + ["--out-dir", out])
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["base"] == {"source": str(folder), "fingerprint": L.base_fingerprint(model)}
    assert ckpt["tokenizer"] == {"type": "gpt2-bpe"}
    reloaded, _ = ts.load_model(os.path.join(out, "ckpt.pt"))
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)

    assert "n_ctx = 64" in one_line_error(args + ["--out-dir", out, "--block-size", "65"], capsys)
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2048))  # damaged: says so, not "network"
    err = one_line_error(args + ["--out-dir", str(tmp_path / "out2")], capsys)
    assert "pytorch_model.bin" in err and "network" not in err

    _hf_folder(folder, seed=1)  # another base under the same path: the adapters refuse it
    with pytest.raises(ValueError, match="is not the base"):
        ts.load_model(os.path.join(out, "ckpt.pt"))
    assert "is not the base" in one_line_error(["--resume", "--out-dir", out], capsys)


# ---- download -----------------------------------------------------------------------------------

@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/site; yields (site, base URL, request log)."""
    site = tmp_path / "site"
    site.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(site), **k)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def test_download_on_first_use_then_cached(loopback_server, tmp_path, monkeypatch):
    site, url, requests = loopback_server
    body = make_text(seed=3).encode("utf-8")
    (site / "input.txt").write_bytes(body)
    monkeypatch.setattr(ts, "DATA_URL", f"{url}/input.txt")
    monkeypatch.setattr(ts, "DATA_BYTES", len(body))
    monkeypatch.setattr(ts, "CACHE_DIR", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "tinyshakespeare.txt"

    report = ts.main(TRAIN_TINY + ["--out-dir", str(tmp_path / "out"), "--base-iters", "2", "--max-iters", "2",
                                   "--sample", "0"])
    assert requests == ["/input.txt"] and cached.read_bytes() == body
    assert report["history"][-1]["step"] == 2

    default_data = argparse.Namespace(data=None), argparse.Namespace(rank=0, world=1, log=lambda *a: None)
    assert ts.read_text(*default_data) == body.decode()
    assert requests == ["/input.txt"]  # the right size is already there: no second download
    cached.write_bytes(body[:100])  # a truncated file is fetched again
    ts.read_text(*default_data)
    assert len(requests) == 2 and cached.read_bytes() == body


def test_download_failure_says_to_pass_data(loopback_server, tmp_path, monkeypatch, capsys):
    site, url, _ = loopback_server
    (site / "input.txt").write_bytes(b"too short\n")
    monkeypatch.setattr(ts, "DATA_BYTES", 1000)
    monkeypatch.setattr(ts, "CACHE_DIR", str(tmp_path / "cache"))
    for target in (f"{url}/missing.txt", f"{url}/input.txt"):  # a 404, then a wrong size
        monkeypatch.setattr(ts, "DATA_URL", target)
        assert "pass --data PATH" in one_line_error(TRAIN_TINY + ["--out-dir", str(tmp_path / "out")], capsys)
        assert not os.path.exists(tmp_path / "cache" / "tinyshakespeare.txt")  # no partial download


# ---- several processes ----------------------------------------------------------------------

def _process_of_two(rank, port, argv, log):
    """One of two processes, with the environment torchrun gives its workers."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = ts.cli(argv)
    os._exit(code)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_match_one_and_share_its_cached_base(finished_run, text_file, tmp_path):
    """Two processes started as torchrun starts them (Gloo on CPUs; forked, so that they need not
    import torch again): a step's samples, and so the cached base's key and the adapters, do not
    depend on the number of processes."""
    argv = TRAIN_TINY + ["--data", text_file, "--lora-dropout", "0", "--sample", "8",
                         "--out-dir", copy_run(finished_run[1], tmp_path / "out")]
    single = ts.main(argv)
    one = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_process_of_two, args=(r, port, argv, tmp_path / f"log{r}")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        p.kill()
    logs = [(tmp_path / f"log{r}").read_text() for r in range(2)]
    assert [p.exitcode for p in procs] == [0, 0], logs
    assert "using the cached base" in logs[0] and "2 process(es)" in logs[0]
    assert logs[0].count("trainable parameters") == 1 and logs[1] == ""  # process 0 alone prints
    two = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert two["weights"].keys() == one["weights"].keys()
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], rtol=1e-3, atol=1e-4)
    assert two["history"][-1]["val_loss"] == pytest.approx(single["adapted_loss"], abs=1e-4)
