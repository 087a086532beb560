"""The committed backtest reports were made by the command their README gives, at the commit it names.

A user who copies a report's command should get the report: so the README's ``crossdistil backtest`` command is
the one the backtest recorded in the report's ``timing.json`` (``command``, written by the run itself), and the
README says which commit the figures were made at (``timing.json``'s ``code.commit``). Whether today's code still
gives the same figures is not checked here (each replay takes minutes); each README says what was compared.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ["backtest_kuairand", "backtest_kuairand_pure", "backtest_kuairand_pure/aux_tasks",
           "backtest_synthetic_drift"]


def code_lines(readme: Path) -> list[str]:
    """The indented code lines of a Markdown file, a line ending in a backslash joined with the next."""
    lines, pending = [], ""
    for line in readme.read_text(encoding="utf-8").splitlines():
        if not line.startswith("    "):
            pending = ""
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
            continue
        pending = ""
        lines.append(text)
    return lines


def readme_backtest_command(readme: Path) -> list[str]:
    """The one ``crossdistil backtest`` command of a report's README, split as a shell splits it."""
    found = [shlex.split(line) for line in code_lines(readme) if line.startswith("crossdistil backtest ")]
    assert len(found) == 1, f"{readme}: expected one 'crossdistil backtest' command, found {len(found)}"
    return found[0]


def timing(report: str) -> dict:
    return json.loads((ROOT / "reports" / report / "timing.json").read_text(encoding="utf-8"))


def test_code_lines_join_backslash_continuations_and_skip_prose(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("Made with:\n\n    crossdistil backtest --log a \\\n        --out b\n\nprose --out c\n")
    assert code_lines(readme) == ["crossdistil backtest --log a --out b"]


@pytest.mark.parametrize("report", REPORTS)
def test_a_backtest_report_was_made_by_the_command_its_readme_gives(report: str) -> None:
    recorded = shlex.split(timing(report)["command"])
    assert readme_backtest_command(ROOT / "reports" / report / "README.md") == recorded, (
        f"reports/{report}: the README's command is not the one that made the report (timing.json 'command'); "
        "run the README's command again with --out reports/" + report + ", or correct the README")


@pytest.mark.parametrize("report", REPORTS)
def test_a_backtest_report_readme_names_the_commit_its_figures_were_made_at(report: str) -> None:
    commit = timing(report)["code"]["commit"][:7]
    text = " ".join((ROOT / "reports" / report / "README.md").read_text(encoding="utf-8").split())
    assert f"Figures made at commit {commit}" in text, (
        f"reports/{report}/README.md does not say 'Figures made at commit {commit}' (timing.json's code.commit)")
