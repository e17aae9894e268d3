"""Smoke tests of bench_lora_gpt2.py (to be merged back into test_lora_gpt2.py, section 9)."""

import contextlib
import io
import json
import math

import pytest
import torch

import bench_lora_gpt2 as bench

# Every model here is tiny: one thread is faster, and leaves a shared CI machine's cores alone.
torch.set_num_threads(1)


# ==============================================================================================
# 9. bench_lora_gpt2.py: a smoke test on a tiny configuration (it asserts no speed)
# ==============================================================================================

BENCH_TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size", "64",
              "--block-size", "16", "--batch-size", "2", "--repeats", "1", "--warmup", "1",
              "--layer-widths", "32", "--gen-tokens", "8", "--gen-prompt", "4", "--gen-model", "bench",
              "--ckpt-presets", "bench", "--threads", "1"]

UNMEASURED = ("not installed", "no baseline")  # cells of rows whose reference is missing

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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        print("number of parameters: %d" % sum(p.numel() for p in self.parameters()))

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.wte(idx))
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
        assert baselines == 1 or (baselines == 0 and any(r[2].startswith("not installed") for r in rs)), comp
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
                      "ours, full fine-tuning (r=0)": "no baseline"}


def test_bench_nanogpt_row_with_a_standin_model_py(tmp_path):
    """With --nanogpt pointing at a folder holding a model.py of nanoGPT's interface, the row times
    its GPT against ours at nanoGPT's CPU configuration; its construction message is not printed."""
    (tmp_path / "model.py").write_text(NANOGPT_STANDIN, encoding="utf-8")
    text, payload = _run(BENCH_TINY + ["--only", "nanogpt", "--nanogpt", str(tmp_path)])
    assert "number of parameters" not in text
    rows = {(r["comparison"], r["candidate"]): r for r in payload["rows"]}
    theirs, ours = rows[("nanogpt", "nanoGPT model.py GPT")], rows[("nanogpt", "ours, full fine-tuning (r=0)")]
    assert theirs["target"] == "baseline" and theirs["median"] > 0
    assert ours["median"] > 0 and ours["ratio"] > 0 and ours["met"] in (True, False)
    c = bench.NANOGPT_CPU
    standin_params = c["vocab_size"] * c["n_embd"] * 2  # wte and an untied, bias-free lm_head
    assert rows[("nanogpt: trainable params", "nanoGPT model.py GPT")]["median"] == standin_params
    assert any(n.startswith(f"nanogpt: {tmp_path}") for n in payload["notes"])


def test_bench_nanogpt_path_without_model_py_is_refused(tmp_path):
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        bench.main(BENCH_TINY + ["--only", "nanogpt", "--nanogpt", str(tmp_path)])


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
    assert status[("hf", "transformers+peft r=4 (c_attn: Q,K,V)")] == "not installed (transformers and peft)"
    assert status[("hf", "ours LoRA r=4 (Q,V)")] == "no baseline"
