"""Speed and memory of lora_gpt2 beside its references: `python bench_lora_gpt2.py [--nanogpt
PATH] [--device cuda] [--preset gpt2.sm]` prints a markdown table (about eight minutes on a
2-core CPU, half of them the memory and savings comparisons). The comparisons (--only picks some):

  train    a training step (forward, backward, AdamW, zero_grad), the peak memory of two and
           the checkpoint's bytes: LoRA r on Q,V versus full fine-tuning; on CUDA also the
           model FLOPs utilization.
  infer    a no-grad forward: plain GPT-2 (r=0) versus LoRA unmerged and merged.
  layer    the fused Q,K,V projection at the bench's width and 1024, forward and backward:
           ours, loralib's MergedLinear, and the frozen base layer (r=0) as a floor.
  hf       a LoRA training step: ours versus transformers' GPT-2 with peft's LoRA on c_attn.
  nanogpt  a full fine-tuning step: ours versus nanoGPT's GPT (--nanogpt PATH), as configured
           there and doing GPT-2's work (biases, tanh GELU); at nanoGPT's CPU Shakespeare
           settings, or at the bench's sizes when --preset is given.
  gen      greedy generation, with the key/value cache versus without.
  memory   the peak memory and step time of a training step, each in a fresh process: full
           fine-tuning and LoRA, each without and with the library's savings (the loss in
           chunks without the full logits, activation checkpointing, both), beside
           transformers+peft's LoRA without and with its gradient checkpointing
           (--memory-runs picks some). On a CPU: the peak resident memory above the built
           model; on CUDA: the peak allocated.
  savings  what each of the library's savings costs in time: the training steps of LoRA and of
           full fine-tuning, each without and with them, timed interleaved in one process.

Timing: a warm-up, then the candidates interleaved (A B, B A, ...) so that a drift of the
machine hits all alike; a row's ratio is the median of candidate / baseline within a repeat. On
CUDA our uncompiled steps run under set_sync_debug_mode("error"). Memory: a fresh process each.

Reading a row: `median` is the candidate's figure, the median over the repeats; `ratio vs
baseline` is the median of its ratios to the comparison's first row, repeat by repeat; `ratio
range` is the smallest and the largest of those ratios, so a range that straddles a target says
the machine was too noisy to decide. A target is met or MISSED on the median ratio. A row whose
reference is not installed, or whose run the library cannot do, says so instead of a figure.

Why each memory figure comes from a fresh process: a process's peak resident memory only grows,
and memory one model freed stays in the allocator's pools for the next. Each process builds its
model, resets its high-water mark to the present level (VmHWM := VmRSS through
/proc/self/clear_refs; on CUDA, reset_peak_memory_stats), trains, and reports the mark above
that level: what training adds to the built model. The weights themselves are below the line;
gradients, AdamW's state, activations and the logits are above it. On a CPU the C library's
allocator counts too: glibc keeps freed blocks of up to 32 MiB for later allocations, and they
stay resident. --malloc-mmap-threshold 131072 starts the processes with glibc returning every
block of 128 KiB or more when it is freed, so that the peak follows the tensors alive.

Where a training step's memory goes (docs/performance-memory.md has the measured figures): full
fine-tuning keeps a gradient and two AdamW moments per weight, 12 bytes in fp32; LoRA keeps them
only for A and B. Both keep the activations that backward needs, layer by layer, and the logits:
batch x tokens x vocabulary floats, with the loss's softmax and the logits' gradient each as
large again. At 1,024 tokens and GPT-2's 50,257 words those last dominate a LoRA step, which is
why the library offers the loss in chunks (forward(..., return_logits=False)) and activation
checkpointing (model.transformer.checkpoint_activations = True), and the memory comparison
measures each.
"""

import argparse
import contextlib
import copy
import importlib.util
import inspect
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# The library sits beside this script; the bench runs from any folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_gpt2 as L  # noqa: E402

# The comparisons in the order they run; --only picks among them.
COMPARISONS = ("train", "infer", "layer", "hf", "nanogpt", "gen", "memory", "savings")
TABLE_HEADER = ("comparison", "candidate", "median", "unit", "ratio vs baseline", "ratio range",
                "target", "met?")
# nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides (batch 12), and
# bias=False as its train.py sets it.
NANOGPT_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0,
                   bias=False)
NANOGPT_BATCH = 12
# Dense bf16 TFLOP/s from NVIDIA's data sheets (SXM unless said). The first name that the GPU's
# name contains wins, so "H100 PCIe" comes before "H100".
PEAK_TFLOPS = {"H100 PCIe": 756, "A100": 312, "H100": 989, "H200": 989}
# The memory comparison's runs, each in a fresh process, in the order they run; --memory-runs
# picks some. model: ours or transformers+peft; lora: LoRA on Q,V (peft: Q,K,V) or full
# fine-tuning; chunked: the loss computed in chunks of positions, the full logits never held
# (forward(..., return_logits=False)); checkpointing: each block's activations recomputed in
# backward instead of kept.
MEMORY_RUNS = {
    "full": dict(model="ours", lora=False, chunked=False, checkpointing=False),
    "full-chunked": dict(model="ours", lora=False, chunked=True, checkpointing=False),
    "full-ckpt": dict(model="ours", lora=False, chunked=False, checkpointing=True),
    "full-both": dict(model="ours", lora=False, chunked=True, checkpointing=True),
    "lora": dict(model="ours", lora=True, chunked=False, checkpointing=False),
    "lora-chunked": dict(model="ours", lora=True, chunked=True, checkpointing=False),
    "lora-ckpt": dict(model="ours", lora=True, chunked=False, checkpointing=True),
    "lora-both": dict(model="ours", lora=True, chunked=True, checkpointing=True),
    "peft": dict(model="peft", lora=True, chunked=False, checkpointing=False),
    "peft-ckpt": dict(model="peft", lora=True, chunked=False, checkpointing=True),
}
# The memory targets, as (title, baseline run, candidate run, target on a CPU, on
# CUDA). LoRA is held to half of full fine-tuning called the same way (the training script's:
# the chunked loss), to half of peft's LoRA (0.6 on a GPU), and checkpointing must lower it.
MEMORY_TARGETS = (
    ("LoRA / full fine-tuning, both with the chunked loss", "full-chunked", "lora-chunked",
     ("≤", 0.5), ("≤", 0.5)),
    ("LoRA with the chunked loss / transformers+peft", "peft", "lora-chunked",
     ("≤", 0.5), ("≤", 0.6)),
    ("LoRA with the chunked loss: checkpointing added", "lora-chunked", "lora-both",
     ("<", 1.0), ("<", 1.0)),
    ("LoRA / transformers+peft, both checkpointed", "peft-ckpt", "lora-both", None, None),
)
# The comparison operators a target may use, as they are printed in the table.
OPERATORS = {"≤": lambda x, y: x <= y, "<": lambda x, y: x < y, "≥": lambda x, y: x >= y}

