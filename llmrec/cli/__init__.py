"""`llmrec` command line. Each sub-command lives in its own module under `llmrec/cli/` and exposes
`register(subparsers)`; heavy imports happen inside the handlers so that `llmrec --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

# one module per command group; a module registers one or more sub-commands
COMMAND_MODULES = ["data", "serve", "recommend", "bench", "finetune", "retrieve", "baselines"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmrec", description="LLM recommender: data, baselines, fine-tuning, ranking, serving"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"llmrec.cli.{name}").register(sub)
    _describe(p)
    return p


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command the line `llmrec --help` lists it with as the description of its own `--help`
    (`add_parser(help=...)` alone shows it only in the parent's list), unless it has a description of its own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = helps[name]
                _describe(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from llmrec.cli.args import UsageError
    from llmrec.config import ConfigError
    from llmrec.data.loaders import DataError
    from llmrec.llm.base import BackendError

    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return rc
    except UsageError as e:  # flags that do not go together: status 2, as argparse's own usage errors
        prog = " ".join(w for w in (parser.prog, args.command, getattr(args, f"{args.command}_command", None)) if w)
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise
    except BrokenPipeError:
        # the reader went away (`llmrec ... | head`): stop quietly as a Unix tool does; stdout goes to devnull so the
        # interpreter's own flush at exit does not report it again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DataError, ConfigError, BackendError, FileNotFoundError, KeyError, ValueError) as e:
        # a refused input or setting: one line naming it (the library's ValueErrors say which); -v shows the traceback
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, KeyError) and not (isinstance(msg, str) and " " in msg):
            # a bare key ('items'): a failed lookup, not one of the library's worded refusals ("unknown user ..."); it
            # must say where it came from, or a bug reads like a refused input
            import traceback

            last = traceback.extract_tb(e.__traceback__)[-1]
            msg = f"{msg} ({type(e).__name__} at {Path(last.filename).name}:{last.lineno}; -v shows the traceback)"
        print(f"llmrec: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
