"""``crossdistil --help`` and ``crossdistil COMMAND --help`` load neither torch, kafka-python nor numpy, and still
print every subcommand's options (bench/cli_startup.py measures what that saves)."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.cli import COMMANDS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("kafka", "numpy", "torch")

# In a fresh interpreter: run `crossdistil ARGV...` and report the help text, which of HEAVY got loaded, and, for
# each, the project modules that were importing when it was first loaded (so a failure names the culprit).
_CHILD = """
import contextlib, io, json, sys, traceback

HEAVY = {heavy!r}
chains = {{}}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY and name not in chains:
            chains[name] = [f"{{f.filename}}:{{f.lineno}}" for f in traceback.extract_stack()[:-1]
                            if f.filename.startswith({root!r}) and "/.venv/" not in f.filename]
        return None

sys.meta_path.insert(0, Watch())
import consumers.cli

out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        consumers.cli.main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps({{"help": out.getvalue(), "loaded": sorted(m for m in HEAVY if m in sys.modules),
                   "chains": chains, "modules": sorted(sys.modules)}}))
"""


def help_of(argv: list[str]) -> dict:
    """The help text that ``crossdistil ARGV`` prints, the heavy modules it loaded and who loaded them."""
    child = subprocess.run([sys.executable, "-c", _CHILD.format(heavy=HEAVY, root=str(ROOT)), *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def _parser_of(path: tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser of ``crossdistil PATH...`` as the subcommand's module builds it (imported here, in the test
    process): ``("kafka",)``, or ``("inspect", "serving")`` for a subcommand's own subcommand."""
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[path[0]][0]).add_arguments(parser)
    for name in path[1:]:
        parser = _subparsers(parser).choices[name]
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def help_paths() -> list[tuple[str, ...]]:
    """Every subcommand, and every subcommand of a subcommand (``inspect checkpoints``)."""
    paths = []
    for command in COMMANDS:
        nested = _subparsers(_parser_of((command,)))
        paths += [(command,)] + [(command, name) for name in (nested.choices if nested else ())]
    return paths


def missing_from(help_text: str, path: tuple[str, ...]) -> list[str]:
    """What ``crossdistil PATH... --help`` does not show of its options and its own subcommands (each listed at the
    start of a line)."""
    parser = _parser_of(path)
    nested = _subparsers(parser)
    options = [option for action in parser._actions for option in action.option_strings]
    names = list(nested.choices) if nested else []
    return ([option for option in options if option not in help_text]
            + [name for name in names if not re.search(rf"^\s+{name}\b", help_text, re.MULTILINE)])


def _loaded_message(report: dict) -> str:
    return "\n".join(f"{name} loaded by:\n  " + "\n  ".join(report["chains"].get(name, ["?"]))
                     for name in report["loaded"])


def test_crossdistil_help_lists_every_subcommand_without_loading_torch_kafka_or_numpy() -> None:
    report = help_of(["--help"])
    assert report["loaded"] == [], _loaded_message(report)
    for name in COMMANDS:
        assert f"    {name} " in report["help"], report["help"]


def test_crossdistil_help_imports_no_subcommand_module() -> None:
    report = help_of(["--help"])
    assert not {module for module, _ in COMMANDS.values()} & set(report["modules"])


@pytest.mark.parametrize("path", help_paths(), ids=" ".join)
def test_a_subcommand_help_prints_its_options_without_loading_torch_kafka_or_numpy(path: tuple[str, ...]) -> None:
    report = help_of([*path, "--help"])
    assert report["loaded"] == [], _loaded_message(report)
    missing = missing_from(report["help"], path)
    assert not missing, f"crossdistil {' '.join(path)} --help does not show {missing}:\n{report['help']}"
