"""`locbe` console script.

Each subcommand lives next to the code it drives and exposes two functions,
``add_arguments(parser[, argv])`` and ``run(args) -> int``.  The table below maps the
command name to that module so start-up stays cheap: torch/timm are imported
only when a command runs, never for ``--help``.

Errors the operator can fix (``locbe.errors.LocbeError``, missing/existing files) print one line
and exit with a code from docs/runs.md "Exit codes"; ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import signal
import sys

from locbe import __version__
from locbe.runtime.numerics import NUMERICS_CHOICES, apply_pinned_numerics, say_overrides
from locbe.runtime.openmp import apply_shared_core_defaults

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("locbe.data.synthetic", "write the built-in synthetic dataset in VOC layout"),
    "make-layout": ("locbe.data.voc_layout", "write a synthetic set laid out exactly like VOC 2012+SBD or COCO 2014"),
    "make-cls-labels": ("locbe.data.cls_labels", "write cls_labels_onehot.npy from segmentation masks"),
    "check-data": ("locbe.data.check", "read every image and mask of a split; list every bad file at once"),
    "build-ext": ("locbe.lattice.build", "compile the regularized-loss extension (CPU, and CUDA if nvcc)"),
    "train": ("locbe.train_command", "train LOC-BE / ToCo (single process or under torchrun)"),
    "eval": ("locbe.eval.cli", "evaluate a checkpoint: seg / CAM mIoU, multi-scale, dense CRF"),
    "reproduce": ("locbe.reproduce", "train -> eval -> report for a preset (smoke, voc, coco)"),
    "compare": ("locbe.report.compare", "compare runs or reports over seeds: differences of means, Welch's t-test"),
    "bench": ("locbe.bench", "run the benchmark suites and print a comparison table"),
    "device-check": ("locbe.device_check", "check a GPU: build, tests, benchmarks, smoke run -> reports/device"),
}

# user-fixable OS errors: they name the path in their message
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default == [] or default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


def _add_arguments(module_name: str, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    add = importlib.import_module(module_name).add_arguments
    if "argv" in inspect.signature(add).parameters:  # defaults that depend on other flags (--preset)
        add(parser, argv=argv)
    else:
        add(parser)


def main(argv: list[str] | None = None) -> int:
    apply_shared_core_defaults()  # before any subcommand imports torch (locbe/runtime/openmp.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _command_at(argv)
    if chosen is not None and "torch" not in sys.modules:  # libraries read these once, when they first run
        if numerics_from_argv(argv[chosen], argv[chosen + 1:]) == "pinned":
            say_overrides(apply_pinned_numerics())
    return _run(build_parser(argv).parse_args(argv))


def _command_at(argv: list[str]) -> int | None:
    """Where the subcommand's name stands in ``argv`` (the first word that is not a flag), or None."""
    return next((i for i, a in enumerate(argv) if not a.startswith("-")), None)


def numerics_from_argv(command: str, argv: list[str]) -> str:
    """The ``cpu_numerics`` a ``locbe train`` / ``reproduce`` command line will run with (its preset's, or
    ``--set cpu_numerics=...``), read without importing torch; "native" for every other command."""
    if command not in ("train", "reproduce"):
        return "native"
    from locbe.config import PRESETS, get_preset

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--set", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    preset = known.preset or importlib.import_module(COMMANDS[command][0]).DEFAULT_PRESET
    chosen = get_preset(preset).cpu_numerics if preset in PRESETS else "native"
    for item in known.set:
        key, _, value = item.partition("=")
        if key.strip() == "cpu_numerics" and value.strip() in NUMERICS_CHOICES:
            chosen = value.strip()
    return chosen


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The ``locbe`` parser; only the subcommand named in ``argv`` gets its arguments (and imports its module)."""
    parser = argparse.ArgumentParser(prog="locbe", formatter_class=_HelpFormatter,
                                     description="LOC-BE weakly-supervised segmentation: data, training, "
                                                 "evaluation, reproduction.",
                                     epilog="exit codes: 0 ok, 1 unexpected error, 2 bad input, 3 acceptance "
                                            "failed, 4 non-finite loss, 128+N stopped by signal N (state saved)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not one line")
    parser.add_argument("--version", action="version", version=f"locbe {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _command_at(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.set_defaults(_module=module_name)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an error, not one line")
        if chosen is not None and name == argv[chosen]:
            _add_arguments(module_name, p, argv[chosen + 1:])
    return parser


def _run(args) -> int:
    from locbe.errors import EXIT_FAILURE, EXIT_INTERRUPTED, LocbeError, one_line

    prog = f"locbe {args.command}"
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except LocbeError as e:
        if args.debug:
            raise
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except _PATH_ERRORS as e:
        if args.debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return EXIT_INTERRUPTED + signal.SIGINT
    except Exception as e:
        if args.debug or "Original Traceback" not in str(e):
            raise
        # a DataLoader worker's error re-raised with the worker's traceback as its message
        print(f"{prog}: error: {one_line(e)} (--debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
