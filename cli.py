"""Command line: ``python -m sparse_avatar <command> ...``.

Each library area owns its commands in a ``cli_commands.py`` next to its code, exposing
``register(subparsers)``; this file only assembles them, so the CLI and the ComfyUI nodes call the
same library functions. A handler returns an exit code; a ``UserFacingError`` (bad input the user
can fix) is printed as one line and exits 2, never as a traceback; the pack's warnings (logger
``sparse-avatar``) are printed as one ``warning: ...`` line each.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import UserFacingError

# Areas that contribute subcommands, in the order they are listed in --help.
_COMMAND_MODULES = (
    "media.cli_commands",
    "model.cli_commands",
    "training.cli_commands",
    "avatar_world.cli_commands",  # the test world: clips, shards, the evaluation suite
    "demo",  # the main job on the shipped model (demo.py: library and its one command)
    "batch",  # batch rendering on a running ComfyUI (batch.py: library and its one command)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_avatar",
        description="Lip-synced talking-head video from a reference video and speech.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = __package__ or "sparse_avatar"
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f".{module_name}", package)
        except ModuleNotFoundError as error:
            # Only a missing cli_commands module of an area is tolerated (an area may have no
            # commands yet); a missing dependency inside one is a real error.
            if error.name and error.name.endswith(module_name.split(".")[-1]):
                continue
            raise
        module.register(subparsers)
    return parser


class _WarningLines(logging.Handler):
    """``warning: <message>`` on stderr, one line per record (looked up at emit time, so tests can capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(self.format(record).split())
            print(f"{record.levelname.lower()}: {text}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a warning must never break the command
            self.handleError(record)


def _show_warnings() -> None:
    # "sparse-avatar": media's warnings; the package name: modules that log under it (model.pipeline).
    for name in dict.fromkeys(("sparse-avatar", __package__ or "sparse_avatar")):
        logger = logging.getLogger(name)
        if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
            logger.addHandler(_WarningLines(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    _show_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