# The options: --name: (default, help). A default of None is an int that takes the preset's size
# when it is not given; False is a switch; otherwise the option has the default's type.
OPTIONS = dict(
    only=(",".join(COMPARISONS), "comparisons to run"),
    device=("cpu", "cpu, cuda or cuda:N"),
    threads=(min(os.cpu_count() or 1, 2), "CPU threads"),
    json=("", "also write the figures to this file"),
    preset=("", "a GPT-2 preset's sizes (gpt2.sm, ...); default: 4 layers of gpt2.sm"),
    n_layer=(None, "layers (default: the preset's)"),
    n_embd=(None, "width (default: the preset's)"),
    n_head=(None, "heads (default: the preset's)"),
    vocab_size=(50257, "its vocabulary"),
    block_size=(128, "tokens per sequence"),
    batch_size=(4, "sequences per step"),
    rank=(4, "LoRA rank r"),
    alpha=(32.0, "LoRA alpha"),
    dtype=("float32", "or bfloat16 (autocast)"),
    compile=(False, "torch.compile the models of train, hf and nanogpt"),
    peak_tflops=(0.0, "the GPU's dense bf16 TFLOP/s, for MFU; 0: by its name"),
    repeats=(5, "timed samples per candidate"),
    nanogpt=("", "a clone of karpathy/nanoGPT, whose model.py is timed"),
    gen_tokens=(256, "tokens to generate, after a prompt of 16"),
    gen_model=("4,256,8,8192", "the generation model's n_layer,n_embd,n_head,vocab, or bench"),
    memory_runs=(",".join(MEMORY_RUNS), "runs of the memory comparison"),
    memory_steps=(2, "training steps of each memory run (1: LoRA's peak less AdamW's state)"),
    malloc_mmap_threshold=(0, "CPU memory runs: glibc's MALLOC_MMAP_THRESHOLD_ in bytes for "
                              "their processes (0: glibc's default)"),
)
# The sizes of the bench's model when no --preset is given: 4 layers of GPT-2 small.
DEFAULT_SIZES = dict(n_layer=4, n_embd=768, n_head=12)
GEN_PROMPT_TOKENS = 16


# ---- timing and rows ----

@contextlib.contextmanager
def no_host_sync(device, enabled=True):
    """On CUDA, a device-to-host sync in the block (or decorated function) is an error."""
    if device.type != "cuda" or not enabled:
        yield
        return
    # A hidden .item() or a CPU tensor mixed in would stall the GPU at every step: the mode
    # makes such a sync raise, so that the bench fails instead of timing a slow path.
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def time_interleaved(functions, repeats, device, warm_up=True):
    """Milliseconds per call of each candidate {name: function}: a warm-up round, then `repeats`
    interleaved rounds. Returns {name: [milliseconds per call, one per round]}."""
    # CUDA runs asynchronously: a clock read needs the GPU's queue drained first.
    if device.type == "cuda":
        def synchronize():
            torch.cuda.synchronize(device)
    else:
        def synchronize():
            pass

    def seconds_per_call(function, calls):
        """The mean time of `calls` calls in a row, the queue drained before and after."""
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            function()
        synchronize()
        return (time.perf_counter() - start) / calls

    # The warm-up also sizes each sample: enough calls to last 20 ms, so that the clock's
    # resolution and the loop's overhead do not count.
    calls = dict.fromkeys(functions, 1)
    if warm_up:
        for name, function in functions.items():
            once = max(seconds_per_call(function, 1), 1e-9)
            calls[name] = max(1, math.ceil(0.02 / once))
    # Odd rounds run the candidates in reverse order: a drift of the machine hits them alike.
    samples = {name: [] for name in functions}
    for round_index in range(repeats):
        order = list(functions) if round_index % 2 == 0 else list(functions)[::-1]
        for name in order:
            samples[name].append(seconds_per_call(functions[name], calls[name]) * 1e3)
    return samples


def make_rows(comparison, values, baseline, unit, targets=None):
    """A row per candidate of {candidate: [figure per repeat]}: its median, its ratio to
    `baseline` paired repeat by repeat, and its target {candidate: (operator, bound)} if any."""
    targets = targets or {}
    rows = []
    for name, figures in values.items():
        row = dict(comparison=comparison, candidate=name, median=statistics.median(figures),
                   unit=unit, ratio=1.0, ratio_range=None, target="baseline", met=None,
                   samples=figures, status="")
        if name != baseline:
            # Ratios are paired within a repeat: both figures saw the same state of the machine.
            ratios = [value / base for value, base in zip(figures, values[baseline])]
            row.update(ratio=statistics.median(ratios), target="")
            if len(ratios) > 1:
                row["ratio_range"] = [min(ratios), max(ratios)]
            if name in targets:
                operator, bound = targets[name]
                row.update(target=f"{operator} {bound:g}× baseline",
                           met=OPERATORS[operator](row["ratio"], bound))
        rows.append(row)
    return rows


def missing_rows(comparison, names, unit, status):
    """Rows not measured: the first name (the reference) reads `status`, the others
    "no baseline"."""
    rows = []
    for index, name in enumerate(names):
        rows.append(dict(comparison=comparison, candidate=name, median=None, unit=unit,
                         ratio=None, ratio_range=None, target="", met=None, samples=[],
                         status=status if index == 0 else "no baseline"))
    return rows


# ---- models, batches, training steps, memory ----

def build(device, args, rank=0, **sizes):
    """Our model at LoRA rank `rank` (0: none), of the bench's sizes or `sizes`, seeded."""
    # The same seed for every candidate: their weights, hence their work, are the same.
    torch.manual_seed(0)
    config = L.GPT2Config(**{**args.sizes, **sizes}, lora_attn_dim=rank,
                          lora_attn_alpha=args.alpha)
    return L.GPT2LMModel(config).to(device)


