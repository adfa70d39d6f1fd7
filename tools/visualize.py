#!/usr/bin/env python
"""``adamae-visualize`` without installing the console script: ``python tools/visualize.py SRC --video FILE ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adamae_scale.visual.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
