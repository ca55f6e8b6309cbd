"""Benchmarks: scripts that print markdown tables (results and history in docs/performance.md)."""

import os
import tempfile
from pathlib import Path


def fresh_work_dir(name: str) -> Path:
    """A new folder for one benchmark invocation, holding every cache it uses: the packed-data cache
    (`PIPEGPT_CACHE`) and the `datasets` cache (`HF_DATASETS_CACHE`, where `map` results of a source are kept
    and found again by a later run), for this process and the ranks it starts. Nothing is read warm."""
    import datasets

    work = Path(tempfile.mkdtemp(prefix=f"pipegpt_{name}_"))
    os.environ["PIPEGPT_CACHE"] = str(work / "cache")
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets")  # read at import: for the ranks started from here
    datasets.disable_caching()  # this process imported datasets already: its map results are not reused
    print(f"fresh caches in {work} (nothing is read from ~/.cache/pipegpt or the datasets cache)", flush=True)
    return work
