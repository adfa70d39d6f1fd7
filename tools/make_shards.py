#!/usr/bin/env python3
"""Videos → WebDataset shards: the same program as the ``adamae-shards`` console script."""

import sys

from adamae_scale.data.shards_cli import main

if __name__ == "__main__":
    sys.exit(main())
