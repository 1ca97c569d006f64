"""``smsdl``: the headless twin of the napari plugin.

Each sub-command lives in :mod:`napari_smsdl.commands` as a module with ``add_parser(subparsers)``
(which sets ``func=run`` on its parser) and ``run(args) -> int``. This module only dispatches and
turns expected errors into one line on stderr and a non-zero exit status.

Under ``torchrun --nproc_per_node=N -m napari_smsdl COMMAND ...`` the process group is joined
before the command runs and left after it (:mod:`napari_smsdl.distributed`); a command declares
that it supports several processes with ``parser.set_defaults(torchrun=True)`` (``benchmark``
and ``reconstruct`` do), the others refuse to run with N > 1. Only rank 0 logs at INFO level.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Sub-command modules, in the order ``smsdl --help`` lists them.
COMMANDS = ("info", "ion", "sample", "register", "reconstruct", "benchmark", "demo", "export")

log = logging.getLogger("napari_smsdl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smsdl",
        description="H&E-guided super-resolution of mass spectrometry images (SMSDL-Net).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"napari_smsdl.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still being built must not break the others
            if exc.name == f"napari_smsdl.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings (of the parser and its sub-commands) that take one value."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _value_options(sub)
        elif action.option_strings and action.nargs is None:
            found.update(action.option_strings)
    return found


def join_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--tol -5ppm`` → ``--tol=-5ppm``: argparse reads a value that starts with '-' and is not a
    plain number as the next option ("expected one argument"); joined, the value reaches the
    command, which says what is wrong with it."""
    options, out, i = _value_options(parser), [], 0
    while i < len(argv):
        token = argv[i]
        if (token in options and i + 1 < len(argv) and argv[i + 1][:1] == "-" and len(argv[i + 1]) > 1
                and (argv[i + 1][1].isdigit() or argv[i + 1][1] == ".")):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(join_dash_values(parser, argv))
    from . import distributed

    env = distributed.env_from_environment()
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.INFO if env.is_main else logging.WARNING),
        format=f"{prefix}%(levelname)s %(name)s: %(message)s",
    )
    if env.world_size > 1 and not getattr(args, "torchrun", False):
        if env.is_main:
            print(f"smsdl {args.command}: error: this command does not run in several processes "
                  "(torchrun --nproc_per_node > 1); run it without torchrun", file=sys.stderr)
        return 2
    try:
        if distributed.launched_by_torchrun() and getattr(args, "torchrun", False):
            with distributed.distributed_session(getattr(args, "device", "auto")):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("smsdl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI contract: one line, no traceback
        if args.debug:
            raise
        from .errors import SmsdlError

        if isinstance(exc, SmsdlError):
            message = str(exc)
        elif isinstance(exc, MemoryError):  # its own text is empty
            message = (f"out of memory ({exc or 'an allocation failed'}); for a large H&E use a pyramidal TIFF or "
                       "--tiled, for many channels --chunk-channels; --debug shows where")
        elif isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
        else:
            message = f"{type(exc).__name__}: {exc}"
        print(f"{prefix}smsdl {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
