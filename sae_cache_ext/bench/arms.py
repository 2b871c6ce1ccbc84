"""What each arm runs, inside its run's own process: the runner it builds on the
setup's model and corpus, and the part of it that `measure` times. `RUNS` maps each
arm's name to its function; `load_model_and_corpus` gives every arm the same inputs.

The heavy modules (torch, datasets, sae-lens, our runner) are imported inside the
functions, so importing this module stays light."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_cache_ext.bench.measure import measure
from sae_cache_ext.bench.setups import ModelSetup

UPSTREAM = "upstream"
OURS = "ours"
PERSIST = "upstream+persist"
FORWARD = "forward-only"
ARMS = (UPSTREAM, OURS, PERSIST, FORWARD)
HOOKS_ONE_PASS = "ours-4-hooks"
HOOKS_EACH = "ours-each-hook"
HOOK_ARMS = (HOOKS_ONE_PASS, HOOKS_EACH)
UPSTREAM_PLAIN = "upstream-plain"
OURS_PLAIN = "ours-plain"
OURS_PLAIN_BARE = "ours-plain-no-stats"
DD = "dd"
WIDE_ARMS = (FORWARD, UPSTREAM_PLAIN, UPSTREAM, OURS_PLAIN, OURS, OURS_PLAIN_BARE, DD)
"""The accelerator regime's arms: the floor (forward-only), both runners with and
without their shuffle, ours plain without its statistics (what they cost), and a
flushed `dd` of the same bytes."""
NO_MODEL_ARMS = (DD,)
ALL_ARMS = (*ARMS, *HOOK_ARMS, UPSTREAM_PLAIN, OURS_PLAIN, OURS_PLAIN_BARE, DD)

Arm = Callable[[ModelSetup, Any, Any, Path, float], dict[str, Any]]
"""(setup, model, corpus, run folder, disk-sampling interval) -> the run's record."""


def _config_kwargs(setup: ModelSetup, out: Path) -> dict[str, Any]:
    return {
        "dataset_path": f"local/pydoc-corpus-{setup.name}",
        "model_name": setup.name,
        "hook_name": setup.hook_name,
        "d_in": setup.d_in,
        "context_size": setup.context_size,
        "model_batch_size": setup.batch_size,
        "training_tokens": setup.tokens,
        "buffer_size_gb": setup.buffer_size_gb,
        "new_cached_activations_path": str(out),
        "shuffle": True,
        "device": setup.device,
        "dtype": setup.dtype,
    }


def _check_sizes(cfg: Any, setup: ModelSetup) -> None:
    got = (cfg.n_buffers, cfg.n_batches_in_buffer)
    if got != (setup.n_buffers, setup.batches_per_buffer):
        raise RuntimeError(
            f"config gives (n_buffers, n_batches_in_buffer) = {got}, expected "
            f"{(setup.n_buffers, setup.batches_per_buffer)}"
        )


def _upstream_runner(
    setup: ModelSetup, model: Any, corpus: Any, out: Path, shuffle: bool = True
) -> Any:
    import sae_lens
    import sae_lens.cache_activations_runner as upstream_module
    from tqdm.auto import tqdm

    # Its constructor always calls `load_model` (which would download): hand it ours.
    upstream_module.load_model = lambda **_: model  # type: ignore[assignment]
    upstream_module.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[assignment]
    cfg = sae_lens.CacheActivationsRunnerConfig(
        **{**_config_kwargs(setup, out), "shuffle": shuffle}
    )
    _check_sizes(cfg, setup)
    return sae_lens.CacheActivationsRunner(cfg, override_dataset=corpus)


def _arm_upstream(
    setup: ModelSetup,
    model: Any,
    corpus: Any,
    run_dir: Path,
    interval: float,
    persist: bool,
    shuffle: bool = True,
) -> dict[str, Any]:
    runner = _upstream_runner(setup, model, corpus, run_dir / "out", shuffle)
    with measure(run_dir, interval) as record:
        dataset = runner.run()
        if persist:
            persisted = time.perf_counter()
            dataset.save_to_disk(str(run_dir / "persisted"))
            record["persist_seconds"] = time.perf_counter() - persisted
    record["tokens"] = len(dataset) * runner.context_size
    return record


def _ours_runner(
    setup: ModelSetup, model: Any, corpus: Any, out: Path, **fields: Any
) -> Any:
    from sae_cache_ext.config import CacheActivationsRunnerConfig
    from sae_cache_ext.runner import CacheActivationsRunner

    cfg = CacheActivationsRunnerConfig(
        **{
            **_config_kwargs(setup, out),
            "shuffle_across_sequences": True,
            "on_dataset_exhausted": "repeat",
            **fields,
        }
    )
    _check_sizes(cfg, setup)
    return CacheActivationsRunner(
        cfg, override_dataset=corpus, override_model=model, quiet=True
    )


def _arm_ours(
    setup: ModelSetup,
    model: Any,
    corpus: Any,
    run_dir: Path,
    interval: float,
    shuffle: bool = True,
    statistics: bool = True,
) -> dict[str, Any]:
    from sae_cache_ext import manifest

    if not statistics:
        _skip_statistics()
    plain = {} if shuffle else {"shuffle": False, "shuffle_across_sequences": False}
    runner = _ours_runner(setup, model, corpus, run_dir / "out", **plain)
    with measure(run_dir, interval) as record:
        dataset = runner.run()
    record["tokens"] = len(dataset) * runner.context_size
    done = manifest.read_manifest(run_dir / "out")
    record["ours_timings"] = done.get("timings")
    record["ours_writer"] = done.get("writer")
    return record


