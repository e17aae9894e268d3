#!/usr/bin/env python
"""Every accelerator path of the project in one run, on one CUDA GPU, in about fifteen minutes:

    python gpu_check.py [--nanogpt PATH] [--data PATH] [--out DIR]   # on a machine with a CUDA GPU
    python gpu_check.py --dry-run                                     # the same on the CPU, tiny

1. the test suite, whose CUDA-only tests run there rather than skip;
2. train_shakespeare.py briefly, four ways with the same settings: float32, bfloat16 (the default
   on CUDA), float16 with its gradient scaler, and bfloat16 compiled. Each must reach its report,
   with a held-out loss within LOSS_TOLERANCE of the float32 run's;
3. the training forward and loss, full and LoRA, traced by torch._dynamo.explain: no graph break;
4. bench_lora_gpt2.py at GPT-2 small's size, block 1024, bfloat16 and compiled, every comparison:
   peak memory and model FLOPs utilization (MFU) of full fine-tuning and LoRA among them, and the
   memory comparison's ten runs (each a process of its own that compiles: about ten minutes).

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

# The project's folder: every command runs there.
HERE = os.path.dirname(os.path.abspath(__file__))
# bf16 keeps 8 bits of mantissa: over these short runs its held-out loss drifts from fp32's by a
# few hundredths of a nat at most; a broken path (no scaler, wrong casts) is off by tenths or more.
LOSS_TOLERANCE = 0.05
# train_shakespeare.py's settings for the four ways: short, but long enough for the losses to
# part if a precision path is broken.
TRAIN = ["--base-iters", "400", "--max-iters", "200", "--eval-interval", "100", "--sample", "100"]
# The dry run's: a model of one layer of width 16, seconds on a CPU. float16 is slow there, so
# every setting is as small as it can be.
TRAIN_DRY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
             "--batch-size", "4", "--base-iters", "30", "--max-iters", "10",
             "--eval-interval", "10", "--eval-iters", "2", "--sample", "8", "--device", "cpu"]
# The bench on the GPU: GPT-2 small at 1024 tokens, bf16 and compiled, as a user would train it.
BENCH = ["--device", "cuda", "--preset", "gpt2.sm", "--block-size", "1024", "--batch-size", "8",
         "--dtype", "bfloat16", "--compile", "--repeats", "5"]
# The dry run's bench: tiny sizes, one repeat; bfloat16 and a peak so that the MFU rows run too.
# hf and nanogpt are left out: their references take seconds to import; of the memory runs, two
# (each a process of its own), one of them with both of the library's savings.
BENCH_DRY = ["--device", "cpu", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size",
             "64", "--block-size", "16", "--batch-size", "2", "--repeats", "1", "--threads", "1",
             "--gen-tokens", "8", "--gen-model", "bench",
             "--dtype", "bfloat16", "--peak-tflops", "1",
             "--only", "train,infer,layer,gen,memory", "--memory-runs", "full,lora-both"]


def command(argv, log):
    """Run a command, its output streamed into the log; (exit status, its last line)."""
    process = subprocess.Popen(argv, cwd=HERE, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    last = "no output"
    for line in process.stdout:
        log(line)
        last = line.strip() or last  # the summary names the last line that says something
    return process.wait(), last


def suite(args, log):
    """The test suite (on the CPU, only its CUDA tests, which skip there)."""
    # The suite in a process of its own: its tests set seeds, threads and devices freely.
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if args.dry_run:
        argv += ["-k", "cuda"]
    status, last = command(argv, log)
    return status == 0, last


def train_runs(args, log):
    """float32, bfloat16, float16 and compiled bfloat16 runs of the script, each in a new folder.

    Each way must reach its report; every way but float32 must end within LOSS_TOLERANCE of the
    float32 run's held-out loss."""
    data = args.data
    if not data and args.dry_run:
        data = os.path.abspath(__file__)  # the dry run's corpus: this file
    common = TRAIN_DRY if args.dry_run else TRAIN
    if data:
        common = common + ["--data", data]
    ways = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"],
            "float16": ["--dtype", "float16"]}
    if not args.dry_run:  # compiling takes a minute on a CPU
        ways["bfloat16 compiled"] = ["--dtype", "bfloat16", "--compile"]
    losses = {}
    checks = []
    scratch = tempfile.mkdtemp(prefix="gpu-check-")
    for way, extra in ways.items():
        argv = common + extra + ["--out-dir", os.path.join(scratch, way.replace(" ", "-"))]
        start = time.perf_counter()
        buffer = _Tee(log)
        try:
            # In this process, its printed lines into the log as they come.
            with contextlib.redirect_stdout(buffer):
                figures = train_shakespeare.main(argv)
            losses[way] = figures["adapted_loss"]
            seconds = time.perf_counter() - start
            log(f"{way}: held-out loss {figures['base_loss']:.4f} -> {losses[way]:.4f}, "
                f"{seconds:.0f} s")
        except Exception as e:  # every way is tried, and each failure reported
            log(f"{way}: {type(e).__name__}: {e}")
            reason = f"{type(e).__name__}: {train_shakespeare.one_line(e)}"
            checks.append((f"train {way}", False, reason))
    shutil.rmtree(scratch)
    # Each other way against float32's loss.
    reference = losses.get("float32")
    for way, loss in losses.items():
        if way == "float32":
            continue
        passed = reference is not None and abs(loss - reference) <= LOSS_TOLERANCE
        if reference is None:
            gap = "no float32 run"
        else:
            gap = f"{loss - reference:+.4f} vs float32 {reference:.4f}"
        checks.append((f"train {way}", passed, f"held-out loss {loss:.4f} ({gap})"))
    return checks


