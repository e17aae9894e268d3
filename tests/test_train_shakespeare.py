"""Tests of train_shakespeare.py: tiny end-to-end runs on a text the tests write themselves.

Mostly in-process through its main() and cli(); in a subprocess or a forked process where the
exit status, the absence of a traceback or several processes matter. A whole base + LoRA run
of the tiny settings in helpers.py takes about a second.
"""

import argparse
import contextlib
import glob
import hashlib
import http.server
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch


import checkpoint_formats as formats
import lora_gpt2 as L
import train_shakespeare as ts

from helpers import (HERE, SCHEDULE, SCRIPT, TRAIN_TINY, copy_run, held_out, make_text,
                     needs_safetensors, one_line_error, without)

from helpers import (_hf_folder, byte_tokens)


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


def test_held_out_windows_are_evaluated_once_per_logged_step_and_the_report_reuses_the_last(
        text_file, tmp_path, monkeypatch):
    """Every evaluation pass is a logged one (6 in pretraining, 4 in adaptation): the report's
    figures are the last evaluation of each phase, not a second pass over the same weights."""
    forward, batches = L.GPT2LMModel.forward, []

    def counting(self, *args, **kwargs):
        # evaluation: eval mode, with labels (sampling has none)
        if not self.training and len(args) > 1:
            batches.append(args[0].shape[0])
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(L.GPT2LMModel, "forward", counting)
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path),
                                   "--sample", "0"])
    settings = argparse.Namespace(block_size=32, batch_size=8, eval_iters=4)
    text = open(text_file, encoding="utf-8").read()
    windows = ts.split(torch.tensor(ts.encode({"type": "char",
                                               "chars": "".join(sorted(set(text)))}, text, "")),
                       settings, scratch=True)[3]
    assert sum(batches) == (30 // 5 + 20 // 5) * len(windows)
    assert (report["adapted_loss"], report["adapted_accuracy"]) == \
        (report["history"][-1]["val_loss"], report["history"][-1]["val_accuracy"])


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
    assert ckpt["base"]["fingerprint"] == formats.base_fingerprint(ts.load_model(base_file)[0])
    # no temporary file left
    assert sorted(os.listdir(out)) == [".lock", ckpt["base"]["file"], "ckpt.pt"]


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


def test_checkpointing_activations_trains_the_very_same_adapters(text_file, tmp_path,
                                                                 finished_run):
    """--checkpoint-activations recomputes each block in backward: the run's figures and its
    trained adapters are bit for bit those of the run without it."""
    out = copy_run(finished_run[1], tmp_path)
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--sample", "0",
                                   "--checkpoint-activations"])
    assert report["adapted_loss"] == finished_run[0]["adapted_loss"]
    trained = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["weights"]
    reference = torch.load(os.path.join(finished_run[1], "ckpt.pt"), weights_only=True)["weights"]
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[key], reference[key]) for key in trained)


def test_a_base_pretrained_in_another_precision_is_not_reused(finished_run, text_file, tmp_path,
                                                              capsys, monkeypatch):
    """bfloat16 and float32 pretraining give different weights: a bfloat16 run pretrains its own
    base."""
    def stop(*args):
        raise KeyboardInterrupt  # at its first step: enough to see which base the run took
    monkeypatch.setattr(ts, "learning_rate", stop)
    with pytest.raises(KeyboardInterrupt, match="interrupted before a checkpoint"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", copy_run(finished_run[1], tmp_path),
                              "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "pretraining a char-level base" in out and "using the cached base" not in out


@needs_safetensors
def test_exports_reproduce_the_adapted_model(text_file, tmp_path, finished_run, monkeypatch):
    """A scratch run's adapter folder holds its base (base/, named by its absolute path, so that
    peft finds it from any working directory, not a folder of the same relative name there) and
    both exports the character vocabulary (chars.json)."""
    out = copy_run(finished_run[1], tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--max-iters", "5",
                                   "--sample", "0", "--save-pretrained", "hf",
                                   "--save-adapter", "peft"])
    figures = (report["adapted_loss"], report["adapted_accuracy"])
    assert held_out(L.GPT2LMModel.from_pretrained(tmp_path / "hf"), text_file) == pytest.approx(
        figures, rel=1e-5)
    base = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])[0]
    adapted = L.GPT2LMModel(L.GPT2Config.from_dict({**base.config.to_dict(), "lora_attn_dim": 2,
                                                    "lora_attn_alpha": 8}))
    adapted.load_weight(base.state_dict()).load_adapter(tmp_path / "peft")
    assert held_out(adapted, text_file) == pytest.approx(figures, rel=1e-5)
    config = json.load(open("peft/adapter_config.json"))
    assert config["base_model_name_or_path"] == os.path.realpath(tmp_path / "peft" / "base")
    exported = L.GPT2LMModel.from_pretrained("peft/base", lora_attn_dim=2, lora_attn_alpha=8)
    exported.load_adapter("peft")
    assert held_out(exported, text_file) == pytest.approx(figures, rel=1e-5)
    text = open(text_file, encoding="utf-8").read()
    for folder in ("hf", "peft"):
        assert json.load(open(f"{folder}/chars.json")) == {"chars": "".join(sorted(set(text)))}
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    chars = json.load(open("peft/chars.json"))["chars"]  # the README's example, as written there
    ids = torch.tensor([[chars.index(c) for c in "ROMEO:"]])
    with torch.no_grad():
        got = peft.AutoPeftModelForCausalLM.from_pretrained("peft")(ids).logits
    assert (got - adapted.eval()(ids)[0]).abs().max() < 1e-4
    # from another working directory that has a peft/base of its own (here the merged model)
    decoy = tmp_path / "elsewhere" / "peft"
    decoy.mkdir(parents=True)
    os.symlink(tmp_path / "hf", decoy / "base")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with torch.no_grad():
        got = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"))(ids).logits
    assert (got - adapted.eval()(ids)[0]).abs().max() < 1e-4


