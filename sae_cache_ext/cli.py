"""The `sae-cache-ext` command line: run, info, verify, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sae_cache_ext import __version__
from sae_cache_ext.config import CacheActivationsRunnerConfig

logger = logging.getLogger("sae_cache_ext")


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# -- config files -----------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"config file {path} does not exist.")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise CliError(f"config file {path} is not valid YAML/JSON: {error}") from None
    if not isinstance(values, dict):
        raise CliError(f"config file {path} must hold a mapping of field: value.")
    return values


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`FIELD=VALUE` pairs, each VALUE parsed as YAML (so `3`, `true`, `[1, 2]`)."""
    values = dict(values)
    for item in overrides:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise CliError(f"--set {item!r} is not of the form FIELD=VALUE.")
        values[field.strip()] = yaml.safe_load(raw) if raw else ""
    return values


def build_config(values: dict[str, Any]) -> CacheActivationsRunnerConfig:
    """The config from plain values, with errors that name the field."""
    known = {f.name for f in dataclasses.fields(CacheActivationsRunnerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(
            f"unknown config field(s) {unknown}. Known fields: {', '.join(sorted(known))}."
        )
    values = dict(values)
    if isinstance(values.get("seqpos_slice"), list):
        values["seqpos_slice"] = tuple(values["seqpos_slice"])
    try:
        return CacheActivationsRunnerConfig(**values)
    except TypeError as error:  # a missing required field
        raise CliError(f"config: {error}") from None
    except ValueError as error:
        raise CliError(str(error)) from None


# -- commands ---------------------------------------------------------------------------


def _load_model(cfg: CacheActivationsRunnerConfig):
    from sae_cache_ext import models

    name = cfg.model_name
    if name.lower() in {"smollm2", "smollm2-135m-instruct"}:
        return models.load_smollm2_hooked(device=cfg.device)
    if Path(name).expanduser().is_dir():
        class_name = (
            cfg.model_class_name
            if cfg.model_class_name in models.SUPPORTED_MODEL_CLASS_NAMES
            else None
        )
        return models.load_local_model(
            name, device=cfg.device, model_class_name=class_name
        )
    return None  # the runner loads it with sae-lens's load_model


def _load_dataset(cfg: CacheActivationsRunnerConfig):
    from sae_cache_ext.data import is_local_dataset, load_local_dataset

    return (
        load_local_dataset(cfg.dataset_path)
        if is_local_dataset(cfg.dataset_path)
        else None
    )


def cmd_run(args: argparse.Namespace) -> int:
    """`run`; Ctrl-C ends it with one line saying how to go on, and status 130."""
    try:
        return _run(args)
    except KeyboardInterrupt as interrupt:
        how = " ".join(getattr(interrupt, "__notes__", [])) or (
            "Nothing was kept; rerun to start again (with resume=True, an "
            "interrupted run keeps its work)."
        )
        print(f"sae-cache-ext: interrupted. {how}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from sae_cache_ext.distributed import rank_device, world_from_env
    from sae_cache_ext.runner import CacheActivationsRunner
    from sae_cache_ext.verify import folder_bytes

    values = apply_overrides(load_config_file(args.config), args.set or [])
    cfg = build_config(values)
    started = time.perf_counter()
    # under torchrun: join the process group first, so that `device: cuda` loads
    # the model on this rank's own GPU
    cfg.device = rank_device(cfg.device, world_from_env(cfg.device))
    model = _load_model(cfg)
    dataset = _load_dataset(cfg)
    runner = CacheActivationsRunner(
        cfg, override_dataset=dataset, override_model=model, quiet=args.quiet
    )
    cache_start = time.perf_counter()
    result = runner.run()
    seconds = time.perf_counter() - cache_start
    tokens = len(result) * runner.context_size
    out = Path(str(cfg.new_cached_activations_path))
    summary = {
        "rows": len(result),
        "tokens": tokens,
        "bytes_on_disk": folder_bytes(out),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "path": str(out),
    }
    if runner.world.is_main:  # one summary for a data-parallel run
        _print_summary("Cached activations", summary, args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sae_cache_ext import accounting
    from sae_cache_ext.verify import describe_cache, format_description

    description = describe_cache(args.path)
    facts = (description.get("manifest") or {}).get("accounting")
    rows = accounting.coverage_table(facts) if facts else []
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        print(format_description(description))
        print()
        if rows:
            print("Coverage (source vs kept, by document length in tokens):")
            print(accounting.format_coverage(rows))
        else:
            print("Coverage: not recorded (no sae-cache-ext manifest with accounting).")
    if args.plot:
        if not rows:
            raise CliError(f"{args.path} records no coverage to plot.")
        accounting.plot_coverage(rows, args.plot)
        print(f"Coverage plot written to {args.plot}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from sae_cache_ext.verify import verify_cache

    model = None
    if args.model:
        model = _load_model_by_name(args.model)
    report = verify_cache(args.path, model=model, rows=args.rows, seed=args.seed)
    print(report.format())
    return 0 if report.ok else 1


def _load_model_by_name(name: str):
    from sae_cache_ext import models

    if name.lower() in {"smollm2", "smollm2-135m-instruct"}:
        return models.load_smollm2_hooked()
    if Path(name).expanduser().is_dir():
        return models.load_local_model(name)
    from sae_lens.load_model import load_model

    return load_model("HookedTransformer", name, device="cpu")


def cmd_demo(args: argparse.Namespace) -> int:
    from sae_cache_ext.demo import run_demo

    out = (
        Path(args.out)
        if args.out
        else Path("sae-cache-ext-demo") / time.strftime("run-%Y%m%d-%H%M%S")
    )
    result = run_demo(
        out,
        tokens=args.tokens,
        layer=args.layer,
        dataset=args.dataset,
        quiet=args.quiet,
    )
    summary = {
        "model": result.model,
        "hook": result.hook_name,
        "sanity top-5 after 'The capital of France is'": result.sanity_top5,
        "tokens cached": result.tokens_cached,
        "rows": result.rows,
        "caching seconds": round(result.cache_seconds, 1),
        "tokens/s": round(result.tokens_per_second, 1),
        "bytes on disk": result.bytes_on_disk,
        "cache": result.cache_path,
        "SAE trained on tokens": result.sae_train_tokens,
        "SAE training seconds": round(result.sae_seconds, 1),
        "SAE held-out tokens": result.sae.tokens,
        "SAE explained variance (held out)": round(result.sae.explained_variance, 4),
        "SAE L0 (held out)": round(result.sae.l0, 2),
        "total seconds": round(result.total_seconds, 1),
    }
    _print_summary("sae-cache-ext demo", summary, args.json)
    return 0


def _print_summary(title: str, summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    print(title)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-cache-ext",
        description="Cache language-model activations for SAE training (sae-lens compatible).",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug details"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="cache activations as a config file says")
    run.add_argument(
        "config", help="YAML or JSON file of CacheActivationsRunnerConfig fields"
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a field (repeatable)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="describe what a cache holds")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--plot", metavar="FILE.png", help="draw the coverage table")
    info.set_defaults(func=cmd_info)

    verify = sub.add_parser(
        "verify", help="check a cache's schema, checksums and values"
    )
    verify.add_argument("path")
    verify.add_argument(
        "--model", help="model to re-run on stored tokens (name or local folder)"
    )
    verify.add_argument(
        "--rows", type=int, default=8, help="rows to re-run (default 8)"
    )
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(func=cmd_verify)

    demo = sub.add_parser(
        "demo", help="cache SmolLM2-135M activations offline and train an SAE"
    )
    demo.add_argument(
        "--out", help="output folder (default: ./sae-cache-ext-demo/run-<time>)"
    )
    demo.add_argument("--tokens", type=int, default=49_152, help="tokens to cache")
    demo.add_argument(
        "--layer", type=int, default=15, help="block whose resid_post to cache"
    )
    demo.add_argument(
        "--dataset", help="local .txt/.jsonl file or saved dataset folder"
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=cmd_demo)

    from sae_cache_ext import bench  # light: imports torch only when run

    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        # tqdm reads TQDM_* defaults from the environment: silence every bar,
        # including those of datasets and sae-lens, for CI logs.
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except CliError as error:
        print(f"sae-cache-ext: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"sae-cache-ext: error: {error}", file=sys.stderr)
        return 2