def make_batch(batch_size, block_size, vocab_size, device, seed=1):
    """Inputs and next-token labels, each (batch_size, block_size), from one random sequence."""
    # Random tokens: speed and memory do not depend on what the text says.
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=generator)
    inputs = ids[:, :-1].contiguous().to(device)  # (B, T)
    labels = ids[:, 1:].contiguous().to(device)  # (B, T): the inputs shifted by one
    return inputs, labels


def randomize_lora_B(model, seed=2):
    """B starts at zero: give it values, so that ΔW ≠ 0 and merging changes the weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def trainable(model):
    """The number of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast(args, device):
    """bfloat16 autocast when --dtype bfloat16, a no-op otherwise."""
    return torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bfloat16")


def train_step(model, loss_function, device, args, ours=True):
    """A step: forward (autocast as --dtype says), backward, AdamW (lr 1e-4), zero_grad.

    AdamW gets only what requires grad, as a trainer would give it: for LoRA, A and B alone.

    Our uncompiled steps run under no_host_sync: a hidden device-to-host copy is an error.
    Compiled code and the references are not watched (compiling may sync)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with no_host_sync(device, ours and not args.compile):
            with autocast(args, device):
                loss = loss_function()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


class Unavailable(Exception):
    """A saving that the library or a reference does not offer: its rows read "not available"."""


def ours_train(args, device, rank, chunked=False, checkpointing=False):
    """(model, step) of our model at `rank`: only LoRA trains when rank > 0, everything when
    rank = 0. `chunked`: the loss without the full logits (forward's return_logits=False);
    `checkpointing`: each block's activations recomputed in backward."""
    model = build(device, args, rank)
    if rank > 0:
        L.mark_only_lora_as_trainable(model)
    # Each saving is asked of the library only where it offers it: an attribute set on a model
    # that does not know it would silently change nothing.
    if checkpointing:
        if not hasattr(model.transformer, "checkpoint_activations"):
            raise Unavailable("lora_gpt2 has no checkpoint_activations")
        model.transformer.checkpoint_activations = True
    keywords = {}
    if chunked:
        if "return_logits" not in inspect.signature(model.forward).parameters:
            raise Unavailable("lora_gpt2's forward has no return_logits")
        keywords["return_logits"] = False  # forward returns (None, loss)
    inputs, labels = make_batch(args.batch_size, args.block_size, args.vocab_size, device)
    runner = torch.compile(model) if args.compile else model

    def loss():
        return runner(inputs, lm_labels=labels, **keywords)[1]
    step = train_step(model, loss, device, args)
    step.loss = loss  # the loss alone, for checks
    return model, step


def memory_candidate(args, device, name):
    """(model, step) of the memory comparison's run `name`, one of MEMORY_RUNS."""
    run = MEMORY_RUNS[name]
    if run["model"] == "ours":
        rank = args.rank if run["lora"] else 0
        return ours_train(args, device, rank, run["chunked"], run["checkpointing"])
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        raise Unavailable("not installed (transformers and peft)")
    model, _, _ = build_peft_model(args, device)
    model.train()  # transformers checkpoints only in training mode; dropout is 0 anyway
    if run["checkpointing"]:
        # transformers' own switch; the non-reentrant kind works with frozen embeddings.
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, peft_step(model, args, device)


def read_status_kib(key):
    """A figure of this process's /proc/self/status in KiB, e.g. VmRSS or VmHWM."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory(args, device, name):
    """The memory run `name` in this process: MiB of the peak over --memory-steps steps, of
    that peak above the level before the first step (the built model, its batch and, on the
    CPU, the process itself), and the milliseconds of the last step. The second step is the one
    that matters: AdamW's state exists from the first on."""
    try:
        _, step = memory_candidate(args, device, name)
    except Unavailable as e:
        return dict(unavailable=str(e))
    cuda = device.type == "cuda"
    # The high-water mark starts at the level before the steps.
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        before = read_status_kib("VmRSS") / 1024
    for _ in range(args.memory_steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        step_ms = (time.perf_counter() - start) * 1e3
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = read_status_kib("VmHWM") / 1024
    return dict(peak=peak, above_model=peak - before, step_ms=step_ms)


def child_argv(args, name):
    """The command of a fresh process that measures the memory run `name` with the bench's own
    options, and prints one line of JSON last."""
    # The same options: the child builds the same model at the same sizes, and checks them again.
    return [sys.executable, os.path.abspath(__file__), *args.argv, "--_child", name]


def child_environment(args):
    """The environment of a memory measurement's process: this one's, with glibc's
    MALLOC_MMAP_THRESHOLD_ as --malloc-mmap-threshold says (why: the module's docstring)."""
    environment = dict(os.environ)
    environment.pop("MALLOC_MMAP_THRESHOLD_", None)  # 0 means glibc's default, whatever is set
    if args.malloc_mmap_threshold:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return environment


def allocator_note(args, comparison):
    """The note saying which allocator setting the memory processes of `comparison` ran with."""
    if args.malloc_mmap_threshold:
        allocator = (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}: blocks of that size "
                     f"and more returned to the system when freed")
    else:
        allocator = ("glibc's default: freed blocks of up to 32 MiB may stay in the process "
                     "(--malloc-mmap-threshold 131072 returns them)")
    return f"{comparison}: the C library's allocator with {allocator}"


def start_memory_children(args):
    """A fresh process per training candidate (full fine-tuning and LoRA), both at once, each
    measuring its own peak; bench_train collects them."""
    children = {}
    for name in ("full", "lora"):
        children[name] = subprocess.Popen(child_argv(args, name), stdout=subprocess.PIPE,
                                          text=True, env=child_environment(args))
    return children


def measure_in_child(args, name):
    """The figures of the memory run `name` from a fresh process; a failure (an allocator's
    error, a process killed for memory) becomes {"failed": its last line}."""
    process = subprocess.run(child_argv(args, name), capture_output=True, text=True,
                             env=child_environment(args))
    # The child's last line of output is its JSON; anything before it is the library's.
    if process.returncode == 0:
        return json.loads(process.stdout.splitlines()[-1])
    if process.returncode < 0:  # killed by a signal: SIGKILL is the kernel's out-of-memory killer
        signal_number = -process.returncode
        guess = " (out of memory?)" if signal_number == 9 else ""
        return dict(failed=f"killed by signal {signal_number}{guess}")
    lines = process.stderr.strip().splitlines() or [f"exit status {process.returncode}"]
    return dict(failed=f"failed: {lines[-1][:120]}")


# ---- the comparisons: each returns its rows and adds its notes ----

def train_rows(comparison, args, device, candidates, targets, repeats=None):
    """Timed steps and trainable parameters of (name, model, step) candidates, the first the
    baseline."""
    steps = {name: step for name, _, step in candidates}
    milliseconds = time_interleaved(steps, repeats or args.repeats, device)
    parameters = {name: [trainable(model)] for name, model, _ in candidates}
    baseline = candidates[0][0]
    return (make_rows(comparison, milliseconds, baseline, "ms", targets)
            + make_rows(f"{comparison}: trainable params", parameters, baseline, "params"))


def bench_train(args, device, notes, children):
    """Full fine-tuning against LoRA: step time, trainable parameters, peak memory (from the
    children started at the beginning), checkpoint bytes and, where a peak is known, MFU."""
    outputs = {name: child.communicate()[0] for name, child in children.items()}
    if any(child.returncode for child in children.values()):
        raise RuntimeError("a memory measurement failed (its error is printed above)")
    # Each child prints one line of JSON last.
    memory = {name: json.loads(output.splitlines()[-1]) for name, output in outputs.items()}
    full, full_step = ours_train(args, device, 0)
    lora, lora_step = ours_train(args, device, args.rank)
    name = f"LoRA r={args.rank} (Q,V)"
    candidates = [("full fine-tuning", full, full_step), (name, lora, lora_step)]
    rows = train_rows("train", args, device, candidates, {name: ("≤", 0.45)})

    what = "GPU allocated" if device.type == "cuda" else "RSS"
    for key, label in (("peak", f"peak {what}"), ("above_model", f"peak {what} above model")):
        values = {"full fine-tuning": [memory["full"][key]], name: [memory["lora"][key]]}
        rows += make_rows(f"train: {label}", values, "full fine-tuning", "MiB",
                          {name: ("<", 1.0)})

    # The bytes of a checkpoint file; the tied head is stored once.
    megabytes = {}
    for label, state in (("full fine-tuning", full.state_dict()), (name, L.lora_state_dict(lora))):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        megabytes[label] = [buffer.tell() / 1e6]
    rows += make_rows("train: checkpoint", megabytes, "full fine-tuning", "MB")

    # MFU from the step times of the first two rows.
    milliseconds = {row["candidate"]: row["samples"] for row in rows[:2]}
    rows += mfu_rows("train", args, device, milliseconds, (full, lora), lora=(name,))
    # What LoRA saves: an fp32 gradient, exp_avg and exp_avg_sq per trainable parameter.
    states = [f"{trainable(model) * 12 / 2**20:.2f}" for model in (full, lora)]
    peak = "max_memory_allocated" if device.type == "cuda" else "VmHWM"
    notes.append(f"memory: {peak} of a fresh process over {args.memory_steps} steps; gradients + "
                 f"AdamW states: full {states[0]} MiB, LoRA {states[1]} MiB")
    if device.type != "cuda":
        notes.append(allocator_note(args, "train"))
    return rows


def mfu_rows(comparison, args, device, milliseconds, models, lora=()):
    """Model FLOPs utilization: a step's FLOPs by nanoGPT's estimate over its time and the peak.

    Per token 6N + 12·L·C·T (N: the parameters less wpe; forward 2N, backward 4N), and
    4N + 12·L·C·T for `lora` candidates, whose backward computes no frozen weight's gradient.
    No rows without a known peak: --peak-tflops, or a GPU in PEAK_TFLOPS running bfloat16."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    bf16 = args.dtype == "bfloat16"  # the data sheets' peak is bf16's
    by_name = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in gpu and bf16), 0)
    peak = args.peak_tflops or by_name
    if not peak:
        return []
    utilization = {}
    for name, model in zip(milliseconds, models):
        n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
        matmul_factor = 4 if name in lora else 6
        attention = 12 * args.n_layer * args.n_embd * args.block_size
        flops = args.batch_size * args.block_size * (matmul_factor * n + attention)
        utilization[name] = [100 * flops / (ms / 1e3) / (peak * 1e12) for ms in milliseconds[name]]
    return make_rows(f"{comparison}: MFU of {peak:g} TFLOP/s", utilization,
                     next(iter(milliseconds)), "%")


def bench_infer(args, device, notes):
    """A no-grad forward of plain GPT-2 against LoRA unmerged and merged, the three checked to
    give the same logits first."""
    lora = build(device, args, args.rank).eval()
    randomize_lora_B(lora)
    # The plain model holds the merged weights, so all three compute the same function.
    plain = build(device, args).eval()
    plain.load_state_dict(L.merged_state_dict(lora))
    merged = copy.deepcopy(lora)
    L.merge_lora(merged)
    inputs, _ = make_batch(args.batch_size, args.block_size, args.vocab_size, device)
    with torch.no_grad():
        reference = plain(inputs)[0]  # (B, T, V)
        difference = max((model(inputs)[0] - reference).abs().max().item()
                         for model in (lora, merged))
    notes.append(f"infer: the three models agree, max |Δlogit| = {difference:.2e}")

    base = "plain GPT-2 (r=0)"
    unmerged_name = f"LoRA r={args.rank} unmerged"
    merged_name = f"LoRA r={args.rank} merged"
    functions = {}
    for name, model in ((base, plain), (unmerged_name, lora), (merged_name, merged)):
        def forward(model=model):
            return model(inputs)
        functions[name] = torch.no_grad()(autocast(args, device)(no_host_sync(device)(forward)))
    # Twice the repeats: the 2% target is within the spread of a handful of samples.
    samples = time_interleaved(functions, 2 * args.repeats, device)
    return make_rows("infer", samples, base, "ms",
                     {unmerged_name: ("≤", 1.10), merged_name: ("≤", 1.02)})


def bench_layer(args, device, notes):
    """The fused Q,K,V projection alone, forward and backward: ours, loralib's and the frozen
    base layer, at the bench's width and at GPT-2 medium's (1024)."""
    rows = []
    for width in sorted({args.n_embd, 1024}):
        comparison = f"layer C={width}"
        functions = {}
        # LoRA on Q and V of the fused projection, K left alone, as in microsoft's GPT-2; the
        # weight stored (in, out) as GPT-2's Conv1D; unmerged, so that the adapters run.
        lora_options = dict(r=args.rank, lora_alpha=args.alpha, enable_lora=[True, False, True],
                            fan_in_fan_out=True, merge_weights=False)
        torch.manual_seed(0)
        ours = L.MergedLinear(width, 3 * width, **lora_options).to(device)
        randomize_lora_B(ours)
        # The floor: the same layer without adapters, its W0 copied from ours.
        base = L.MergedLinear(width, 3 * width, r=0, fan_in_fan_out=True,
                              merge_weights=False).to(device)
        base.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
        base.weight.requires_grad_(False)  # frozen as in the LoRA layers; biases train in all
        x = torch.randn(args.batch_size, args.block_size, width, device=device,
                        requires_grad=True)  # (B, T, C)
        grad_output = torch.randn(args.batch_size, args.block_size, 3 * width,
                                  device=device)  # (B, T, 3C)

        def forward_backward(layer, check_syncs=True, x=x, grad_output=grad_output):
            """The gradients of x and of what trains, as one timed function."""
            wrt = [x] + [p for p in layer.parameters() if p.requires_grad]

            def run():
                return torch.autograd.grad(layer(x), wrt, grad_output)
            return no_host_sync(device, check_syncs)(run)

        # loralib, microsoft's own layer, when installed: checked to compute what ours computes,
        # then timed beside it.
        if importlib.util.find_spec("loralib") is not None:
            import loralib
            reference = loralib.MergedLinear(width, 3 * width, **lora_options).to(device)
            reference.load_state_dict(ours.state_dict())
            reference.train()  # loralib's train() returns None
            with torch.no_grad():
                difference = (reference(x) - ours(x)).abs().max().item()
            notes.append(f"{comparison}: ours and loralib agree, max |Δy| = {difference:.2e}")
            functions["loralib.MergedLinear"] = forward_backward(reference, check_syncs=False)
        else:
            rows += missing_rows(comparison, ["loralib.MergedLinear"], "ms",
                                 "not installed (loralib)")
        functions["ours MergedLinear"] = forward_backward(ours)
        functions["frozen base only (r=0)"] = forward_backward(base)
        samples = time_interleaved(functions, 3 * args.repeats, device)  # cheap: 3× the samples
        target = {}
        if "loralib.MergedLinear" in functions:
            target = {"ours MergedLinear": ("≤", 0.6)}
        rows += make_rows(comparison, samples, next(iter(functions)), "ms", target)
    return rows


def build_peft_model(args, device):
    """transformers' GPT-2 of the bench's sizes with peft's LoRA on c_attn (Q, K and V), no
    dropout, sdpa attention as ours, seeded; (model, transformers, peft)."""
    import warnings

    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=args.vocab_size, n_embd=args.n_embd,
                                     n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    lora_config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["c_attn"],
                                  fan_in_fan_out=True, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # deprecation notices between transformers and peft versions
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(model.float().to(device), lora_config)
    return model, transformers, peft


def peft_step(model, args, device):
    """A training step of the peft model: the loss the usual way, from its full logits."""
    inputs, labels = make_batch(args.batch_size, args.block_size, args.vocab_size, device)
    runner = torch.compile(model) if args.compile else model

    # Our labels are already shifted; passing them to transformers as `labels` would shift them
    # again, so the loss is taken here, as a user of the logits would.
    def loss():
        logits = runner(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return train_step(model, loss, device, args, ours=False)


def bench_hf(args, device, notes):
    """A LoRA training step: ours against transformers' GPT-2 with peft's LoRA."""
    ours_name = f"ours LoRA r={args.rank} (Q,V)"
    peft_name = f"transformers+peft r={args.rank} (c_attn: Q,K,V)"
    missing = [p for p in ("transformers", "peft") if importlib.util.find_spec(p) is None]
    if missing:
        status = f"not installed ({' and '.join(missing)})"
        return missing_rows("hf", [peft_name, ours_name], "ms", status)
    # Both adapt at the same rank and alpha; peft adapts K too, which transformers' fused c_attn
    # leaves it no way to skip: a little more work on its side.
    model, transformers, peft = build_peft_model(args, device)
    # Ours is called microsoft's way here (logits returned); the memory comparison has the rest.
    candidates = [(peft_name, model, peft_step(model, args, device)),
                  (ours_name, *ours_train(args, device, args.rank))]
    rows = train_rows("hf", args, device, candidates, {ours_name: ("≤", 1.0)})
    notes.append(f"hf: transformers {transformers.__version__}, peft {peft.__version__}, "
                 f"{model.config._attn_implementation} attention as ours; peft adapts Q, K and V")
    return rows


def bench_nanogpt(args, device, notes):
    """A full fine-tuning step: ours against nanoGPT's GPT, as configured there and doing
    GPT-2's work (biases and tanh GELU)."""
    theirs_name = "nanoGPT model.py GPT"
    ours_name = "ours, full fine-tuning (r=0)"
    work_name = "nanoGPT model.py GPT with GPT-2's biases and tanh GELU"
    if not args.nanogpt:
        return missing_rows("nanogpt", [theirs_name, work_name, ours_name], "ms",
                            "not installed (--nanogpt PATH)")
    # Their model.py, imported from its file.
    path = os.path.join(args.nanogpt, "model.py")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)

    config = NANOGPT_CPU
    batch_size = NANOGPT_BATCH
    if args.preset:  # GPT-2's sizes: nanoGPT's own GPT-2 configuration, less its dropout
        config = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      block_size=args.block_size, vocab_size=args.vocab_size, dropout=0.0,
                      bias=False)
        batch_size = args.batch_size
    models = {}
    # The second model does GPT-2's work: biases here, and tanh GELU below.
    for name, bias in ((theirs_name, config["bias"]), (work_name, True)):
        torch.manual_seed(0)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # it prints its size
            models[name] = nanogpt.GPT(nanogpt.GPTConfig(**{**config, "bias": bias})).to(device)
    gelus = [m for m in models[work_name].modules() if isinstance(m, torch.nn.GELU)]
    for gelu in gelus:
        gelu.approximate = "tanh"
    models[ours_name] = build(device, args, vocab_size=config["vocab_size"],
                              n_positions=config["block_size"], n_ctx=config["block_size"],
                              n_embd=config["n_embd"], n_layer=config["n_layer"],
                              n_head=config["n_head"])
    # Their forward takes targets, ours lm_labels: both second.
    inputs, labels = make_batch(batch_size, config["block_size"], config["vocab_size"], device)
    candidates = []
    for name, model in models.items():
        runner = torch.compile(model) if args.compile else model

        def loss(runner=runner):
            return runner(inputs, labels)[1]
        candidates.append((name, model, train_step(model, loss, device, args, name == ours_name)))
    rows = train_rows("nanogpt", args, device, candidates, {}, 8 * args.repeats)  # cheap: 8×

    # The target is against the model doing the same work; nanoGPT's configuration is
    # information. The rows go right after the timed ones, pairing their very samples.
    same_work = {row["candidate"]: row["samples"] for row in rows[1:len(models)]}
    rows[len(models):len(models)] = make_rows("nanogpt: GPT-2's work", same_work, work_name, "ms",
                                              {ours_name: ("≤", 1.0)})
    if args.preset:  # the bench's sizes: nanoGPT's MFU, by its own estimate, beside ours
        milliseconds = {row["candidate"]: row["samples"] for row in rows[:len(models)]}
        rows += mfu_rows("nanogpt", args, device, milliseconds, list(models.values()))
    where = "the bench's sizes" if args.preset else "its CPU Shakespeare configuration"
    settings = ", ".join(f"{key} {value}" for key, value in config.items())
    notes.append(f"nanogpt: {args.nanogpt} at {where}: batch_size {batch_size}, {settings}; one "
                 f"AdamW and batch for all; '{work_name}': bias=True, its {len(gelus)} nn.GELU "
                 f"approximate='tanh'")
    return rows


