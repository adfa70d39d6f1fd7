"""``python -m adamae_scale.bench``: the ``adamae-bench`` console script (torchrun launches it this way)."""

import sys

from . import main

sys.exit(main())
