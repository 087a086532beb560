"""Docstring examples are specifications too: every example in the packages runs as a test."""

import doctest
import importlib
import pkgutil
import tempfile

import pytest

import consumers
import models
import streamer

pytestmark = pytest.mark.unit


def _modules() -> list[str]:
    names = []
    for package in (streamer, consumers, models):
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    # examples make their folders with tempfile.mkdtemp() (readable, no clean-up lines): here, in the test's tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
