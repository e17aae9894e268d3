#!/usr/bin/env python
"""Every accelerator path of the project in one run, on one CUDA GPU, in about five minutes:

    python gpu_check.py [--nanogpt PATH] [--data PATH] [--out DIR]   # on a machine with a CUDA GPU
    python gpu_check.py --dry-run                                     # the same on the CPU, tiny

1. the test suite, whose CUDA-only tests run there rather than skip;
2. train_shakespeare.py briefly, four ways with the same settings: float32, bfloat16 (the default
   on CUDA), float16 with its gradient scaler, and bfloat16 compiled. Each must reach its report,
   with a held-out loss within LOSS_TOLERANCE of the float32 run's;
3. the training forward and loss, full and LoRA, traced by torch._dynamo.explain: no graph break;
4. bench_lora_gpt2.py at GPT-2 small's size, block 1024, bfloat16 and compiled, every comparison:
   peak memory and model FLOPs utilization (MFU) of full fine-tuning and LoRA among them.

Each step's output goes to --out; the last lines are the summary, one check a line, and the exit
status is 1 if any check failed. --dry-run runs steps 1-4 on the CPU at tiny sizes in seconds (no
compiling, and only the suite's CUDA tests, which skip), so that the script itself never rots; its
corpus is this file."""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import lora_gpt2 as L
import train_shakespeare

HERE = os.path.dirname(os.path.abspath(__file__))
# bf16 keeps 8 bits of mantissa: over these short runs its held-out loss drifts from fp32's by a
# few hundredths of a nat at most; a broken path (no scaler, wrong casts) is off by tenths or more.
LOSS_TOLERANCE = 0.05
TRAIN = ["--base-iters", "400", "--max-iters", "200", "--eval-interval", "100", "--sample", "100"]
TRAIN_DRY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
             "--batch-size", "4", "--base-iters", "30", "--max-iters", "10",
             "--eval-interval", "10", "--eval-iters", "2", "--sample", "8", "--device", "cpu"]
BENCH = ["--device", "cuda", "--preset", "gpt2.sm", "--block-size", "1024", "--batch-size", "8",
         "--dtype", "bfloat16", "--compile", "--repeats", "5"]
BENCH_DRY = ["--device", "cpu", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size",
             "64", "--block-size", "16", "--batch-size", "2", "--repeats", "1", "--threads", "1",
             "--gen-tokens", "8", "--gen-model", "bench",
             "--dtype", "bfloat16", "--peak-tflops", "1",
             "--only", "train,infer,layer,gen"]


