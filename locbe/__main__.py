"""`python -m locbe ...` is the `locbe` console script (for environments whose bin/ is not on PATH)."""

import sys

from locbe.cli import main

if __name__ == "__main__":
    sys.exit(main())