def bench_gen(args, device, notes):
    """Greedy generation of a merged LoRA model, with the key/value cache against without."""
    model = build(device, args, args.rank, **args.gen_sizes).eval()
    randomize_lora_B(model)
    L.merge_lora(model)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, args.gen_sizes["vocab_size"], (1, GEN_PROMPT_TOKENS),
                           generator=generator).to(device)  # (1, 16)
    tokens = args.gen_tokens
    short = min(tokens, 8)

    def generate(new_tokens, cache):
        return model.generate(prompt, new_tokens, temperature=0, use_cache=cache)
    # The check is also the warm-up; it is short because generating without a cache is slow.
    same = torch.equal(generate(short, True), generate(short, False))
    notes.append(f"gen: {args.gen_sizes}, LoRA merged, batch 1, prompt {GEN_PROMPT_TOKENS}, "
                 f"{tokens} new tokens, greedy; cached = uncached on the first {short}: {same}")
    functions = {"without cache": lambda: generate(tokens, False),
                 "with KV cache": lambda: generate(tokens, True)}
    milliseconds = time_interleaved(functions, min(args.repeats, 3), device, False)
    per_second = {name: [tokens / (ms / 1e3) for ms in samples]
                  for name, samples in milliseconds.items()}
    return make_rows("gen", per_second, "without cache", "tokens/s", {"with KV cache": ("≥", 3.0)})


