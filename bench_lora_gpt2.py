"""Measured speed and memory of lora_gpt2, side by side with the references.

Run `python bench_lora_gpt2.py` (about two minutes on a 2-core CPU). It prints a markdown table,
and with `--json PATH` writes the same figures as JSON. Six comparisons:

  1. train   One training step (forward, backward, AdamW step, zero_grad) on the same model and
             batch: LoRA r=4 on Q,V versus full fine-tuning of the plain model. Time, trainable
             parameters, and peak memory. LoRA skips the weight gradients of every frozen matrix
             and the optimizer update of all but a few thousand numbers.
  2. infer   A no-grad forward pass: plain GPT-2 (rank 0) versus LoRA unmerged versus LoRA merged,
             all three holding the same function (plain = merged_state_dict of the LoRA model).
             Merged must cost what plain costs; unmerged pays for two thin products per layer.
             This comparison takes twice --repeats samples: its 2% target is within the spread
             of a handful.
  3. layer   GPT-2's fused Q,K,V projection alone (MergedLinear, LoRA on Q and V), forward and
             backward (the input needs its gradient, as it does mid-network): ours versus
             `loralib.MergedLinear` with identical parameters, and the frozen base layer (r=0) as
             a floor. loralib rebuilds the full ΔW on every call; ours applies two thin products.
             Samples are cheap here, so this comparison takes three times --repeats.
  4. hf      A training step of our model with LoRA r=4 versus Hugging Face `transformers`
             GPT2LMHeadModel with a `peft` LoRA adapter of the same rank on `c_attn`, same sizes,
             same batch, float32, dropout 0, train mode, the same loss (cross entropy over all
             positions computed from the logits). peft's adapter covers all of c_attn (Q, K and V
             together); ours covers Q and V: both trainable counts are reported.
  5. gen     Generation of 256 new tokens (greedy), with the key/value cache versus without.
  6. ckpt    Bytes of a real torch.save of the adapter only (lora_state_dict) versus the whole
             state dict, for gpt2.sm and gpt2.md at r=4.

How timing is done. Threads are pinned (torch.set_num_threads) and printed. Each comparison builds
its candidates in one process, warms each up, then runs them interleaved: one sample of each per
repeat, the order reversed on every other repeat (A B C, C B A, ...), so that a drift of the
machine's speed (another process, thermal limits) hits every candidate alike. A sample of a fast
candidate loops until it lasts ~20 ms. The table gives each candidate's median, and its ratio to
the comparison's baseline: the median over repeats of candidate / baseline *within the same
repeat* (paired, so drift cancels), with the min-max of those paired ratios. On CUDA every sample
is bracketed by torch.cuda.synchronize().

How memory is measured. On CPU each training candidate runs in a fresh child process (this script
with --_child): it builds the model, the batch and the optimizer, resets the kernel's peak-RSS
counter (writes 5 to /proc/self/clear_refs; VmHWM then equals the current RSS), runs two training
steps, and reads VmHWM. "Peak RSS" is that high-water mark of the whole process (interpreter,
torch, model, gradients, optimizer state, activations); "peak above model" subtracts the RSS just
before the first step, leaving what training itself adds. On CUDA the same two figures come from
torch.cuda.max_memory_allocated after reset_peak_memory_stats.

A missed target is printed as MISSED with a one-line reason, and (unless --no-profile) a
torch.profiler summary of each candidate of that comparison follows the table. Nothing is tuned
to pass: the figures are what the machine measured.

Optional references: `loralib`, `transformers` and `peft` are imported only when installed; their
rows read "not installed" otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_gpt2 as L  # noqa: E402

COMPARISONS = ("train", "infer", "layer", "hf", "gen", "ckpt")
TITLES = {
    "train": "1. training step",
    "infer": "2. inference forward",
    "layer": "3. fused Q/V layer fwd+bwd",
    "hf": "4. train step vs HF+peft",
    "gen": "5. generation",
    "ckpt": "6. checkpoint size",
}
MIN_SAMPLE_S = 0.02  # a timing sample of a fast candidate repeats its call until it lasts this long


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table. `ratio` is candidate / baseline (None on a baseline row);
    `met` is True / False for a row with a target, None otherwise."""

    comparison: str
    candidate: str
    median: Optional[float]          # None: not measured (reference not installed)
    unit: str
    ratio: Optional[float] = None
    ratio_range: Optional[List[float]] = None
    target: str = ""
    met: Optional[bool] = None
    baseline: bool = False
    samples: List[float] = field(default_factory=list)
    status: str = ""                 # "not installed" when a reference package is missing
    reason: str = ""                 # one line, printed when the target is missed


