"""The runner's configuration: sae-lens's config plus the options sae-lens never wires.

Every field of `sae_lens.CacheActivationsRunnerConfig` is inherited unchanged, with
its default. Only the new fields are declared here, each with a docstring, and the
cross-field rules are checked in `__post_init__` with errors that name the fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from sae_lens import CacheActivationsRunnerConfig as _UpstreamConfig

SeparatorToken = int | Literal["bos", "eos", "sep"] | None

_SEPARATOR_NAMES = ("bos", "eos", "sep")
_STORABLE_DTYPES = ("float32", "float16", "float64")
# Fields that change where or whether a cache is uploaded, not what it holds.
_NON_DATA_FIELDS = frozenset(
    {
        "hf_repo_id",
        "hf_num_shards",
        "hf_revision",
        "hf_is_private_repo",
        "device",
        "resume",
        "on_non_finite",
        "lease_stale_seconds",
        "wait_for_lease",
        "distributed_timeout_minutes",
    }
)
# Data fields added after caches were made: left out of the fingerprint at their
# default, so a cache made before them keeps its fingerprint.
_FINGERPRINT_DEFAULTS: dict[str, Any] = {"store_token_positions": False}


@dataclass
class CacheActivationsRunnerConfig(_UpstreamConfig):
    """sae-lens's `CacheActivationsRunnerConfig` with more options.

    `shuffle=True` here means the shuffle is written to disk (sae-lens only shuffles
    the object it returns), seeded by `seed`.
    """

    disable_concat_sequences: bool = False
    """Never join documents into one row: each row is the start of one document, and
    documents shorter than `context_size` are skipped (sae-lens's store semantics)."""

    sequence_separator_token: SeparatorToken = "bos"
    """Token put between concatenated documents: a token id, `"bos"`, `"eos"`,
    `"sep"` (the tokenizer's token of that name) or None for no separator."""

    exclude_special_tokens: bool | list[int] = False
    """Remove these tokens' positions before writing: True for the ids sae-lens's
    `get_special_token_ids` returns (the tokenizer's bos, eos, pad, sep and
    decoder-start token ids; not its additional special tokens, such as chat-template
    tokens), or an explicit list of ids. The remaining tokens are re-packed into full
    rows, so the cache still holds as many rows. The manifest and `sae-cache-ext info`
    list each removed id with its token string."""

    shuffle_across_sequences: bool = False
    """Permute tokens (with their activations and token ids) across the rows of each
    buffer, seeded by `(seed, buffer index)`. Needs `shuffle=True`."""

    on_dataset_exhausted: Literal["warn", "error", "repeat"] = "warn"
    """When the dataset runs out before `training_tokens`: `"warn"` finishes the cache
    with what was read and records it in the manifest, `"error"` fails (nothing is
    written), `"repeat"` starts the dataset again as sae-lens does (recorded)."""

    hook_names: list[str] | None = None
    """Cache several hooks from one forward pass (which stops after the deepest of
    them). `hook_name` must be one of them: `d_in` is its width, and the others'
    widths are read from the model. The output folder then holds one dataset per
    hook, in `<new_cached_activations_path>/<hook>/`, all with the same rows in the
    same order and the same `token_ids`. A buffer holds `n_seq_in_buffer` rows of
    every hook, so its memory grows with the hooks' total width."""

    resume: bool = False
    """Continue an interrupted run at the same output path from its last completed
    buffer (or shuffled shard) instead of starting over. The result is identical to
    an uninterrupted run's. A failed run with `resume=True` keeps its staging folder.
    A resume refuses (and keeps the work) when the config, the dataset, the model's
    weights or the device differ from the interrupted run's; `resume=False` starts
    over."""

    lease_stale_seconds: float = 120.0
    """A run holds a lease on its output path, renewed every `lease_stale_seconds/12`
    seconds (at most 10) while it lives; another run (on any host sharing the
    filesystem) takes it over only once it has not been renewed for this long."""

    wait_for_lease: bool = False
    """When another live run holds the output path's lease: False refuses at once,
    naming it; True waits until it is released (or goes stale)."""

    on_non_finite: Literal["error", "warn"] = "error"
    """When activations hold NaN or inf as stored (after the cast to `dtype`, so a
    float16 overflow above 65504 counts): `"error"` stops the run at the first such
    buffer, naming the hook and the count, and nothing is written; `"warn"` keeps
    them and counts them in the manifest's `statistics`."""

    distributed_timeout_minutes: float = 360.0
    """In a data-parallel run, how long a rank waits for the others at a collective
    before failing. A rank that fails makes every rank fail at once with its error;
    this only bounds the wait for a rank that hangs (or is slower by that much)."""

    store_token_positions: bool = False
    """Store where every token came from: a `token_positions` column of
    `Array2D((context_size, 2), int64)` beside `token_ids`, holding for each token
    `(sequence, position)`: the index of the `context_size`-token sequence sae-lens's
    store produced it in (counted from 0 over the run, across passes of the
    dataset), and its position in that sequence (before `seqpos_slice`). The pair
    travels with the token through exclusion and every shuffle, so `verify --model`
    can rebuild any token's context. sae-lens's trainer ignores the column."""

    def __post_init__(self) -> None:
        # Cheap checks on our own fields first, so a bad value fails before the
        # parent's checks (which may look at the dataset).
        self._check_new_fields()
        super().__post_init__()

    def _check_new_fields(self) -> None:
        if self.shuffle_across_sequences and not self.shuffle:
            raise ValueError(
                "shuffle_across_sequences=True requires shuffle=True: set shuffle=True, "
                "or set shuffle_across_sequences=False."
            )
        sep = self.sequence_separator_token
        if isinstance(sep, bool) or not (
            sep is None or isinstance(sep, int) or sep in _SEPARATOR_NAMES
        ):
            raise ValueError(
                f"sequence_separator_token={sep!r} is not valid: use a token id (int), "
                f"one of {list(_SEPARATOR_NAMES)}, or None for no separator."
            )
        if isinstance(sep, int) and sep < 0:
            raise ValueError(
                f"sequence_separator_token={sep} is negative: token ids start at 0."
            )
        exc = self.exclude_special_tokens
        if not isinstance(exc, bool):
            if not isinstance(exc, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in exc
            ):
                raise ValueError(
                    f"exclude_special_tokens={exc!r} is not valid: use True (the "
                    "tokenizer's special tokens), False, or a list of token ids (ints)."
                )
            self.exclude_special_tokens = [int(t) for t in exc]
        if not isinstance(self.disable_concat_sequences, bool):
            raise ValueError(
                "disable_concat_sequences must be True or False, got "
                f"{self.disable_concat_sequences!r}."
            )
        if not isinstance(self.store_token_positions, bool):
            raise ValueError(
                "store_token_positions must be True or False, got "
                f"{self.store_token_positions!r}."
            )
        if self.on_dataset_exhausted not in ("warn", "error", "repeat"):
            raise ValueError(
                f"on_dataset_exhausted={self.on_dataset_exhausted!r} is not valid: use "
                "'warn', 'error' or 'repeat'."
            )
        if self.on_non_finite not in ("error", "warn"):
            raise ValueError(
                f"on_non_finite={self.on_non_finite!r} is not valid: use 'error' (stop "
                "at the first NaN or inf) or 'warn' (keep and count them)."
            )
        self._check_hook_names()
        if isinstance(self.lease_stale_seconds, bool) or not (
            isinstance(self.lease_stale_seconds, (int, float))
            and self.lease_stale_seconds > 0
        ):
            raise ValueError(
                f"lease_stale_seconds={self.lease_stale_seconds!r} must be a positive "
                "number of seconds (default 120)."
            )
        timeout = self.distributed_timeout_minutes
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or timeout <= 0
        ):
            raise ValueError(
                f"distributed_timeout_minutes={timeout!r} must be a positive number of "
                "minutes (360 by default)."
            )
        if self.dtype not in _STORABLE_DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} cannot be stored: the `datasets` Array2D feature "
                f"supports {list(_STORABLE_DTYPES)} (not bfloat16). Set dtype='float32' "
                "or 'float16'."
            )

    def _check_hook_names(self) -> None:
        names = self.hook_names
        if names is None:
            return
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ValueError(
                f"hook_names={names!r} is not valid: use a list of hook names, or None "
                "to cache hook_name alone."
            )
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"hook_names={names!r} must be a non-empty list of hook names (str)."
            )
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ValueError(
                f"hook_names lists {repeated} more than once: list each hook once."
            )
        if self.hook_name not in names:
            raise ValueError(
                f"hook_name={self.hook_name!r} is not in hook_names={list(names)}: "
                "hook_name is the hook whose width is d_in, so add it to hook_names."
            )
        self.hook_names = list(names)

    @property
    def all_hook_names(self) -> list[str]:
        """The hooks this run caches: `hook_names`, or `hook_name` alone."""
        return (
            list(self.hook_names) if self.hook_names is not None else [self.hook_name]
        )

    # -- derived values -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (what gets uploaded and recorded)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def data_fingerprint(self) -> str:
        """A hash of every field that changes the cached data.

        Two runs with the same fingerprint produce the same dataset; it identifies a
        run's leftovers and a finished cache.
        """
        blob = json.dumps(self.data_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def data_fields(self) -> dict[str, Any]:
        """The fields that change the cached data, as JSON-ready values."""
        return {
            f.name: v
            for f, v in zip(fields(self), self.to_dict().values(), strict=True)
            if f.name not in _NON_DATA_FIELDS
            and not (
                f.name in _FINGERPRINT_DEFAULTS and _FINGERPRINT_DEFAULTS[f.name] == v
            )
        }

    def run_fingerprint(self, world_size: int = 1) -> str:
        """`data_fingerprint`, and the number of processes when there are several
        (their split of the data, so the cache, depends on it)."""
        fingerprint = self.data_fingerprint
        return fingerprint if world_size == 1 else f"{fingerprint}-w{world_size}"

    @classmethod
    def from_upstream(
        cls, upstream: _UpstreamConfig, **new_fields: Any
    ) -> CacheActivationsRunnerConfig:
        """Build ours from an existing sae-lens config, adding any new fields."""
        values = {f.name: getattr(upstream, f.name) for f in fields(upstream)}
        values.update(new_fields)
        return cls(**values)


def changed_fields(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The data fields whose values differ between two `to_dict()`s, as
    `name: before -> now` lines."""
    names = sorted((set(before) | set(now)) - _NON_DATA_FIELDS)
    return [
        f"{name}: {before.get(name)!r} -> {now.get(name)!r}"
        for name in names
        if before.get(name) != now.get(name)
    ]
