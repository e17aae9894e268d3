"""Hypothesis profiles, one thread, and the fixtures several test files share."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings


import train_shakespeare as ts

from helpers import TRAIN_TINY, make_text

settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Every model here is tiny: one thread is faster, and leaves a shared CI machine's cores alone.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "play.txt"
    path.write_text(make_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file):
    """One complete scratch base + LoRA run, shared read-only by several tests."""
    out = str(tmp_path_factory.mktemp("run"))
    report = ts.main(TRAIN_TINY + ["--data", text_file, "--out-dir", out])
    return report, out