def memory_label(name, args):
    """The memory run `name` as the table names it."""
    run = MEMORY_RUNS[name]
    if run["model"] == "peft":
        who = f"transformers+peft r={args.rank} (Q,K,V)"
    elif run["lora"]:
        who = f"LoRA r={args.rank} (Q,V)"
    else:
        who = "full fine-tuning"
    savings = [saving for saving, key in (("chunked loss", "chunked"),
                                          ("checkpointing", "checkpointing")) if run[key]]
    return who + (", " + " + ".join(savings) if savings else "")


def unmeasured_row(comparison, candidate, unit, status):
    """A row whose figure is not there, `status` saying why."""
    return dict(comparison=comparison, candidate=candidate, median=None, unit=unit, ratio=None,
                ratio_range=None, target="", met=None, samples=[], status=status)


def memory_notes(args, device):
    """Where a training step's memory goes, by arithmetic on the bench's sizes: the weights,
    the logits and the optimizer's state of full fine-tuning and LoRA."""
    # On the meta device: shapes only, nothing allocated.
    with torch.device("meta"):
        full = L.GPT2LMModel(L.GPT2Config(**args.sizes))
        lora = L.GPT2LMModel(L.GPT2Config(**args.sizes, lora_attn_dim=args.rank,
                                          lora_attn_alpha=args.alpha))
    L.mark_only_lora_as_trainable(lora)
    parameters = sum(p.numel() for p in full.parameters())
    mib = 2**20
    # One fp32 (B, T, V) tensor: the logits; the loss's softmax and the logits' gradient are
    # each as large again.
    logits = args.batch_size * args.block_size * args.vocab_size * 4 / mib
    # fp32 gradient, exp_avg and exp_avg_sq: 12 bytes per trainable parameter.
    states_full = trainable(full) * 12 / mib
    states_lora = trainable(lora) * 12 / mib
    notes = [f"memory: weights {parameters * 4 / mib:,.0f} MiB (in the built model, below the "
             f"line the peaks are measured from); one fp32 (B, T, V) logits tensor "
             f"{logits:,.0f} MiB; gradients + AdamW states: full {states_full:,.0f} MiB, LoRA "
             f"{states_lora:.2f} MiB; each run: a fresh process, {args.memory_steps} steps, one "
             f"after another"]
    if device.type != "cuda":
        notes.append(allocator_note(args, "memory"))
        notes.append("memory on a GPU (bf16, compiled; the GPU targets): not run here "
                     "(--device cpu)")
    return notes


