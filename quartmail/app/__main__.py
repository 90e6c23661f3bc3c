"""``python -m quartmail.app``: serve the sign-up app (see :mod:`quartmail.app.launcher`)."""

from __future__ import annotations

import sys

from .launcher import main

if __name__ == "__main__":
    sys.exit(main())
