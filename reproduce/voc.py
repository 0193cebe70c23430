"""Train -> evaluate -> report for the `voc` preset: same as `locbe reproduce --preset voc [ARGS]`.

Usage: python reproduce/voc.py [--data-root DIR] [--pretrained FILE] [...]  (see `locbe reproduce -h`)
"""

import sys

from locbe.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "--preset", "voc", *sys.argv[1:]]))
