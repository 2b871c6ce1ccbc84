"""The output path, a read-only look at the disk: `validate_output_path` refuses a
path the run could not write, or must not write."""

from __future__ import annotations

import os
from pathlib import Path

from sae_cache_ext import staging
from sae_cache_ext.config import CacheActivationsRunnerConfig

# Folders the cache, its staging folder and its backup must never be written into.
_SYSTEM_FOLDERS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lock",
    "/var/run",
)


def validate_output_path(
    cfg: CacheActivationsRunnerConfig, world_size: int = 1
) -> None:
    """Refuse an output path the run could not write, or must not write, read-only.

    With `resume=True`, the finished cache of this very run (config and
    `world_size`) may stand at the output path (a run killed after its swap): the
    run then returns it, so it is not refused.

    Raises `ValueError` (a system folder, a mount point), `FileExistsError` (a file,
    or a folder that is not empty, at or above the path) or `PermissionError`.
    """
    path = cfg.new_cached_activations_path
    if not path:
        raise ValueError("new_cached_activations_path must be set to a folder path.")
    layout = staging.Layout.for_output(path)
    _check_not_system_folder(path, layout.final)
    # After a crashed swap the output path may hold our half-moved cache: the
    # runner's `run` sorts that out, so the emptiness check waits for it.
    finished = cfg.resume and staging.holds_finished_cache(
        layout.final, cfg.run_fingerprint(world_size)
    )
    if not layout.backup.exists() and not finished:
        staging.check_output_free(layout)
    if os.path.ismount(layout.final):
        raise ValueError(
            f"new_cached_activations_path={path!r} is a mount point, which the finished "
            "cache cannot be renamed onto: use a folder inside it, e.g. "
            f"{str(layout.final / 'cache')!r}."
        )
    ancestor = layout.final.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileExistsError(
            f"new_cached_activations_path={path!r} cannot be created: {ancestor} is a "
            "file. Choose a path whose parent folders are folders."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"new_cached_activations_path={path!r} cannot be written: {ancestor} is "
            "not writable by this user. Choose a path you can write to."
        )


def _check_not_system_folder(path: str, final: Path) -> None:
    if os.name != "posix":
        return
    resolved = final.resolve()
    for folder in _SYSTEM_FOLDERS:
        for form in {Path(folder), Path(folder).resolve()}:
            if resolved == form or form in resolved.parents:
                raise ValueError(
                    f"new_cached_activations_path={path!r} is inside the system folder "
                    f"{form}, where sae-cache-ext never writes: choose a folder on a "
                    "data disk or under your home, e.g. '~/activations/<name>'."
                )
    if resolved.parent == resolved or resolved.parent == Path("/"):
        raise ValueError(
            f"new_cached_activations_path={path!r} would put the cache and its staging "
            "folder in the root folder /: choose a path at least two levels deep, "
            "e.g. '/data/activations/<name>'."
        )
