"""Data set adapters: every one yields time-ordered ``Interaction`` records (see ``base``).

``open_dataset(name, source, mapping=None, **options)`` is the one way in:

* ``kuairand``  — KuaiRand-27K subset; ``source`` is the .tsv or its folder (``kuairand.py``).
* ``icme2019``  — ICME 2019 track 2 / TikTok schema; a built-in mapping over ``csv`` (``icme2019.py``).
* ``csv``       — any CSV, TSV or Parquet file through a TOML mapping (``tabular.py``; ``mappings/*.toml``).
* ``synthetic`` — latent-factor generator; ``source`` is ignored, ``options`` configure it (``synthetic.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamer.datasets.base import Dataset, DatasetError, Interaction

DATASETS = ("kuairand", "icme2019", "csv", "synthetic")

__all__ = ["DATASETS", "Dataset", "DatasetError", "Interaction", "open_dataset"]


def open_dataset(name: str, source: str | Path | None, mapping: str | Path | dict[str, Any] | None = None,
                 **options: Any) -> Dataset:
    """Open the data set adapter ``name`` on ``source``; raises ``DatasetError`` with a clear message."""
    if name not in DATASETS:
        raise DatasetError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    if mapping is not None and name != "csv":
        raise DatasetError(f"data set '{name}' has its own columns: a mapping is for --dataset csv (drop --mapping, "
                           f"or use --dataset csv --mapping {mapping})")
    if name == "synthetic":
        # lazy: each adapter (numpy, pyarrow) loads when asked for
        from streamer.datasets.synthetic import open_synthetic

        return open_synthetic(**options)
    if options:
        raise DatasetError(f"data set '{name}' takes no options (got {', '.join(sorted(options))})")
    if source is None:
        raise DatasetError(f"data set '{name}' needs --source PATH")
    if not Path(source).exists():
        raise DatasetError(f"source {source} does not exist")
    if name == "kuairand":
        from streamer.datasets.kuairand import KuaiRand  # lazy: each adapter (numpy, pyarrow) loads when asked for

        return KuaiRand(source)
    if name == "icme2019":
        from streamer.datasets.icme2019 import open_icme2019  # lazy: each adapter (numpy, pyarrow) loads when asked for

        return open_icme2019(source)
    if name == "csv":
        from streamer.datasets.tabular import open_tabular  # lazy: each adapter (numpy, pyarrow) loads when asked for

        return open_tabular(source, mapping)
    raise DatasetError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