def _met(ratio: float, op: str, bound: float) -> bool:
    return ratio <= bound if op == "<=" else (ratio < bound if op == "<" else ratio >= bound)


def _target_text(op: str, bound: float) -> str:
    return {"<=": "≤", "<": "<", ">=": "≥"}[op] + f" {bound:g}× baseline"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device, min_sample_s: float = MIN_SAMPLE_S) -> Dict[str, List[float]]:
    """Seconds per call of each candidate: `warmup` untimed calls each, then `repeats` samples
    each, interleaved, the order reversed every other repeat. A sample of a candidate faster than
    `min_sample_s` (as timed in the last warm-up) averages over enough back-to-back calls to last
    that long."""
    names = list(fns)
    inner = {n: 1 for n in names}  # without a warm-up, one call per sample
    for _ in range(warmup):
        for n in names:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            inner[n] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-9)))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            k = inner[n]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fns[n]()
            _sync(device)
            samples[n].append((time.perf_counter() - t0) / k)
    return samples


def paired_ratios(samples: Sequence[float], base: Sequence[float]) -> List[float]:
    return [s / b for s, b in zip(samples, base)]


def timing_rows(comparison: str, samples: Dict[str, List[float]], baseline: str,
                targets: Dict[str, tuple], unit: str = "ms", per_second: float = 0.0,
                reasons: Optional[Dict[str, str]] = None) -> List[Row]:
    """Rows for one timed comparison. Times are shown in ms; with `per_second` > 0 the figure is
    a rate instead, per_second / time (e.g. tokens per second)."""
    def figure(s):
        return per_second / s if per_second else s * 1e3

    base = [figure(s) for s in samples[baseline]]
    rows = []
    for name, secs in samples.items():
        vals = [figure(s) for s in secs]
        row = Row(comparison, name, statistics.median(vals), unit, samples=vals)
        if name == baseline:
            row.baseline, row.ratio, row.target = True, 1.0, "baseline"
        else:
            ratios = paired_ratios(vals, base)
            row.ratio = statistics.median(ratios)
            row.ratio_range = [min(ratios), max(ratios)]
            if name in targets:
                op, bound = targets[name]
                row.target = _target_text(op, bound)
                row.met = _met(row.ratio, op, bound)
                if not row.met:
                    row.reason = (reasons or {}).get(name, "")
        rows.append(row)
    return rows


def single_rows(comparison: str, values: Dict[str, float], baseline: str, unit: str,
                targets: Optional[Dict[str, tuple]] = None, reasons: Optional[Dict[str, str]] = None,
                ) -> List[Row]:
    """Rows for figures measured once (memory, sizes, parameter counts)."""
    rows = []
    for name, v in values.items():
        row = Row(comparison, name, float(v), unit, samples=[float(v)])
        if name == baseline:
            row.baseline, row.ratio, row.target = True, 1.0, "baseline"
        else:
            row.ratio = float(v) / float(values[baseline])
            if targets and name in targets:
                op, bound = targets[name]
                row.target = _target_text(op, bound)
                row.met = _met(row.ratio, op, bound)
                if not row.met:
                    row.reason = (reasons or {}).get(name, "")
            else:
                row.target = "(report)"
        rows.append(row)
    return rows


def missing_row(comparison: str, candidate: str, unit: str, package: str) -> Row:
    return Row(comparison, candidate, None, unit, status=f"not installed ({package})")


# --------------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------------

