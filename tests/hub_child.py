"""Runs a cache with `hf_repo_id` set, against the loopback Hub, then reads the pushed
dataset back with `load_dataset`; used by test_hub.py (the Hub client reads
`HF_ENDPOINT` at import time, so this must be its own process).

Usage: python -m tests.hub_child SPEC_JSON  -> prints one JSON line of findings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from datasets import load_dataset

    from sae_cache_ext import CacheActivationsRunner, CacheActivationsRunnerConfig
    from tests.fixtures import build_corpus, build_model
    from tests.helpers import columns

    model = build_model(Path(spec["tokenizer_dir"]))
    model.load_state_dict(torch.load(spec["weights"]))
    cfg = CacheActivationsRunnerConfig(**spec["cfg"])
    local = CacheActivationsRunner(
        cfg, override_dataset=build_corpus(), override_model=model, quiet=True
    ).run()
    pushed = load_dataset(cfg.hf_repo_id, split="train", revision=cfg.hf_revision)
    acts, toks = columns(local)
    disk_acts, disk_toks = columns(cfg.new_cached_activations_path)
    hub_acts, hub_toks = columns(pushed)
    print(
        json.dumps(
            {
                "rows": len(pushed),
                "hub_equals_local": bool(
                    hub_acts.tobytes() == acts.tobytes()
                    and np.array_equal(hub_toks, toks)
                ),
                "hub_equals_disk": bool(
                    hub_acts.tobytes() == disk_acts.tobytes()
                    and np.array_equal(hub_toks, disk_toks)
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
