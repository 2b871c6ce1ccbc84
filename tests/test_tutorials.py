"""The tutorials run as they are, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
SLOW = {"02_train_sae.py"}  # loads the real SmolLM2 model


def test_there_are_three_tutorials():
    assert [t.name for t in TUTORIALS] == [
        "01_caching_options.py",
        "02_train_sae.py",
        "03_push_to_hub.py",
    ]


@pytest.mark.parametrize(
    "tutorial",
    [
        pytest.param(t, id=t.stem, marks=pytest.mark.slow if t.name in SLOW else ())
        for t in TUTORIALS
    ],
)
def test_tutorial_runs(tutorial: Path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TUTORIAL_PUSH_REPO"}
    env.update({"TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    proc = subprocess.run(
        [sys.executable, str(tutorial)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