def model_config(args, r: int) -> L.GPT2Config:
    return L.GPT2Config(vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                        n_head=args.n_head, lora_attn_dim=r, lora_attn_alpha=args.alpha)


def build_model(cfg: L.GPT2Config, device: torch.device, seed: int = 0) -> L.GPT2LMModel:
    torch.manual_seed(seed)
    return L.GPT2LMModel(cfg).to(device)


def batch(args, device: torch.device, seed: int = 1):
    """Inputs and next-token labels, (batch, block) each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def randomize_lora_B(model: torch.nn.Module, seed: int = 2) -> None:
    """B starts at zero; give it values so that ΔW ≠ 0 and merging changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]):
    """forward + backward + AdamW (PyTorch defaults, lr 1e-4) + zero_grad(set_to_none=True)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours_train_setup(args, device: torch.device, r: int):
    """Our model (rank r, only LoRA trainable when r > 0; everything trainable when r = 0)."""
    model = build_model(model_config(args, r), device)
    if r > 0:
        L.mark_only_lora_as_trainable(model)
    inp, lab = batch(args, device)
    return model, make_train_step(model, lambda: model(inp, lm_labels=lab)[1])


def hf_train_setup(args, device: torch.device):
    """transformers GPT2LMHeadModel + peft LoRA on c_attn, float32, SDPA attention if offered."""
    import warnings
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
    transformers.logging.set_verbosity_error()

    hf_cfg = HFConfig(vocab_size=args.vocab_size, n_positions=1024, n_embd=args.n_embd,
                      n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    try:
        hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    except (TypeError, ValueError, ImportError):  # an older transformers without SDPA for GPT-2
        hf = GPT2LMHeadModel(hf_cfg)
    hf = hf.float().to(device)
    attn_impl = getattr(hf.config, "_attn_implementation", "unknown")
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["c_attn"],
                      fan_in_fan_out=True, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # deprecation notices between transformers and peft versions
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(hf, lcfg)
    inp, lab = batch(args, device)
    V = args.vocab_size

    def loss_fn():
        # use_cache=False: no key/value cache is built in training (the cheaper choice for HF)
        logits = model(input_ids=inp, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, V), lab.reshape(-1))
    return model, make_train_step(model, loss_fn), attn_impl


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def _proc_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


def measure_train_memory(args, device: torch.device, kind: str, steps: int = 2) -> Dict[str, float]:
    """Peak memory of `steps` training steps of candidate `kind` ('full' or 'lora'), in MiB:
    {'peak': high-water mark, 'above_model': peak minus the level just before the first step}."""
    import gc
    _, step = ours_train_setup(args, device, 0 if kind == "full" else args.rank)
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(peak=peak / 2**20, above_model=(peak - before) / 2**20,
                    method="torch.cuda.max_memory_allocated")
    if _reset_peak_rss():
        before = _proc_status_kib("VmRSS")
        for _ in range(steps):
            step()
        peak = _proc_status_kib("VmHWM")
        return dict(peak=peak / 1024, above_model=(peak - before) / 1024, method="VmHWM")
    # No /proc (not Linux): ru_maxrss counts from process start, so "above model" is an upper bound.
    import resource
    before = _proc_status_kib("VmRSS") or 0
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_kib = peak / 1024 if sys.platform == "darwin" else peak
    return dict(peak=peak_kib / 1024, above_model=(peak_kib - before) / 1024, method="ru_maxrss")


def train_memory(args, argv: List[str], device: torch.device, kinds: Sequence[str]) -> Dict[str, dict]:
    """Peak memory of each training candidate. On CUDA, measured here, one after the other; on
    CPU, each in its own fresh child process (this script with --_child). The children run at the
    same time: each one's RSS is its own, so they do not disturb each other's figures."""
    if device.type == "cuda":
        return {k: measure_train_memory(args, device, k) for k in kinds}
    procs = {k: subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--_child", f"memory-{k}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in kinds}
    result = {}
    for k, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {k} failed:\n{err[-2000:]}")
        result[k] = json.loads(out.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, argv: List[str]):
        self.args = args
        self.argv = argv
        self.device = torch.device(args.device)
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self.profile_fns: Dict[str, Dict[str, Callable]] = {}  # comparison -> candidates, kept for misses

    def time(self, fns, repeats=None):
        a = self.args
        return time_interleaved(fns, a.repeats if repeats is None else repeats, a.warmup, self.device)

    # 1 ----------------------------------------------------------------------------------------
    def train(self):
        a = self.args
        full_model, full_step = ours_train_setup(a, self.device, 0)
        lora_model, lora_step = ours_train_setup(a, self.device, a.rank)
        lora_name = f"LoRA r={a.rank} (Q,V)"
        fns = {"full fine-tuning": full_step, lora_name: lora_step}
        samples = self.time(fns)
        self.rows += timing_rows(
            "train", samples, "full fine-tuning", {lora_name: ("<=", 0.5)},
            reasons={lora_name: "LoRA still pays the whole forward and the input gradients of every "
                                "frozen matrix (the V×C head included); it saves only the weight "
                                "gradients and optimizer updates; see the profile below"})
        self.rows += single_rows("train: trainable params",
                                 {"full fine-tuning": trainable_count(full_model),
                                  lora_name: trainable_count(lora_model)}, "full fine-tuning", "params")
        self.profile_fns["train"] = fns
        mem = train_memory(a, self.argv, self.device, ("full", "lora"))
        what = "GPU allocated" if self.device.type == "cuda" else "RSS"
        for key, label in (("peak", f"train: peak {what}"), ("above_model", f"train: peak {what} above model")):
            self.rows += single_rows(label, {"full fine-tuning": mem["full"][key],
                                             lora_name: mem["lora"][key]}, "full fine-tuning", "MiB",
                                     targets={lora_name: ("<", 1.0)},
                                     reasons={lora_name: "LoRA should hold fewer gradients and "
                                                         "optimizer states; see the method note"})
        self.notes.append(f"memory: {mem['full']['method']} over 2 training steps, "
                          + ("in-process" if self.device.type == "cuda" else "one fresh child process per candidate")
                          + "; for scale, gradients + AdamW states alone (trainable × 12 bytes): "
                          + ", ".join(f"{n} {trainable_count(m) * 12 / 2**20:.1f} MiB"
                                      for n, m in (("full", full_model), ("LoRA", lora_model))))

    # 2 ----------------------------------------------------------------------------------------
    def infer(self):
        a = self.args
        lora = build_model(model_config(a, a.rank), self.device)
        randomize_lora_B(lora)
        lora.eval()
        plain = build_model(model_config(a, 0), self.device).eval()
        plain.load_state_dict(L.merged_state_dict(lora))
        merged = copy.deepcopy(lora)
        L.merge_lora(merged)
        inp, _ = batch(a, self.device)
        with torch.no_grad():
            ref = plain(inp)[0]
            diff = max((m(inp)[0] - ref).abs().max().item() for m in (lora, merged))
        self.notes.append(f"inference: the three models agree, max |Δlogit| = {diff:.2e} (same function)")

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(inp)
            return run
        fns = {"plain GPT-2 (r=0)": fwd(plain), f"LoRA r={a.rank} unmerged": fwd(lora),
               f"LoRA r={a.rank} merged": fwd(merged)}
        # Twice the repeats: the 2% target is within the spread of a handful of samples.
        samples = self.time(fns, repeats=2 * a.repeats)
        self.rows += timing_rows(
            "infer", samples, "plain GPT-2 (r=0)",
            {f"LoRA r={a.rank} unmerged": ("<=", 1.10), f"LoRA r={a.rank} merged": ("<=", 1.02)},
            reasons={f"LoRA r={a.rank} merged": "merged runs the same kernels on the same shapes as "
                                                "plain; a gap is noise or drift (see the ratio range)",
                     f"LoRA r={a.rank} unmerged": "the adapter adds 3 thin products and 2 slice adds per "
                                                  "layer: tiny in FLOPs, but each op pays a fixed cost, "
                                                  "large when the cores are shared; see the profile"})
        self.profile_fns["infer"] = fns

    # 3 ----------------------------------------------------------------------------------------
    def layer(self):
        a = self.args
        widths = [int(w) for w in a.layer_widths.split(",") if w]
        have_loralib = importlib.util.find_spec("loralib") is not None
        for C in widths:
            comp = f"layer C={C}"
            kw = dict(r=a.rank, lora_alpha=a.alpha, enable_lora=[True, False, True],
                      fan_in_fan_out=True, merge_weights=False)
            torch.manual_seed(0)
            ours = L.MergedLinear(C, 3 * C, **kw).to(self.device)
            randomize_lora_B(ours)
            base = L.MergedLinear(C, 3 * C, r=0, fan_in_fan_out=True, merge_weights=False).to(self.device)
            with torch.no_grad():
                base.weight.copy_(ours.weight)
                base.bias.copy_(ours.bias)
            base.weight.requires_grad_(False)  # frozen, as in the LoRA layers; bias trains in all three
            x = torch.randn(a.batch_size, a.block_size, C, device=self.device, requires_grad=True)
            gy = torch.randn(a.batch_size, a.block_size, 3 * C, device=self.device)

            def fwd_bwd(layer, x=x, gy=gy):  # bind this width's tensors (the profile runs later)
                def run():
                    x.grad = None
                    for p in layer.parameters():
                        p.grad = None
                    layer(x).backward(gy)
                return run
            fns = {}
            if have_loralib:
                import loralib
                ref = loralib.MergedLinear(C, 3 * C, **kw).to(self.device)
                ref.load_state_dict(ours.state_dict())
                ref.train()
                with torch.no_grad():  # same function: check once
                    d = (ref(x) - ours(x)).abs().max().item()
                self.notes.append(f"layer C={C}: ours and loralib agree, max |Δy| = {d:.2e}")
                fns["loralib.MergedLinear"] = fwd_bwd(ref)
            fns["ours MergedLinear"] = fwd_bwd(ours)
            fns["frozen base only (r=0)"] = fwd_bwd(base)
            samples = self.time(fns, repeats=3 * a.repeats)  # cheap: three times the samples
            if have_loralib:
                self.rows += timing_rows(
                    comp, samples, "loralib.MergedLinear", {"ours MergedLinear": ("<=", 0.6)},
                    reasons={"ours MergedLinear": "ours forms no dense ΔW; its cost above the frozen "
                                                  "base is the thin products, the output concatenation "
                                                  "and their backward: see the profile"})
            else:
                self.rows.append(missing_row(comp, "loralib.MergedLinear", "ms", "loralib"))
                self.rows += timing_rows(comp, samples, "frozen base only (r=0)", {})
            self.profile_fns[comp] = fns

    # 4 ----------------------------------------------------------------------------------------
    def hf(self):
        a = self.args
        ours_name = f"ours LoRA r={a.rank} (Q,V)"
        peft_name = f"transformers+peft r={a.rank} (c_attn: Q,K,V)"
        missing = [p for p in ("transformers", "peft") if importlib.util.find_spec(p) is None]
        ours_model, ours_step = ours_train_setup(a, self.device, a.rank)
        if missing:
            self.rows.append(missing_row("hf", peft_name, "ms", " and ".join(missing)))
            self.rows.append(Row("hf", ours_name, None, "ms", status="no baseline"))
            return
        hf_model, hf_step, attn_impl = hf_train_setup(a, self.device)
        fns = {peft_name: hf_step, ours_name: ours_step}
        samples = self.time(fns)
        self.rows += timing_rows(
            "hf", samples, peft_name, {ours_name: ("<=", 1.0)},
            reasons={ours_name: "same matrix products as peft (aten::mm); the difference lies in "
                                "the small ops: see the profile below"})
        self.rows += single_rows("hf: trainable params", {peft_name: trainable_count(hf_model),
                                                          ours_name: trainable_count(ours_model)},
                                 peft_name, "params")
        import transformers, peft
        self.notes.append(f"hf: transformers {transformers.__version__}, peft {peft.__version__}, "
                          f"attention implementation '{attn_impl}' (ours: F.scaled_dot_product_attention); "
                          f"peft's adapter on c_attn adapts Q, K and V (A: r×C, B: 3C×r), ours Q and V "
                          f"(A: 2r×C, B: 2C×r)")
        self.profile_fns["hf"] = fns

    # 5 ----------------------------------------------------------------------------------------
    def gen(self):
        a = self.args
        if a.gen_model == "bench":
            nl, ne, nh, V = a.n_layer, a.n_embd, a.n_head, a.vocab_size
        else:
            nl, ne, nh, V = (int(v) for v in a.gen_model.split(","))
        cfg = L.GPT2Config(vocab_size=V, n_layer=nl, n_embd=ne, n_head=nh,
                           lora_attn_dim=a.rank, lora_attn_alpha=a.alpha)
        if a.gen_prompt + a.gen_tokens > cfg.n_ctx:
            raise SystemExit(f"--gen-prompt + --gen-tokens must not exceed n_ctx = {cfg.n_ctx}")
        model = build_model(cfg, self.device).eval()
        randomize_lora_B(model)
        L.merge_lora(model)
        g = torch.Generator().manual_seed(3)
        prompt = torch.randint(0, V, (1, a.gen_prompt), generator=g).to(self.device)
        n = a.gen_tokens
        same = torch.equal(model.generate(prompt, min(n, 8), temperature=0, use_cache=True),
                           model.generate(prompt, min(n, 8), temperature=0, use_cache=False))
        self.notes.append(f"gen: model n_layer={nl} n_embd={ne} n_head={nh} vocab={V}, LoRA merged, "
                          f"batch 1, prompt {a.gen_prompt} tokens, {n} new tokens, greedy; "
                          f"cached and uncached agree on the first tokens: {same}")
        fns = {"without cache": lambda: model.generate(prompt, n, temperature=0, use_cache=False),
               "with KV cache": lambda: model.generate(prompt, n, temperature=0, use_cache=True)}
        # the first call of each is the warm-up; a full-length uncached run is costly, so the
        # warm-up is a short run of each instead.
        model.generate(prompt, min(n, 8), temperature=0, use_cache=False)
        model.generate(prompt, min(n, 8), temperature=0, use_cache=True)
        reps = min(a.repeats, a.gen_repeats)
        samples = time_interleaved(fns, reps, 0, self.device)
        self.rows += timing_rows("gen", samples, "without cache", {"with KV cache": (">=", 3.0)},
                                 unit="tokens/s", per_second=float(n),
                                 reasons={"with KV cache": "per-token fixed costs (Python, small "
                                                           "ops) dominate a small model; see the "
                                                           "profile below"})
        self.profile_fns["gen"] = fns

    # 6 ----------------------------------------------------------------------------------------
    def ckpt(self):
        a = self.args
        for name in [p for p in a.ckpt_presets.split(",") if p]:
            if name == "bench":
                cfg = model_config(a, a.rank)
            else:
                cfg = L.GPT2Config.from_preset(name, lora_attn_dim=a.rank, lora_attn_alpha=a.alpha)
            model = build_uninitialized(cfg)
            full_b = saved_bytes(model.state_dict())
            lora_b = saved_bytes(L.lora_state_dict(model))
            label = name if name != "bench" else f"bench n_layer={cfg.n_layer} n_embd={cfg.n_embd}"
            self.rows += single_rows(f"ckpt {label}", {"full state_dict": full_b / 1e6,
                                                        f"adapter only r={a.rank}": lora_b / 1e6},
                                     "full state_dict", "MB")
            del model
        self.notes.append("ckpt: bytes of torch.save to a temporary file (os.path.getsize); "
                          "MB = 10^6 bytes; the full state dict holds the tied head once")

    # profiles ---------------------------------------------------------------------------------
    def profile_misses(self) -> List[str]:
        out = []
        missed = sorted({r.comparison.split(":")[0] for r in self.rows if r.met is False})
        for comp in missed:
            fns = self.profile_fns.get(comp)
            if not fns:
                continue
            for name, fn in fns.items():
                out.append(f"profile of {comp} / {name} (one call, top ops by self time):")
                out += profile_once(fn, self.device)
        return out


def build_uninitialized(cfg: L.GPT2Config) -> L.GPT2LMModel:
    """A model with real, uninitialized CPU tensors (no initializer runs: the saved size does not
    depend on the values), its tied parameters still tied."""
    with torch.device("meta"):
        model = L.GPT2LMModel(cfg)
    owners: Dict[int, list] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, pname))
    model.to_empty(device="cpu")
    for group in owners.values():
        shared = getattr(*group[0])
        for mod, pname in group[1:]:
            setattr(mod, pname, shared)
    return model


def saved_bytes(state_dict) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        torch.save(state_dict, path)
        return os.path.getsize(path)


def profile_once(fn: Callable, device: torch.device, top: int = 6) -> List[str]:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [f"    {e.key:<40s} {e.self_cpu_time_total / 1e3:9.1f} ms self  "
            f"{100 * e.self_cpu_time_total / total:5.1f}%  ×{e.count}" for e in events[:top]]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def fmt_num(x: float, unit: str = "") -> str:
    if unit == "params" or (unit == "bytes"):
        return f"{int(round(x)):,}"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.1f}"
    return f"{x:.3g}"


TABLE_HEADER = ("comparison", "candidate", "median", "unit", "ratio vs baseline",
                "ratio range", "target", "met?")


def table_lines(rows: List[Row]) -> List[str]:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join("---" for _ in TABLE_HEADER) + "|"]
    for r in rows:
        if r.median is None:
            cells = [r.comparison, r.candidate, r.status, r.unit, "—", "—", r.target or "—", "—"]
        else:
            rng = f"{r.ratio_range[0]:#.3g}–{r.ratio_range[1]:#.3g}" if r.ratio_range else "—"
            met = "—" if r.met is None else ("yes" if r.met else "MISSED")
            cells = [r.comparison, r.candidate, fmt_num(r.median, r.unit), r.unit,
                     f"{r.ratio:#.3g}" if r.ratio is not None else "—", rng, r.target or "—", met]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json_atomic(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv: List[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(COMPARISONS),
                   help=f"comma-separated subset of {','.join(COMPARISONS)} (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2),
                   help="torch.set_num_threads (default min(cpu_count, 2))")
    p.add_argument("--preset", choices=sorted(L.PRESETS), default=None,
                   help="model sizes of a GPT-2 preset (default: 4 layers at gpt2.sm width)")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per candidate (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first (default 1)")
    p.add_argument("--layer-widths", default="768,1024",
                   help="widths for the fused Q/V layer comparison (default 768,1024)")
    p.add_argument("--gen-tokens", type=int, default=256, help="new tokens to generate (default 256)")
    p.add_argument("--gen-prompt", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--gen-repeats", type=int, default=3,
                   help="samples of each generation candidate, at most --repeats (default 3)")
    p.add_argument("--gen-model", default="4,256,8,8192",
                   help="n_layer,n_embd,n_head,vocab of the generation model, or 'bench' for the "
                        "benchmark's model (default 4,256,8,8192: uncached generation is quadratic)")
    p.add_argument("--ckpt-presets", default="gpt2.sm,gpt2.md",
                   help="presets whose checkpoints are saved, comma-separated; 'bench' is the "
                        "benchmark's own model (default gpt2.sm,gpt2.md)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--no-profile", action="store_true", help="skip the profiles of missed targets")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = dict(L.PRESETS[args.preset]) if args.preset else dict(n_layer=4, n_embd=768, n_head=12)
    for k in ("n_layer", "n_embd", "n_head"):
        if getattr(args, k) is None:
            setattr(args, k, sizes[k])
    only = [c for c in args.only.split(",") if c]
    bad = [c for c in only if c not in COMPARISONS]
    if bad:
        p.error(f"--only: unknown comparison(s) {bad}; choose from {','.join(COMPARISONS)}")
    args.only = only
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    for k in ("repeats", "gen_repeats", "block_size", "batch_size", "rank", "threads"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:  # main() may be called in-process (the smoke test): leave the thread count as found
        torch.set_num_threads(threads_before)


def _run(args, argv: List[str]) -> dict:
    device = torch.device(args.device)

    if args._child:  # a memory measurement in a fresh process: print one JSON line, nothing else
        print(json.dumps(measure_train_memory(args, device, args._child.split("-", 1)[1])))
        return {}

    child_argv = [x for x in argv]
    if "--json" in child_argv:  # children only measure memory; they never write files
        i = child_argv.index("--json")
        del child_argv[i:i + 2]
    child_argv = [x for x in child_argv if not x.startswith("--json=")]

    t_start = time.perf_counter()
    meta = dict(
        torch=torch.__version__, python=platform.python_version(), processor=processor_name(),
        cpu_count=os.cpu_count(), threads=torch.get_num_threads(), device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, dtype="float32",
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
        block_size=args.block_size, batch_size=args.batch_size, rank=args.rank, alpha=args.alpha,
        repeats=args.repeats, warmup=args.warmup, optimizer="torch.optim.AdamW(lr=1e-4), defaults",
        comparisons=args.only,
        load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    header = [
        "# bench_lora_gpt2.py",
        "",
        f"torch {meta['torch']} | Python {meta['python']} | processor: {meta['processor']} "
        f"({meta['cpu_count']} CPUs) | threads: {meta['threads']} | device: {device}"
        + (f" ({meta['gpu']})" if meta["gpu"] else "") + " | float32"
        + (f" | load average at start: {meta['load_average_1min']:.2f}"
           if meta["load_average_1min"] is not None else ""),
        f"model: n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} "
        f"vocab={args.vocab_size} | batch {args.batch_size} × block {args.block_size} | "
        f"LoRA r={args.rank} α={args.alpha:g} | AdamW | {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up; median, paired ratio",
        "",
    ]
    print("\n".join(header), flush=True)

    bench = Bench(args, child_argv)
    timings = {}
    for comp in COMPARISONS:
        if comp in args.only:
            t0 = time.perf_counter()
            getattr(bench, comp)()
            timings[comp] = time.perf_counter() - t0
            print(f"  ({TITLES[comp]}: {timings[comp]:.1f} s)", file=sys.stderr, flush=True)

    lines = table_lines(bench.rows)
    missed = [r for r in bench.rows if r.met is False]
    notes = list(bench.notes)
    for r in missed:
        notes.append(f"MISSED: {r.comparison} / {r.candidate}: ratio {r.ratio:.3g} vs target "
                     f"{r.target} — {r.reason}")
    total = time.perf_counter() - t_start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta["load_average_1min_end"] = load_end
    if (meta["load_average_1min"] or 0.0) > 0.5:  # at the end the load counts this run too
        notes.append(f"the machine was shared: 1-minute load average {meta['load_average_1min']:.2f} "
                     f"at start ({load_end:.2f} at end, this run included), on {os.cpu_count()} CPUs. Other processes "
                     f"slow every candidate, and with {args.threads} pinned threads each parallel op "
                     f"may wait for a descheduled worker, a fixed cost per op that inflates "
                     f"op-heavy candidates; the paired ratios absorb drift, not this")
    notes.append(f"targets met: {sum(r.met is True for r in bench.rows)}, missed: {len(missed)}; "
                 f"wall time of the measurements {total:.1f} s ("
                 + ", ".join(f"{c} {s:.0f} s" for c, s in timings.items()) + ")")
    print("\n".join(lines))
    print()
    print("\n".join("- " + n for n in notes), flush=True)
    profile = []
    if missed and not args.no_profile:
        try:
            profile = bench.profile_misses()
        except Exception as e:  # a profile is an aid; never lose the measured table to it
            profile = [f"profiling failed: {type(e).__name__}: {e}"]
        print()
        print("\n".join(profile), flush=True)

    payload = dict(meta={**meta, "total_seconds": total, "seconds_per_comparison": timings},
                   rows=[asdict(r) for r in bench.rows], notes=notes, profiles=profile,
                   table=lines)
    if args.json:
        write_json_atomic(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
