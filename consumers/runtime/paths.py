"""Output paths of the tools: refused before any work when they cannot become the folder a tool writes.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> check_output_folder(root / "new" / "out", "--out")  # a folder to be made: fine
>>> (root / "afile").write_text("x")
1
>>> check_output_folder(root / "afile" / "out", "--out")
Traceback (most recent call last):
...
ValueError: --out .../afile/out: .../afile is a file, not a folder
"""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(out: Path, option: str) -> None:
    """A ``ValueError`` naming ``option`` when ``out`` cannot be (or become) a writable folder: it, or the nearest of
    its parents that exists, is a file or not writable. A replay or an evaluation grid that runs for minutes
    must not find this out when it writes its results."""
    for path in (out, *out.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            raise ValueError(f"{option} {out}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {out}: {path} is not writable")
        return
