"""Tests of train_shakespeare.py (to be merged back into test_lora_gpt2.py, section 8)."""

import contextlib
import copy
import http.server
import io
import json
import math
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
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bench_lora_gpt2 as bench
import lora_gpt2 as L
import train_shakespeare as ts

settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Every model here is tiny: one thread is faster, and leaves a shared CI machine's cores alone.
torch.set_num_threads(1)


# ==============================================================================================
# 8. train_shakespeare.py: tiny end-to-end runs on a text the tests write themselves
# ==============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_shakespeare.py")

# A tiny model and a short schedule: a full base + LoRA run takes about a second.
TRAIN_TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "8", "--base-iters", "30",
        "--base-lr", "3e-3", "--max-iters", "20", "--warmup", "2", "--eval-interval", "5",
        "--eval-iters", "4", "--log-interval", "5", "--rank", "2", "--alpha", "8",
        "--lora-dropout", "0.1", "--lr", "1e-2", "--sample", "16", "--device", "cpu", "--seed", "7"]


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
    """One complete LoRA run (with --merge), shared read-only by several tests."""
    out = str(tmp_path_factory.mktemp("run"))
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--merge"])
    return report, out


def held_out_loss(model, text_file, block_size=32, eval_iters=4, batch_size=8):
    """The script's own held-out evaluation, for a model loaded from a checkpoint."""
    s = dict(ts.DEFAULTS, block_size=block_size, batch_size=batch_size)
    text = open(text_file, encoding="utf-8").read()
    ids = torch.tensor(ts.CharTokenizer.from_text(text).encode(text))
    val = ts.split_tokens(ids, block_size, 0.5).val
    starts = ts.eval_starts(len(val), block_size, eval_iters * batch_size)
    return ts.evaluate(model, val, starts, s, ts.Runtime(torch.device("cpu"), torch.float32))


# ---- an end-to-end run ------------------------------------------------------------------------

def test_lora_run_lowers_held_out_loss(finished_run):
    report, _ = finished_run
    assert report["adapted_loss"] < report["base_loss"] - 0.01
    train_losses = [h["train_loss"] for h in report["history"]]
    assert train_losses[-1] < train_losses[0]
    assert [h["step"] for h in report["history"]] == [5, 10, 15, 20]
    # rank 2 on Q and V of 2 layers of width 64: 2 layers x 2 projections x (64 + 64) x 2
    assert report["trainable"] == 2 * 2 * (64 + 64) * 2
    assert report["sample"].startswith("\n") and len(report["sample"]) == 1 + 16


def test_adapter_checkpoint_holds_only_lora_tensors(finished_run):
    report, out = finished_run
    ckpt = torch.load(os.path.join(out, "adapter.pt"), weights_only=True)
    assert ckpt["kind"] == "adapter" and ckpt["format"] == ts.FORMAT
    assert ckpt["weights"] and all("lora_" in k for k in ckpt["weights"])
    assert ckpt["config"]["lora_attn_dim"] == 2 and ckpt["tokenizer"]["type"] == "char"
    # the context is the trained block size, so sampling never uses untrained positions
    assert ckpt["config"]["n_ctx"] == 32 and ckpt["config"]["n_positions"] == 256
    assert ckpt["base"]["init_from"] == "scratch" and os.path.isfile(os.path.join(out, ckpt["base"]["file"]))
    assert report["result_bytes"] == os.path.getsize(os.path.join(out, "adapter.pt"))
    assert report["result_bytes"] < 0.1 * report["full_bytes"]
    # the full-size figure is what a merged checkpoint really takes on disk
    assert abs(os.path.getsize(os.path.join(out, "merged.pt")) - report["full_bytes"]) < 1024
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary file left behind


def test_reloaded_adapter_and_merged_export_reproduce_the_held_out_loss(finished_run, text_file, tmp_path):
    report, out = finished_run
    model, tokenizer = ts.load_model(os.path.join(out, "adapter.pt"))
    assert isinstance(tokenizer, ts.CharTokenizer)
    assert held_out_loss(model, text_file) == pytest.approx(report["adapted_loss"], abs=1e-6)
    assert report["merged_loss"] == pytest.approx(report["adapted_loss"], abs=1e-5)

    merged_path = ts.export_merged(os.path.join(out, "adapter.pt"), str(tmp_path / "merged.pt"))
    ckpt = torch.load(merged_path, weights_only=True)
    assert ckpt["config"]["lora_attn_dim"] == 0 and not any("lora_" in k for k in ckpt["weights"])
    plain = L.GPT2LMModel(L.GPT2Config.from_dict(ckpt["config"])).load_weight(ckpt["weights"]).eval()
    assert held_out_loss(plain, text_file) == pytest.approx(report["adapted_loss"], abs=1e-5)


