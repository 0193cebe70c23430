"""Train -> evaluate -> report for the `coco` preset: same as `locbe reproduce --preset coco [ARGS]`.

Usage: python reproduce/coco.py [--data-root DIR] [--pretrained FILE] [...]  (see `locbe reproduce -h`)
"""

import sys

from locbe.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "--preset", "coco", *sys.argv[1:]]))
