"""Smoke test of bench_lora_gpt2.py (to be merged into test_lora_gpt2.py).

Runs every comparison on a tiny configuration with one repeat and checks the table's structure,
that every figure is a positive number, and that --json writes the same figures. It asserts no
speed: timings on a tiny model say nothing.
"""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lora_gpt2 as bench  # noqa: E402

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab-size", "64",
        "--block-size", "16", "--batch-size", "2", "--repeats", "1", "--warmup", "1",
        "--layer-widths", "32", "--gen-tokens", "8", "--gen-prompt", "4", "--gen-model", "bench",
        "--ckpt-presets", "bench", "--no-profile", "--threads", "1"]


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
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        payload = bench.main(TINY + ["--json", str(path)])
    return out.getvalue(), payload, json.loads(path.read_text(encoding="utf-8"))


def test_bench_smoke_table_structure(tiny_run):
    text, _, _ = tiny_run
    assert "torch " in text and "threads: 1" in text and "processor:" in text
    header, rows = _table(text)
    assert header == list(bench.TABLE_HEADER)
    assert all(len(r) == len(header) for r in rows)
    comparisons = {r[0].split(":")[0].split(" ")[0] for r in rows}
    assert comparisons == set(bench.COMPARISONS)
    # every comparison has exactly one baseline row
    by_comp = {}
    for r in rows:
        by_comp.setdefault(r[0], []).append(r)
    for comp, rs in by_comp.items():
        assert sum(r[6] == "baseline" for r in rs) == 1, comp
    for r in rows:
        assert r[7] in ("yes", "MISSED", "—")


def test_bench_smoke_figures_positive(tiny_run):
    _, _, _ = tiny_run
    text = tiny_run[0]
    _, rows = _table(text)
    for r in rows:
        if r[2].startswith("not installed"):
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
            assert cells[2].startswith("not installed")
            continue
        assert row["median"] > 0 and all(s > 0 for s in row["samples"])
        assert _number(cells[2]) == pytest.approx(row["median"], rel=1e-2, abs=1e-3)
        assert _number(cells[4]) == pytest.approx(row["ratio"], rel=1e-2)
