"""Train -> evaluate -> report for the `smoke` preset: same as `locbe reproduce --preset smoke [ARGS]`.

Usage: python reproduce/smoke.py [--data-root DIR] [--pretrained FILE] [...]  (see `locbe reproduce -h`)
"""

import sys

from locbe.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "--preset", "smoke", *sys.argv[1:]]))
