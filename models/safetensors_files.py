"""A `save_pretrained` folder's safetensors files, one or several (`model.safetensors.index.json`), read by stored key:
headers only, or single tensors from only the files that hold them."""

import contextlib
import hashlib
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
    Used as a context: a file is opened the first time one of its tensors or headers is read and stays open until
    the exit; `opened` holds the files opened so far, by name."""

    def __init__(self, model_dir: Path):
        super().__init__()
        self.model_dir, self.opened = model_dir, {}
        if (model_dir / INDEX).exists():
            self.weight_map: dict[str, str] = json.loads((model_dir / INDEX).read_text())["weight_map"]
        elif (model_dir / SINGLE).exists():
            self.weight_map = dict.fromkeys(self._file(SINGLE).keys(), SINGLE)
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
            for key in names:
                yield key, tuple(self._file(filename).get_slice(key).get_shape())


def weights_fingerprint(model_dir: Path) -> str:
    """A digest that tells pretrained models apart in seconds, whatever their size: every safetensors file's header
    (names, shapes, dtypes, offsets) and, of every tensor, 4 KiB from the start, the middle and the end of its
    data (~12 KiB per tensor: seconds for 70B). Two fine-tunes of one architecture share headers but not the data
    of any tensor they trained, so a LoRA checkpoint is not resumed on the wrong base unnoticed. (A change of a
    few weights outside the sampled bytes would go unseen: a full hash of 140 GB would cost minutes per launch.)"""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = f.read(header_size)
            digest.update(header)
            for name, entry in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                start, stop = entry["data_offsets"]
                for offset in sorted({start, (start + stop) // 2, max(start, stop - 4096)}):
                    f.seek(8 + header_size + offset)
                    digest.update(f.read(min(4096, stop - offset)))
    return digest.hexdigest()[:32]