def test_base_is_cached_and_reused(finished_run, text_file):
    _, out = finished_run
    bases = [f for f in os.listdir(out) if f.startswith("base-")]
    assert len(bases) == 1
    base = torch.load(os.path.join(out, bases[0]), weights_only=True)
    assert base["kind"] == "base" and not any("lora_" in k for k in base["weights"])
    # The frozen weights of the adapted model are the cached base's, untouched by training.
    model, _ = ts.load_model(os.path.join(out, "adapter.pt"))
    sd = model.state_dict()
    for k, v in base["weights"].items():
        assert torch.equal(sd[k], v), k


def test_full_fine_tuning_with_rank_0(text_file, tmp_path, finished_run):
    _, run_dir = finished_run
    for f in os.listdir(run_dir):  # start from the same base, without pretraining it again
        if f.startswith("base-"):
            shutil.copy(os.path.join(run_dir, f), tmp_path)
    report = ts.main(without(TRAIN_TINY, "--lr") + ["--data", text_file, "--out-dir", str(tmp_path),
                                              "--rank", "0", "--sample", "0"])
    assert report["timings"]["base"] == 0  # the cached base was used
    assert report["trainable"] == report["total"]
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(tmp_path / "full.pt", weights_only=True)
    assert ckpt["kind"] == "full" and "transformer.wte.weight" in ckpt["weights"]


# ---- resume -------------------------------------------------------------------------------------

