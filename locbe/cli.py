"""`locbe` console script.

Each subcommand lives next to the code it drives and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``.  The table below maps the
command name to that module so start-up stays cheap: torch/timm are imported
only by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("locbe.data.synthetic", "write the built-in synthetic dataset in VOC layout"),
    "make-cls-labels": ("locbe.data.cls_labels", "write cls_labels_onehot.npy from segmentation masks"),
    "build-ext": ("locbe.regloss.build", "compile the regularized-loss extension (CPU, and CUDA if nvcc)"),
    "train": ("locbe.train", "train LOC-BE / ToCo (single process or under torchrun)"),
    "eval": ("locbe.eval.evaluate", "evaluate a checkpoint: seg / CAM mIoU, multi-scale, dense CRF"),
    "reproduce": ("locbe.reproduce", "train -> eval -> report for a preset (smoke, voc, coco)"),
    "bench": ("locbe.bench", "run the benchmark suites and print a comparison table"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="locbe", formatter_class=_HelpFormatter,
                                     description="LOC-BE weakly-supervised segmentation: data, training, "
                                                 "evaluation, reproduction.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
