#!/usr/bin/env python3
"""Benchmarks that print one JSON object: the same program as the ``adamae-bench`` console script."""

import sys

from adamae_scale.bench import main

if __name__ == "__main__":
    sys.exit(main())
