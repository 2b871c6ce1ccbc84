"""`sae-cache-ext bench`: sae-lens's runner against ours, on the same model, data and
config, one fresh process per run.

Arms (each run alone in its own process):

    upstream           sae-lens's runner, shuffle=True (its shuffle is an index
                       mapping on the returned object; nothing is persisted)
    ours               our runner, shuffle=True, shuffle_across_sequences=True
                       (the shuffle is written to disk), and
                       on_dataset_exhausted="repeat" (sae-lens's behaviour, so every
                       arm caches the same tokens even past one pass of the corpus)
    upstream+persist   sae-lens's runner, then `dataset.save_to_disk` of its shuffled
                       dataset (timed too): what persisting its shuffle costs
    forward-only       the same batches from the ActivationsStore, kept and joined
                       per buffer as upstream does, nothing written; pipeline
                       efficiency = forward-only time / an arm's time

With `--hooks`, two more arms compare caching four hooks (four hook points of the
last block; see the setups) in one forward pass against four single-hook runs:

    ours-4-hooks       our runner with hook_names = the four hooks, as `ours`
    ours-each-hook     four runs of `ours`, one per hook, one after another in the
                       same process (its wall time is their total)

The accelerator regime (`--model wide`): a 1-layer model of width `--width` with
one 1-wide attention head, hooked before its block, reading pretokenized rows, so
its forward pass is nearly free, as on a fast GPU. Its arms (the default there):

    forward-only       the floor: the store's batches, nothing kept
    upstream-plain     sae-lens's runner, shuffle=False
    upstream           sae-lens's runner, shuffle=True (nothing persisted)
    ours-plain         our runner, shuffle=False
    ours               our runner, shuffle=True, shuffle_across_sequences=True
    dd                 `dd if=/dev/zero ... conv=fdatasync` of the cache's bytes on
                       the same filesystem: one flushed write
It prints GB/s per arm and each arm against its limit (floor + one dd for plain,
floor + two for shuffled). `--scale` runs the wide model at 1x, 4x and 16x
`--scale-base-gb` (ours shuffled by default) and prints seconds per GB, peak RSS
and peak disk along the curve.

Arms alternate within each repeat (upstream, ours, upstream+persist, forward-only,
upstream, ours, ...). Each run is a fresh process forked from one server process that
has imported torch/sae-lens but never run anything, so imports (15-20 s here) are paid
once. In each run, the RSS just before `run()` is the baseline ("above the model");
the kernel's peak-RSS counter is reset there (`/proc/self/clear_refs`), so
`ru_maxrss` afterwards is the peak of the run itself, not of loading the model. Disk
writes come from `/proc/self/io`, peak disk use from a thread that sums the run
folder's file sizes every `--disk-interval` seconds.

    sae-cache-ext bench [--model tiny|smollm2|both|wide] [--repeats 3] [--threads 1]
                        [--hooks] [--json PATH] [--quick] [--device cpu|cuda]
                        [--width 1024] [--dtype float32|float16] [--gb 1.074]
                        [--scale [--scale-base-gb 1.074]]
"""

# The docstring above is `sae-cache-ext bench --help`'s description.

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from sae_cache_ext.bench.arms import ALL_ARMS, ARMS, HOOK_ARMS, OURS, WIDE_ARMS
from sae_cache_ext.bench.harness import run_benchmark
from sae_cache_ext.bench.report import format_report
from sae_cache_ext.bench.setups import (
    ITEMSIZE,
    MODELS,
    TINY_WIDTH,
    WIDE,
    WIDE_BATCH,
    WIDE_CONTEXT,
    WIDE_GB,
    WIDE_WIDTH,
    BenchPlan,
    ModelSetup,
    scale_setups,
    smollm2_setup,
    tiny_setup,
    wide_setup,
)

# The package's logger, as before the benchmark was split into modules.
logger = logging.getLogger("sae_cache_ext.bench")

QUICK_TINY_TOKENS = 32_768
QUICK_WIDE_BATCHES = 4


