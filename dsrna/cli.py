"""The ``dsrna`` command. Each subcommand lives in its own module under :mod:`dsrna.commands`
exposing ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their subcommand runs, so ``dsrna info`` stays fast."""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import sys
import warnings

SUBCOMMANDS = {
    "search": "dsrna.commands.search",
    "train": "dsrna.commands.train",
    "attack": "dsrna.commands.attack",
    "certify": "dsrna.commands.certify",
    "compare": "dsrna.commands.compare",
    "report": "dsrna.commands.report",
    "bench": "dsrna.commands.bench",
    "data": "dsrna.commands.data",
    "info": "dsrna.commands.info",
}


# Terminal colour codes (PyTorch puts some in its messages) would print as garbage in a log file.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage first by default)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _ShowDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help says it or there is none to say
    (None: the data set's or preset's; a flag's False). Also options without a help text."""

    def _format_action(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text and text != argparse.SUPPRESS
                and action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)):
            action = copy.copy(action)  # the parser's own stays as it is
            action.help = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return super()._format_action(action)


def _load(name: str):
    try:
        return importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == SUBCOMMANDS[name]:
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from dsrna import __version__

    parser = _Parser(prog="dsrna", description="Differentiable search of robust neural architectures.")
    parser.add_argument("--version", action="version", version=f"dsrna {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in SUBCOMMANDS:
        module = _load(name) if only in (None, name) else None
        help_text = getattr(module, "HELP", "not available yet in this version")
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_ShowDefaults)
        if module is not None:
            module.add_arguments(p)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    # A command's warnings (e.g. a fast backend falling back to the reference) are for the user,
    # not a source location.
    print(f"dsrna: warning: {message}", file=sys.stderr if file is None else file)


# How an interrupted long run continues (its checkpoints are written atomically at each epoch's end).
_EPOCH_CHECKPOINT_HINT = "; if an epoch finished, the same command with --resume continues from its checkpoint"
_RESUME_HINTS = {
    "search": _EPOCH_CHECKPOINT_HINT,
    "train": _EPOCH_CHECKPOINT_HINT,
    "compare": "; the same command continues from the last finished stage",
}


def main(argv: list[str] | None = None) -> int:
    from dsrna.backend import BackendUnavailable, check_environment
    from dsrna.errors import DsrnaError, first_line

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    module = _load(args.command)
    if module is None:
        print(f"dsrna {args.command}: error: this subcommand is not available in this version", file=sys.stderr)
        return 2
    try:
        check_environment()
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(module.run(args) or 0)
    # Errors a user can fix (bad input, missing files, a full disk, an unusable --backend) are one
    # line; anything else is a bug and keeps its traceback.
    except (DsrnaError, OSError, ValueError, BackendUnavailable) as exc:
        if os.environ.get("DSRNA_DEBUG"):
            raise
        message = _ANSI_ESCAPE.sub("", first_line(exc))
        print(f"dsrna {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsrna {args.command}: interrupted{_RESUME_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