def command(argv, log):
    """Run a command, its output streamed into the log; (exit status, its last line)."""
    proc = subprocess.Popen(argv, cwd=HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    last = "no output"
    for line in proc.stdout:
        log(line)
        last = line.strip() or last
    return proc.wait(), last


def suite(a, log):
    """The test suite (on the CPU, only its CUDA tests, which skip there)."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    status, last = command(argv + (["-k", "cuda"] if a.dry_run else []), log)
    return status == 0, last


def train_runs(a, log):
    """float32, bfloat16, float16 and compiled bfloat16 runs of the script, each in a new folder."""
    data = a.data or (os.path.abspath(__file__) if a.dry_run else None)
    common = (TRAIN_DRY if a.dry_run else TRAIN) + (["--data", data] if data else [])
    ways = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"],
            "float16": ["--dtype", "float16"]}
    if not a.dry_run:
        ways["bfloat16 compiled"] = ["--dtype", "bfloat16", "--compile"]
    results, checks, scratch = {}, [], tempfile.mkdtemp(prefix="gpu-check-")
    for way, extra in ways.items():
        argv = common + extra + ["--out-dir", os.path.join(scratch, way.replace(" ", "-"))]
        t0, buffer = time.perf_counter(), _Tee(log)
        try:
            with contextlib.redirect_stdout(buffer):
                figures = train_shakespeare.main(argv)
            results[way] = figures["adapted_loss"]
            seconds = time.perf_counter() - t0
            log(f"{way}: held-out loss {figures['base_loss']:.4f} -> {results[way]:.4f}, "
                f"{seconds:.0f} s")
        except Exception as e:  # every way is tried, and each failure reported
            log(f"{way}: {type(e).__name__}: {e}")
            reason = f"{type(e).__name__}: {train_shakespeare.one_line(e)}"
            checks.append((f"train {way}", False, reason))
    shutil.rmtree(scratch)
    reference = results.get("float32")
    for way, loss in results.items():
        if way != "float32":
            ok = reference is not None and abs(loss - reference) <= LOSS_TOLERANCE
            gap = "no float32 run" if reference is None else \
                f"{loss - reference:+.4f} vs float32 {reference:.4f}"
            checks.append((f"train {way}", ok, f"held-out loss {loss:.4f} ({gap})"))
    return checks


def graph_breaks(a, log):
    """torch._dynamo.explain of the training forward and loss, full and LoRA, under autocast."""
    device = torch.device("cpu" if a.dry_run else "cuda")
    sizes = dict(n_layer=1, n_embd=32, n_head=2) if a.dry_run else L.PRESETS["gpt2.sm"]
    checks = []
    for r in (0, 4):
        model = L.GPT2LMModel(L.GPT2Config(**sizes, lora_attn_dim=r, lora_attn_alpha=16)).to(device)
        if r:
            L.mark_only_lora_as_trainable(model)
        x = torch.randint(0, 64, (2, 64), device=device)
        with torch.autocast(device.type, torch.bfloat16):
            ex = torch._dynamo.explain(model)(x, x)
        torch._dynamo.reset()
        reasons = "; ".join(str(b.reason).splitlines()[0] for b in ex.break_reasons)
        log(f"explain r={r}: {ex.graph_count} graph(s), {ex.graph_break_count} break(s) {reasons}")
        checks.append((f"graph breaks, {'LoRA' if r else 'full'}", ex.graph_break_count == 0,
                       f"{ex.graph_break_count} break(s), {ex.graph_count} graph(s) {reasons}"))
    return checks


def bench(a, log):
    """The bench; its table and notes go to the log, its figures to bench.json."""
    path = os.path.abspath(os.path.join(a.out, "bench.json"))
    argv = (BENCH_DRY if a.dry_run else BENCH) + ["--json", path]
    argv += ["--nanogpt", a.nanogpt] if a.nanogpt else []
    status, last = command([sys.executable, "bench_lora_gpt2.py", *argv], log)
    if status:
        return [("bench", False, last)]
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    missed = sum(r["met"] is False for r in rows)
    checks = [("bench", True, f"{len(rows)} rows, {missed} target(s) missed")]
    for r in rows:  # a missed speed target is a figure to report, not a broken path
        if r["median"] is not None and (r["unit"] in ("%", "MiB") or r["met"] is not None):
            ratio = f", {r['ratio']:.3g}× {r['target'] or 'baseline'}" if r["ratio"] != 1 else ""
            status = {True: "met", False: "MISSED"}.get(r["met"], "")
            checks.append((f"  {r['comparison']}: {r['candidate']}", status,
                           f"{r['median']:.4g} {r['unit']}{ratio}"))
    return checks


class _Tee(list):
    """stdout of an in-process run, line by line into the log."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def write(self, text):
        self.append(text)
        if text.endswith("\n"):
            self.log("".join(self).rstrip("\n"))
            self.clear()

    def flush(self):
        pass


def main(argv=None) -> bool:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes, in seconds")
    p.add_argument("--nanogpt", help="a clone of karpathy/nanoGPT, for the bench's nanogpt rows")
    p.add_argument("--data", help="the corpus of the training runs (default: the script's)")
    p.add_argument("--out", default="gpu-check", help="the folder of the logs and bench.json")
    p.add_argument("--only", default="suite,train_runs,graph_breaks,bench", help="the steps to run")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        p.exit(1, "error: no CUDA GPU here; run with --dry-run to check the script on the CPU\n")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "log.txt"), "w", encoding="utf-8") as f:
        def log(text):
            f.write(text.rstrip("\n") + "\n")
            f.flush()
        where = "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name()
        log(f"gpu_check: {where}, torch {torch.__version__}")
        checks = []
        for step in (s for s in (suite, train_runs, graph_breaks, bench) if s.__name__ in a.only):
            t0 = time.perf_counter()
            result = step(a, log)
            checks += [("test suite", *result)] if step is suite else result
            seconds = time.perf_counter() - t0
            print(f"  ({step.__name__}: {seconds:.0f} s)", file=sys.stderr, flush=True)
        status = {True: "PASS", False: "FAIL"}
        summary = [f"{status.get(ok, ok):6} {name}: {what}" for name, ok, what in checks]
        log("\n".join(["", "summary:"] + summary))
    print("\n".join([f"gpu_check on {where}, torch {torch.__version__}"] + summary))
    return all(ok is not False for _, ok, _ in checks)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
