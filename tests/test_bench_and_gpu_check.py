"""Smoke tests of bench_lora_gpt2.py and gpu_check.py on tiny sizes: the structure of their
output and their refusals. No speed is asserted: speed claims come from the bench itself, run
side by side.
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch


import bench_lora_gpt2 as bench
import gpu_check

from helpers import HERE, tiny_lora_model


BENCH_TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size", "64",
              "--block-size", "16", "--batch-size", "2", "--repeats", "1",
              "--gen-tokens", "8", "--gen-model", "bench", "--threads", "1",
              "--memory-runs", "lora"]  # one run of the memory comparison: a process each

# cells of rows whose reference or run is missing
UNMEASURED = ("not installed", "no baseline", "not available", "not measured")

# A stand-in for nanoGPT's model.py: the same GPTConfig fields, GPT(config), and
# forward(idx, targets) -> (logits, loss); it prints on construction, as nanoGPT's GPT does.
NANOGPT_STANDIN = '''
from dataclasses import dataclass
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.gelu = nn.GELU()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        print("number of parameters: %d" % sum(p.numel() for p in self.parameters()))

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.gelu(self.wte(idx)))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
'''


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _table(text: str):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].replace("|", "").replace("-", "") == ""
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def _run(argv):
    threads = torch.get_num_threads()  # bench.main pins its own thread count and restores it
    with contextlib.redirect_stdout(io.StringIO()) as out:
        payload = bench.main(argv)
    assert torch.get_num_threads() == threads
    return out.getvalue(), payload


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    text, payload = _run(BENCH_TINY + ["--json", str(path)])
    return text, payload, json.loads(path.read_text(encoding="utf-8"))


def test_bench_smoke_table_structure(tiny_run):
    text, _, _ = tiny_run
    assert "torch " in text and "threads: 1" in text and "processor:" in text
    header, rows = _table(text)
    assert header == list(bench.TABLE_HEADER)
    assert all(len(r) == len(header) for r in rows)
    comparisons = {r[0].split(":")[0].split(" ")[0] for r in rows}
    assert comparisons == set(bench.COMPARISONS)
    # every comparison has exactly one baseline row (none when its reference is not installed)
    by_comp = {}
    for r in rows:
        by_comp.setdefault(r[0], []).append(r)
    for comp, rs in by_comp.items():
        baselines = sum(r[6] == "baseline" for r in rs)
        assert baselines == 1 or (baselines == 0 and any(r[2].startswith(UNMEASURED)
                                                         for r in rs)), comp
    for r in rows:
        assert r[7] in ("yes", "MISSED", "—")


def test_bench_smoke_figures_positive(tiny_run):
    _, rows = _table(tiny_run[0])
    for r in rows:
        if r[2].startswith(UNMEASURED):
            continue
        median, ratio = _number(r[2]), _number(r[4])
        assert math.isfinite(median) and median > 0, r
        assert math.isfinite(ratio) and ratio > 0, r
        if r[5] != "—":
            lo, hi = (_number(x) for x in r[5].split("–"))
            assert 0 < lo <= hi, r


def test_bench_smoke_json_matches_table(tiny_run):
    text, payload, data = tiny_run
    _, rows = _table(text)
    assert data["rows"] == json.loads(json.dumps(payload["rows"]))
    assert data["table"] == [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(data["rows"]) == len(rows)
    assert data["meta"]["threads"] == 1 and data["meta"]["torch"]
    for cells, row in zip(rows, data["rows"]):
        assert [cells[0], cells[1], cells[3]] == [row["comparison"], row["candidate"], row["unit"]]
        if row["median"] is None:
            assert cells[2].startswith(UNMEASURED)
            continue
        assert row["median"] > 0 and all(s > 0 for s in row["samples"])
        assert _number(cells[2]) == pytest.approx(row["median"], rel=1e-2, abs=1e-3)
        assert _number(cells[4]) == pytest.approx(row["ratio"], rel=1e-2)


def test_bench_without_nanogpt_path_its_rows_read_not_installed(tiny_run):
    _, rows = _table(tiny_run[0])
    status = {r[1]: r[2] for r in rows if r[0] == "nanogpt"}
    assert status == {"nanoGPT model.py GPT": "not installed (--nanogpt PATH)",
                      "nanoGPT model.py GPT with GPT-2's biases and tanh GELU": "no baseline",
                      "ours, full fine-tuning (r=0)": "no baseline"}


def test_bench_nanogpt_row_with_a_standin_model_py(tmp_path):
    """With --nanogpt pointing at a folder holding a model.py of nanoGPT's interface, the rows time
    its GPT as configured there and doing GPT-2's work (biases, tanh GELU) against ours, all three
    interleaved; its construction message is not printed."""
    (tmp_path / "model.py").write_text(NANOGPT_STANDIN, encoding="utf-8")
    text, payload = _run(BENCH_TINY + ["--only", "nanogpt", "--nanogpt", str(tmp_path)])
    assert "number of parameters" not in text
    theirs, work, ours = ("nanoGPT model.py GPT",
                          "nanoGPT model.py GPT with GPT-2's biases and tanh GELU",
                          "ours, full fine-tuning (r=0)")
    rows = {(r["comparison"], r["candidate"]): r for r in payload["rows"]}
    assert (rows[("nanogpt", theirs)]["target"] == "baseline"
            and rows[("nanogpt", theirs)]["median"] > 0)
    assert rows[("nanogpt", ours)]["ratio"] > 0 and rows[("nanogpt", ours)]["met"] is None
    assert rows[("nanogpt: GPT-2's work", ours)]["met"] in (True, False)
    # the second comparison pairs the very samples of the first
    assert rows[("nanogpt: GPT-2's work", work)]["samples"] == rows[("nanogpt", work)]["samples"]
    assert rows[("nanogpt: GPT-2's work", ours)]["samples"] == rows[("nanogpt", ours)]["samples"]
    c = bench.NANOGPT_CPU
    params = {n: rows[("nanogpt: trainable params", n)]["median"] for n in (theirs, work)}
    # wte and an untied, bias-free lm_head
    assert params[theirs] == c["vocab_size"] * c["n_embd"] * 2
    assert params[work] == params[theirs] + c["vocab_size"]  # ... and the bias it gets
    assert any(n.startswith(f"nanogpt: {tmp_path}") and "its 1 nn.GELU approximate='tanh'" in n
               for n in payload["notes"])


@pytest.mark.parametrize("option, value, message", [
    ("--nanogpt", None, "--nanogpt: no model.py"),
    ("--preset", "gpt2.xs", "--preset: choose from gpt2.sm"),
    ("--gen-model", "4,256,8", "--gen-model"),
    ("--gen-model", "1,30,4,64", "n_embd (30) must be divisible by n_head (4)"),
    ("--gen-tokens", "0", "--gen-tokens"),
    ("--device", "gpu", "--device"),
    ("--json", "{tmp}/no/such/folder/bench.json", "--json"),
    ("--n-head", "3", "n_head"),
    ("--block-size", "2048", "--block-size")])
def test_bench_refuses_bad_options_before_measuring(tmp_path, monkeypatch, option, value, message):
    monkeypatch.setattr(bench, "run", lambda a: pytest.fail("measured despite a bad option"))
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.main(BENCH_TINY + [option, str(tmp_path) if value is None
                                 else value.format(tmp=tmp_path)])


@pytest.mark.parametrize("argv, start", [(["--gen-model", "4,256"], "error: --gen-model"),
                                         (["--repeats", "x"],
                                          "error: argument --repeats: invalid int value")])
def test_bench_command_line_error_is_one_line(argv, start):
    """Our checks and argparse's alike: one line on stderr, exit status 1, no usage dump or
    traceback."""
    out = subprocess.run([sys.executable, bench.__file__, *argv], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(start) and out.stderr.count("\n") == 1, out.stderr


def test_bench_without_reference_packages_marks_their_rows_not_installed(monkeypatch):
    """With loralib, transformers and peft hidden, their rows read "not installed" and ours are
    still measured where they need no reference."""
    real_find_spec = bench.importlib.util.find_spec
    hidden = {"loralib", "transformers", "peft"}
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    text, _ = _run(BENCH_TINY + ["--only", "layer,hf"])
    _, rows = _table(text)
    status = {(r[0], r[1]): r[2] for r in rows}
    assert status[("layer C=32", "loralib.MergedLinear")] == "not installed (loralib)"
    assert _number(status[("layer C=32", "ours MergedLinear")]) > 0
    assert (status[("hf", "transformers+peft r=4 (c_attn: Q,K,V)")]
            == "not installed (transformers and peft)")
    assert status[("hf", "ours LoRA r=4 (Q,V)")] == "no baseline"


def test_bench_mfu_is_the_step_flops_of_nanogpts_estimate_over_time_and_peak(monkeypatch):
    """6N + 12·L·C·T FLOPs per token for full fine-tuning, 4N + ... for LoRA (N less wpe), over
    the step's time and the peak; the peak by GPU name (PCIe before SXM), in bf16 only."""
    a = argparse.Namespace(peak_tflops=0.0, dtype="bfloat16", batch_size=2, block_size=8,
                           n_layer=2, n_embd=12)
    model = tiny_lora_model()
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    attention = 12 * 2 * 12 * 8
    cuda = types.SimpleNamespace(type="cuda")
    for gpu, peak in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, gpu=gpu: gpu)
        rows = bench.mfu_rows("train", a, cuda, {"full": [10.0], "lora": [5.0]}, [model] * 2,
                              lora=("lora",))
        assert rows[0]["comparison"] == f"train: MFU of {peak} TFLOP/s"
        for row, k, ms in zip(rows, (6, 4), (10.0, 5.0)):
            flops = 2 * 8 * (k * n + attention)
            assert row["median"] == pytest.approx(100 * flops / (ms / 1e3) / (peak * 1e12))
    float32 = argparse.Namespace(**{**vars(a), "dtype": "float32"})
    assert bench.mfu_rows("train", float32, cuda, {"full": [10.0]}, [model]) == []  # no fp32 peak


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_offers_the_dry_run():
    out = subprocess.run([sys.executable, "gpu_check.py"], capture_output=True, text=True,
                         cwd=HERE)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: no CUDA GPU") and "--dry-run" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--only", "", "--only: name at least one of train,infer,layer,hf,nanogpt,gen,memory"),
    ("--only", "train,trian", "--only: unknown trian; choose from train,"),
    ("--memory-runs", "lora,lora-chunk", "--memory-runs: unknown lora-chunk; choose from full,"),
    ("--json", "{tmp}", "is a folder; name a file"),
    ("--threads", str((os.cpu_count() or 1) + 1), "--threads must lie in [1, "),
    ("--threads", "0", "--threads must lie in [1, "),
    ("--peak-tflops", "-1", "--peak-tflops must lie in [0, "),
    ("--peak-tflops", "nan", "--peak-tflops must lie in [0, "),
    ("--peak-tflops", "inf", "--peak-tflops must lie in [0, "),
    ("--repeats", "1000000", "--repeats must lie in [1, 1,000]"),
    ("--memory-steps", "0", "--memory-steps must lie in [1, 100]"),
    ("--malloc-mmap-threshold", "-1", "--malloc-mmap-threshold must lie in [0, 33,554,432]"),
    ("--n-layer", "0", "--n-layer must lie in [1, "),
    ("--rank", "100000000000", "--rank must lie in [1, 32]"),
    ("--alpha", "nan", "--alpha must lie in"),
    ("--vocab-size", "1", "--vocab-size must lie in [2, "),
    ("--batch-size", "100000000", "--batch-size must lie in [1, "),
    ("--n-embd", "65536", "the model's fp32 weights alone take")])