def _skip_statistics() -> None:
    """In this run's process only (each run is its own), add no statistics: the
    wall time against the same arm with them is what they cost. (The non-finite
    check goes too: it only runs on a buffer whose statistics found NaN or inf.)"""
    from sae_cache_ext.statistics import CacheStatistics

    def add(self: CacheStatistics, acts_ND: Any, dtype: str) -> list[str]:
        return []

    CacheStatistics.add = add  # type: ignore[method-assign]


def _arm_hooks(
    setup: ModelSetup,
    model: Any,
    corpus: Any,
    run_dir: Path,
    interval: float,
    one_pass: bool,
) -> dict[str, Any]:
    """The four hooks of `setup.hook_set`: one run with hook_names, or one run per
    hook in turn (timed together). `tokens` counts the tokens of one run."""
    hooks = list(setup.hook_set)
    if one_pass:
        runners = [
            _ours_runner(setup, model, corpus, run_dir / "out", hook_names=hooks)
        ]
    else:
        runners = [
            _ours_runner(setup, model, corpus, run_dir / f"out-{i}", hook_name=hook)
            for i, hook in enumerate(hooks)
        ]
    with measure(run_dir, interval) as record:
        for runner in runners:
            dataset = runner.run()
    record["tokens"] = len(dataset) * runners[0].context_size
    record["hooks"] = hooks
    return record


def _arm_forward_only(
    setup: ModelSetup, model: Any, corpus: Any, run_dir: Path, interval: float
) -> dict[str, Any]:
    import sae_lens
    import torch
    from sae_lens.cache_activations_runner import _mk_activations_store

    cfg = sae_lens.CacheActivationsRunnerConfig(
        **_config_kwargs(setup, run_dir / "out")
    )
    _check_sizes(cfg, setup)
    store = _mk_activations_store(model, cfg, corpus)
    with torch.no_grad(), measure(run_dir, interval) as record:
        # upstream's loop without its shard building and writing: each buffer's
        # batches are kept and joined, then dropped (dropping each batch at once
        # measured 5-10% slower than upstream's whole run on this machine)
        for _ in range(setup.n_buffers):
            batches = [
                store.get_raw_llm_batch() for _ in range(setup.batches_per_buffer)
            ]
            acts = torch.cat([acts for acts, _ in batches])
            del batches, acts
    record["tokens"] = setup.n_batches * setup.tokens_per_batch
    return record


def _arm_dd(
    setup: ModelSetup, model: Any, corpus: Any, run_dir: Path, interval: float
) -> dict[str, Any]:
    """`dd` of the cache's bytes (activations and token ids) from /dev/zero to a
    file in the run folder, flushed (`conv=fdatasync`): the disk's write speed."""
    mib = 1 << 20
    count = -(-setup.payload_bytes // mib)
    argv = ["dd", "if=/dev/zero", f"of={run_dir / 'dd.bin'}", f"bs={mib}"]
    with measure(run_dir, interval) as record:
        subprocess.run(
            [*argv, f"count={count}", "conv=fdatasync"], check=True, capture_output=True
        )
    record["tokens"] = setup.tokens
    record["dd_bytes"] = count * mib
    return record


RUNS: dict[str, Arm] = {
    UPSTREAM: functools.partial(_arm_upstream, persist=False),
    OURS: _arm_ours,
    PERSIST: functools.partial(_arm_upstream, persist=True),
    FORWARD: _arm_forward_only,
    HOOKS_ONE_PASS: functools.partial(_arm_hooks, one_pass=True),
    HOOKS_EACH: functools.partial(_arm_hooks, one_pass=False),
    UPSTREAM_PLAIN: functools.partial(_arm_upstream, persist=False, shuffle=False),
    OURS_PLAIN: functools.partial(_arm_ours, shuffle=False),
    OURS_PLAIN_BARE: functools.partial(_arm_ours, shuffle=False, statistics=False),
    DD: _arm_dd,
}


def load_model_and_corpus(
    setup: ModelSetup, tokenizer_dir: str | None
) -> tuple[Any, Any]:
    """The setup's model and the corpus every arm reads."""
    from sae_cache_ext.data import pydoc_corpus

    model = _load_model(setup, tokenizer_dir)
    corpus = pydoc_corpus()
    if setup.family in ("tiny", "wide"):
        # The tiny model stands for a fast accelerator, where the forward is cheap:
        # tokenizing on the fly would dominate, so both arms read the same
        # pretokenized rows (as sae-lens recommends for real runs).
        corpus = _pretokenized(model, corpus, setup.context_size)
    return model, corpus


def _load_model(setup: ModelSetup, tokenizer_dir: str | None) -> Any:
    if setup.family in ("tiny", "wide"):
        from sae_cache_ext.toy import build_model, build_wide_model

        if tokenizer_dir is None:
            raise RuntimeError(f"the {setup.family} model needs the prepared tokenizer")
        if setup.family == "wide":
            return build_wide_model(Path(tokenizer_dir), setup.d_in, setup.device)
        return build_model(Path(tokenizer_dir), d_model=setup.d_in).to(setup.device)
    from sae_cache_ext.models import load_smollm2_hooked

    return load_smollm2_hooked(device=setup.device)


def _pretokenized(model: Any, corpus: Any, context_size: int) -> Any:
    """The corpus as rows of `context_size` token ids: documents joined by BOS, as
    sae-lens's store joins them."""
    import torch
    from datasets import Dataset
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos = model.tokenizer.bos_token_id
    documents = (
        torch.tensor(ids)
        for ids in model.tokenizer(list(corpus["text"]), add_special_tokens=False)[
            "input_ids"
        ]
        if ids
    )
    rows = concat_and_batch_sequences(
        documents,
        context_size,
        begin_batch_token_id=bos,
        sequence_separator_token_id=bos,
    )
    return Dataset.from_dict({"tokens": [row.tolist() for row in rows]})