def bench_memory(args, device, notes):
    """The peak memory and step time of each run of --memory-runs, each in a fresh process,
    one after another; then the memory targets, where both of their runs were measured."""
    # One after another: two at once would share the cores and blur each other's step time.
    results = {}
    for name in args.memory_runs:
        start = time.perf_counter()
        results[name] = measure_in_child(args, name)
        print(f"    (memory {name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr,
              flush=True)
    what = "GPU allocated" if device.type == "cuda" else "RSS"
    peak_comparison = f"memory: peak {what} above model"
    step_comparison = "memory: step time"
    measured = [name for name in args.memory_runs if "above_model" in results[name]]
    # The baseline: full fine-tuning as the library always ran it, or the first measured run.
    baseline = "full" if "full" in measured else (measured[0] if measured else None)
    ordered = ([baseline] if baseline else []) + [n for n in args.memory_runs if n != baseline]
    rows = []
    for comparison, key, unit in ((peak_comparison, "above_model", "MiB"),
                                  (step_comparison, "step_ms", "ms")):
        figures = {memory_label(name, args): [results[name][key]]
                   for name in ordered if name in measured}
        by_label = {}
        if baseline:
            measured_rows = make_rows(comparison, figures, memory_label(baseline, args), unit)
            by_label = {row["candidate"]: row for row in measured_rows}
        # In the order of --memory-runs, the baseline first; a run without figures says why.
        for name in ordered:
            label = memory_label(name, args)
            if name in measured:
                rows.append(by_label[label])
            elif "unavailable" in results[name]:
                status = f"not available ({results[name]['unavailable']})"
                rows.append(unmeasured_row(comparison, label, unit, status))
            else:
                rows.append(unmeasured_row(comparison, label, unit, results[name]["failed"]))

    # The memory targets: each a pair of runs, side by side in this one bench.
    for title, base_name, candidate_name, cpu_target, cuda_target in MEMORY_TARGETS:
        comparison = f"memory target: {title}"
        target = cuda_target if device.type == "cuda" else cpu_target
        pair = (base_name, candidate_name)
        if all(name in measured for name in pair):
            values = {memory_label(name, args): [results[name]["above_model"]] for name in pair}
            targets = {memory_label(candidate_name, args): target} if target else {}
            rows += make_rows(comparison, values, memory_label(base_name, args), "MiB", targets)
            continue
        lacking = [name for name in pair if name not in measured]
        for name in lacking:
            if name in results:
                status = "not measured (see its row above)"
            else:
                status = f"not measured (needs --memory-runs with {name})"
            rows.append(unmeasured_row(comparison, memory_label(name, args), "MiB", status))
    notes += memory_notes(args, device)
    return rows


