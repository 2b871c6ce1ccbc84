"""A caching run in its own process, for the lease tests (test_lease.py).

Usage: python -m tests.lease_child SPEC_JSON
SPEC_JSON holds the tokenizer folder, the model's saved weights, the config kwargs,
`result` (a file to write `{"ok", "error", "message"}` to), and optionally:
- `pause`: `[n, ready_file, go_file]`: before the n-th buffer is written, create
  `ready_file` and wait until `go_file` exists (a live run, mid-caching);
- `barrier`: `[folder, n]`: once loaded, wait until n runs are (runs started
  together).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    from sae_cache_ext import (
        CacheActivationsRunner,
        CacheActivationsRunnerConfig,
        shuffle,
    )
    from tests.fixtures import build_corpus, build_model
    from tests.helpers import before_nth_call

    model = build_model(Path(spec["tokenizer_dir"]))
    model.load_state_dict(torch.load(spec["weights"]))
    if spec.get("pause"):
        n, ready, go = spec["pause"]

        def pause() -> None:
            Path(ready).touch()
            while not Path(go).exists():
                time.sleep(0.05)

        for sink in (shuffle.BucketShuffleSink, shuffle.OrderedSink):
            sink.write_buffer = before_nth_call(sink.write_buffer, n, pause)  # type: ignore[method-assign]
    cfg = CacheActivationsRunnerConfig(**spec["cfg"])
    runner = CacheActivationsRunner(
        cfg, override_dataset=build_corpus(), override_model=model, quiet=True
    )
    if spec.get("barrier"):
        folder, n = Path(spec["barrier"][0]), spec["barrier"][1]
        (folder / str(os.getpid())).touch()
        while len(list(folder.iterdir())) < n:
            time.sleep(0.001)
    result: dict = {"ok": True, "error": None, "message": None}
    try:
        runner.run()
    except Exception as error:
        result = {"ok": False, "error": type(error).__name__, "message": str(error)}
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
