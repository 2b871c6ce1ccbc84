"""`sae-cache-ext bench`: sae-lens's runner against ours; this module re-exports the
names callers use.

Lower modules never import higher ones:

    setups    the models, hooks and cache sizes, and the plan
    measure   time, peak RSS and disk use of one run, inside its process
    arms      what each arm runs (upstream, ours, upstream+persist, forward-only,
              the hooks arms), inside its process
    report    medians, ratios, regime, targets and verdicts, and the text tables
    harness   the fork server (`serve`) and running the arms in fresh processes
    command   the `bench` subcommand: options, plan, run, print
"""

from sae_cache_ext.bench.arms import (
    ALL_ARMS,
    ARMS,
    FORWARD,
    HOOK_ARMS,
    HOOKS_EACH,
    HOOKS_ONE_PASS,
    OURS,
    PERSIST,
    UPSTREAM,
)
from sae_cache_ext.bench.command import (
    QUICK_TINY_TOKENS,
    add_parser,
    plan_from_args,
    run_bench_command,
)
from sae_cache_ext.bench.harness import run_benchmark, serve
from sae_cache_ext.bench.measure import measure
from sae_cache_ext.bench.report import TARGETS, build_report, format_report, regime
from sae_cache_ext.bench.setups import (
    MODELS,
    BenchPlan,
    ModelSetup,
    smollm2_setup,
    tiny_setup,
)

__all__ = [
    "ALL_ARMS",
    "ARMS",
    "FORWARD",
    "HOOKS_EACH",
    "HOOKS_ONE_PASS",
    "HOOK_ARMS",
    "MODELS",
    "OURS",
    "PERSIST",
    "QUICK_TINY_TOKENS",
    "TARGETS",
    "UPSTREAM",
    "BenchPlan",
    "ModelSetup",
    "add_parser",
    "build_report",
    "format_report",
    "measure",
    "plan_from_args",
    "regime",
    "run_bench_command",
    "run_benchmark",
    "serve",
    "smollm2_setup",
    "tiny_setup",
]
