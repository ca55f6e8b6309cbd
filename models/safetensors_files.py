"""A `save_pretrained` folder's safetensors files, one or several (`model.safetensors.index.json`), read by stored key:
headers only, or single tensors from only the files that hold them."""

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open as _safe_open

from models.errors import first_line

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


@contextlib.contextmanager
def safe_open(path: Path, framework: str):
    """safetensors' `safe_open`, its errors (a truncated or damaged file) as a ValueError naming the file."""
    try:
        with _safe_open(path, framework=framework) as f:
            yield f
    except SafetensorError as e:
        raise ValueError(
            f"{path} cannot be read ({first_line(e)}): the file is truncated or damaged; copy or download it again"
        ) from None


class SafetensorsFiles(contextlib.ExitStack):
    """The stored keys of a folder and the file of each (from the index, without opening any file when sharded).
    Used as a context: a file is opened the first time one of its tensors is read and stays open until the exit;
    `opened` names the files opened so far."""

    def __init__(self, model_dir: Path):
        super().__init__()
        self.model_dir, self.opened = model_dir, {}
        if (model_dir / INDEX).exists():
            self.weight_map: dict[str, str] = json.loads((model_dir / INDEX).read_text())["weight_map"]
        elif (model_dir / SINGLE).exists():
            with safe_open(model_dir / SINGLE, framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise FileNotFoundError(
                f"{model_dir} has no model.safetensors: re-save it with save_pretrained(safe_serialization=True)"
            )

    def _file(self, filename: str):
        if filename not in self.opened:
            self.opened[filename] = self.enter_context(safe_open(self.model_dir / filename, framework="pt"))
        return self.opened[filename]

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor `key`, read from its file alone."""
        return self._file(self.weight_map[key]).get_tensor(key)

    def shapes(self, keys: Iterable[str]) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(key, shape) of stored tensors, from the headers of their files only (seconds for any size)."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        for filename, names in by_file.items():
            with safe_open(self.model_dir / filename, framework="pt") as f:
                for key in names:
                    yield key, tuple(f.get_slice(key).get_shape())
