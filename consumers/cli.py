"""The ``crossdistil`` command line: one entry point, one subcommand per part of the product.

Each subcommand lives in its own module, which exposes two functions:

* ``add_arguments(parser: argparse.ArgumentParser) -> None``
* ``run(args: argparse.Namespace) -> int`` (the process exit status)

Modules keep heavy imports (torch, kafka-python, numpy) inside ``run`` so that ``crossdistil --help`` stays fast
(tests/unit/consumers/test_cli_startup.py checks that no ``--help`` loads them), and ``main`` imports only the
module of the subcommand it runs: ``crossdistil --help`` lists the others by name. A subcommand whose module does
not exist yet answers "not implemented yet" with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Collection, Sequence

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("consumers.tools.kafka", "run a local single-node Apache Kafka 4.x (KRaft): up, down, status"),
    "stream": ("streamer.stream",
               "stream a data set as impression and feedback events into Kafka or an event-log file"),
    "train": ("consumers.trainer.command",
              "the trainer daemon: join, mini-batches, CrossDistil updates, checkpoints, publication"),
    "serve": ("consumers.serving.command",
              "the serving daemon: load published checkpoints from the serving topic and score"),
    "backtest": ("consumers.tools.backtest",
                 "replay an event log or topic range through the trainer's code; compare configurations"),
    "evaluate": ("consumers.tools.evaluate",
                 "offline training and evaluation of model configurations (ablation ladder, backbones)"),
    "inspect": ("consumers.tools.inspect",
                "read-only: a trainer's checkpoints (verified, positions, join, publication, lock) or the serving "
                "topic's publications"),
    "demo": ("consumers.tools.demo",
             "the whole pipeline locally: Kafka, streamer, trainer, serving, Prometheus, live view"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def _exists(module_name: str) -> bool:
    """Whether the subcommand's module is there, without importing it."""
    return importlib.util.find_spec(module_name) is not None


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``crossdistil`` parser with the flags of ``commands`` (their modules imported; None: every subcommand's).
    The other subcommands are there by name and help only."""
    parser = argparse.ArgumentParser(
        prog="crossdistil",
        description="Streaming online-learning multi-task recommender (CrossDistil) on Apache Kafka.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if commands is None or name in commands:
            module = _load(module_name)
            implemented = module is not None and hasattr(module, "run")
        else:
            module, implemented = None, _exists(module_name)
        p = sub.add_parser(
            name,
            help=help_text if implemented else f"{help_text} [not implemented yet]",
            description=help_text,
        )
        if implemented and hasattr(module, "add_arguments"):
            module.add_arguments(p)
        p.set_defaults(_module=module_name if implemented else None, _name=name)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (``crossdistil`` itself takes none but
    ``--help``)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    if args._module is None:
        print(f"crossdistil {args._name}: not implemented yet", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (``crossdistil backtest ... | head -1``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter flushes stdout at exit: not into the closed pipe
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