def test_bench_refuses_names_paths_and_numbers_out_of_range_before_measuring(
        tmp_path, monkeypatch, option, value, message):
    """Once, an empty or unknown --only ran nothing and passed, --json DIR failed after the
    whole bench, and numbers were checked only for >= 1 or not at all (--n-layer 0 took the
    preset's, a rank or width too large failed to allocate mid-run)."""
    monkeypatch.setattr(bench, "run", lambda a: pytest.fail("measured despite a bad option"))
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.main(BENCH_TINY + [option, value.format(tmp=tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["--only", "foo"], "--only: unknown foo; choose from suite,train_runs,graph_breaks,bench"),
    (["--only", "suite,train-runs"], "--only: unknown train-runs; choose from suite,"),
    (["--only", ""], "--only: name at least one of suite,train_runs,graph_breaks,bench"),
    (["--out", "{tmp}/file"], "--out {tmp}/file is not a folder"),
    (["--data", "{tmp}/absent.txt"], "--data {tmp}/absent.txt: no such file"),
    (["--nanogpt", "{tmp}"], "--nanogpt {tmp}: no model.py there")])
def test_gpu_check_refuses_what_it_cannot_do_before_any_step(tmp_path, monkeypatch, capsys, argv,
                                                            message):
    """A typo in --only used to run nothing and exit 0 (CI would pass without checking); --out
    FILE ended in a traceback. Each is one line on stderr, exit status 1, and no step runs."""
    (tmp_path / "file").write_text("not a folder")
    for name in ("suite", "train_runs", "graph_breaks", "bench"):
        monkeypatch.setattr(gpu_check, name, lambda *a: pytest.fail("ran a step"))
    argv = ["--dry-run"] + [arg.format(tmp=tmp_path) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1, err


def _fabricated_memory(args, name):
    """Figures a child would print: MiB above the model and ms per step, by run."""
    peaks = {"full": 100.0, "full-chunked": 80.0, "lora": 60.0, "lora-chunked": 30.0,
             "lora-ckpt": 20.0, "lora-both": 10.0, "peft": 70.0, "peft-ckpt": 40.0}
    if name == "full-ckpt":
        return dict(unavailable="lora_gpt2 has no checkpoint_activations")
    if name == "full-both":
        return dict(failed="killed by signal 9 (out of memory?)")
    return dict(peak=peaks[name] + 500, above_model=peaks[name], step_ms=peaks[name] / 10)


def test_bench_memory_rows_compare_each_run_and_check_the_memory_targets(monkeypatch):
    """The memory comparison: a row per run (full fine-tuning as baseline), a run the library
    cannot do or that failed says so, and the targets pair the runs they name."""
    monkeypatch.setattr(bench, "measure_in_child", _fabricated_memory)
    args = bench.parse_args(BENCH_TINY + ["--memory-runs", ",".join(bench.MEMORY_RUNS)])
    notes = []
    rows = bench.bench_memory(args, torch.device("cpu"), notes)
    peaks = [row for row in rows if row["comparison"] == "memory: peak RSS above model"]
    assert [row["candidate"] for row in peaks] == [bench.memory_label(name, args)
                                                   for name in bench.MEMORY_RUNS]
    assert peaks[0]["target"] == "baseline" and peaks[0]["median"] == 100.0
    by_candidate = {row["candidate"]: row for row in peaks}
    assert by_candidate["LoRA r=4 (Q,V), chunked loss"]["ratio"] == pytest.approx(0.3)
    assert (by_candidate["full fine-tuning, checkpointing"]["status"]
            == "not available (lora_gpt2 has no checkpoint_activations)")
    assert (by_candidate["full fine-tuning, chunked loss + checkpointing"]["status"]
            == "killed by signal 9 (out of memory?)")
    steps = [row for row in rows if row["comparison"] == "memory: step time"]
    assert steps[0]["median"] == 10.0 and len(steps) == len(bench.MEMORY_RUNS)
    targets = {row["comparison"]: row for row in rows
               if row["comparison"].startswith("memory target") and row["target"] != "baseline"}
    full_ratio = targets["memory target: LoRA / full fine-tuning, both with the chunked loss"]
    assert full_ratio["ratio"] == pytest.approx(30 / 80) and full_ratio["met"] is True
    peft_ratio = targets["memory target: LoRA with the chunked loss / transformers+peft"]
    assert peft_ratio["ratio"] == pytest.approx(30 / 70) and peft_ratio["met"] is True
    checkpointing = targets["memory target: LoRA with the chunked loss: checkpointing added"]
    assert checkpointing["ratio"] == pytest.approx(1 / 3) and checkpointing["met"] is True
    assert any("not run here" in note for note in notes)  # the GPU rows: not guessed


def test_bench_memory_targets_name_the_runs_they_lack(monkeypatch):
    monkeypatch.setattr(bench, "measure_in_child", _fabricated_memory)
    args = bench.parse_args(BENCH_TINY + ["--memory-runs", "lora-chunked"])
    rows = bench.bench_memory(args, torch.device("cpu"), [])
    status = {(row["comparison"], row["candidate"]): row["status"] for row in rows}
    title = "memory target: LoRA / full fine-tuning, both with the chunked loss"
    assert (status[(title, "full fine-tuning, chunked loss")]
            == "not measured (needs --memory-runs with full-chunked)")


def test_bench_savings_time_each_way_of_training_beside_the_one_without(tiny_run):
    """The savings comparison times LoRA's and full fine-tuning's steps with each of the library's
    savings against the same training without them, one group each."""
    _, payload, _ = tiny_run
    groups = {}
    for row in payload["rows"]:
        if row["comparison"].startswith("savings:"):
            groups.setdefault(row["comparison"], []).append(row)
    args = bench.parse_args(BENCH_TINY)
    for comparison, lora in (("savings: LoRA step time", True),
                             ("savings: full fine-tuning step time", False)):
        names = [name for name, run in bench.MEMORY_RUNS.items()
                 if run["model"] == "ours" and run["lora"] == lora]
        assert [row["candidate"] for row in groups[comparison]] == [
            bench.memory_label(name, args) for name in names]
        assert groups[comparison][0]["target"] == "baseline"
        assert all(row["median"] > 0 and row["ratio"] > 0 for row in groups[comparison])


def test_bench_savings_leave_the_loss_as_it_was():
    """Each of the library's savings changes where memory goes, not the loss: the four ways of
    calling our model give one loss (within float rounding). A saving the library lacks is
    reported "not available" by the bench, and skipped here."""
    args = bench.parse_args(BENCH_TINY)
    for rank in (0, args.rank):
        losses = {}
        for chunked in (False, True):
            for checkpointing in (False, True):
                try:
                    _, step = bench.ours_train(args, torch.device("cpu"), rank, chunked,
                                               checkpointing)
                except bench.Unavailable:
                    continue
                losses[(chunked, checkpointing)] = step.loss().item()
        plain = losses[(False, False)]
        assert all(loss == pytest.approx(plain, rel=1e-5) for loss in losses.values()), losses


@pytest.mark.parametrize("returncode, stderr, status", [
    (-9, "", "killed by signal 9 (out of memory?)"),
    (-15, "", "killed by signal 15"),
    (1, "Traceback ...\nRuntimeError: DefaultCPUAllocator: not enough memory\n",
     "failed: RuntimeError: DefaultCPUAllocator: not enough memory")])
def test_bench_memory_run_that_fails_becomes_a_row_saying_how(monkeypatch, returncode, stderr,
                                                               status):
    """A memory run killed or failing (too large for the machine) is reported in its row; the
    other runs still are measured."""
    def finished(argv, **keywords):
        return subprocess.CompletedProcess(argv, returncode, stdout="", stderr=stderr)
    monkeypatch.setattr(bench.subprocess, "run", finished)
    args = bench.parse_args(BENCH_TINY)
    assert bench.measure_in_child(args, "full") == {"failed": status}


@pytest.mark.parametrize("option, variable", [([], None),
                                              (["--malloc-mmap-threshold", "131072"], "131072")])
def test_bench_memory_process_runs_with_the_allocator_setting_it_reports(monkeypatch, option,
                                                                         variable):
    """--malloc-mmap-threshold N reaches each memory measurement's process as glibc's
    MALLOC_MMAP_THRESHOLD_; without it the process has glibc's default, as the table's note says,
    even where the bench's own environment sets the variable."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    environments = []

    def finished(argv, env=None, **keywords):
        environments.append(env)
        return subprocess.CompletedProcess(argv, 0, stdout='{"above_model": 1.0}', stderr="")
    monkeypatch.setattr(bench.subprocess, "run", finished)
    args = bench.parse_args(BENCH_TINY + option)
    assert bench.measure_in_child(args, "lora") == {"above_model": 1.0}
    # The train comparison's two processes, started at once, run with it too.
    monkeypatch.setattr(bench.subprocess, "Popen",
                        lambda argv, env=None, **keywords: environments.append(env))
    bench.start_memory_children(args)
    assert [env.get("MALLOC_MMAP_THRESHOLD_") for env in environments] == [variable] * 3
    notes = bench.memory_notes(args, torch.device("cpu"))
    assert any(("MALLOC_MMAP_THRESHOLD_=131072" if variable else "glibc's default") in note
               for note in notes)
