"""Every command the documentation shows a user works as written: users copy them.

The commands are read from README.md, docs/*.md and reports/*/README.md (the shell code blocks: fenced, with no
language or bash, sh, shell, console, or indented by four spaces; the inline code of the prose; the README's table of
subcommands, whose first column leaves ``crossdistil`` out) and from the comments of deploy/'s TOML examples. A
command is checked when its command word is ``crossdistil`` (any path to it, e.g. ``.venv/bin/crossdistil``),
``python`` (a script, or ``-m MODULE``; ``python -m consumers.cli`` and ``torchrun ... -m consumers.cli`` are
``crossdistil``) or ``bash SCRIPT``; other programs (curl, prometheus, torchrun's own flags) are not this project's
to check. A quoted message of the program (``crossdistil serve: following ...``) is not a command.

* ``crossdistil SUBCOMMAND ...`` parses with the real parser (``consumers.cli.build_parser``), nothing run. A
  code block's command is complete: its required arguments must be there. Inline code is a fragment ("`crossdistil
  evaluate --cadence`"): its flags and their values must parse, required ones may be left out. Inline code written
  as a synopsis (``[--json]`` optional parts, ``up|down|status`` alternatives) is checked for its subcommand and
  that every ``--flag`` it names is one the subcommand knows.
* ``--config FILE`` loads with the daemons' own loader (``consumers.runtime.config.load_config``), with the
  command's ``--set`` overrides; ``--mapping FILE`` with the csv adapter's; evaluate's ``--backbone``, ``--seeds``
  and ``--cadence`` with evaluate's own parsers. What needs torch (evaluate's ``--configs`` names, the model of each
  configuration a train or backtest command is given) is the one slow test.
* ``python SCRIPT.py --flag ...`` parses with a parser rebuilt from the script's own ``add_argument`` calls (read
  from its source: importing it would load torch; flags, counts and literal choices are checked, not the values
  a script converts with a function of its own).
* every path inside the repository the command reads (a config, a mapping, a script) exists, and so does every
  repository path the documents' code names.

Placeholders stand for a value of the reader's own and are allowed only in these forms (``is_placeholder``): a
word of ``PLACEHOLDER_WORDS`` (``DIR``, ``HOST:PORT``) or one capital letter (``N``), ``<anything>``, a shell
variable (``$pair``, ``${mode}``) and elision (``...``, ``…``). A placeholder passes any type or choice check of the
option it is the value of, and a path with one in it is not looked for; an elision standing alone as an argument
makes the command a fragment. Every failing command is reported with its file:line; the few broken in documents
this test's owner may not edit are listed in ``KNOWN_BROKEN`` and ``KNOWN_MISSING`` (strict: they must stay broken).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import re
import shlex
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumers.cli import COMMANDS, build_parser
from consumers.runtime.config import ConfigError, load_config
from consumers.tools.evaluate import BACKBONES, parse_cadence, parse_list, parse_seeds
from streamer.datasets.tabular import MappingError, load_mapping

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "reports").glob("*/README.md"))]
CONFIG_EXAMPLES = sorted((ROOT / "deploy").rglob("*.toml"))  # their comments say how to run them
SHELL_FENCES = frozenset({"", "bash", "sh", "shell", "console"})

# The words the documentation uses for "your own value here" (and any one capital letter: N, T, R); nothing else in
# capitals is a placeholder.
PLACEHOLDER_WORDS = frozenset({
    "COL", "COMMAND", "DIR", "FACTOR", "FILE", "HOST", "KEY", "NAME", "OUT", "PATH", "PORT", "PRESET", "RUN", "RUNG",
    "SECTION", "VALUE",
})
_MARKS = re.compile(r"<[^<>\s][^<>]*>|\$\{[^}]*\}|\$[A-Za-z_]\w*|\.\.\.|…")  # <dir>, ${mode}, $pair, elision
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEPARATORS = re.compile(r"^(?:file://|kafka://)?[\s:,@=/.+-]*$")
ELISION = frozenset({"...", "…"})
SEPARATORS = frozenset({"&&", "||", ";", ";;", "|", "&", "(", ")", "|&"})
PREFIX_WORDS = frozenset({"do", "then", "else", "time", "nohup", "exec", "!", "sudo"})
# Flags whose value a command writes, not reads: its path need not exist yet.
OUTPUT_OPTIONS = frozenset({"--out", "--to", "--output", "--replay-cache", "--data-dir", "--storage.tsdb.path"})
INPUT_SUFFIXES = (".toml", ".py", ".sh", ".yml", ".yaml", ".csv", ".tsv", ".parquet")
TRACKED_TOP = frozenset(p.name for p in ROOT.iterdir() if not p.name.startswith(".")) - {"runs"}


def _placeholder_parts(token: str) -> tuple[str, bool]:
    """``token`` without its placeholders, and whether it had any."""
    rest = _MARKS.sub(" ", token)
    rest = _WORD.sub(lambda m: " " if m.group(0) in PLACEHOLDER_WORDS or re.fullmatch("[A-Z]", m.group(0))
                     else m.group(0), rest)
    return rest, rest != token


def is_placeholder(token: str) -> bool:
    """Whether ``token`` is made of placeholders only (and separators: ``HOST:PORT``, ``file://PATH``, ``A,B``)."""
    rest, had = _placeholder_parts(token)
    return had and bool(_SEPARATORS.match(rest))


def has_placeholder(token: str) -> bool:
    """Whether ``token`` has a placeholder anywhere (``/tmp/kr/${mode}``, ``runs/demo-<timestamp>``)."""
    return _placeholder_parts(token)[1]


# ---------------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Snippet:
    """Shell text of a document: a logical line of a code block, or one inline code span."""

    path: Path
    line: int
    text: str
    inline: bool

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def _fence(line: str) -> str | None:
    m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
    return m.group(2).lower() if m else None


def snippets(path: Path) -> Iterator[Snippet]:
    """The shell text of one Markdown document, with line numbers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fence: str | None = None
    prose: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None  # a code line continued with a backslash
    previous_blank_or_code = True
    for number, line in enumerate(lines, start=1):
        info = _fence(line)
        if fence is not None:
            if info is not None and not info:
                fence = None
            elif fence in SHELL_FENCES:
                if fence == "console":
                    if not line.lstrip().startswith("$ "):
                        continue
                    line = line.lstrip()[2:]
                pending = yield from _code_line(path, number, line, pending)
            continue
        if info is not None:
            yield from _inline(path, prose)
            prose, fence, pending = [], info, None
            continue
        if line.startswith("    ") and (previous_blank_or_code or pending) and not prose:
            pending = yield from _code_line(path, number, line, pending)
            previous_blank_or_code = True
            continue
        previous_blank_or_code = not line.strip()
        if line.strip():
            prose.append((number, line))
        else:
            yield from _inline(path, prose)
            prose = []
    yield from _inline(path, prose)


def _code_line(path: Path, number: int, line: str, pending: tuple[int, str] | None
               ) -> Generator[Snippet, None, tuple[int, str] | None]:
    """The snippet a code line ends (none when it ends with a backslash); returns the text still pending."""
    start, text = pending if pending else (number, "")
    text += line.strip()
    if text.endswith("\\"):
        return (start, text[:-1] + " ")
    yield Snippet(path, start, text, inline=False)
    return None


def toml_snippets(path: Path) -> Iterator[Snippet]:
    """The commands in a TOML file's comments: a whole comment line that is a command, and inline code."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        comment = line.strip()[1:].strip() if line.strip().startswith("#") else ""
        if not comment and " #" in line:
            comment = line.split(" #", 1)[1]  # after a value; TOML strings of these files hold no " #"
        if _MENTIONS.match(comment):
            yield Snippet(path, number, comment, inline=False)
        for span in re.findall(r"`([^`]+)`", comment):
            yield Snippet(path, number, span, inline=True)


def _inline(path: Path, paragraph: list[tuple[int, str]]) -> Iterator[Snippet]:
    """The inline code spans of a paragraph (a span may run over a line break)."""
    if not paragraph:
        return
    text = "\n".join(line for _, line in paragraph)
    starts = [0]
    for _, line in paragraph:
        starts.append(starts[-1] + len(line) + 1)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        index = max(i for i, s in enumerate(starts[:-1]) if s <= m.start())
        yield Snippet(path, paragraph[index][0], m.group(1).replace("\\|", "|").replace("\n", " "), inline=True)


# ------------------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """One invocation a document shows: ``kind`` is crossdistil, python-script, python-module or bash."""

    where: str
    kind: str
    argv: tuple[str, ...]
    text: str
    fragment: bool
    synopsis: bool = False

    @property
    def id(self) -> str:
        return f"{self.where} {self.kind} {' '.join(self.argv[:1])}".strip()


_MENTIONS = re.compile(r"(?<![\w.-])(crossdistil|consumers\.cli|python3?|bash)(?![\w-])")


def commands(snippet: Snippet) -> Iterator[Command | tuple[str, str]]:
    """The commands in ``snippet``; a ``(where, problem)`` pair for text that mentions one but is not shell."""
    if not _MENTIONS.search(snippet.text):
        return
    message = re.match(r"^(?:\S*/)?crossdistil ([a-z]+):", snippet.text)
    if message and message.group(1) in COMMANDS:
        return  # "crossdistil serve: following ...": a message of the program, quoted
    if snippet.inline and re.search(r"[\[|]", snippet.text):
        yield from _synopsis(snippet)
        return
    text = _MARKS.sub(lambda m: m.group(0) if m.group(0) in ELISION else "PATH", snippet.text)  # <a b> is one word
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:
        yield snippet.where, f"{snippet.text!r} does not split as a shell command: {exc}"
        return
    for words in _simple_commands(tokens):
        command = _classify(snippet, words)
        if command is not None:
            yield command


def _simple_commands(tokens: list[str]) -> Iterator[list[str]]:
    """Each simple command's words, redirections left out."""
    words: list[str] = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in SEPARATORS:
            yield words
            words = []
        elif set(token) <= set("<>&|") and ("<" in token or ">" in token):
            if words and words[-1].isdigit():
                words.pop()  # 2>&1
            skip = not token.endswith("&")
        else:
            words.append(token)
    yield words


def _classify(snippet: Snippet, words: list[str]) -> Command | None:
    """The command a simple command's ``words`` are, if it is one this test checks."""
    while words and (words[0] in PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
        words = words[1:]  # shell keywords, VAR=value
    if not words:
        return None
    fragment = snippet.inline
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "consumers.cli":
        argv = words[words.index("-m") + 2:]
        if snippet.inline and not argv:
            return None  # "`python3 -m consumers.cli` is the `crossdistil` entry point"
        return Command(snippet.where, "crossdistil", tuple(argv), snippet.text, fragment)
    program = Path(words[0]).name
    if program == "crossdistil":
        if snippet.inline and len(words) == 1:
            return None  # the program's (or the rung's) name in prose, not an invocation
        return Command(snippet.where, "crossdistil", tuple(words[1:]), snippet.text, fragment)
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[2:] if rest[0] in ("-X", "-W") else rest[1:]
        if not rest:
            return None  # the interpreter alone
        if rest[0] == "-m":
            return Command(snippet.where, "python-module", tuple(rest[1:]), snippet.text, fragment)
        return Command(snippet.where, "python-script", tuple(rest), snippet.text, fragment)
    if program in ("bash", "sh"):
        rest = [w for w in words[1:] if not w.startswith("-")]
        return Command(snippet.where, "bash", tuple(rest[:1]), snippet.text, fragment) if rest else None
    return None


def _synopsis(snippet: Snippet) -> Iterator[Command]:
    """``crossdistil kafka up|down|status [--port P]``: its subcommand and the flags it names."""
    invocation = re.search(r"(?<![\w./-])(?:\S*/)?crossdistil\s+(\w.*)", snippet.text)
    if invocation:  # not `crossdistil[peers]` (a package's extra) nor `mtl|crossdistil` (rungs)
        words = invocation.group(1).replace("[", " ").replace("]", " ").replace("|", " | ").split()
        yield Command(snippet.where, "crossdistil", tuple(words), snippet.text, True, synopsis=True)


def command_table(path: Path) -> Iterator[Command]:
    """A table headed ``| command | ...`` (the README's list of subcommands) has ``crossdistil`` left out of its
    first column: each row is the synopsis of that column's code, plus the flags its other columns name."""
    lines = path.read_text(encoding="utf-8").splitlines()
    in_table = False
    for number, line in enumerate(lines, start=1):
        if re.match(r"^\|\s*command\s*\|", line):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not re.match(r"^\|[\s|:-]*$", line):
            first, *others = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            synopsis = " ".join(re.findall(r"`([^`]+)`", first)).replace("\\|", "|")
            flags = [m for cell in others for m in re.findall(r"(?<![\w-])--[a-z][\w-]*", cell)]
            if synopsis:
                snippet = Snippet(path, number, f"crossdistil {synopsis} [{' '.join(flags)}]", inline=True)
                yield from _synopsis(snippet)


def documented_commands(documents: list[Path] = DOCUMENTS + CONFIG_EXAMPLES
                        ) -> tuple[list[Command], list[tuple[str, str]]]:
    """Every command of every document, and the shell text that could not be read as commands."""
    found: list[Command] = []
    unreadable: list[tuple[str, str]] = []
    for path in documents:
        for snippet in toml_snippets(path) if path.suffix == ".toml" else snippets(path):
            for item in commands(snippet):
                (found if isinstance(item, Command) else unreadable).append(item)
        found += command_table(path)
    return found, unreadable


# -------------------------------------------------------------------------------------------------------- parsers


class _AnyPlaceholder(list):
    """An option's choices, plus any placeholder (``--device D``)."""

    def __contains__(self, value: object) -> bool:
        return (isinstance(value, str) and is_placeholder(value)) or super().__contains__(value)


def _placeholder_or(convert: Any) -> Any:
    @functools.wraps(convert)
    def accept(text: str) -> Any:
        return text if is_placeholder(text) else convert(text)
    return accept


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _subparsers(sub)


def _for_docs(parser: argparse.ArgumentParser, fragment: bool) -> argparse.ArgumentParser:
    """``parser`` changed in place so that placeholders pass, and (``fragment``) nothing is required."""
    for p in _subparsers(parser):
        for action in p._actions:
            if callable(action.type):
                action.type = _placeholder_or(action.type)
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                action.choices = _AnyPlaceholder(action.choices)
            if fragment:
                action.required = False
                if not action.option_strings and action.nargs in (None, "+"):
                    action.nargs = "?" if action.nargs is None else "*"
        if fragment:
            for group in p._mutually_exclusive_groups:
                group.required = False
    return parser


@functools.cache
def cli_parser(fragment: bool) -> argparse.ArgumentParser:
    return _for_docs(build_parser(), fragment)


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """``parser.parse_args(argv)`` without exiting: the namespace (None after --help), or argparse's error."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(argv), None
        except SystemExit as exc:
            if exc.code == 0:
                return None, None  # --help
            lines = err.getvalue().strip().splitlines()
            return None, lines[-1] if lines else f"exit status {exc.code}"


_ARGPARSE_NAMES = {"REMAINDER": argparse.REMAINDER, "SUPPRESS": argparse.SUPPRESS, "OPTIONAL": argparse.OPTIONAL,
                   "ZERO_OR_MORE": argparse.ZERO_OR_MORE, "ONE_OR_MORE": argparse.ONE_OR_MORE}
_TYPES = {"int": int, "float": float, "str": str}


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Attribute) and node.attr in _ARGPARSE_NAMES:
        return _ARGPARSE_NAMES[node.attr]
    return ast.literal_eval(node)


@functools.cache
def script_parser(path: Path, fragment: bool) -> argparse.ArgumentParser | None:
    """A parser with the flags of the script's own ``add_argument`` calls (literal settings kept, the rest left out);
    None when the script does not use argparse."""
    source = path.read_text(encoding="utf-8")
    if "argparse" not in source:
        return None
    parser = argparse.ArgumentParser(prog=str(path.relative_to(ROOT)), conflict_handler="resolve")
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        settings: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg == "type" and isinstance(keyword.value, ast.Name):
                if keyword.value.id in _TYPES:
                    settings["type"] = _TYPES[keyword.value.id]
            elif keyword.arg in ("action", "nargs", "choices", "dest", "required", "const"):
                with contextlib.suppress(ValueError):
                    settings[keyword.arg] = _literal(keyword.value)
        if settings.get("action") not in (None, "store", "append") and "nargs" in settings:
            del settings["nargs"]
        parser.add_argument(*names, **settings)
    return _for_docs(parser, fragment)


# --------------------------------------------------------------------------------------------------------- checks


def _option_values(argv: tuple[str, ...]) -> Iterator[tuple[str | None, str]]:
    """Each argument with the option it is the value of (None for an option itself or a positional)."""
    previous: str | None = None
    for word in argv:
        if word.startswith("--") and "=" in word:
            flag, value = word.split("=", 1)
            yield flag, value
            previous = None
        elif word.startswith("-") and not re.fullmatch(r"-\d.*", word):
            yield None, word
            previous = word
        else:
            yield previous, word
            previous = None


def missing_paths(argv: tuple[str, ...]) -> list[str]:
    """The repository paths ``argv`` reads that do not exist."""
    missing = []
    for option, value in _option_values(argv):
        if option in OUTPUT_OPTIONS or has_placeholder(value) or value.startswith("-"):
            continue
        for candidate in {value, value.split("=", 1)[-1]}:
            candidate = candidate.removeprefix("file://")
            if candidate.startswith(("/", "~", "..", "$")) or not candidate:
                continue
            top = candidate.split("/", 1)[0]
            looks_like_path = ("/" in candidate and top in TRACKED_TOP) or candidate.endswith(INPUT_SUFFIXES)
            if looks_like_path and not (ROOT / candidate).exists():
                missing.append(candidate)
    return missing


def _config_problems(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Each ``--config`` file of a parsed crossdistil command loaded with the ``--set`` overrides; what failed."""
    sub = next(p for p in _subparsers(parser) if p is not parser and p.prog.split()[-1] == args.command)
    options = sub._option_string_actions
    if "--config" not in options:
        return []
    files = getattr(args, options["--config"].dest) or []
    overrides = getattr(args, options["--set"].dest, []) if "--set" in options else []
    if any(has_placeholder(o) for o in overrides):
        overrides = []
    problems = []
    for file in [files] if isinstance(files, str) else files:
        if has_placeholder(file) or not (ROOT / file).exists():
            continue  # a placeholder, or reported as a missing path
        try:
            load_config(ROOT / file, env={}, overrides=overrides)
        except ConfigError as exc:
            problems.append(f"{file} does not load: {exc}")
    return problems


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices.get(name)


def _takes_value(parser: argparse.ArgumentParser | None, word: str | None) -> bool:
    """Whether ``word`` is a flag of ``parser`` (or of its subcommands) that takes a value."""
    if parser is None or word is None or not word.startswith("-"):
        return False
    actions = [p._option_string_actions[word] for p in _subparsers(parser) if word in p._option_string_actions]
    return any(action.nargs != 0 for action in actions)


def elided(parser: argparse.ArgumentParser | None, argv: list[str], fragment: bool) -> tuple[list[str], bool]:
    """``argv`` as the parser should see it, and whether it is a fragment: an elision standing for more arguments
    is dropped (``... --out DIR``; one in a flag's place is that flag's value), and a fragment's last flag may go
    without its value ("`crossdistil evaluate --cadence`" names the flag)."""
    kept: list[str] = []
    for word in argv:
        if word in ELISION and not _takes_value(parser, kept[-1] if kept else None):
            fragment = True
            continue
        kept.append(word)
    if fragment and kept and _takes_value(parser, kept[-1]):
        kept.append("VALUE")
    return kept, fragment


def _synopsis_problems(command: Command) -> list[str]:
    name = command.argv[0]
    if name not in COMMANDS:
        return [f"no subcommand {name!r} (crossdistil has {', '.join(COMMANDS)})"]
    parser = cli_parser(fragment=True)
    sub = next(p for p in _subparsers(parser) if p is not parser and p.prog.split()[-1] == name)
    known = {flag for p in _subparsers(sub) for flag in p._option_string_actions}
    flags = {w.split("=", 1)[0].rstrip(",.;:)") for w in command.argv if w.startswith("--")}
    return [f"crossdistil {name} has no flag {flag}" for flag in sorted(flags - known)]


def crossdistil_problems(command: Command) -> list[str]:
    """What is wrong with a ``crossdistil ...`` command of the docs (empty: nothing)."""
    argv = list(command.argv)
    if not argv:
        return ["'crossdistil' with no subcommand"]
    if command.synopsis:
        return _synopsis_problems(command)
    problems = [f"{p} does not exist in the repository" for p in missing_paths(tuple(argv))]
    names = list(COMMANDS) if is_placeholder(argv[0]) else [argv[0]]  # crossdistil COMMAND --help
    for name in names:
        rest, fragment = elided(_subcommand(cli_parser(False), name), argv[1:], command.fragment)
        parser = cli_parser(fragment)
        args, error = parse(parser, [name, *rest])
        if error:
            problems.append(error)
        elif args is not None:
            problems += _config_problems(parser, args) + _mapping_problems(args) + _value_problems(args)
    return problems


def _mapping_problems(args: argparse.Namespace) -> list[str]:
    """A ``--mapping FILE`` (the csv adapter's column mapping) read with the adapter's own loader."""
    mapping = getattr(args, "mapping", None)
    if not isinstance(mapping, str) or has_placeholder(mapping) or not (ROOT / mapping).is_file():
        return []  # none, a placeholder, or reported as a missing path
    try:
        load_mapping(ROOT / mapping)
    except MappingError as exc:
        return [f"{mapping} does not load as a column mapping: {exc}"]
    return []


def _value_problems(args: argparse.Namespace) -> list[str]:
    """What ``crossdistil evaluate`` would refuse, before reading any data, in the values of its list flags (its own
    parsers: they run in ``run``, not in argparse; ``--configs`` needs torch, see the slow test below)."""
    if args.command != "evaluate":
        return []
    parsers = {"backbone": lambda v: parse_list(v, BACKBONES, "--backbone"), "seeds": parse_seeds,
               "cadence": parse_cadence}
    problems = []
    for dest, parse_value in parsers.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not has_placeholder(value):
            try:
                parse_value(value)
            except ValueError as exc:
                problems.append(f"crossdistil evaluate: {exc}")
    return problems


def script_problems(command: Command) -> list[str]:
    """What is wrong with a ``python SCRIPT ...`` or ``python -m MODULE`` or ``bash SCRIPT`` command."""
    argv = list(command.argv)
    if command.kind == "python-module":
        module = argv[0] if argv else ""
        if module.split(".")[0] in TRACKED_TOP:
            exists = importlib.util.find_spec(module) is not None
        else:
            exists = importlib.util.find_spec(module.split(".")[0]) is not None
        return [] if exists else [f"no module {module!r} to run with python -m"]
    script = argv[0]
    if has_placeholder(script):
        return []
    if not (ROOT / script).is_file():
        return [f"{script} does not exist in the repository"]
    problems = [f"{p} does not exist in the repository" for p in missing_paths(tuple(argv[1:]))]
    if command.kind == "python-script" and script.endswith(".py"):
        rest, fragment = elided(script_parser(ROOT / script, False), argv[1:], command.fragment)
        parser = script_parser(ROOT / script, fragment)
        if parser is not None:
            _, error = parse(parser, rest)
            if error:
                problems.append(error)
    return problems


def problems_of(command: Command) -> list[str]:
    if command.kind == "crossdistil":
        return crossdistil_problems(command)
    return script_problems(command)


# ---------------------------------------------------------------------------------------------------------- tests

COMMANDS_FOUND, UNREADABLE = documented_commands()

# Commands that are wrong in files this test's owner may not edit, each with why; the test fails when one of them
# works again (strict xfail), so the list cannot go stale. Keyed by document and a piece of the command's text.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}


def _known(command: Command) -> str | None:
    path = command.where.rsplit(":", 1)[0]
    return next((why for (doc, piece), why in KNOWN_BROKEN.items() if doc == path and piece in command.text), None)


def _params() -> list[Any]:
    params = []
    for command in COMMANDS_FOUND:
        why = _known(command)
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        params.append(pytest.param(command, id=command.id, marks=marks))
    return params


@pytest.mark.parametrize("command", _params())
def test_documented_command_works(command: Command) -> None:
    problems = problems_of(command)
    assert not problems, f"{command.where}: {command.text!r}:\n  " + "\n  ".join(problems)


def test_every_shell_snippet_that_names_a_command_reads_as_shell() -> None:
    assert not UNREADABLE, "\n".join(f"{where}: {problem}" for where, problem in UNREADABLE)


# Repository paths the docs' code names that do not exist, in files this test's owner may not edit.
KNOWN_MISSING: dict[tuple[str, str], str] = {}


def named_paths(documents: list[Path] = DOCUMENTS + CONFIG_EXAMPLES) -> Iterator[tuple[str, str]]:
    """``(file:line, path)`` of each file or folder of the repository that the documents' code names."""
    for document in documents:
        for snippet in toml_snippets(document) if document.suffix == ".toml" else snippets(document):
            for word in re.split(r"[\s`'\"(),;<>=|\[\]]+", snippet.text):
                word = word.removeprefix("file://").rstrip(".:")
                if has_placeholder(word) or re.search(r"[*{}$]", word) or "/" not in word:
                    continue
                if word.split("/", 1)[0] in TRACKED_TOP:
                    yield snippet.where, re.sub(r"(::.*|:\d+|#.*)$", "", word)  # a test id, a line, an anchor


def test_every_repository_path_the_docs_name_in_code_exists() -> None:
    missing = [(where, path) for where, path in named_paths() if not (ROOT / path).exists()
               and (where.rsplit(":", 1)[0], path) not in KNOWN_MISSING]
    assert not missing, "\n".join(f"{where}: {path} does not exist in the repository" for where, path in missing)
    for doc, path in KNOWN_MISSING:
        assert any(w.rsplit(":", 1)[0] == doc and p == path for w, p in named_paths()) and not (ROOT / path).exists(), (
            f"KNOWN_MISSING names {doc}: {path}, which is no longer missing there: remove it")


def test_every_known_broken_command_is_still_in_the_docs() -> None:
    for (doc, piece), why in KNOWN_BROKEN.items():
        assert any(c.where.rsplit(":", 1)[0] == doc and piece in c.text for c in COMMANDS_FOUND), (
            f"KNOWN_BROKEN names {doc}: {piece!r} ({why}), which no document shows any more: remove it")


def test_the_readme_starts_with_setup_then_demo_then_tests() -> None:
    readme = [c for c in COMMANDS_FOUND if c.where.startswith("README.md:") and not c.fragment]
    assert [(c.kind, c.argv) for c in readme[:4]] == [
        ("bash", ("deploy/setup.sh",)), ("crossdistil", ("demo",)),
        ("bash", ("deploy/setup.sh",)), ("python-module", ("pytest",)),
    ]


@pytest.mark.slow
def test_documented_model_configurations_are_ones_the_commands_accept() -> None:
    """What the commands check once torch is loaded (~4 s here), before any data is read: evaluate's ``--configs``
    names, and the model of every configuration a trainer or a backtest of the docs is given (its rung, backbone
    and options, as ``crossdistil train`` checks them at start)."""
    from consumers.runtime.assembly import model_config
    from consumers.tools.backtest import build_configs
    from consumers.tools.evaluate import parse_configs

    problems = []
    for command in COMMANDS_FOUND:
        if command.kind != "crossdistil" or command.synopsis or _known(command):
            continue
        rest, fragment = elided(_subcommand(cli_parser(False), command.argv[0]), list(command.argv[1:]),
                                command.fragment)
        args, error = parse(cli_parser(fragment), [command.argv[0], *rest])
        if args is None or error:
            continue  # reported by test_documented_command_works
        try:
            if args.command == "evaluate" and args.configs and not has_placeholder(args.configs):
                parse_configs(args.configs)
            files = [] if args.command not in ("train", "backtest") else (
                [args.config] if args.command == "train" and args.config else getattr(args, "configs_files", []))
            if any(has_placeholder(f) or not (ROOT / f).exists() for f in files):
                continue
            if args.command == "backtest" and not has_placeholder(args.rungs or ""):
                configs = build_configs([str(ROOT / f) for f in files], args.rungs, [])
            else:
                configs = {f: load_config(ROOT / f, env={}) for f in files}
            for cfg in configs.values():
                model_config(cfg)
        except (ValueError, TypeError) as exc:
            problems.append(f"{command.where}: {command.text!r}: {exc}")
    assert not problems, "\n".join(problems)


def test_placeholders_are_the_listed_forms_only() -> None:
    placeholders = ["DIR", "HOST:PORT", "file://PATH", "<dir>", "$pair", "${mode}", "...", "…", "A,B", "RUNG@PRESET"]
    values = ["SASL_SSL", "SCRAM-SHA-512", "mtl", "deploy/trainer.example.toml", "2026-11-01T00:00Z", "DIRS"]
    assert [is_placeholder(t) for t in placeholders] == [True] * len(placeholders)
    assert [is_placeholder(t) for t in values] == [False] * len(values)


BROKEN_DOC = """# A page with one broken command of each kind

```bash
crossdistil train --config deploy/trainer.example.toml --no-such-flag
crossdistil evaluate --dataset kuairand --tasks click --mode sideways --out runs/x
crossdistil stream --source ../shared/data/kuairand --to file:///tmp/x.evlog
crossdistil serve --config deploy/nowhere.toml
crossdistil train --config deploy/trainer.example.toml --set model.seed=zero
crossdistil evaluate --dataset kuairand --tasks click --backbone transformer --out runs/x
python bench/run_all.py --no-such-flag
bash deploy/no_such_script.sh
crossdistil --dataset kuairand ...
```

Inline, `crossdistil backtest --no-such-flag` and `crossdistil inspect checkpoints DIR [--no-such-flag]` are wrong,
`crossdistil evaluate --seeds N` and `crossdistil backtest --kafka HOST:PORT ... --out DIR` are right.

| command | what it does |
|---|---|
| `demo [--ranks N]` | right |
| `demo [--out RUN]` | wrong: `--no-such-flag N` |
"""


def test_each_kind_of_broken_command_is_reported_with_its_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(BROKEN_DOC)
    found, unreadable = documented_commands([page])
    failing: dict[str, list[str]] = {}
    for command in found:
        failing.setdefault(command.where, []).extend(problems_of(command))
    assert not unreadable and len(found) == 15
    assert {where for where, problems in failing.items() if problems} == {
        f"{page}:{line}" for line in (4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 21)}
    failing = {where.rsplit(":", 1)[1]: problems for where, problems in failing.items()}
    assert "unrecognized arguments: --no-such-flag" in failing["4"][0]
    assert "invalid choice: 'sideways'" in failing["5"][0]
    assert "required: --dataset" in failing["6"][0]
    assert "deploy/nowhere.toml does not exist" in failing["7"][0]
    assert "does not load" in failing["8"][0] and "model.seed" in failing["8"][0]
    assert "--backbone: unknown ['transformer']" in failing["9"][0]
    assert "unrecognized arguments: --no-such-flag" in failing["10"][0]
    assert "deploy/no_such_script.sh does not exist" in failing["11"][0]
    assert "invalid choice" in failing["12"][0]
    assert len(failing["15"]) == 2 and all("--no-such-flag" in p for p in failing["15"])
    assert failing["16"] == failing["20"] == []
    assert failing["21"] == ["crossdistil demo has no flag --no-such-flag"]


def test_a_column_mapping_is_read_with_the_adapters_loader(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```\n"
                    "crossdistil stream --dataset csv --source /tmp/x.csv --mapping mappings/kuairand_pure.toml --to file://x\n"
                    "crossdistil stream --dataset csv --source /tmp/x.csv --mapping deploy/trainer.example.toml --to file://x\n"
                    "```\n")
    found, _ = documented_commands([page])
    assert [problems_of(c) for c in found][0] == []
    assert "deploy/trainer.example.toml does not load as a column mapping" in problems_of(found[1])[0]


def test_a_configuration_examples_comments_are_checked_too(tmp_path: Path) -> None:
    example = tmp_path / "trainer.toml"
    example.write_text("# crossdistil train --config deploy/trainer.example.toml --no-such-flag\n"
                       "[model]\n"
                       "seed = 0  # `crossdistil train --check-config` prints it, `crossdistil train --sed 1` no\n")
    found, _ = documented_commands([example])
    failing = [(c.where.rsplit(":", 1)[1], problems_of(c)) for c in found]
    assert [(line, bool(problems)) for line, problems in failing] == [("1", True), ("3", False), ("3", True)]
    assert "--no-such-flag" in failing[0][1][0] and "--sed" in failing[2][1][0]