def graph_breaks(args, log):
    """torch._dynamo.explain of the training forward and loss, full and LoRA, under autocast:
    a graph break would cost the compiled step its speed."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        sizes = dict(n_layer=1, n_embd=32, n_head=2)
    else:
        sizes = L.PRESETS["gpt2.sm"]
    checks = []
    for rank in (0, 4):
        config = L.GPT2Config(**sizes, lora_attn_dim=rank, lora_attn_alpha=16)
        model = L.GPT2LMModel(config).to(device)
        if rank:
            L.mark_only_lora_as_trainable(model)
        tokens = torch.randint(0, 64, (2, 64), device=device)  # (B, T): inputs and labels
        # Under autocast, as the training script runs: its casts must not break the graph either.
        with torch.autocast(device.type, torch.bfloat16):
            explained = torch._dynamo.explain(model)(tokens, tokens)
        torch._dynamo.reset()  # the next model is traced afresh, not from this one's cache
        reasons = "; ".join(str(b.reason).splitlines()[0] for b in explained.break_reasons)
        graphs = explained.graph_count
        breaks = explained.graph_break_count
        log(f"explain r={rank}: {graphs} graph(s), {breaks} break(s) {reasons}")
        checks.append((f"graph breaks, {'LoRA' if rank else 'full'}", breaks == 0,
                       f"{breaks} break(s), {graphs} graph(s) {reasons}"))
    return checks


def bench(args, log):
    """The bench; its table and notes go to the log, its figures to bench.json.

    A missed speed target is a figure to report, not a broken path: those rows are listed with
    MISSED but do not fail the check."""
    path = os.path.abspath(os.path.join(args.out, "bench.json"))
    argv = (BENCH_DRY if args.dry_run else BENCH) + ["--json", path]
    if args.nanogpt:
        argv += ["--nanogpt", args.nanogpt]
    status, last = command([sys.executable, "bench_lora_gpt2.py", *argv], log)
    if status:
        return [("bench", False, last)]
    # The bench exits 0 with its figures written; its rows say what was measured.
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    missed = sum(row["met"] is False for row in rows)
    checks = [("bench", True, f"{len(rows)} rows, {missed} target(s) missed")]
    # The summary lists the measured rows with a target, and every memory and MFU row.
    for row in rows:
        listed = row["unit"] in ("%", "MiB") or row["met"] is not None
        if row["median"] is None or not listed:
            continue
        ratio = ""
        if row["ratio"] != 1:
            ratio = f", {row['ratio']:.3g}× {row['target'] or 'baseline'}"
        status = {True: "met", False: "MISSED"}.get(row["met"], "")
        checks.append((f"  {row['comparison']}: {row['candidate']}", status,
                       f"{row['median']:.4g} {row['unit']}{ratio}"))
    return checks


class _Tee(list):
    """stdout of an in-process run, line by line into the log."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def write(self, text):
        # Pieces of a line gather until its newline.
        self.append(text)
        if text.endswith("\n"):
            self.log("".join(self).rstrip("\n"))
            self.clear()

    def flush(self):
        pass