def _files(folder):
    """{relative path: SHA-256 of its bytes} of every file under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            found[os.path.relpath(path, folder)] = digest
    return found


@needs_safetensors
def test_a_re_export_killed_at_any_step_leaves_the_old_export_whole(finished_run, text_file,
                                                                    tmp_path, monkeypatch, capsys):
    """The adapter export of a run on another base (another --seed) is killed as it writes the
    base, the adapter, chars.json, or at either rename that puts the folder in place: each time
    the folder holds the old export, byte for byte, and no temporary file or folder stays. The
    staging folders a kill -9 left are removed by the next export, which replaces the old
    exports whole and says so."""
    old_run = copy_run(finished_run[1], tmp_path / "old", everything=True)
    exports = ["--save-adapter", str(tmp_path / "peft"), "--save-pretrained", str(tmp_path / "hf")]
    ts.main(["--resume", "--out-dir", old_run, "--sample", "0"] + exports)
    old = {folder: _files(tmp_path / folder) for folder in ("peft", "hf")}
    assert "base/model.safetensors" in old["peft"] and "chars.json" in old["hf"]
    new_run = str(tmp_path / "new")
    ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", new_run, "--seed", "8",
                          "--max-iters", "5", "--sample", "0"])
    argv = ["--resume", "--out-dir", new_run, "--sample", "0"] + exports
    rename = os.rename

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def killed_at_rename(n):
        calls = []

        def rename_or_kill(source, target):
            calls.append(target)
            if len(calls) == n:
                raise KeyboardInterrupt
            rename(source, target)
        return rename_or_kill
    kills = [(L.GPT2LMModel, "save_pretrained", killed), (L.GPT2LMModel, "save_adapter", killed),
             (json, "dump", killed), (os, "rename", killed_at_rename(1)),
             (os, "rename", killed_at_rename(2))]
    for owner, name, kill in kills:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, kill)
            with pytest.raises(KeyboardInterrupt):
                ts.main(argv[:-2])
        assert _files(tmp_path / "peft") == old["peft"], name
        assert sorted(os.listdir(tmp_path)) == ["hf", "new", "old", "peft"], name

    # what kill -9 leaves: staging folders of a process that is gone
    for leftover in (".peft.999999999.export.tmp", ".hf.999999999.old.tmp"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    ts.main(argv)
    printed = capsys.readouterr().out
    assert f"replaced {tmp_path / 'peft'}: a PEFT adapter" in printed
    assert f"replaced {tmp_path / 'hf'}: a Hugging Face GPT-2 folder" in printed
    assert sorted(os.listdir(tmp_path)) == ["hf", "new", "old", "peft"]
    new = _files(tmp_path / "peft")
    assert new.keys() == old["peft"].keys()
    assert new["base/model.safetensors"] != old["peft"]["base/model.safetensors"]
    # the new adapter goes onto the new base beside it
    base = L.GPT2LMModel.from_pretrained(tmp_path / "peft" / "base", lora_attn_dim=2,
                                         lora_attn_alpha=8)
    base.load_adapter(tmp_path / "peft")


def test_progress_lines_reach_a_pipe_as_the_run_goes_every_tenth_of_the_steps(text_file, tmp_path):
    """Redirected to a file or a pipe, stdout is block-buffered unless each line is flushed: the log
    of a long run must fill as it goes. A line comes every 10% of the steps even when evaluations
    are rarer, with the train loss and the time left."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: faster, and kinder to a shared machine
    argv = TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path), "--base-iters", "1000",
                         "--eval-interval", "1000"]
    with subprocess.Popen([sys.executable, SCRIPT] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=HERE, env=env) as proc:
        try:
            first = proc.stdout.readline()
            step = proc.stdout.readline()
            running = not os.path.exists(tmp_path / "ckpt.pt")  # written at step 1000 only
        finally:
            proc.terminate()
            proc.communicate(timeout=120)
    assert first.startswith("pretraining a char-level base") and running
    line = r"\[base\] step   100/1000 \| train \d\.\d{4} \| +\d+ ms/step \| \d+s left\n"  # no val
    assert re.fullmatch(line, step), step


