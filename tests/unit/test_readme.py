"""The README's configuration reference is the one generated from the schema."""

import re
from pathlib import Path

import pytest

from consumers.runtime.config import model_options_markdown, reference_markdown

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_reference_matches_the_schema():
    text = README.read_text()
    block = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", text, re.S)
    assert block, "README.md lost its config-reference markers"
    assert block.group(1) == reference_markdown() + "\n\n" + model_options_markdown(), (
        "README.md's configuration reference is stale: paste the output of 'python -m consumers.runtime.config'")


def test_readme_starts_with_the_two_setup_commands_that_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash deploy/setup.sh && .venv/bin/crossdistil demo" in text
    assert "bash deploy/setup.sh && .venv/bin/python -m pytest" in text
    assert ".venv/bin/python -m pytest" in ci and "bash deploy/setup.sh" in ci
