"""Tripwires on the parts of sae-lens we override or lean on.

Our runner overrides `CacheActivationsRunner.__init__` and `.run`; it and
validate.py call the private `_mk_activations_store`, `_get_sliced_context_size` and
`_get_input_token_device`; and the runner wraps the store's private
`_iterate_raw_dataset_tokens` and `_iterate_tokenized_sequences` (for the drop
accounting) after setting two store attributes.
If sae-lens changes any of them, these tests fail: re-read the new upstream code,
check that our override still matches its behaviour (tests/test_runner.py compares
outputs), then record the new digests here.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest
import sae_lens
import sae_lens.cache_activations_runner as upstream_runner
from sae_lens.training.activations_store import (
    ActivationsStore,
    _get_input_token_device,
)

# sha256 (first 16 hex digits) of the source of each, as of sae-lens 6.54.12.
PINNED = {
    "_mk_activations_store": (
        upstream_runner._mk_activations_store,
        "b3f9bfc4234a1390",
    ),
    "CacheActivationsRunner.__init__": (
        sae_lens.CacheActivationsRunner.__init__,
        "db21d38dc9cb1bee",
    ),
    "CacheActivationsRunner.run": (
        sae_lens.CacheActivationsRunner.run,
        "9af7fa15cf4f6840",
    ),
    "CacheActivationsRunner._get_sliced_context_size": (
        sae_lens.CacheActivationsRunner._get_sliced_context_size,
        "b68e9d7bfc1bdf8e",
    ),
    "ActivationsStore._iterate_tokenized_sequences": (
        ActivationsStore._iterate_tokenized_sequences,
        "a07f05522eb24179",
    ),
    "ActivationsStore._iterate_raw_dataset_tokens": (
        ActivationsStore._iterate_raw_dataset_tokens,
        "fb14cda814f179b5",
    ),
    "_get_input_token_device": (_get_input_token_device, "af82756c49bf454d"),
    "ActivationsStore.get_raw_llm_batch": (
        ActivationsStore.get_raw_llm_batch,
        "c19a1e8c77422517",
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_upstream_private_code_we_rely_on_is_unchanged(name):
    function, digest = PINNED[name]
    source = inspect.getsource(function)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
        f"sae-lens {sae_lens.__version__} changed {name}: review sae_cache_ext/runner.py "
        "against the new code, then update the digest in this test."
    )


def test_the_store_keeps_the_attributes_we_set(tiny_model, corpus, make_cfg):
    cfg = make_cfg()
    store = upstream_runner._mk_activations_store(tiny_model, cfg, corpus)
    for attribute in (
        "disable_concat_sequences",
        "sequence_separator_token",
        "iterable_sequences",
    ):
        assert hasattr(store, attribute), attribute
    params = inspect.signature(ActivationsStore.__init__).parameters
    assert params["disable_concat_sequences"].default is False
    assert params["sequence_separator_token"].default == "bos"