def test_time_left_comes_from_the_phase_so_far(finished_run, text_file, tmp_path, monkeypatch,
                                               capsys):
    """On a clock where the first 5 steps take 10 s each and the rest 1 s: at step 10 of 20 the
    last interval took 1 s a step, the phase 5.5 s a step, so 55 s are left (not 10)."""
    clock = [0.0]
    real_lr = ts.learning_rate

    def timed(step, *args):
        clock[0] += 10 if step < 5 else 1
        return real_lr(step, *args)
    monkeypatch.setattr(ts, "time", argparse.Namespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(ts, "learning_rate", timed)
    ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", copy_run(finished_run[1], tmp_path),
                          "--eval-interval", "10", "--sample", "0"])
    [line] = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith("[adapt] step    10/20")]
    assert line.endswith("|  1000 ms/step | 55s left"), line


def test_a_run_into_an_out_dir_holding_one_is_refused_unless_overwrite(finished_run, text_file,
                                                                     tmp_path, capsys):
    """Running a command again, or another one into the same --out-dir, never replaces the run
    there silently: it points at --resume and at --overwrite, which starts over on the cached
    base."""
    out = copy_run(finished_run[1], tmp_path, everything=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    argv = TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--rank", "1", "--sample", "0"]
    err = one_line_error(argv, capsys)
    assert "holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    report = ts.main(argv + ["--overwrite"])
    assert "using the cached base" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["settings"]["rank"] == 1
    assert report["base_loss"] == finished_run[0]["base_loss"]


def test_resume_on_a_finished_run_samples_without_training(finished_run, tmp_path, capsys):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    report = ts.main(["--resume", "--out-dir", out, "--prompt", "ROMEO:", "--sample", "20"])
    assert report["sample"].startswith("ROMEO:") and len(report["sample"]) == 6 + 20
    out = capsys.readouterr().out
    assert "] step " not in out
    assert "[adapt] the run has done its 20 steps: nothing to train" in out
    assert "nothing trained (the run had done its 20 steps)" in out
    assert report["history"] == finished_run[0]["history"]
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_help_shows_the_defaults_and_how_to_sample_from_a_finished_run(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        ts.parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for option, default in (("--base-iters", 1500), ("--max-iters", 1000), ("--block-size", 64),
                            ("--out-dir", "out-shakespeare"), ("--prompt", "'\\n'")):
        assert re.search(f"{option} [^(]*\\(default: {re.escape(str(default))}\\)", text), option
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "a finished run is only evaluated and sampled" in text and "--overwrite" in text


# ---- resume -------------------------------------------------------------------------------------

def test_resume_after_interrupts_in_pretraining_and_adaptation_is_bit_exact(
        finished_run, text_file, tmp_path, monkeypatch, capsys):
    """A crash loses at most the work since the last checkpoint, in the base pretraining as in
    the adaptation; and the message after an interrupted resumed run names the checkpoint."""
    uninterrupted, run_dir = finished_run
    out = str(tmp_path)
    real_lr, calls = ts.learning_rate, []

    def interrupt_at(n):  # Ctrl-C during the n-th step of the next run
        calls.clear()

        def lr(*args):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_lr(*args)
        monkeypatch.setattr(ts, "learning_rate", lr)

    interrupt_at(13)  # base step 13; the last checkpoint is base step 10
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    assert not glob.glob(os.path.join(out, "base-*.pt"))
    interrupt_at(2)  # a resumed run interrupted before its first checkpoint
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(["--resume", "--out-dir", out, "--device", "cpu"])  # where the run began
    assert "[base] resuming from step 10 of 30" in capsys.readouterr().out
    interrupt_at(20 + 13)  # base steps 11-30, then adaptation step 13
    with pytest.raises(KeyboardInterrupt, match="step 10 of the adapt phase"):
        ts.main(["--resume", "--out-dir", out, "--device", "cpu"])
    monkeypatch.setattr(ts, "learning_rate", real_lr)
    resumed = ts.main(["--resume", "--out-dir", out, "--sample", "16", "--device", "cpu"])

    assert resumed["history"] == uninterrupted["history"]
    for key in ("base_loss", "adapted_loss", "base_accuracy", "adapted_accuracy", "sample"):
        assert resumed[key] == uninterrupted[key], key
    bases = [name for name in os.listdir(run_dir) if name.startswith("base-")]
    for name in ["ckpt.pt"] + bases:
        resumed_weights = torch.load(os.path.join(out, name), weights_only=True)["weights"]
        weights = torch.load(os.path.join(run_dir, name), weights_only=True)["weights"]
        assert resumed_weights.keys() == weights.keys(), name
        for key in weights:
            assert torch.equal(resumed_weights[key], weights[key]), (name, key)


def test_resume_of_a_run_whose_base_file_is_missing_is_refused_at_once(finished_run, tmp_path,
                                                                       capsys):
    """Pretraining a new base would overwrite the trained adapters' ckpt.pt with a base-phase one:
    the resume stops before anything is written, naming the missing file."""
    out = copy_run(finished_run[1], tmp_path, everything=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    [base] = glob.glob(os.path.join(out, "base-*.pt"))
    os.remove(base)
    err = one_line_error(["--resume", "--out-dir", out, "--sample", "0"], capsys)
    assert f"{base} is missing, the base the adapters in" in err and "--overwrite" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt"]


def test_a_base_in_pretraining_resumes_only_on_its_own_recipe_and_survives_kills(
        finished_run, text_file, tmp_path, monkeypatch, capsys):
    """A base-phase --resume with another base option, --dtype or --init-from is refused, naming
    it, and ckpt.pt is left as it was; killed as it renames the finished base, then as it renames
    the adaptation's first checkpoint, the run resumes to the figures of a run never stopped."""
    out = str(tmp_path / "out")
    real_lr = ts.learning_rate

    def stop_at_step_13(step, *args):
        if step == 12:
            raise KeyboardInterrupt
        return real_lr(step, *args)
    monkeypatch.setattr(ts, "learning_rate", stop_at_step_13)
    with pytest.raises(KeyboardInterrupt, match="step 10 of the base phase"):
        ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    monkeypatch.setattr(ts, "learning_rate", real_lr)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    _hf_folder(tmp_path / "hf", seed=0)
    for extra, message in ((["--base-lr", "1e-3"], "--base-lr 0.001: the run in"),
                           (["--seed", "8"], "--seed 8: the run in"),
                           (["--base-iters", "40"], "is pretraining its base with 30"),
                           (["--dtype", "bfloat16"], "in float32; resume with --dtype float32"),
                           (["--init-from", str(tmp_path / "hf")], "--resume keeps the base")):
        err = one_line_error(["--resume", "--out-dir", out, "--sample", "0"] + extra, capsys)
        assert message in err, err
        assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt"]

    # killed as the finished base is renamed into place
    replace = os.replace

    def killed_at_the_base(source, target):
        if os.path.basename(target).startswith("base-"):
            raise KeyboardInterrupt
        replace(source, target)
    monkeypatch.setattr(os, "replace", killed_at_the_base)
    with pytest.raises(KeyboardInterrupt, match="step 30 of the base phase"):
        ts.main(["--resume", "--out-dir", out, "--device", "cpu"])

    # then killed as the adaptation's first ckpt.pt is renamed into place
    def killed_at_the_checkpoint(source, target):
        if os.path.basename(target) == "ckpt.pt":
            raise KeyboardInterrupt
        replace(source, target)
    monkeypatch.setattr(os, "replace", killed_at_the_checkpoint)
    with pytest.raises(KeyboardInterrupt, match="step 30 of the base phase"):
        ts.main(["--resume", "--out-dir", out, "--device", "cpu"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["phase"] == "base"
    monkeypatch.setattr(os, "replace", replace)
    resumed = ts.main(["--resume", "--out-dir", out, "--device", "cpu", "--sample", "16"])
    for key in ("history", "base_loss", "adapted_loss", "sample"):
        assert resumed[key] == finished_run[0][key], key
    assert not glob.glob(os.path.join(out, "*.tmp"))


def test_an_overwrite_killed_at_its_first_checkpoint_leaves_the_old_run(finished_run, text_file,
                                                                         tmp_path, monkeypatch,
                                                                         capsys):
    """Killed as it writes, or as it renames, its first ckpt.pt, an --overwrite run leaves the
    old run whole: --resume takes it as finished."""
    out = copy_run(finished_run[1], tmp_path, everything=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    argv = TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--overwrite", "--rank", "1"]
    save = torch.save
    replace = os.replace

    def killed_in_write(obj, file):
        file.write(b"partial")
        raise KeyboardInterrupt

    def killed_in_rename(source, target):
        raise KeyboardInterrupt
    for owner, name, kill in ((torch, "save", killed_in_write), (os, "replace", killed_in_rename)):
        monkeypatch.setattr(owner, name, kill)
        with pytest.raises(KeyboardInterrupt, match="interrupted before a checkpoint"):
            ts.main(argv)
        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(os, "replace", replace)
        assert (tmp_path / "ckpt.pt").read_bytes() == before
    report = ts.main(["--resume", "--out-dir", out, "--sample", "0"])
    assert report["history"] == finished_run[0]["history"]
    assert "nothing to train" in capsys.readouterr().out


def test_processes_that_read_different_texts_are_refused():
    """Compared by a hash of the text, gathered from every process (here a stand-in gather)."""
    runtime = argparse.Namespace(world=3, rank=0)
    settings = argparse.Namespace(data="play.txt")

    def gather(texts):
        def all_gather(into, mine):
            into[:] = texts
        return all_gather
    ts.check_same_text("a", settings, runtime, all_gather=gather(["a", "a", "a"]))
    with pytest.raises(ValueError, match="--data play.txt: process 2 read another text than "
                                         "process 0; give every process the same file"):
        ts.check_same_text("a", settings, runtime, all_gather=gather(["a", "a", "b"]))


def test_report_after_resume_measures_base_and_adapted_on_the_same_windows(finished_run, text_file,
                                                                           tmp_path):
    """--resume with another --eval-iters: both figures come from the new windows."""
    report, run_dir = finished_run
    out = copy_run(run_dir, tmp_path, everything=True)
    resumed = ts.main(["--resume", "--out-dir", out, "--eval-iters", "2", "--sample", "0",
                       "--device", "cpu"])
    base = ts.load_model(glob.glob(os.path.join(out, "base-*.pt"))[0])[0]
    assert held_out(base, text_file, eval_iters=2) == pytest.approx(
        (resumed["base_loss"], resumed["base_accuracy"]), rel=1e-5)
    assert held_out(ts.load_model(os.path.join(out, "ckpt.pt"))[0], text_file, eval_iters=2) == (
        pytest.approx((resumed["adapted_loss"], resumed["adapted_accuracy"]), rel=1e-5))
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
    assert os.listdir(tmp_path) == ["ck.pt"] and torch.equal(
        torch.load(path, weights_only=True)["x"], torch.zeros(3))


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_run(finished_run, text_file,
                                                                      tmp_path):
    """Only this script's own temporary names: a user's file ending in .tmp, here the text the
    run reads from --out-dir itself, stays."""
    out = copy_run(finished_run[1], tmp_path, everything=True)
    for name in ("ckpt.pt.tmp", "base-0123456789ab.pt.tmp"):  # what kill -9 mid-save leaves
        (tmp_path / name).write_bytes(b"partial")
    mine = tmp_path / "mytext.tmp"
    mine.write_bytes(open(text_file, "rb").read())
    (tmp_path / "notes.tmp").write_text("mine")
    ts.main(["--resume", "--out-dir", out, "--data", str(mine), "--sample", "0", "--device", "cpu"])
    assert sorted(glob.glob(os.path.join(out, "*.tmp"))) == [str(mine), str(tmp_path / "notes.tmp")]


@pytest.mark.skipif(ts.fcntl is None, reason="no fcntl: runs go unlocked")
def test_a_second_run_into_the_same_out_dir_is_refused(text_file, tmp_path, capsys):
    with open(tmp_path / ".lock", "w") as lock:  # as a run in progress holds it
        ts.fcntl.flock(lock, ts.fcntl.LOCK_EX | ts.fcntl.LOCK_NB)
        err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path)], capsys)
    assert "another run is using --out-dir" in err
    assert sorted(os.listdir(tmp_path)) == [".lock"]


@pytest.mark.skipif(ts.fcntl is None, reason="no fcntl: runs go unlocked")
def test_a_new_run_into_an_out_dir_whose_run_is_training_names_it_as_live(finished_run, text_file,
                                                                        tmp_path, capsys):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    with open(tmp_path / ".lock", "w") as lock:  # as the run in progress holds it
        ts.fcntl.flock(lock, ts.fcntl.LOCK_EX | ts.fcntl.LOCK_NB)
        err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", out], capsys)
    assert "holds a run that is training now" in err and "--overwrite" not in err


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/missing.txt"], "no such file"),
    (["--data", "{tmp}"], "not a regular file"),
    (["--data", "{fifo}"], "not a regular file"),
    (["--data", "{empty}"], "is empty"),
    (["--data", "{short}"], "too short"),
    (["--data", "{latin1}"], "not UTF-8"),
    (["--rank", "-1"], "--rank -1: must be 0"),
    (["--rank", "100000000000"], "--rank 100000000000 exceeds the width 64 of the base"),
    (["--rank", "four"], "invalid"),
    (["--alpha", "0"], "--alpha 0, --lora-dropout 0.1: GPT2Config.lora_attn_alpha"),
    (["--alpha", "inf"], "--alpha inf"),
    (["--alpha", "1e25"], "α/r"),
    (["--n-embd", "63"], "divisible"),
    (["--eval-interval", "0"], "must lie in [1, "),
    (["--lr", "nan"], "--lr: must lie in [0, "),
    (["--lr", "1e300"], "--lr 1e+300 overflows the optimizer's float32 arithmetic"),
    (["--base-lr", "1e38"], "--base-lr 1e+38 overflows"),
    (["--lr", "1e36", "--weight-decay", "1e10"], "(with --weight-decay 1e+10)"),
    (["--weight-decay", "inf"], "--weight-decay: must lie in [0, "),
    (["--batch-size", "0"], "must lie in [1, "),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--prompt", "€"], "--prompt has characters outside the corpus's alphabet"),
    (["--resume"], "No such file"),
    (["--init-from", "{tmp}/missing"], "no checkpoint at"),
    (["--init-from", "{run}/ckpt.pt"], "is a checkpoint of this script, not GPT-2 weights"),
    (["--save-adapter", "{tmp}/peft", "--rank", "0"], "--save-adapter"),
    (["--resume", "--out-dir", "{run}", "--data", "{other}"], "not the text"),
    (["--resume", "--out-dir", "{run}", "--rank", "4"], "--rank 4: the run in"),
    (["--resume", "--out-dir", "{run}", "--n-embd", "32"], "--n-embd 32: the run in"),
    (["--resume", "--out-dir", "{run}", "--alpha", "4"], "trained with 8.0, which --resume keeps"),
    (["--resume", "--out-dir", "{run}", "--block-size", "16"], "--block-size 16: the run in"),
    (["--resume", "--overwrite", "--out-dir", "{run}"], "--overwrite starts a new one there"),
    (["--resume", "--out-dir", "{run}", "--init-from", "gpt2"], "--init-from gpt2: --resume keeps"),
    (["--resume", "--out-dir", "{run}", "--init-from", "scratch"], "drop --init-from"),
    (["--save-pretrained", "{tmp}/x", "--save-adapter", "{tmp}/x"], "need separate folders"),
    (["--save-pretrained", "{tmp}/x/hf", "--save-adapter", "{tmp}/x"], "need separate folders"),
    (["--save-adapter", "{short}"], "short.txt is a file, not a folder"),
    (["--save-adapter", "{tmp}/merged"], "merged holds a Hugging Face model (config.json)"),
    (["--save-pretrained", "{tmp}/adapter"], "adapter holds a PEFT adapter (adapter_config.json)"),
    (["--save-adapter", "{tmp}/basefile"], "basefile holds a file named base"),
    (["--save-pretrained", "{tmp}/mine"], "mine holds notes.txt, which no export writes"),
    (["--save-adapter", "{tmp}/minebase"], "minebase holds base/notes.txt, which no export"),
    (["--save-pretrained", "{short}/hf"], "cannot write in"),
    (["--save-pretrained", "/proc/no/such/hf"], "cannot write in /proc"),
    (["--save-adapter", "{tmp}/out"], "is --out-dir (the checkpoints)"),
    (["--out-dir", "{short}/sub"], "Not a directory"),
    (["--out-dir", "{short}"], "short.txt is a file; pass a folder"),
    (["--resume", "--out-dir", "{short}"], "short.txt is a file; pass a folder"),
])
def test_bad_input_is_one_line_and_nonzero_before_any_training(extra, message, finished_run,
                                                               text_file, tmp_path, capsys):
    if "{fifo}" in extra and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 2)
    (tmp_path / "latin1.txt").write_bytes("Sé bien\n".encode("latin-1") * 100)
    (tmp_path / "other.txt").write_text(make_text(seed=1))
    (tmp_path / "empty.txt").write_text("")
    # folders the exports must not replace
    folders = {"merged": "config.json", "adapter": "adapter_config.json", "basefile": "base",
               "mine": "notes.txt", "minebase": "base/notes.txt"}
    for folder, name in folders.items():
        (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text("{}")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")  # opening it for reading would block: it must not be opened
    subs = dict(tmp=tmp_path, run=finished_run[1], short=tmp_path / "short.txt",
                fifo=tmp_path / "fifo", latin1=tmp_path / "latin1.txt",
                other=tmp_path / "other.txt", empty=tmp_path / "empty.txt")
    argv = SCHEDULE if "--init-from" in extra else TRAIN_TINY
    argv = argv + ["--data", text_file, "--out-dir", str(tmp_path / "out")]
    argv += [e.format(**subs) for e in extra]
    assert message in one_line_error(argv, capsys)
    assert not os.path.exists(tmp_path / "out")  # refused before any step, leaving no folder


def test_bad_input_in_a_real_process_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--data", str(tmp_path / "nope.txt"),
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=HERE)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: --data") and proc.stderr.count("\n") == 1, proc.stderr