def test_resume_after_interrupt_reproduces_the_uninterrupted_run(finished_run, text_file, tmp_path, monkeypatch):
    uninterrupted, run_dir = finished_run
    for f in os.listdir(run_dir):
        if f.startswith("base-"):
            shutil.copy(os.path.join(run_dir, f), tmp_path)
    args = TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path)]

    real_step, calls = ts.train_step, []

    def interrupted_step(*a, **k):  # Ctrl-C during step 13; the last checkpoint is step 10
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(ts, "train_step", interrupted_step)
    with pytest.raises(ts.Interrupted, match="step 10"):
        ts.main(args)
    monkeypatch.setattr(ts, "train_step", real_step)
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["step"] == 10

    resumed = ts.main(["--resume", "--out-dir", str(tmp_path), "--sample", "16"])
    for a, b in zip(resumed["history"], uninterrupted["history"], strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert resumed["base_loss"] == uninterrupted["base_loss"]
    assert resumed["sample"] == uninterrupted["sample"]
    a = torch.load(tmp_path / "adapter.pt", weights_only=True)["weights"]
    b = torch.load(os.path.join(run_dir, "adapter.pt"), weights_only=True)["weights"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


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
    assert os.listdir(tmp_path) == ["ck.pt"]


# ---- bad input ----------------------------------------------------------------------------------

def _cli_error(argv, capsys):
    code = ts.cli(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/missing.txt"], "no such file"),
    (["--data", "{short}"], "too short"),
    (["--data", "{latin1}"], "not UTF-8"),
    (["--block-size", "512"], "n_positions (256)"),
    (["--rank", "-1"], "--rank must be >= 0"),
    (["--alpha", "0"], "--alpha must be a finite number > 0"),
    (["--alpha", "-2"], "--alpha must be a finite number > 0"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--rank", "four"], "invalid int value"),
    (["--n-embd", "63"], "divisible"),
    (["--resume", "{tmp}/missing.pt"], "no such checkpoint"),
    (["--init-from", "{tmp}/missing.pt"], "no such file or folder"),
    (["--init-from", "{run}/adapter.pt"], "'adapter' checkpoint"),
    (["--init-from", "{run}/merged.pt", "--n-embd", "32"], "--n-embd 32 does not fit"),
    (["--resume", "{run}/resume.pt", "--rank", "4"], "--rank 4 does not fit"),
    (["--resume", "{run}/resume.pt", "--n-embd", "32"], "n_embd 64 vs 32"),
    (["--resume", "{run}/resume.pt", "--data", "{other}"], "text differs"),
    (["--out-dir", "{short}/sub"], "cannot hold checkpoints"),
    (["--alpha", "inf"], "--alpha must be"),
])
def test_bad_input_is_one_line_and_nonzero(extra, message, finished_run, text_file, tmp_path, capsys):
    _, run_dir = finished_run
    (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 2)
    (tmp_path / "latin1.txt").write_bytes("Sé bien\n".encode("latin-1") * 100)
    (tmp_path / "other.txt").write_text(make_text(seed=1))
    subs = dict(tmp=tmp_path, run=run_dir, short=tmp_path / "short.txt",
                latin1=tmp_path / "latin1.txt", other=tmp_path / "other.txt")
    base_args = without(TRAIN_TINY, "--preset") if "--init-from" in extra else TRAIN_TINY  # --preset is for scratch
    argv = base_args + ["--data", text_file, "--out-dir", str(tmp_path / "out")] + [e.format(**subs) for e in extra]
    code, err = _cli_error(argv, capsys)
    assert code != 0
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out" / "adapter.pt")


def test_bad_input_in_a_real_process_exits_nonzero_without_traceback(tmp_path):
    for argv, message in ((["--data", str(tmp_path / "nope.txt")], "--data"),
                          (["--rank", "-3"], "--rank")):
        proc = subprocess.run([sys.executable, SCRIPT, *argv, "--out-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, cwd=HERE)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr and message in proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_non_finite_loss_stops_the_run(text_file, tmp_path, capsys):
    code = ts.cli(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path), "--base-lr", "1e30",
                          "--warmup", "0", "--grad-clip", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "the loss became" in err and err.count("\n") == 1


# ---- schedule -----------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [ts.learning_rate(step, 1.0, 10, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert ts.learning_rate(100, 1.0, 10, 100) == pytest.approx(0.1)


# ---- pretrained GPT-2 path, with a stand-in tokenizer ------------------------------------------

class ByteTokenizer:
    """Stands in for GPT-2's BPE (which needs network access to fetch its files)."""
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def describe(self):
        return {"type": "gpt2-bpe"}


def test_init_from_a_hugging_face_folder(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "load_gpt2_tokenizer", ByteTokenizer)
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.manual_seed(0)
    model = L.GPT2LMModel(L.GPT2Config(vocab_size=256, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=2))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, '
                                        '"n_embd": 32, "n_layer": 2, "n_head": 2}')
    out = tmp_path / "out"
    args = without(TRAIN_TINY, "--preset") + ["--data", text_file, "--init-from", str(folder)]
    report = ts.main(args + ["--out-dir", str(out)])
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(out / "adapter.pt", weights_only=True)
    assert ckpt["base"] == {"init_from": str(folder)} and ckpt["tokenizer"] == {"type": "gpt2-bpe"}
    reloaded, _ = ts.load_model(str(out / "adapter.pt"))
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)
    # --block-size beyond the pretrained model's 64 positions is refused
    with pytest.raises(ts.UsageError, match="n_positions"):
        ts.main(args + ["--out-dir", str(tmp_path / "out2"), "--block-size", "65"])
    with pytest.raises(ts.UsageError, match="--preset sizes a scratch base only"):
        ts.main(args + ["--out-dir", str(tmp_path / "out2"), "--preset", "tiny"])


# ---- download -----------------------------------------------------------------------------------

@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/site; yields (base URL, request log)."""
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
    cache = tmp_path / "cache"

    report = ts.main(TRAIN_TINY + ["--cache-dir", str(cache), "--out-dir", str(tmp_path / "out"),
                             "--base-iters", "2", "--max-iters", "2", "--sample", "0"])
    assert requests == ["/input.txt"]
    assert (cache / ts.DATA_FILE).read_bytes() == body
    assert report["history"][-1]["step"] == 2

    assert ts.shakespeare_path(str(cache), log=lambda *a: None) == str(cache / ts.DATA_FILE)
    assert requests == ["/input.txt"]  # the right size is already there: no second download

    (cache / ts.DATA_FILE).write_bytes(body[:100])  # a truncated file is fetched again
    ts.shakespeare_path(str(cache), log=lambda *a: None)
    assert len(requests) == 2 and (cache / ts.DATA_FILE).read_bytes() == body


def test_download_failure_says_to_pass_data(loopback_server, tmp_path, monkeypatch, capsys):
    site, url, _ = loopback_server
    (site / "input.txt").write_bytes(b"too short\n")
    monkeypatch.setattr(ts, "DATA_BYTES", 1000)
    for target in (f"{url}/missing.txt", f"{url}/input.txt"):  # a 404, then a wrong size
        monkeypatch.setattr(ts, "DATA_URL", target)
        code = ts.cli(TRAIN_TINY + ["--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "pass --data PATH" in err and err.count("\n") == 1, err
        assert not os.listdir(tmp_path / "cache")  # no partial download left


# ---- several processes ----------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_matches_one_process(text_file, tmp_path):
    # One process with 2 micro-batches per step sees the same samples per step as two processes
    # with one each, so the adapters must agree up to float rounding.
    common = TRAIN_TINY + ["--data", text_file, "--lora-dropout", "0", "--sample", "8"]
    single = ts.main(common + ["--out-dir", str(tmp_path / "one"), "--grad-accum", "2"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", SCRIPT, *common, "--out-dir", str(tmp_path / "two"),
         "--grad-accum", "1"],
        capture_output=True, text=True, timeout=180, cwd=HERE, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trainable parameters") == 1  # only process 0 reports
    assert "2 process(es)" in proc.stdout

    two = torch.load(tmp_path / "two" / "adapter.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "adapter.pt", weights_only=True)
    assert two["weights"].keys() == one["weights"].keys()
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k], rtol=1e-3, atol=1e-4)
    assert two["val_loss"] == pytest.approx(single["adapted_loss"], abs=1e-4)