def bench_savings(args, device, notes):
    """The step time of LoRA and of full fine-tuning, each without and with the library's savings
    (the chunked loss, checkpointing, both), timed interleaved: a step-time ratio to the same
    training without savings, measured side by side (the memory runs' single steps, each in its
    own process, cannot give one)."""
    rows = []
    for lora, who in ((True, "LoRA"), (False, "full fine-tuning")):
        names = [name for name, run in MEMORY_RUNS.items()
                 if run["model"] == "ours" and run["lora"] == lora]
        steps = {}
        for name in names:
            try:
                steps[memory_label(name, args)] = memory_candidate(args, device, name)[1]
            except Unavailable as e:
                rows.append(unmeasured_row(f"savings: {who} step time", memory_label(name, args),
                                           "ms", f"not available ({e})"))
        samples = time_interleaved(steps, args.repeats, device)
        rows += make_rows(f"savings: {who} step time", samples, next(iter(steps)), "ms")
        del steps, samples  # one group's models at a time
    notes.append("savings: a group's models built together, their steps timed in turn; the "
                 "memory of each is the memory comparison's")
    return rows


def format_figure(value, unit):
    """A median as the table shows it: thousands with separators, three significant digits
    below."""
    if unit == "params" or value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table_lines(rows):
    """The markdown table of the rows, one line each after the header."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for row in rows:
        # A row without a figure shows why in the median's cell, and dashes after its unit.
        if row["median"] is None:
            cells = [row["status"], row["unit"], "—", "—", "—", "—"]
        else:
            # The range exists only with two repeats or more; a ratio of one sample has none.
            if row["ratio_range"]:
                ratio_range = "{:#.3g}–{:#.3g}".format(*row["ratio_range"])
            else:
                ratio_range = "—"
            if row["met"] is None:
                met = "—"
            else:
                met = "yes" if row["met"] else "MISSED"
            cells = [format_figure(row["median"], row["unit"]), row["unit"],
                     f"{row['ratio']:#.3g}", ratio_range, row["target"] or "—", met]
        lines.append("| " + " | ".join([row["comparison"], row["candidate"]] + cells) + " |")
    return lines


# ---- output and command line ----

def machine_memory_bytes(device):
    """The memory a run can use: the GPU's on CUDA, the machine's RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def names_error(option, given, valid):
    """Why the comma-separated names of `option` are not a choice among `valid`, or ""."""
    unknown = [name for name in given if name not in valid]
    if not given:
        return f"{option}: name at least one of {','.join(valid)}"
    if unknown:
        return f"{option}: unknown {','.join(unknown)}; choose from {','.join(valid)}"
    return ""


def range_error(option, value, low, high):
    """Why `value` of `option` lies outside [low, high], or ""."""
    if not low <= value <= high:  # NaN fails every comparison
        bounds = [f"{bound:,}" if isinstance(bound, int) else f"{bound:g}" for bound in (low, high)]
        return f"{option} must lie in [{bounds[0]}, {bounds[1]}], got {value}"
    return ""


