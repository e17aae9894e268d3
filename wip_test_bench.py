"""Smoke tests of bench_lora_gpt2.py (to be merged back into test_lora_gpt2.py, section 9)."""

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
# 9. bench_lora_gpt2.py: a smoke test on a tiny configuration (it asserts no speed)
# ==============================================================================================

BENCH_TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size", "64",
        "--block-size", "16", "--batch-size", "2", "--repeats", "1", "--warmup", "1",
        "--layer-widths", "32", "--gen-tokens", "8", "--gen-prompt", "4", "--gen-model", "bench",
        "--ckpt-presets", "bench", "--no-profile", "--threads", "1"]


UNMEASURED = ("not installed", "no baseline")  # cells of rows whose reference package is missing


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _table(text: str):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].replace("|", "").replace("-", "") == ""
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()  # bench.main pins its own thread count
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        payload = bench.main(BENCH_TINY + ["--json", str(path)])
    torch.set_num_threads(threads)
    return out.getvalue(), payload, json.loads(path.read_text(encoding="utf-8"))


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
    _, _, _ = tiny_run
    text = tiny_run[0]
    _, rows = _table(text)
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


def test_bench_without_reference_packages_marks_their_rows_not_installed(monkeypatch):
    """With loralib, transformers and peft hidden, their rows read "not installed" and ours are
    still measured where they need no reference."""
    real_find_spec = bench.importlib.util.find_spec
    hidden = {"loralib", "transformers", "peft"}
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        bench.main(BENCH_TINY + ["--only", "layer,hf"])
    torch.set_num_threads(threads)
    _, rows = _table(out.getvalue())
    status = {(r[0], r[1]): r[2] for r in rows}
    assert status[("layer C=32", "loralib.MergedLinear")] == "not installed (loralib)"
    assert _number(status[("layer C=32", "ours MergedLinear")]) > 0
    assert status[("hf", "transformers+peft r=4 (c_attn: Q,K,V)")].startswith("not installed (transformers and peft")
