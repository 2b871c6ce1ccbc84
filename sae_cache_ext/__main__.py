"""`python -m sae_cache_ext ...`: the same as the `sae-cache-ext` command."""

import sys

from sae_cache_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