def parse_args(argv):
    """The options, checked before anything runs: a bad one is a ValueError naming it."""
    parser = argparse.ArgumentParser(description=__doc__[:__doc__.index("Timing:")],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message):  # one line on stderr, exit status 1, no usage dump
        sys.exit(f"error: {message} (see --help)")
    parser.error = error
    for name, (default, text) in OPTIONS.items():
        if default is False:
            kind = dict(action="store_true")
        else:
            kind = dict(type=int if default is None else type(default))
        shown = f" [{default}]" if default not in ("", None, False) else ""
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=text + shown,
                            **kind)
    # A memory measurement's process: the run it measures.
    parser.add_argument("--_child", choices=MEMORY_RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv  # for the memory measurements' processes
    args.only = [name for name in args.only.split(",") if name]
    args.memory_runs = [name for name in args.memory_runs.split(",") if name]

    # The names, the device and the files: each a (bad, message) check, in this order.
    bad_device = (not re.fullmatch(r"cpu|cuda(:\d+)?", args.device)
                  or (args.device != "cpu" and not torch.cuda.is_available()))
    json_path = os.path.abspath(args.json) if args.json else ""
    only_error = names_error("--only", args.only, COMPARISONS)
    memory_runs_error = names_error("--memory-runs", args.memory_runs, MEMORY_RUNS)
    checks = [
        (only_error, only_error),
        (memory_runs_error, memory_runs_error),
        (args.preset and args.preset not in L.PRESETS,
         f"--preset: choose from {', '.join(L.PRESETS)}"),
        (bad_device, "--device: cpu, or cuda or cuda:N where CUDA is available"),
        (args.dtype not in ("float32", "bfloat16"), "--dtype: float32 or bfloat16"),
        (args.json and not os.path.isdir(os.path.dirname(json_path)), "--json: no such folder"),
        (args.json and os.path.isdir(json_path),
         f"--json {args.json} is a folder; name a file, e.g. {os.path.join(args.json, 'b.json')}"),
        (args.json and os.path.isdir(os.path.dirname(json_path))
         and not os.access(os.path.dirname(json_path), os.W_OK),
         f"--json: cannot write in {os.path.dirname(json_path)}"),
        (args.nanogpt and not os.path.isfile(os.path.join(args.nanogpt, "model.py")),
         "--nanogpt: no model.py"),
        (not re.fullmatch(r"bench|\d+,\d+,\d+,\d+", args.gen_model),
         "--gen-model: bench or L,C,H,V")]
    for bad, message in checks:
        if bad:
            raise ValueError(message)

    # Sizes given as 0 are refused below, not replaced by the preset's: only those not given are.
    for key, value in L.PRESETS.get(args.preset, DEFAULT_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Every number within its range: (option, value, lowest, highest).
    n_ctx = 1024
    cpus = os.cpu_count() or 1
    ranges = [("--threads", args.threads, 1, cpus),
              ("--repeats", args.repeats, 1, 1000),
              ("--memory-steps", args.memory_steps, 1, 100),
              # glibc takes no threshold above 32 MiB on a 64-bit machine (0: its default).
              ("--malloc-mmap-threshold", args.malloc_mmap_threshold, 0, 2**25),
              ("--n-layer", args.n_layer, 1, 1000),
              ("--n-embd", args.n_embd, 1, 2**16),
              ("--n-head", args.n_head, 1, args.n_embd),
              ("--vocab-size", args.vocab_size, 2, 2**24),
              ("--block-size", args.block_size, 1, n_ctx),
              ("--batch-size", args.batch_size, 1, 2**16),
              ("--rank", args.rank, 1, args.n_embd),
              ("--alpha", args.alpha, 1e-6, 1e6),
              ("--peak-tflops", args.peak_tflops, 0, 1e6),
              ("--gen-tokens", args.gen_tokens, 1, n_ctx - GEN_PROMPT_TOKENS)]
    for option, value, low, high in ranges:
        message = range_error(option, value, low, high)
        if message:
            raise ValueError(message)

    # The bench's model and the generation model.
    args.sizes = {key: getattr(args, key) for key in ("n_layer", "n_embd", "n_head", "vocab_size")}
    if args.gen_model == "bench":
        args.gen_sizes = args.sizes
    else:
        args.gen_sizes = dict(zip(args.sizes, map(int, args.gen_model.split(","))))
    # A bad size (heads not dividing the width, ...) is named by GPT2Config before anything runs.
    for sizes in (args.sizes, args.gen_sizes):
        L.GPT2Config(**sizes, lora_attn_dim=args.rank, lora_attn_alpha=args.alpha)
    # A model or a batch's logits larger than the machine's memory would fail to allocate only
    # after the comparisons before it had run.
    available = machine_memory_bytes(torch.device(args.device))
    weights = 4 * (12 * args.n_layer * args.n_embd**2 + (args.vocab_size + n_ctx) * args.n_embd)
    logits = 4 * args.batch_size * args.block_size * args.vocab_size
    for what, needed, options in (
            ("the model's fp32 weights", weights, "--n-layer, --n-embd, --vocab-size"),
            ("a batch's fp32 logits", logits, "--batch-size, --block-size, --vocab-size")):
        if needed > available:
            raise ValueError(f"{options}: {what} alone take {needed / 2**30:,.1f} GiB, more "
                             f"than the {available / 2**30:,.1f} GiB here")
    return args


def main(argv=None):
    """Parse, then run the bench (or, in a memory measurement's process, measure one peak)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args._child is not None:  # a memory measurement in a fresh process: one line of JSON
            print(json.dumps(peak_memory(args, torch.device(args.device), args._child)))
            return {}
        return run(args)
    finally:  # main() may run in-process (the smoke tests): leave the thread count as found
        torch.set_num_threads(threads)


def machine_description(args, device):
    """What the figures depend on: versions, processor, load, and the options."""
    # The load at the start: other work on the machine slows every candidate, unevenly.
    load = os.getloadavg()[0]
    processor = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    return dict(torch=torch.__version__, python=platform.python_version(),
                processor=processor or platform.machine(), cpu_count=os.cpu_count(),
                load_average_1min=load,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                **{key: getattr(args, key) for key in OPTIONS})


def run(args):
    """Every comparison of --only: the table and notes on stdout, the figures in --json."""
    device = torch.device(args.device)
    start = time.perf_counter()
    meta = machine_description(args, device)
    gpu = f" ({meta['gpu']})" if meta["gpu"] else ""
    compiled = " compiled" if args.compile else ""
    print(f"# bench_lora_gpt2.py\n\ntorch {meta['torch']} | Python {meta['python']} | processor: "
          f"{meta['processor']} ({meta['cpu_count']} CPUs) | threads: {args.threads} | "
          f"{device}{gpu} | {args.dtype}{compiled} | load average at start: "
          f"{meta['load_average_1min']:.2f}\nmodel: n_layer={args.n_layer} n_embd={args.n_embd} "
          f"n_head={args.n_head} vocab={args.vocab_size} | batch {args.batch_size} × block "
          f"{args.block_size} | LoRA r={args.rank} α={args.alpha:g} | AdamW | "
          f"{args.repeats} repeats\n", flush=True)

    # The memory children run first, while the references (seconds to import) are imported.
    children = start_memory_children(args) if "train" in args.only else None
    for module, comparison in (("transformers", "hf"), ("peft", "hf"), ("loralib", "layer")):
        if comparison in args.only and importlib.util.find_spec(module) is not None:
            __import__(module)
    rows = []
    notes = []
    seconds = {}
    for comparison in COMPARISONS:
        if comparison not in args.only:
            continue
        comparison_start = time.perf_counter()
        extra = [children] if comparison == "train" else []
        rows += globals()["bench_" + comparison](args, device, notes, *extra)
        seconds[comparison] = time.perf_counter() - comparison_start
        print(f"  ({comparison}: {seconds[comparison]:.1f} s)", file=sys.stderr, flush=True)

    # The table, then the notes: what each comparison checked, and the targets' count.
    lines = table_lines(rows)
    total = time.perf_counter() - start
    met = sum(row["met"] is True for row in rows)
    missed = sum(row["met"] is False for row in rows)
    per_comparison = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    notes.append(f"targets met: {met}, missed: {missed}; {total:.0f} s in all ({per_comparison})")
    print("\n".join(lines) + "\n\n" + "\n".join("- " + note for note in notes), flush=True)
    # The same figures for programs (gpu_check.py reads them): every row with its samples.
    payload = dict(meta={**meta, "total_seconds": total, "seconds_per_comparison": seconds},
                   rows=rows, notes=notes, table=lines)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
    return payload


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad options, refused before anything runs; others keep a traceback
        sys.exit(f"error: {e}")