def _craft(ckpt):
    """Ways to damage a ckpt.pt, each with what the one-line error must say."""
    other_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    rank8 = L.GPT2LMModel(L.GPT2Config.from_dict({**ckpt["config"], "lora_attn_dim": 8,
                                                  "lora_attn_alpha": 8}))
    return [
        ({**ckpt, "weights": {k: v.cpu() for k, v in L.lora_state_dict(rank8).items()}},
         "does not fit this run"),
        ({k: v for k, v in ckpt.items() if k != "settings"}, "lacks settings"),
        ({**ckpt, "optimizer": other_optimizer}, "does not fit this run"),
        ({**ckpt, "step": "ten"}, "does not fit this run"),
        ({**ckpt, "base": {**ckpt["base"], "fingerprint": "0" * 64}}, "is not the base"),
        ({**ckpt, "settings": {**ckpt["settings"], "bogus": 1}}, "unrecognized arguments"),
        ({**ckpt, "settings": {**ckpt["settings"], "rank": "four"}}, "invalid"),
        ({**ckpt, "format": "something else"}, "not a ckpt checkpoint of this script"),
        # refused by weights_only
        ({**ckpt, "settings": argparse.Namespace()}, "holds more than tensors"),
    ]


def test_damaged_checkpoints_are_one_line_errors(finished_run, text_file, tmp_path, capsys,
                                                 monkeypatch):
    out = copy_run(finished_run[1], tmp_path, everything=True)
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    for crafted, message in _craft(ckpt):
        torch.save(crafted, path)
        assert message in one_line_error(["--resume", "--out-dir", out, "--sample", "0"],
                                         capsys), message
    with open(path, "wb") as file:
        file.write(os.urandom(4096))
    assert "cannot read the checkpoint" in one_line_error(["--resume", "--out-dir", out], capsys)

    # a cached base of another size under the name this run's base would have
    torch.save(ckpt, path)
    base_path = glob.glob(os.path.join(out, "base-*.pt"))[0]
    small = L.GPT2LMModel(L.GPT2Config.from_dict({**ckpt["config"], "n_embd": 32,
                                                  "lora_attn_dim": 0}))
    torch.save({**torch.load(base_path, weights_only=True), "weights": small.state_dict()},
               base_path)
    assert "shape" in one_line_error(["--resume", "--out-dir", out], capsys)

    # a full disk: torch.save raises its own RuntimeError, not an OSError
    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path / "new")],
                         capsys)
    assert "cannot write" in err and "inline_container" in err