def add_parser(subparsers: Any) -> None:
    """Register `bench` on the `sae-cache-ext` command's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="time sae-lens's runner against ours (throughput, memory, disk)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--model",
        choices=[*MODELS, "both", WIDE],
        default="both",
        help="both = tiny and smollm2; wide = the accelerator regime",
    )
    bench.add_argument(
        "--repeats", type=int, help="runs per arm (default 3; 1 with --scale)"
    )
    bench.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1)"
    )
    bench.add_argument(
        "--tokens", type=int, default=16_384, help="smollm2 tokens (default 16384)"
    )
    bench.add_argument(
        "--tiny-tokens", type=int, default=524_288, help="tiny tokens (default 524288)"
    )
    bench.add_argument(
        "--tiny-width",
        type=int,
        default=TINY_WIDTH,
        help=f"the tiny model's d_model (default {TINY_WIDTH})",
    )
    bench.add_argument(
        "--width",
        type=int,
        default=WIDE_WIDTH,
        help=f"the wide model's d_model (default {WIDE_WIDTH})",
    )
    bench.add_argument(
        "--dtype",
        choices=list(ITEMSIZE),
        default="float32",
        help="the wide model's cache dtype (default float32)",
    )
    bench.add_argument(
        "--gb",
        type=float,
        default=WIDE_GB,
        help=f"GB of activations the wide model caches (default {WIDE_GB})",
    )
    bench.add_argument(
        "--device", default="cpu", help="the models' device: cpu or cuda (default cpu)"
    )
    bench.add_argument(
        "--scale",
        action="store_true",
        help="the scale curve: the wide model at 1x, 4x and 16x --scale-base-gb",
    )
    bench.add_argument(
        "--scale-base-gb",
        type=float,
        default=WIDE_GB,
        help=f"GB of activations at 1x of the scale curve (default {WIDE_GB})",
    )
    bench.add_argument(
        "--arms",
        help=f"comma-separated arms to run, in this order (default {','.join(ARMS)}; "
        f"with --model wide {','.join(WIDE_ARMS)}; with --scale {OURS}; also "
        f"{', '.join(HOOK_ARMS)})",
    )
    bench.add_argument(
        "--hooks",
        action="store_true",
        help=f"also run {' and '.join(HOOK_ARMS)}: four hooks in one pass against "
        "four single-hook runs",
    )
    bench.add_argument(
        "--disk-interval",
        type=float,
        default=0.02,
        help="seconds between disk-use samples; 0 samples only before and after",
    )
    bench.add_argument("--json", metavar="PATH", help="also write every number here")
    bench.add_argument(
        "--workdir",
        help="make the run folders (and keep the logs) under here (default: a "
        "temporary folder, removed afterwards)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run, 1 repeat: the tiny model ({QUICK_TINY_TOKENS} tokens), or "
        f"with --model wide / --scale, {QUICK_WIDE_BATCHES} batches at 1x",
    )
    bench.set_defaults(func=run_bench_command)


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """The plan the options ask for, with errors that name the option."""
    wide = args.model == WIDE or args.scale
    default_arms: list[str] = [OURS] if args.scale else [*(WIDE_ARMS if wide else ARMS)]
    arms: list[str] = (
        [a.strip() for a in args.arms.split(",") if a.strip()]
        if args.arms is not None
        else default_arms
    )
    if getattr(args, "hooks", False):
        arms += HOOK_ARMS
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown or not arms:
        raise ValueError(f"--arms {args.arms!r}: choose from {', '.join(ALL_ARMS)}.")
    repeats = args.repeats if args.repeats is not None else (1 if args.scale else 3)
    for option, value in (("--repeats", repeats), ("--threads", args.threads)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}.")
    if args.disk_interval < 0:
        raise ValueError(
            f"--disk-interval must be 0 or more, got {args.disk_interval}."
        )
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: use cpu or cuda.")
    if args.quick:
        repeats = 1
    return BenchPlan(
        setups=_setups(args, wide),
        arms=list(dict.fromkeys(arms)),
        repeats=repeats,
        threads=args.threads,
        disk_interval=args.disk_interval,
        workdir=Path(args.workdir).expanduser() if args.workdir else None,
        scale=args.scale,
    )


def _setups(args: argparse.Namespace, wide: bool) -> list[ModelSetup]:
    if wide:
        quick_gb = (
            QUICK_WIDE_BATCHES
            * WIDE_BATCH
            * WIDE_CONTEXT
            * args.width
            * ITEMSIZE[args.dtype]
            / 1e9
        ) * 1.0001  # float rounding must not lose the last batch
        if args.scale:
            base = quick_gb if args.quick else args.scale_base_gb
            return scale_setups(base, args.width, args.dtype, args.device)
        gb = quick_gb if args.quick else args.gb
        return [wide_setup(gb, args.width, args.dtype, args.device)]
    models = list(MODELS) if args.model == "both" else [args.model]
    tiny_tokens = args.tiny_tokens
    if args.quick:
        models, tiny_tokens = ["tiny"], QUICK_TINY_TOKENS
    setups = [
        tiny_setup(tiny_tokens, args.tiny_width)
        if m == "tiny"
        else smollm2_setup(args.tokens)
        for m in models
    ]
    if args.device != "cpu":
        setups = [dataclasses.replace(s, device=args.device) for s in setups]
    return setups


def run_bench_command(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    for setup in plan.setups:
        logger.info("bench %s: %s", setup.name, setup.describe())
    report = run_benchmark(plan)
    for message in report["warnings"]:
        logger.warning(message)
    print(format_report(report))
    if args.json:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        logger.info("wrote every number to %s", path)
    return 0
