"""`llmrec` command line. Each sub-command lives in its own module under `llmrec/cli/` and exposes
`register(subparsers)`; heavy imports happen inside the handlers so that `llmrec --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from llmrec.config import ConfigError
    from llmrec.data.loaders import DataError
    from llmrec.llm.base import BackendError

    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return rc
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
        print(f"llmrec: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