def test_non_finite_loss_stops_the_run_with_a_message_about_the_settings_that_matter(
        text_file, tmp_path, capsys):
    args = TRAIN_TINY + ["--data", text_file, "--out-dir", str(tmp_path), "--warmup", "0",
                         "--grad-clip", "0"]
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

def test_init_from_a_hugging_face_folder_and_refusing_a_changed_one(text_file, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder, out = tmp_path / "hf", str(tmp_path / "out")
    model = _hf_folder(folder, seed=0)
    args = SCHEDULE + [
        "--data", text_file, "--init-from", str(folder), "--max-iters", "10"]
    report = ts.main(args + ["--out-dir", out])
    assert report["adapted_loss"] < report["base_loss"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["base"] == {"source": str(folder), "fingerprint": formats.base_fingerprint(model)}
    assert ckpt["tokenizer"] == {"type": "gpt2-bpe"}
    reloaded, _ = ts.load_model(os.path.join(out, "ckpt.pt"))
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)

    err = one_line_error(args + ["--out-dir", out, "--block-size", "65", "--overwrite"], capsys)
    assert "--block-size 65 is longer than the n_ctx = 64 positions of --init-from" in err
    (folder / "pytorch_model.bin").write_bytes(os.urandom(2048))  # damaged: says so, not "network"
    err = one_line_error(args + ["--out-dir", str(tmp_path / "out2")], capsys)
    assert "pytorch_model.bin" in err and "network" not in err

    _hf_folder(folder, seed=1)  # another base under the same path: the adapters refuse it
    with pytest.raises(ValueError, match="is not the base"):
        ts.load_model(os.path.join(out, "ckpt.pt"))
    assert "is not the base" in one_line_error(["--resume", "--out-dir", out], capsys)


@needs_safetensors
def test_an_adapter_exported_from_a_pretrained_base_names_that_base(text_file, tmp_path,
                                                                    monkeypatch):
    """--save-adapter records where the base came from (peft loads it from there); a scratch base
    has no name."""
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder = tmp_path / "hf"
    _hf_folder(folder, seed=0)
    ts.main(SCHEDULE + ["--data", text_file, "--init-from", str(folder), "--max-iters", "2",
                        "--sample", "0", "--out-dir", str(tmp_path / "out"),
                        "--save-adapter", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)


@needs_safetensors
def test_exports_into_the_init_from_base_are_refused(text_file, tmp_path, monkeypatch, capsys):
    """--save-pretrained over the base would replace the user's model, and --save-adapter into it
    would make transformers apply the adapter to every later load of the base."""
    monkeypatch.setattr(ts, "gpt2_bpe", byte_tokens)
    folder = tmp_path / "hf"
    _hf_folder(folder, seed=0)
    for option, target in (("--save-pretrained", folder), ("--save-adapter", folder / "peft"),
                           ("--save-adapter", folder / ".." / "hf")):
        args = ["--data", text_file, "--init-from", str(folder), "--out-dir", str(tmp_path / "out")]
        err = one_line_error(SCHEDULE + args + [option, str(target)], capsys)
        assert "would write into the --init-from base" in err
    assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.bin"]
    assert not glob.glob(str(tmp_path / "out" / "*.pt"))


@needs_safetensors
def test_a_failed_export_write_is_one_line(text_file, tmp_path, finished_run, monkeypatch, capsys):
    import safetensors.torch

    def full(*args):
        raise safetensors.SafetensorError("Error while serializing: No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = copy_run(finished_run[1], tmp_path / "o")
    err = one_line_error(TRAIN_TINY + ["--data", text_file, "--out-dir", out, "--max-iters", "1",
                                       "--sample", "0", "--save-pretrained", str(tmp_path / "hf")],
                         capsys)
    assert f"cannot write {tmp_path / 'hf'}: Error while serializing: No space left" in err


def test_without_tiktoken_gpt2s_tokenizer_is_a_one_line_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    ts.gpt2_bpe.cache_clear()
    try:
        with pytest.raises(ValueError, match="pip install tiktoken"):
            ts.gpt2_bpe()
    finally:
        ts.gpt2_bpe.cache_clear()


def test_offline_tiktoken_says_where_it_keeps_its_files(monkeypatch):
    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net')")
    monkeypatch.setitem(sys.modules, "tiktoken", argparse.Namespace(get_encoding=offline))
    ts.gpt2_bpe.cache_clear()
    try:
        with pytest.raises(OSError, match="TIKTOKEN_CACHE_DIR") as error:
            ts.gpt2_bpe()
    finally:
        ts.gpt2_bpe.cache_clear()
    assert "openaipublic" in str(error.value) and "\n" not in str(error.value)


def test_weights_of_an_unknown_width_point_at_a_folder_with_a_config(text_file, tmp_path, capsys):
    """The command line cannot pass n_head: the message names what it can do, and that works."""
    model = L.GPT2LMModel(L.GPT2Config(vocab_size=256, n_positions=64, n_ctx=64, n_embd=48,
                                       n_layer=1, n_head=2))
    (tmp_path / "hf").mkdir()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    args = SCHEDULE + ["--data", text_file, "--out-dir", str(tmp_path / "out")]
    err = one_line_error(args + ["--init-from", str(tmp_path / "hf" / "pytorch_model.bin")], capsys)
    assert "n_head" in err and "config.json" in err
    (tmp_path / "hf" / "config.json").write_text('{"n_embd": 48, "n_layer": 1, "n_head": 2, '
                                                 '"vocab_size": 256, "n_positions": 64}')
    loaded = L.GPT2LMModel.from_pretrained(tmp_path / "hf")
    assert formats.base_fingerprint(loaded) == formats.base_fingerprint(model)


# ---- download -----------------------------------------------------------------------------------

@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/site; yields (site, base URL, request log)."""
    site = tmp_path / "site"
    site.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
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

    report = ts.main(TRAIN_TINY + ["--out-dir", str(tmp_path / "out"), "--base-iters", "2",
                                   "--max-iters", "2", "--sample", "0"])
    assert requests == ["/input.txt"] and cached.read_bytes() == body
    assert report["history"][-1]["step"] == 2

    default_data = (argparse.Namespace(data=None),
                    argparse.Namespace(rank=0, world=1, log=lambda *args: None))
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
        assert "pass --data PATH" in one_line_error(
            TRAIN_TINY + ["--out-dir", str(tmp_path / "out")], capsys)
        assert not os.path.exists(tmp_path / "cache" / "tinyshakespeare.txt")  # no partial download


# ---- several processes ----------------------------------------------------------------------

def _process_of_two(rank, port, argv, log):
    """One of two processes, with the environment torchrun gives its workers."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with open(log, "w") as file, contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
        code = ts.cli(argv)
    os._exit(code)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_match_one_and_share_its_cached_base(finished_run, text_file, tmp_path):
    """Two processes started as torchrun starts them (Gloo on CPUs; forked, so that they need not
    import torch again): a step's samples, and so the cached base's key and the adapters, do not
    depend on the number of processes."""
    if torch.cuda.is_initialized():  # autograd's device threads do not survive a fork
        pytest.skip("CUDA was used in this process, so it cannot fork; run this test alone")
    argv = TRAIN_TINY + ["--data", text_file, "--lora-dropout", "0", "--sample", "8",
                         "--out-dir", copy_run(finished_run[1], tmp_path / "out")]
    single = ts.main(argv)
    one = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    argv += ["--overwrite"]
    procs = [fork.Process(target=_process_of_two, args=(r, port, argv, tmp_path / f"log{r}"))
             for r in range(2)]
    for process in procs:
        process.start()
    for process in procs:
        process.join(timeout=120)
        process.kill()
    logs = [(tmp_path / f"log{r}").read_text() for r in range(2)]
    assert [process.exitcode for process in procs] == [0, 0], logs
    assert "using the cached base" in logs[0] and "2 process(es)" in logs[0]
    assert logs[0].count("trainable parameters") == 1 and logs[1] == ""  # process 0 alone prints
    two = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert two["weights"].keys() == one["weights"].keys()
    for key in one["weights"]:
        torch.testing.assert_close(two["weights"][key], one["weights"][key], rtol=1e-3, atol=1e-4)
    assert two["history"][-1]["val_loss"] == pytest.approx(single["adapted_loss"], abs=1e-4)
    # the logged train loss is the mean over both processes' sequences, as one process's over all
    for a, b in zip(two["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)


# ---- the README's set-up ------------------------------------------------------------------------

def test_readme_installs_a_cpu_torch_before_the_requirements_would_pull_a_cuda_one():
    """Followed top to bottom on a machine without a GPU, the README never fetches a CUDA build."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    cpu = readme.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < readme.index("pip install -r requirements.txt")
