"""The `sae-cache-ext` command line: init, run, info, verify, demo, bench.

Global flags (`-q`, `-v`, `--json`) work before or after the command. Nothing heavy
is imported until a command needs it, so `--help`, `init` and a config typo answer
at once. Exit status: 0 done, 1 `verify` found a problem, 2 a usage or input error
(nothing written), 3 `run` finished a cache cut short because the dataset ran out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_cache_ext import __version__
from sae_cache_ext.cli_run import (
    EXIT_OK,
    EXIT_SHORT_CACHE,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    SMOLLM2_NAMES,
    HubUnreachable,
    build_and_run,
    explain_hub_errors,
    load_checked_config,
    model_fix,
    summarize,
)

logger = logging.getLogger("sae_cache_ext")


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# -- commands ---------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from sae_cache_ext.template import render_template

    text = render_template()
    if args.path in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.path)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists: choose another path, or pass --force.")
    path.write_text(text, encoding="utf-8")
    print(
        f"Wrote {path}: every field with its type, default and meaning. Edit "
        f"dataset_path (and the rest), then: sae-cache-ext run {path}",
        file=sys.stderr,
    )
    return EXIT_OK


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
    cfg = load_checked_config(args.config, args.set or [])
    runner, run_seconds = build_and_run(cfg, quiet=args.quiet)
    summary = summarize(cfg, runner, run_seconds, time.perf_counter() - args.started)
    if runner.world.is_main:  # one summary for a data-parallel run
        if args.json:
            print(json.dumps(summary.to_json(), default=str))
        else:
            _print_pairs("Cached activations", summary.lines())
    if summary.dataset_ran_out:
        logger.warning(
            "The dataset ran out: the cache at %s holds %d of training_tokens=%d "
            "tokens (exit status %d). Use a larger dataset or lower training_tokens.",
            summary.path,
            summary.tokens,
            summary.training_tokens,
            EXIT_SHORT_CACHE,
        )
        return EXIT_SHORT_CACHE
    return EXIT_OK


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
        print(f"Coverage plot written to {args.plot}", file=sys.stderr)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from sae_cache_ext.verify import verify_cache

    name = args.model

    def load() -> Any:  # called only if the cache's rows can be re-run
        with explain_hub_errors(f"--model {name}", model_fix(name)):
            return _load_model_by_name(name)

    report = verify_cache(
        args.path, model=load if name else None, rows=args.rows, seed=args.seed
    )
    print(json.dumps(asdict(report)) if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


def _load_model_by_name(name: str):
    from sae_cache_ext import models

    if name.lower() in SMOLLM2_NAMES:
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
        "tokens/s over caching seconds": round(result.tokens_per_second, 1),
        "bytes on disk": result.bytes_on_disk,
        "cache": result.cache_path,
        "SAE trained on tokens": result.sae_train_tokens,
        "SAE training seconds": round(result.sae_seconds, 1),
        "SAE held-out tokens": result.sae.tokens,
        "SAE explained variance (held out)": round(result.sae.explained_variance, 4),
        "SAE L0 (held out)": round(result.sae.l0, 2),
        "total seconds": round(result.total_seconds, 1),
    }
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_pairs("sae-cache-ext demo", [(k, str(v)) for k, v in summary.items()])
    return EXIT_OK


def _print_pairs(title: str, pairs: list[tuple[str, str]]) -> None:
    print(title)
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"  {key:<{width}}  {value}")


# -- parser -----------------------------------------------------------------------


def _global_flags(
    parser: argparse.ArgumentParser, top: bool, json: bool = True
) -> None:
    """`-q`, `-v`, `--json`: on the top parser with defaults, on every command with
    SUPPRESS (so a flag given before the command is not reset after it)."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="only warnings and errors: no INFO logs, library warnings or progress bars",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="debug logs",
    )
    if json:
        parser.add_argument(
            "--json",
            action="store_true",
            default=default(False),
            help="print the result as JSON on stdout",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-cache-ext",
        description="Cache language-model activations for SAE training (sae-lens "
        "compatible). Start with `sae-cache-ext init config.yaml`.",
        epilog="Exit status: 0 done; 1 verify found a problem; 2 usage or input error "
        "(nothing written); 3 the dataset ran out before training_tokens (the "
        "shorter cache is written).",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    _global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        new = sub.add_parser(name, help=help, description=help, **kwargs)
        _global_flags(new, top=False)
        return new

    init = command("init", "write a commented config template (every field)")
    init.add_argument("path", nargs="?", help="file to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite PATH")
    init.set_defaults(func=cmd_init)

    run = command("run", "cache activations as a config file says")
    run.add_argument(
        "config", help="YAML or JSON file of config fields (`sae-cache-ext init`)"
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a field, VALUE read as YAML (repeatable)",
    )
    run.set_defaults(func=cmd_run)

    info = command("info", "describe what a cache holds")
    info.add_argument("path")
    info.add_argument("--plot", metavar="FILE.png", help="draw the coverage table")
    info.set_defaults(func=cmd_info)

    verify = command("verify", "check a cache's schema, checksums and values")
    verify.add_argument("path")
    verify.add_argument(
        "--model", help="model to re-run on stored tokens (name or local folder)"
    )
    verify.add_argument(
        "--rows", type=int, default=8, help="rows to re-run (default 8)"
    )
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(func=cmd_verify)

    demo = command("demo", "cache SmolLM2-135M activations offline and train an SAE")
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
    demo.set_defaults(func=cmd_demo)

    from sae_cache_ext import bench  # light: imports torch only when run

    bench.add_parser(sub)
    _global_flags(sub.choices["bench"], top=False, json=False)  # its --json is a PATH
    return parser


def _quiet_everything() -> None:
    """No INFO logs, no library warnings, no progress bars (set before the
    libraries are imported, which read these at import)."""
    for name in (
        "TQDM_DISABLE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    ):
        os.environ[name] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    if args.quiet:
        _quiet_everything()
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    try:
        return args.func(args)
    except (
        CliError,
        HubUnreachable,
        ValueError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
    ) as error:
        print(f"sae-cache-ext: error: {error}", file=sys.stderr)
        return EXIT_USAGE
