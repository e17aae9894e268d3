"""Speed and memory of lora_gpt2 beside its references: `python bench_lora_gpt2.py [--nanogpt
PATH] [--device cuda] [--preset gpt2.sm]` prints a markdown table (two to three minutes on a
2-core CPU). The comparisons (--only picks some):

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

Timing: a warm-up, then the candidates interleaved (A B, B A, ...) so that a drift of the
machine hits all alike; a row's ratio is the median of candidate / baseline within a repeat. On
CUDA our uncompiled steps run under set_sync_debug_mode("error"). Memory: a fresh process each.
"""

import argparse
import contextlib
import copy
import importlib.util
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_gpt2 as L  # noqa: E402

COMPARISONS = ("train", "infer", "layer", "hf", "nanogpt", "gen")
TABLE_HEADER = ("comparison", "candidate", "median", "unit", "ratio vs baseline", "ratio range",
                "target", "met?")
# nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides, bias=False
NANOGPT_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0,
                   bias=False)
NANOGPT_BATCH = 12
# Dense bf16 TFLOP/s from NVIDIA's data sheets, the first name the GPU's contains (SXM unless said)
PEAK_TFLOPS = {"H100 PCIe": 756, "A100": 312, "H100": 989, "H200": 989}
OPS = {"≤": lambda x, y: x <= y, "<": lambda x, y: x < y, "≥": lambda x, y: x >= y}

# --name: (default, help); None: an int, the preset's size if not given.
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
)


# ---- timing and rows ----

@contextlib.contextmanager
def no_host_sync(device, on=True):
    """On CUDA, a device-to-host sync in the block (or decorated function) is an error."""
    if device.type != "cuda" or not on:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def time_interleaved(fns, repeats, device, warm_up=True):
    """Milliseconds per call of each candidate: a warm-up round, then `repeats` interleaved ones."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(fn, calls):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls
    calls = dict.fromkeys(fns, 1)
    for name, fn in fns.items() if warm_up else ():
        calls[name] = max(1, math.ceil(0.02 / max(timed(fn, 1), 1e-9)))  # samples >= 20 ms
    samples = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            samples[name].append(timed(fns[name], calls[name]) * 1e3)
    return samples


def make_rows(comparison, values, baseline, unit, targets=None):
    """A row per candidate of {candidate: [figure per repeat]}: its median, its ratio to
    `baseline` paired repeat by repeat, and its target {candidate: (op, bound)} if any."""
    rows = []
    for name, vals in values.items():
        row = dict(comparison=comparison, candidate=name, median=statistics.median(vals),
                   unit=unit, ratio=1.0, ratio_range=None, target="baseline", met=None,
                   samples=vals, status="")
        if name != baseline:
            ratios = [v / b for v, b in zip(vals, values[baseline])]
            row.update(ratio=statistics.median(ratios), target="")
            if len(ratios) > 1:
                row["ratio_range"] = [min(ratios), max(ratios)]
            if name in (targets or {}):
                op, bound = targets[name]
                row.update(target=f"{op} {bound:g}× baseline", met=OPS[op](row["ratio"], bound))
        rows.append(row)
    return rows


def missing_rows(comparison, names, unit, status):
    """Rows not measured: the reference's with `status`, the others "no baseline"."""
    return [dict(comparison=comparison, candidate=n, median=None, unit=unit, ratio=None,
                 ratio_range=None, target="", met=None, samples=[],
                 status="no baseline" if i else status)
            for i, n in enumerate(names)]


# ---- models, batches, training steps, memory ----

def build(device, a, r=0, **sizes):
    """Our model at rank r, of the bench's sizes or `sizes`, seeded."""
    torch.manual_seed(0)
    config = L.GPT2Config(**{**a.sizes, **sizes}, lora_attn_dim=r, lora_attn_alpha=a.alpha)
    return L.GPT2LMModel(config).to(device)


