"""The life of a run at an output path: recover, stage, swap.

`recover` cleans up after an earlier run and decides, in one place, whether the
output path already holds this run's finished cache; `staged` hands out the staging
folder and, when the work in it is done, swaps it into place (the last step of a
run). The low-level names, markers and renames are `staging`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sae_cache_ext import checkpoints, staging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovery:
    """What an earlier run at the output path left for this one."""

    resumable: bool  # its staging folder is kept for this run to continue
    finished: bool  # the output path holds this run's finished cache already


def recover(layout: staging.Layout, fingerprint: str, resume: bool) -> Recovery:
    """Clean up after an earlier run at the output path (keeping its staging folder
    when `resume` and its fingerprint matches), then refuse an output path that
    holds anything but this run's finished cache."""
    swap_finished, resumable = staging.recover(
        layout, resume_fingerprint=fingerprint if resume else None
    )
    if (swap_finished or resume) and staging.holds_finished_cache(
        layout.final, fingerprint
    ):
        logger.warning(
            "%s already holds this config's finished cache; returning it.",
            layout.final,
        )
        return Recovery(resumable, finished=True)
    staging.check_output_free(layout)
    return Recovery(resumable, finished=False)


@contextlib.contextmanager
def staged(
    layout: staging.Layout, fingerprint: str, recovery: Recovery, keep_on_error: bool
) -> Iterator[Path]:
    """The staging folder (the kept one when `recovery.resumable`); once the block
    is done, its leftover checkpoint goes and the folder is swapped into place. If
    anything fails it is removed, unless `keep_on_error`."""
    with staging.staging_area(
        layout, fingerprint, reuse=recovery.resumable, keep_on_error=keep_on_error
    ) as folder:
        yield folder
        checkpoints.remove(folder)  # a crash may have kept them past the manifest
        staging.swap_into_place(layout)
    logger.info("Cached activations at %s", layout.final)