# The steps, functions of this module, in the order they run; --only picks some.
STEP_NAMES = ("suite", "train_runs", "graph_breaks", "bench")


def check_options(args) -> str:
    """Why the options cannot be run, before any step starts, or "": a typo in --only would
    otherwise run nothing and pass, and a bad path fail only after the steps before it."""
    unknown = [name for name in args.only if name not in STEP_NAMES]
    if not args.only:
        return f"--only: name at least one of {','.join(STEP_NAMES)}"
    if unknown:
        return f"--only: unknown {','.join(unknown)}; choose from {','.join(STEP_NAMES)}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out} is not a folder; name a folder for the logs and bench.json"
    if args.data and not os.path.isfile(args.data):
        return f"--data {args.data}: no such file"
    if args.nanogpt and not os.path.isfile(os.path.join(args.nanogpt, "model.py")):
        return f"--nanogpt {args.nanogpt}: no model.py there; pass a clone of karpathy/nanoGPT"
    return ""


def main(argv=None) -> bool:
    """Every step of --only, each check a line of the summary; True when none failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message):  # one line on stderr, exit status 1, no usage dump
        parser.exit(1, f"error: {message} (see --help)\n")
    parser.error = error
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU at tiny sizes, in seconds")
    parser.add_argument("--nanogpt",
                        help="a clone of karpathy/nanoGPT, for the bench's nanogpt rows")
    parser.add_argument("--data", help="the corpus of the training runs (default: the script's)")
    parser.add_argument("--out", default="gpu-check",
                        help="the folder of the logs and bench.json")
    parser.add_argument("--only", default=",".join(STEP_NAMES),
                        help="the steps to run, among " + ",".join(STEP_NAMES))
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    problem = check_options(args)
    if problem:
        parser.error(problem)
    if not args.dry_run and not torch.cuda.is_available():
        parser.exit(1, "error: no CUDA GPU here; run with --dry-run to check the script on the "
                    "CPU\n")
    # Every step's output goes to the log; the terminal gets the timings and the summary.
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.txt"), "w", encoding="utf-8") as log_file:
        def log(text):
            log_file.write(text.rstrip("\n") + "\n")
            log_file.flush()  # a long step's progress can be followed with tail -f
        where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
        log(f"gpu_check: {where}, torch {torch.__version__}")
        checks = []
        for name in STEP_NAMES:
            if name not in args.only:
                continue
            step = globals()[name]  # looked up when run, so that tests can stand in for it
            start = time.perf_counter()
            result = step(args, log)
            # The suite is one check; the other steps return a list of them.
            if name == "suite":
                checks.append(("test suite", *result))
            else:
                checks += result
            seconds = time.perf_counter() - start
            print(f"  ({name}: {seconds:.0f} s)", file=sys.stderr, flush=True)
        # A check passes (True), fails (False), or is a figure listed with its status text.
        labels = {True: "PASS", False: "FAIL"}
        summary = [f"{labels.get(passed, passed):6} {name}: {what}"
                   for name, passed, what in checks]
        log("\n".join(["", "summary:"] + summary))
    print("\n".join([f"gpu_check on {where}, torch {torch.__version__}"] + summary))
    return all(passed is not False for _, passed, _ in checks)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