def make_batch(batch_size, block_size, vocab_size, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def randomize_lora_B(model, seed=2):
    """B starts at zero: values, so that ΔW ≠ 0 and merging changes weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for name, p in model.named_parameters() if name.endswith("lora_B")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast(a, device):
    return torch.autocast(device.type, torch.bfloat16, enabled=a.dtype == "bfloat16")


def train_step(model, loss_fn, device, a, ours=True):
    """forward (autocast as --dtype says), backward, AdamW (lr 1e-4), zero_grad. Compiled code is
    not watched for syncs: compiling may sync."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with no_host_sync(device, ours and not a.compile):
            with autocast(a, device):
                loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours_train(a, device, r):
    """Our model at rank r: only LoRA trains when r > 0, everything when r = 0."""
    model = build(device, a, r)
    if r > 0:
        L.mark_only_lora_as_trainable(model)
    inp, lab = make_batch(a.batch_size, a.block_size, a.vocab_size, device)
    run = torch.compile(model) if a.compile else model
    return model, train_step(model, lambda: run(inp, lm_labels=lab)[1], device, a)


def peak_memory(a, device, r, steps=2):
    """MiB: the peak over `steps` training steps at rank r, and above the level before."""
    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    _, step = ours_train(a, device, r)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else status_kib("VmRSS") / 1024
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else status_kib("VmHWM") / 1024
    return dict(peak=peak, above_model=peak - before)


def start_memory_children(a):
    """A fresh process per training candidate (r=0 and r=rank), both at once; bench_train waits."""
    argv = [sys.executable, os.path.abspath(__file__), *a.argv, "--_child"]
    return {r: subprocess.Popen(argv + [str(r)], stdout=subprocess.PIPE, text=True)
            for r in (0, a.rank)}


# ---- the comparisons: each returns its rows and adds its notes ----

def train_rows(comparison, a, device, cands, targets, repeats=None):
    """Timed steps and trainable parameters of (name, model, step) candidates, the first the
    baseline."""
    ms = time_interleaved({n: step for n, _, step in cands}, repeats or a.repeats, device)
    params = {n: [trainable(m)] for n, m, _ in cands}
    return (make_rows(comparison, ms, cands[0][0], "ms", targets)
            + make_rows(f"{comparison}: trainable params", params, cands[0][0], "params"))


def bench_train(a, device, notes, children):
    out = {r: proc.communicate()[0] for r, proc in children.items()}
    if any(proc.returncode for proc in children.values()):
        raise RuntimeError("a memory measurement failed (its error is printed above)")
    mem = {r: json.loads(o.splitlines()[-1]) for r, o in out.items()}
    (full, full_step), (lora, lora_step) = ours_train(a, device, 0), ours_train(a, device, a.rank)
    name = f"LoRA r={a.rank} (Q,V)"
    rows = train_rows("train", a, device, [("full fine-tuning", full, full_step),
                                           (name, lora, lora_step)], {name: ("≤", 0.45)})
    what = "GPU allocated" if device.type == "cuda" else "RSS"
    for key, label in (("peak", f"peak {what}"), ("above_model", f"peak {what} above model")):
        values = {"full fine-tuning": [mem[0][key]], name: [mem[a.rank][key]]}
        rows += make_rows(f"train: {label}", values, "full fine-tuning", "MiB", {name: ("<", 1.0)})
    nbytes = {}
    for label, sd in (("full fine-tuning", full.state_dict()), (name, L.lora_state_dict(lora))):
        torch.save(sd, buf := io.BytesIO())  # the bytes of a file; the tied head is stored once
        nbytes[label] = [buf.tell() / 1e6]
    rows += make_rows("train: checkpoint", nbytes, "full fine-tuning", "MB")
    ms = {r["candidate"]: r["samples"] for r in rows[:2]}
    rows += mfu_rows("train", a, device, ms, (full, lora), lora=(name,))
    states = [f"{trainable(m) * 12 / 2**20:.2f}" for m in (full, lora)]  # fp32 grad, exp_avg(_sq)
    peak = "max_memory_allocated" if device.type == "cuda" else "VmHWM"
    notes.append(f"memory: {peak} of a fresh process over 2 steps; gradients + AdamW states: "
                 f"full {states[0]} MiB, LoRA {states[1]} MiB")
    return rows


def mfu_rows(comparison, a, device, ms, models, lora=()):
    """Model FLOPs utilization: a step's FLOPs by nanoGPT's estimate over its time and the peak.
    Per token 6N + 12·L·C·T (N: the parameters less wpe; forward 2N, backward 4N), 4N + 12·L·C·T
    for `lora` candidates, whose backward computes no frozen weight's gradient."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    bf16 = a.dtype == "bfloat16"  # the data sheets' peak is bf16's
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu and bf16), 0)
    if not peak:
        return []
    mfu = {}
    for name, m in zip(ms, models):
        n = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()
        flops = a.batch_size * a.block_size * ((4 if name in lora else 6) * n
                                               + 12 * a.n_layer * a.n_embd * a.block_size)
        mfu[name] = [100 * flops / (t / 1e3) / (peak * 1e12) for t in ms[name]]
    return make_rows(f"{comparison}: MFU of {peak:g} TFLOP/s", mfu, next(iter(ms)), "%")


def bench_infer(a, device, notes):
    lora = build(device, a, a.rank).eval()
    randomize_lora_B(lora)
    plain = build(device, a).eval()
    plain.load_state_dict(L.merged_state_dict(lora))
    merged = copy.deepcopy(lora)
    L.merge_lora(merged)
    inp, _ = make_batch(a.batch_size, a.block_size, a.vocab_size, device)
    with torch.no_grad():
        ref = plain(inp)[0]
        diff = max((m(inp)[0] - ref).abs().max().item() for m in (lora, merged))
    notes.append(f"infer: the three models agree, max |Δlogit| = {diff:.2e}")
    base, unmerged = "plain GPT-2 (r=0)", f"LoRA r={a.rank} unmerged"
    merged_name = f"LoRA r={a.rank} merged"
    fns = {name: torch.no_grad()(autocast(a, device)(no_host_sync(device)(lambda m=m: m(inp))))
           for name, m in ((base, plain), (unmerged, lora), (merged_name, merged))}
    # twice the repeats: the 2% target is within the spread of a handful of samples
    return make_rows("infer", time_interleaved(fns, 2 * a.repeats, device), base, "ms",
                     {unmerged: ("≤", 1.10), merged_name: ("≤", 1.02)})


def bench_layer(a, device, notes):
    rows = []
    for C in sorted({a.n_embd, 1024}):  # the bench's width and GPT-2 medium's
        comp, fns = f"layer C={C}", {}
        kw = dict(r=a.rank, lora_alpha=a.alpha, enable_lora=[True, False, True],
                  fan_in_fan_out=True, merge_weights=False)
        torch.manual_seed(0)
        ours = L.MergedLinear(C, 3 * C, **kw).to(device)
        randomize_lora_B(ours)
        base = L.MergedLinear(C, 3 * C, r=0, fan_in_fan_out=True, merge_weights=False).to(device)
        base.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
        base.weight.requires_grad_(False)  # frozen as in the LoRA layers; biases train in all
        x = torch.randn(a.batch_size, a.block_size, C, device=device, requires_grad=True)
        gy = torch.randn(a.batch_size, a.block_size, 3 * C, device=device)

        def fwd_bwd(layer, check=True, x=x, gy=gy):  # the gradients of x and of what trains
            wrt = [x] + [p for p in layer.parameters() if p.requires_grad]
            return no_host_sync(device, check)(lambda: torch.autograd.grad(layer(x), wrt, gy))
        if importlib.util.find_spec("loralib") is not None:
            import loralib
            ref = loralib.MergedLinear(C, 3 * C, **kw).to(device)
            ref.load_state_dict(ours.state_dict())
            ref.train()  # loralib's train() returns None
            with torch.no_grad():
                diff = (ref(x) - ours(x)).abs().max().item()
            notes.append(f"{comp}: ours and loralib agree, max |Δy| = {diff:.2e}")
            fns["loralib.MergedLinear"] = fwd_bwd(ref, check=False)
        else:
            rows += missing_rows(comp, ["loralib.MergedLinear"], "ms", "not installed (loralib)")
        fns["ours MergedLinear"] = fwd_bwd(ours)
        fns["frozen base only (r=0)"] = fwd_bwd(base)
        samples = time_interleaved(fns, 3 * a.repeats, device)  # cheap: 3× the samples
        target = {"ours MergedLinear": ("≤", 0.6)} if "loralib.MergedLinear" in fns else {}
        rows += make_rows(comp, samples, next(iter(fns)), "ms", target)
    return rows


def bench_hf(a, device, notes):
    ours_name, peft_name = f"ours LoRA r={a.rank} (Q,V)", \
        f"transformers+peft r={a.rank} (c_attn: Q,K,V)"
    missing = [p for p in ("transformers", "peft") if importlib.util.find_spec(p) is None]
    if missing:
        status = f"not installed ({' and '.join(missing)})"
        return missing_rows("hf", [peft_name, ours_name], "ms", status)
    import warnings
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=a.vocab_size, n_embd=a.n_embd, n_layer=a.n_layer,
                                  n_head=a.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    lcfg = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=["c_attn"],
                           fan_in_fan_out=True, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # deprecation notices between transformers and peft versions
        warnings.simplefilter("ignore", FutureWarning)
        hf = peft.get_peft_model(hf.float().to(device), lcfg)
    inp, lab = make_batch(a.batch_size, a.block_size, a.vocab_size, device)
    run = torch.compile(hf) if a.compile else hf

    def hf_loss():
        logits = run(input_ids=inp, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), lab.flatten())
    cands = [(peft_name, hf, train_step(hf, hf_loss, device, a, False)),
             (ours_name, *ours_train(a, device, a.rank))]
    rows = train_rows("hf", a, device, cands, {ours_name: ("≤", 1.0)})
    notes.append(f"hf: transformers {transformers.__version__}, peft {peft.__version__}, "
                 f"{hf.config._attn_implementation} attention as ours; peft adapts Q, K and V")
    return rows


def bench_nanogpt(a, device, notes):
    theirs_name, ours_name = "nanoGPT model.py GPT", "ours, full fine-tuning (r=0)"
    arch_name = "nanoGPT model.py GPT with GPT-2's biases and tanh GELU"
    if not a.nanogpt:
        return missing_rows("nanogpt", [theirs_name, arch_name, ours_name], "ms",
                            "not installed (--nanogpt PATH)")
    path = os.path.join(a.nanogpt, "model.py")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    ng = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ng)
    c, batch_size, models = NANOGPT_CPU, NANOGPT_BATCH, {}
    if a.preset:  # GPT-2's sizes: nanoGPT's own GPT-2 configuration, less its dropout
        c = dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.block_size,
                 vocab_size=a.vocab_size, dropout=0.0, bias=False)
        batch_size = a.batch_size
    for name, bias in ((theirs_name, c["bias"]), (arch_name, True)):  # the second does GPT-2's work
        torch.manual_seed(0)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # it prints its size
            models[name] = ng.GPT(ng.GPTConfig(**{**c, "bias": bias})).to(device)
    gelus = [m for m in models[arch_name].modules() if isinstance(m, torch.nn.GELU)]
    for m in gelus:
        m.approximate = "tanh"
    models[ours_name] = build(device, a, vocab_size=c["vocab_size"], n_positions=c["block_size"],
                              n_ctx=c["block_size"], n_embd=c["n_embd"], n_layer=c["n_layer"],
                              n_head=c["n_head"])
    # their targets, our lm_labels
    inp, lab = make_batch(batch_size, c["block_size"], c["vocab_size"], device)
    steps = []
    for n, m in models.items():
        run = torch.compile(m) if a.compile else m
        loss = lambda run=run: run(inp, lab)[1]  # noqa: E731
        steps.append((n, m, train_step(m, loss, device, a, n == ours_name)))
    rows = train_rows("nanogpt", a, device, steps, {}, 8 * a.repeats)  # cheap: 8× the samples
    arch = {r["candidate"]: r["samples"] for r in rows[1:len(models)]}
    # The target is against the model doing the same work; nanoGPT's configuration is information.
    rows[len(models):len(models)] = make_rows("nanogpt: GPT-2's work", arch, arch_name, "ms",
                                              {ours_name: ("≤", 1.0)})
    if a.preset:  # the bench's sizes: nanoGPT's MFU, by its own estimate, beside ours
        ms = {r["candidate"]: r["samples"] for r in rows[:len(models)]}
        rows += mfu_rows("nanogpt", a, device, ms, list(models.values()))
    where = "the bench's sizes" if a.preset else "its CPU Shakespeare configuration"
    notes.append(f"nanogpt: {a.nanogpt} at {where}: batch_size {batch_size}, "
                 + ", ".join(f"{k} {v}" for k, v in c.items()) + "; one AdamW and batch "
                 f"for all; '{arch_name}': bias=True, its {len(gelus)} nn.GELU approximate='tanh'")
    return rows


def bench_gen(a, device, notes):
    model = build(device, a, a.rank, **a.gen_sizes).eval()
    randomize_lora_B(model)
    L.merge_lora(model)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, a.gen_sizes["vocab_size"], (1, 16), generator=g).to(device)
    n, short = a.gen_tokens, min(a.gen_tokens, 8)

    def gen(k, cache):
        return model.generate(prompt, k, temperature=0, use_cache=cache)
    same = torch.equal(gen(short, True), gen(short, False))  # the warm-up too (uncached is slow)
    notes.append(f"gen: {a.gen_sizes}, LoRA merged, batch 1, prompt 16, {n} new tokens, greedy; "
                 f"cached = uncached on the first {short}: {same}")
    fns = {"without cache": lambda: gen(n, False), "with KV cache": lambda: gen(n, True)}
    ms = time_interleaved(fns, min(a.repeats, 3), device, False)
    return make_rows("gen", {k: [n / (t / 1e3) for t in v] for k, v in ms.items()},
                     "without cache", "tokens/s", {"with KV cache": ("≥", 3.0)})


def table_lines(rows):
    def fmt(x, unit):
        if unit == "params" or x >= 1000:
            return f"{x:,.0f}"
        return f"{x:.1f}" if x >= 100 else f"{x:.3g}"
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in rows:
        if r["median"] is None:
            cells = [r["status"], r["unit"], "—", "—", "—", "—"]
        else:
            rng = "—" if not r["ratio_range"] else "{:#.3g}–{:#.3g}".format(*r["ratio_range"])
            met = "—" if r["met"] is None else ("yes" if r["met"] else "MISSED")
            cells = [fmt(r["median"], r["unit"]), r["unit"], f"{r['ratio']:#.3g}", rng,
                     r["target"] or "—", met]
        lines.append("| " + " | ".join([r["comparison"], r["candidate"]] + cells) + " |")
    return lines


# ---- output and command line ----

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__[:__doc__.index("Timing:")],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    for k, (v, text) in OPTIONS.items():
        kind = dict(action="store_true") if v is False else dict(type=int if v is None else type(v))
        shown = f" [{v}]" if v not in ("", None, False) else ""
        p.add_argument("--" + k.replace("_", "-"), default=v, help=text + shown, **kind)
    p.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = argv  # for the memory measurements' processes
    for k, v in L.PRESETS.get(a.preset, dict(n_layer=4, n_embd=768, n_head=12)).items():
        setattr(a, k, getattr(a, k) or v)
    a.only = [c for c in a.only.split(",") if c]
    positive = ("repeats", "gen_tokens", "block_size", "batch_size", "rank", "threads")
    for bad, message in (
            (set(a.only) - set(COMPARISONS), f"--only: choose from {','.join(COMPARISONS)}"),
            (a.preset and a.preset not in L.PRESETS,
             f"--preset: choose from {', '.join(L.PRESETS)}"),
            (not re.fullmatch(r"cpu|cuda(:\d+)?", a.device)
             or a.device != "cpu" and not torch.cuda.is_available(),
             "--device: cpu, or cuda or cuda:N where CUDA is available"),
            (a.dtype not in ("float32", "bfloat16"), "--dtype: float32 or bfloat16"),
            (a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))),
             "--json: no such folder"),
            (a.nanogpt and not os.path.isfile(os.path.join(a.nanogpt, "model.py")),
             "--nanogpt: no model.py"),
            (max(16 + a.gen_tokens, a.block_size) > 1024,
             "--block-size and 16 + --gen-tokens must not exceed n_ctx 1024"),
            (min(getattr(a, k) for k in positive) < 1,
             ", ".join("--" + k.replace("_", "-") for k in positive) + " must be >= 1"),
            (not re.fullmatch(r"bench|\d+,\d+,\d+,\d+", a.gen_model),
             "--gen-model: bench or L,C,H,V")):
        if bad:
            raise ValueError(message)
    a.sizes = {k: getattr(a, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    a.gen_sizes = a.sizes if a.gen_model == "bench" else dict(
        zip(a.sizes, map(int, a.gen_model.split(","))))
    for sizes in (a.sizes, a.gen_sizes):  # a bad size is named before anything runs
        L.GPT2Config(**sizes, lora_attn_dim=a.rank, lora_attn_alpha=a.alpha)
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        if a._child is not None:  # a memory measurement in a fresh process: one line of JSON
            print(json.dumps(peak_memory(a, torch.device(a.device), a._child)))
            return {}
        return run(a)
    finally:  # main() may run in-process (the smoke tests): leave the thread count as found
        torch.set_num_threads(threads)


def run(a):
    device, t_start, load, cpu = torch.device(a.device), time.perf_counter(), os.getloadavg()[0], ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    meta = dict(torch=torch.__version__, python=platform.python_version(),
                processor=cpu or platform.machine(), cpu_count=os.cpu_count(),
                load_average_1min=load,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                **{k: getattr(a, k) for k in OPTIONS})
    gpu = f" ({meta['gpu']})" if meta["gpu"] else ""
    print(f"# bench_lora_gpt2.py\n\ntorch {meta['torch']} | Python {meta['python']} | processor: "
          f"{meta['processor']} ({meta['cpu_count']} CPUs) | threads: {a.threads} | {device}{gpu}"
          f" | {a.dtype}{' compiled' * a.compile} | load average at start: {load:.2f}\nmodel: "
          f"n_layer={a.n_layer} n_embd={a.n_embd} n_head={a.n_head} vocab={a.vocab_size} | batch "
          f"{a.batch_size} × block {a.block_size} | LoRA r={a.rank} α={a.alpha:g} | AdamW | "
          f"{a.repeats} repeats\n", flush=True)

    # The memory children run first, while the references (seconds to import) are imported.
    children = start_memory_children(a) if "train" in a.only else None
    for module, comp in (("transformers", "hf"), ("peft", "hf"), ("loralib", "layer")):
        if comp in a.only and importlib.util.find_spec(module) is not None:
            __import__(module)
    rows, notes, seconds = [], [], {}
    for comp in (c for c in COMPARISONS if c in a.only):
        t0 = time.perf_counter()
        extra = [children] if comp == "train" else []
        rows += globals()["bench_" + comp](a, device, notes, *extra)
        seconds[comp] = time.perf_counter() - t0
        print(f"  ({comp}: {seconds[comp]:.1f} s)", file=sys.stderr, flush=True)

    lines, total = table_lines(rows), time.perf_counter() - t_start
    notes.append(f"targets met: {sum(r['met'] is True for r in rows)}, missed: "
                 f"{sum(r['met'] is False for r in rows)}; {total:.0f} s in all ("
                 + ", ".join(f"{c} {s:.0f} s" for c, s in seconds.items()) + ")")
    print("\n".join(lines) + "\n\n" + "\n".join("- " + n for n in notes), flush=True)
    payload = dict(meta={**meta, "total_seconds": total, "seconds_per_comparison": seconds},
                   rows=rows, notes=notes, table=lines)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
    return payload


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad options, refused before anything runs; others keep a traceback
        sys.exit(f"error: {e}")
