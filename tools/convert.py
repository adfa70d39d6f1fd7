#!/usr/bin/env python
"""``adamae-convert`` without installing the console script: ``python tools/convert.py COMMAND ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adamae_scale.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
