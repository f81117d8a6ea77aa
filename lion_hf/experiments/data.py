"""Sentiment-classification data for the recipes: Hub tasks, local files, and an offline default.

:func:`load_sentiment_data` returns a :class:`SentimentData`: a ``datasets.DatasetDict`` with
``"train"`` and ``"validation"`` splits whose columns are exactly ``text`` (str) and ``label``
(int ``0..K-1``, a ``ClassLabel``), plus the label names and a description of the source.
Sources, first match wins:

1. ``train_file`` (and optionally ``validation_file``): local files.
2. ``data_dir``: a folder with ``train.*`` and ``validation.*`` (or ``dev.*``, or ``test.*``)
   files; a folder holding a single data file (any name) is split like a lone ``train_file``.
3. ``task``: a name from :data:`TASKS`, loaded from the Hugging Face Hub with
   ``datasets.load_dataset`` (needs the Hub or its local cache).
4. ``task=None`` or ``task="vader_movies"``: the offline default, :data:`DEFAULT_TASK`, whose data
   arrives through the Python package registry alone (see :func:`load_vader_movies`).

Local files are read by ``datasets.load_dataset`` ("csv", "json" or "parquet" with
``data_files=``, as transformers' ``run_glue.py`` does); on top, this module checks columns,
texts and labels and names the file, column and row of anything wrong. Formats by extension:
``.csv`` (standard CSV quoting), ``.tsv`` (tab-separated, read with ``csv.QUOTE_NONE``: quote
characters are ordinary text, as in SST-2 sentences), ``.json`` (a list of records, a dict of
columns, ``{"data": [records]}``, or JSON lines), ``.jsonl``, ``.parquet``. Delimited files have a
header row, unless ``column_names`` names their columns (header-less ``text<TAB>label`` files).
csv/tsv values are read as the strings written, so the label rules below see the file's text.
Text and label columns are auto-detected (:data:`TEXT_COLUMNS`, :data:`LABEL_COLUMNS`, exact
name first, then case-insensitive) unless named.

Labels: integers (also integer-valued floats and strings such as ``"1"``) are kept when they are
``0..K-1``; other integer sets (e.g. ``{1, 2}`` or ``{-1, 1}``) map their sorted unique values to
``0..K-1`` and keep the original values as names. String labels map their sorted unique names
(over train and validation together, so both splits share one mapping) to ``0..K-1``. Binary
``0/1`` labels are named ``negative``/``positive``. Fractional floats, missing values, lists and
the like raise ``ValueError`` naming the column and what was found.

Checks that stop a run that would train on the wrong thing (``ValueError`` naming the file, the column and
the values): a label in validation that never occurs in training; labels that differ only in case
(``Positive``/``positive``); a label column with more distinct values than half the training rows (no class
can be learnt from one or two rows: that is a text column, or swapped columns); a file that is not in its
encoding (``encoding``, UTF-8 by default; the error names the line and offers ``--encoding``). Warnings,
where the data may be meant so: labels that differ only by surrounding spaces (merged), a validation split
under :data:`SMALL_VALIDATION` rows.

When only one file is given, a seeded validation split (``validation_fraction``, stratified by
label) is drawn from it; ``max_train_samples``/``max_eval_samples`` keep a seeded random subset
(in file order). Both depend on ``seed`` only, so the same arguments give the same data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TASK",
    "LABEL_COLUMNS",
    "SUPPORTED_EXTENSIONS",
    "TASKS",
    "TEXT_COLUMNS",
    "SentimentData",
    "TaskSpec",
    "default_cache_dir",
    "load_sentiment_data",
    "load_vader_movies",
    "read_local_file",
    "tokenize_sentiment_data",
]

DEFAULT_TASK = "vader_movies"
TEXT_COLUMNS = ("text", "sentence", "review", "content")
LABEL_COLUMNS = ("label", "labels", "sentiment")
SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
VALIDATION_STEMS = ("validation", "dev", "test")  # in data_dir, the first one found is the validation split
BINARY_NAMES = ["negative", "positive"]
# Below this many validation rows one row moves the accuracy by more than a point, which is about the gap
# between optimizers a comparison has to resolve.
SMALL_VALIDATION = 100


@dataclass(frozen=True)
class TaskSpec:
    """A sentiment task on the Hugging Face Hub."""

    path: str  # Hub dataset id
    config: str | None
    text_column: str
    label_column: str
    train_split: str
    validation_split: str
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    # GLUE SST-2: the test split has no labels (-1), so the dev set ("validation") is the eval split.
    "sst2": TaskSpec("nyu-mll/glue", "sst2", "sentence", "label", "train", "validation", ("negative", "positive")),
    "imdb": TaskSpec("stanfordnlp/imdb", None, "text", "label", "train", "test", ("neg", "pos")),
    "rotten_tomatoes": TaskSpec(
        "cornell-movie-review-data/rotten_tomatoes", None, "text", "label", "train", "validation", ("neg", "pos")
    ),
    # Hub class names are "1" (negative) and "2" (positive), the original star buckets.
    "yelp_polarity": TaskSpec(
        "fancyzhx/yelp_polarity", None, "text", "label", "train", "test", ("negative", "positive")
    ),
    "tweet_eval": TaskSpec(
        "cardiffnlp/tweet_eval",
        "sentiment",
        "text",
        "label",
        "train",
        "validation",
        ("negative", "neutral", "positive"),
    ),
}


@dataclass
class SentimentData:
    """Train and validation splits (columns ``text``, ``label``) with their label names."""

    dataset: Any  # datasets.DatasetDict with "train" and "validation"
    label_names: list[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def train(self):
        return self.dataset["train"]

    @property
    def validation(self):
        return self.dataset["validation"]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.dataset.items())
        return f"SentimentData({sizes}, label_names={self.label_names}, source={self.source!r})"


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def _python_encoding(encoding: str) -> str:
    """UTF-8 files may start with a byte-order mark (Excel writes one): read them as utf-8-sig."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def check_encoding(path: str | os.PathLike, encoding: str = "utf-8") -> None:
    """A ``ValueError`` naming the file, line, column and bytes if ``path`` is not text in ``encoding``."""
    import codecs

    path = Path(path)
    try:
        codec = codecs.lookup(_python_encoding(encoding))
    except LookupError:
        raise ValueError(f"--encoding {encoding!r}: no such text encoding (e.g. utf-8, latin-1, cp1252)") from None
    decoder = codec.incrementaldecoder("strict")
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode(codec.name)
        except UnicodeDecodeError as exc:
            bad = line[exc.start: exc.end + 3]
            raise ValueError(
                f"{path}: not {encoding} text: line {number}, column {exc.start + 1} holds the bytes {bad!r}. If the "
                f"file is in another encoding, name it with --encoding (encoding= in Python), e.g. --encoding cp1252 "
                f"(Windows) or --encoding latin-1"
            ) from None
    raise ValueError(f"{path}: not {encoding} text (it ends inside a character)")


def _string_features(path: Path, delimiter: str, quoting: int, column_names: Sequence[str] | None,
                     encoding: str = "utf-8"):
    """Every column as a string, as written: no type guessing per chunk (which would disagree
    between chunks of a large file), and the label checks below see exactly the file's text."""
    from datasets import Features, Value

    if column_names is None:
        import pandas as pd

        try:
            header = pd.read_csv(path, sep=delimiter, quoting=quoting, nrows=0, encoding=_python_encoding(encoding))
            column_names = list(header.columns)
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path}: the file is empty (no header row, no data)") from None
    return Features({name: Value("string") for name in column_names})


_RAGGED_ROW = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _load_dataset(builder: str, path: Path, **kwargs: Any):
    """``datasets.load_dataset(builder, data_files=path, split="train")``, its errors as ValueErrors naming the file."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # a header and no rows, or "[]"
            raise ValueError(f"{path}: the file is empty (no data rows)") from exc
        raise ValueError(f"{path}: could not read it as {builder}: {exc}") from exc
    except StopIteration as exc:  # datasets' JSON reader on a file with no bytes
        raise ValueError(f"{path}: the file is empty") from exc
    except Exception as exc:  # datasets wraps the reader's error (pandas, pyarrow) in DatasetGenerationError
        cause = exc.__cause__ or exc
        ragged = _RAGGED_ROW.search(str(cause))
        if ragged:  # pandas' "Expected 2 fields in line 3, saw 3", said the way a user can act on
            expected, line, found = ragged.groups()
            raise ValueError(
                f"{path}, line {line}: {found} fields where {expected} were expected; a stray delimiter or quote?"
            ) from exc
        raise ValueError(f"{path}: could not read it as {builder}: {type(cause).__name__}: {cause}") from exc


def _delimited(path: Path, delimiter: str, quoting: int, column_names: Sequence[str] | None, encoding: str = "utf-8"):
    check_encoding(path, encoding)
    features = _string_features(path, delimiter, quoting, column_names, encoding)
    kwargs: dict[str, Any] = dict(
        delimiter=delimiter, quoting=quoting, features=features, encoding=_python_encoding(encoding),
        keep_default_na=False,  # "NA" or "null" in a sentence is text; an empty label is caught below
    )
    if column_names is not None:
        kwargs.update(header=None, column_names=list(column_names))
    return _load_dataset("csv", path, **kwargs)


def _json(path: Path, encoding: str = "utf-8"):
    check_encoding(path, encoding)
    kwargs = {} if _python_encoding(encoding) == "utf-8-sig" else {"encoding": encoding}
    ds = _load_dataset("json", path, **kwargs)
    # datasets reads a top-level JSON object as a single row: {"data": [records]} is a field of
    # records, {"text": [...], "label": [...]} a table of columns.
    if len(ds) == 1 and all(isinstance(ds[0][c], list) for c in ds.column_names):
        row = ds[0]
        if len(row) == 1 and row[ds.column_names[0]] and isinstance(row[ds.column_names[0]][0], dict):
            return _load_dataset("json", path, field=ds.column_names[0], **kwargs)
        lengths = {len(v) for v in row.values()}
        if len(lengths) > 1:
            raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
        from datasets import Dataset

        return Dataset.from_dict(row)
    return ds


def read_local_file(path: str | os.PathLike, column_names: Sequence[str] | None = None, encoding: str = "utf-8"):
    """A csv/tsv/json/jsonl/parquet file as a ``datasets.Dataset``, read by ``datasets.load_dataset``.

    csv and tsv columns are strings as written (tsv with ``csv.QUOTE_NONE``: quotes are text);
    json and parquet keep their types. ``column_names`` names the columns, in order, of a
    delimited file that has no header row; ``encoding`` is the text encoding of csv/tsv/json files.
    Raises ``ValueError`` for an unsupported extension, an empty, malformed or wrongly encoded file, or
    ``column_names`` on a non-delimited file, naming the file; and
    ``FileNotFoundError`` for a missing file."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file extension {ext or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {_with_absolute(path)}")
    if column_names is not None:
        column_names = list(column_names)
        if ext not in (".csv", ".tsv"):
            raise ValueError(f"{path}: column_names (no header row) applies to .csv/.tsv files, not {ext}")
        if len(column_names) < 2 or len(set(column_names)) != len(column_names):
            raise ValueError(f"column_names must name at least 2 distinct columns, got {column_names}")
    if ext == ".csv":
        return _delimited(path, ",", csv.QUOTE_MINIMAL, column_names, encoding)
    if ext == ".tsv":
        return _delimited(path, "\t", csv.QUOTE_NONE, column_names, encoding)
    if ext in (".json", ".jsonl"):
        return _json(path, encoding)
    return _load_dataset("parquet", path)


def _find_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], kind: str, path: Path) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise ValueError(f"{path}: {kind} column {wanted!r} not found; columns found: {list(columns)}")
    for name in candidates:
        if name in columns:
            return name
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ValueError(
        f"{path}: no {kind} column found (looked for {list(candidates)}); columns found: {list(columns)}; "
        f"name it with --{kind}_column ({kind}_column= in Python)"
    )


def _load_file(
    path: Path, text_column: str | None, label_column: str | None, column_names: Sequence[str] | None = None,
    encoding: str = "utf-8",
) -> tuple[list[str], list[Any], str]:
    """(texts, raw labels, label column name) of one local file, texts checked."""
    table = read_local_file(path, column_names, encoding)
    names = list(table.column_names)
    text_col = _find_column(names, text_column, TEXT_COLUMNS, "text", path)
    label_col = _find_column(names, label_column, LABEL_COLUMNS, "label", path)
    texts, labels = table[text_col], table[label_col]
    if not texts:
        raise ValueError(f"{path}: no data rows (columns found: {names})")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(
                f"{path}: text column {text_col!r} row {i} holds {t!r} ({type(t).__name__}), expected a string"
            )
    return list(texts), list(labels), f"{path} [{label_col}]"


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def _classify_label(value: Any) -> tuple[str, Any]:
    """('int', int) | ('str', str) | ('bad', description)."""
    if value is None:
        return "bad", "a missing value (None)"
    if isinstance(value, (bool, np.bool_)):
        return "int", int(value)
    if isinstance(value, (int, np.integer)):
        return "int", int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "bad", "a missing value (NaN)"
        if math.isinf(value) or not float(value).is_integer():
            return "bad", f"the non-integer number {value!r}"
        return "int", int(value)
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return "bad", "an empty string (missing value)"
        if _INT_RE.match(s):
            return "int", int(s)
        if _FLOAT_RE.match(s):
            f = float(s)
            if f.is_integer():
                return "int", int(f)
            return "bad", f"the non-integer number {value!r}"
        if s.lower() in ("nan", "none", "null", "na", "n/a"):
            return "bad", f"a missing value ({value!r})"
        return "str", s
    return "bad", f"{value!r} of type {type(value).__name__}"


def _counted(values: Sequence[Any], keep: set[Any]) -> str:
    counts: dict[Any, int] = {}
    for v in values:
        if v in keep:
            counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{v!r} ({n} row{'s' if n != 1 else ''})" for v, n in sorted(counts.items(), key=str))


def _encode_labels(splits: dict[str, tuple[list[Any], str]]) -> tuple[dict[str, list[int]], list[str]]:
    """Map raw labels of every split (``{split: (values, where)}``) to shared ids ``0..K-1``, refusing labels
    that differ only in case and validation labels never seen in training."""
    kinds: dict[str, set[str]] = {}
    parsed: dict[str, list[Any]] = {}
    spellings: dict[str, set[str]] = {}  # stripped class name -> the spellings found, spaces included
    for split, (values, where) in splits.items():
        out = []
        for i, value in enumerate(values):
            kind, v = _classify_label(value)
            if kind == "bad":
                raise ValueError(f"{where}: label row {i} is {v}; labels must be integers or class-name strings")
            kinds.setdefault(kind, set()).add(where)
            if kind == "str":
                spellings.setdefault(v, set()).add(value)
            out.append(v)
        parsed[split] = out
    if len(kinds) > 1:
        raise ValueError(
            f"labels mix integers ({sorted(kinds['int'])}) and class-name strings ({sorted(kinds['str'])}); "
            "use one kind"
        )
    where_all = " and ".join(where for _, where in splits.values())
    spaced = {name: sorted(found) for name, found in spellings.items() if len(found) > 1}
    if spaced:
        logger.warning("%s: labels that differ only by surrounding spaces are one class each: %s", where_all,
                       "; ".join(f"{' / '.join(map(repr, found))} -> {name!r}" for name, found in spaced.items()))
    by_case: dict[str, set[str]] = {}
    for name in spellings:
        by_case.setdefault(name.casefold(), set()).add(name)
    clashes = [names for names in by_case.values() if len(names) > 1]
    if clashes:
        every = [v for vals in parsed.values() for v in vals]
        raise ValueError(
            f"{where_all}: labels that differ only in case would become separate classes: "
            + "; ".join(_counted(every, names) for names in clashes)
            + ". Write each class one way in the file."
        )
    if "validation" in parsed:
        unseen = set(parsed["validation"]) - set(parsed["train"])
        if unseen:
            raise ValueError(
                f"{splits['validation'][1]}: label value{'s' if len(unseen) > 1 else ''} "
                f"{_counted(parsed['validation'], unseen)} never occur{'s' if len(unseen) == 1 else ''} in the "
                f"training file {splits['train'][1]}: the model could never predict "
                f"{'them' if len(unseen) > 1 else 'it'}. Fix those labels or drop those rows."
            )
    uniques = sorted({v for vals in parsed.values() for v in vals})
    if len(uniques) < 2:
        logger.warning("only one label value found (%r): a classifier cannot learn from this", uniques)
    mapping = {v: i for i, v in enumerate(uniques)}
    if uniques == [0, 1]:
        names = list(BINARY_NAMES)
    else:
        names = [str(v) for v in uniques]
    if kinds.get("int") and uniques != list(range(len(uniques))):
        logger.info("integer labels %s are not 0..K-1: mapped in sorted order to 0..%d", uniques, len(uniques) - 1)
    return {split: [mapping[v] for v in vals] for split, vals in parsed.items()}, names


def _check_label_column(texts: Sequence[str], labels: Sequence[int], raw: Sequence[Any], where: str) -> None:
    """Refuse a label column with more distinct values than half the training rows.

    Fewer than two rows per class on average leaves nothing to learn a class from: real label columns (2-5
    sentiment classes, tens of topics) sit far below that line, a text column read as labels (swapped columns:
    SST-2's 6,920 training sentences hold 6,912 distinct texts) far above it.
    """
    classes = len(set(labels))
    if classes <= 2 or classes <= len(labels) / 2:
        return
    examples = ", ".join(repr(str(v))[:40] for v in list(dict.fromkeys(raw))[:3])
    text_values = set(texts)
    swapped = (f" The text column holds only {len(text_values)} distinct values "
               f"({', '.join(map(repr, sorted(text_values)[:5]))}): are the text and label columns swapped?"
               if len(text_values) <= 20 else "")
    raise ValueError(
        f"{where}: the label column has {classes:,} distinct values in {len(labels):,} training rows (e.g. "
        f"{examples}): too few rows per class to learn any, so this is not a class column.{swapped} Name the "
        "columns with --text_column/--label_column, or --column_names for a file without a header row."
    )


# --------------------------------------------------------------------------------------------
# Splits and subsets
# --------------------------------------------------------------------------------------------


def _stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train indices, validation indices), each in file order; each label contributes
    ``round(fraction * count)`` rows to validation; at least one row ends up on each side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    n = len(labels)
    if n < 2:
        raise ValueError(f"cannot split {n} row(s) into train and validation")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    val: list[int] = []
    for label in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == label)
        rng.shuffle(idx)
        val.extend(idx[: round(fraction * len(idx))].tolist())
    if not val:
        val = [int(rng.integers(n))]
    if len(val) == n:
        val = val[1:]
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


def _subset_indices(n: int, limit: int | None, seed: int, what: str) -> list[int] | None:
    if limit is None:
        return None
    if limit <= 0:
        raise ValueError(f"{what} must be a positive integer, got {limit}")
    if limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=limit, replace=False).tolist())


def _build(texts: dict[str, list[str]], labels: dict[str, list[int]], names: list[str], source: str) -> SentimentData:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    dd = DatasetDict(
        {
            split: Dataset.from_dict({"text": texts[split], "label": labels[split]}, features=features)
            for split in ("train", "validation")
        }
    )
    return SentimentData(dataset=dd, label_names=list(names), source=source)


def _from_rows(
    train: tuple[list[str], list[Any], str],
    validation: tuple[list[str], list[Any], str] | None,
    *,
    validation_fraction: float,
    seed: int,
    source: str,
) -> tuple[dict[str, list[str]], dict[str, list[int]], list[str], str]:
    raw = {"train": (train[1], train[2])}
    if validation is not None:
        raw["validation"] = (validation[1], validation[2])
    ids, names = _encode_labels(raw)
    _check_label_column(train[0], ids["train"], train[1], train[2])
    if validation is not None:
        return {"train": train[0], "validation": validation[0]}, ids, names, source
    tr, va = _stratified_split(ids["train"], validation_fraction, seed)
    texts = {"train": [train[0][i] for i in tr], "validation": [train[0][i] for i in va]}
    out = {"train": [ids["train"][i] for i in tr], "validation": [ids["train"][i] for i in va]}
    source += f"; seeded split (validation_fraction={validation_fraction}, seed={seed})"
    return texts, out, names, source


def _with_absolute(path: Path) -> str:
    """``path``, and for a relative one where it was looked for: a config's relative ``data_dir`` is read from the
    current directory, not from the config's folder."""
    if path.is_absolute():
        return str(path)
    return f"{path} (looked for in the current directory, {Path.cwd()}: {os.path.abspath(path)})"


def _resolve_data_dir(data_dir: Path) -> tuple[Path, Path | None]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir is not a folder: {_with_absolute(data_dir)}")
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)

    def pick(stem: str) -> Path | None:
        found = [p for p in files if p.stem.lower() == stem]
        if len(found) > 1:
            raise ValueError(
                f"{data_dir}: several {stem}.* files {[p.name for p in found]}; keep one or name it with train_file="
            )
        return found[0] if found else None

    train = pick("train")
    if train is None:
        if len(files) == 1:
            return files[0], None
        raise ValueError(
            f"{data_dir}: no train.* file (extensions {', '.join(SUPPORTED_EXTENSIONS)}); "
            f"files found: {sorted(p.name for p in data_dir.iterdir())}"
        )
    for stem in VALIDATION_STEMS:
        found = pick(stem)
        if found is not None:
            return train, found
    return train, None


# --------------------------------------------------------------------------------------------
# Offline default: VADER human-rated movie-review snippets, from the vaderSentiment sdist on PyPI
# --------------------------------------------------------------------------------------------

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SIZE = 2_466_783
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MOVIES_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_MOVIES_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
VADER_MOVIES_ROWS = 10_605
VADER_COLUMNS = ("id", "rating", "text")


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LION_HF_CACHE``, else ``~/.cache/lion_hf``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LION_HF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lion_hf"


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _pip_download_vader(dest: Path) -> Path:
    # Hash-checking mode: pip verifies the sha256 right after the download, before it runs the
    # sdist's build backend to read its metadata (which `pip download` of an sdist always does).
    requirements = dest / "requirements.txt"
    requirements.write_text(f"vadersentiment==3.3.2 --hash=sha256:{VADER_SDIST_SHA256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
        "-r", str(requirements), "-d", str(dest), "--disable-pip-version-check", "--no-input",
    ]  # fmt: skip
    logger.info("fetching %s from the package registry: %s", VADER_SDIST, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sdist = dest / VADER_SDIST
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not download {VADER_SDIST} with pip (exit code {proc.returncode}):\n{tail}\n"
            f"Without access to a package index, put {VADER_SDIST} (sha256 {VADER_SDIST_SHA256}) into "
            f"{dest.parent} yourself, or load other data (--data_dir, --train_file or a Hub --task; data_dir=, "
            "train_file=, task= in Python)."
        )
    return sdist


def _extract_vader_movies(sdist: Path, target: Path) -> None:
    digest = _sha256(sdist)
    if digest != VADER_SDIST_SHA256:
        raise RuntimeError(
            f"{sdist}: sha256 {digest} does not match the expected {VADER_SDIST_SHA256} "
            f"({sdist.stat().st_size} bytes, expected {VADER_SDIST_SIZE}); refusing to use it. "
            "Delete the file and retry."
        )
    with tarfile.open(sdist, "r:gz") as outer:
        inner_fh = outer.extractfile(VADER_INNER_TARBALL)
        if inner_fh is None:
            raise RuntimeError(f"{sdist}: {VADER_INNER_TARBALL} missing")
        with tarfile.open(fileobj=io.BytesIO(inner_fh.read()), mode="r:gz") as inner:
            member = inner.extractfile(VADER_MOVIES_MEMBER)
            if member is None:
                raise RuntimeError(f"{sdist}: {VADER_MOVIES_MEMBER} missing from {VADER_INNER_TARBALL}")
            payload = member.read()
    if hashlib.sha256(payload).hexdigest() != VADER_MOVIES_SHA256:
        raise RuntimeError(f"{sdist}: {VADER_MOVIES_MEMBER} has unexpected content")
    target.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename: concurrent processes (e.g. DDP ranks) never see a partial file
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(payload)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, target)


def vader_movies_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached movie-review file, fetching it on first use.

    Lookup: ``<cache>/vader_movies/movieReviewSnippets_GroundTruth.txt`` if present and intact;
    else ``<cache>/vaderSentiment-3.3.2.tar.gz`` if someone put the sdist there; else
    ``pip download`` of the sdist into a temporary folder (deleted afterwards). The sdist's
    sha256 is checked before anything is extracted; only the one file is kept."""
    cache = default_cache_dir(cache_dir)
    target = cache / "vader_movies" / Path(VADER_MOVIES_MEMBER).name
    if target.is_file():
        if _sha256(target) == VADER_MOVIES_SHA256:
            return target
        logger.warning("%s is corrupt: fetching it again", target)
    local_sdist = cache / VADER_SDIST
    if local_sdist.is_file():
        _extract_vader_movies(local_sdist, target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="vader-", dir=cache))
    try:
        _extract_vader_movies(_pip_download_vader(tmp), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_vader_movies(path: str | os.PathLike) -> tuple[list[str], list[float]]:
    """(texts, mean ratings) of the VADER movie file: tab-separated id, mean rating, text; no
    header, no quoting (it writes quotes as ``''`` and has one bare ``"``), CRLF line ends."""
    table = _delimited(Path(path), "\t", csv.QUOTE_NONE, VADER_COLUMNS)
    return [t.strip() for t in table["text"]], [float(r) for r in table["rating"]]


def load_vader_movies(
    *, validation_fraction: float = 0.1, seed: int = 42, cache_dir: str | os.PathLike | None = None
) -> tuple[dict[str, list[str]], dict[str, list[int]], list[str], str]:
    """The offline default task ``vader_movies``: 10,605 movie-review snippets (Pang & Lee
    sentences) with the mean of at least 20 human sentiment ratings on -4..+4, from
    ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` in the vaderSentiment 3.3.2 sdist
    (Hutto & Gilbert, ICWSM 2014; MIT licence), fetched from PyPI with pip once and cached.

    Label 1 (positive) if the mean rating is > 0, 0 (negative) if < 0. The 37 snippets rated
    exactly 0 are dropped, and so are 2 repeated snippets (first kept, same sign), so that no
    text is both in train and validation: 10,566 rows (5,241 positive, 5,325 negative), then a
    seeded stratified split (``validation_fraction``; 0.1 gives 9,510 train / 1,056 validation).
    Texts are kept as written (the file spells double quotes as ``''``)."""
    path = vader_movies_path(cache_dir)
    texts, ratings = read_vader_movies(path)
    if len(texts) != VADER_MOVIES_ROWS:
        raise RuntimeError(f"{path}: {len(texts)} rows, expected {VADER_MOVIES_ROWS}")
    seen: set[str] = set()
    kept_texts, kept_labels = [], []
    zeros = dups = 0
    for text, rating in zip(texts, ratings):
        if rating == 0:
            zeros += 1
            continue
        if text in seen:
            dups += 1
            continue
        seen.add(text)
        kept_texts.append(text)
        kept_labels.append(1 if rating > 0 else 0)
    tr, va = _stratified_split(kept_labels, validation_fraction, seed)
    split_texts = {"train": [kept_texts[i] for i in tr], "validation": [kept_texts[i] for i in va]}
    split_labels = {"train": [kept_labels[i] for i in tr], "validation": [kept_labels[i] for i in va]}
    source = (
        f"{DEFAULT_TASK}: {VADER_MOVIES_MEMBER} from {VADER_SDIST} (PyPI; cached at {path}); label = mean rating > 0; "
        f"{len(kept_texts)} rows after dropping {zeros} zero-rated and {dups} repeated; "
        f"seeded split (validation_fraction={validation_fraction}, seed={seed})"
    )
    return split_texts, split_labels, list(BINARY_NAMES), source


# --------------------------------------------------------------------------------------------
# Hub tasks
# --------------------------------------------------------------------------------------------


def _load_hub_task(
    task: str,
    spec: TaskSpec,
    cache_dir: str | os.PathLike | None,
    seed: int,
    max_train_samples: int | None,
    max_eval_samples: int | None,
) -> SentimentData:
    import datasets

    args = (spec.path,) if spec.config is None else (spec.path, spec.config)
    try:
        raw = datasets.load_dataset(*args, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as exc:  # no network, Hub down, gated, ...: say what the offline routes are
        hub_id = spec.path + (f"/{spec.config}" if spec.config else "")
        raise RuntimeError(
            f"could not load task {task!r} ({hub_id}) from the Hugging Face Hub: {type(exc).__name__}: {exc}. "
            f"Offline, load local files with --data_dir or --train_file (data_dir= / train_file= in Python), or "
            f"leave --task unset (task=None) for the offline default {DEFAULT_TASK!r}."
        ) from exc
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(spec.label_names))}
    )
    splits = {}
    limits = {"train": max_train_samples, "validation": max_eval_samples}
    for ours, theirs in (("train", spec.train_split), ("validation", spec.validation_split)):
        if theirs not in raw:
            raise ValueError(f"{spec.path}: no split {theirs!r}; splits found: {list(raw)}")
        ds = raw[theirs]
        for col, kind in ((spec.text_column, "text"), (spec.label_column, "label")):
            if col not in ds.column_names:
                raise ValueError(
                    f"{spec.path} [{theirs}]: {kind} column {col!r} not found; columns found: {ds.column_names}"
                )
        keep = _subset_indices(len(ds), limits[ours], seed, f"max_{'train' if ours == 'train' else 'eval'}_samples")
        if keep is not None:
            ds = ds.select(keep)
        ds = ds.select_columns([spec.text_column, spec.label_column])
        if spec.text_column != "text":
            ds = ds.rename_column(spec.text_column, "text")
        if spec.label_column != "label":
            ds = ds.rename_column(spec.label_column, "label")
        found = set(ds.unique("label"))
        bad = sorted(v for v in found if not (isinstance(v, int) and 0 <= v < spec.num_labels))
        if bad:
            raise ValueError(f"{spec.path} [{theirs}]: label values {bad[:5]} outside 0..{spec.num_labels - 1}")
        splits[ours] = ds.cast(features)
    source = f"{task}: Hugging Face Hub {spec.path}" + (f" ({spec.config})" if spec.config else "")
    source += f", splits {spec.train_split}/{spec.validation_split}"
    return SentimentData(dataset=datasets.DatasetDict(splits), label_names=list(spec.label_names), source=source)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _unknown_task(task: str) -> ValueError:
    return ValueError(
        f"unknown task {task!r}; known tasks: {', '.join([*TASKS, DEFAULT_TASK])} (or None = {DEFAULT_TASK})"
    )


def load_sentiment_data(
    task: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    column_names: Sequence[str] | None = None,
    encoding: str = "utf-8",
    validation_fraction: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> SentimentData:
    """Load a sentiment task as train/validation splits with columns ``text`` and ``label``.

    Priority: ``train_file``/``validation_file`` > ``data_dir`` > ``task`` (a :data:`TASKS` name,
    from the Hub) > the offline default :data:`DEFAULT_TASK` (``task=None``). See the module
    docstring for formats, column detection, label mapping and seeded splits/subsets.
    ``column_names`` reads header-less ``.csv``/``.tsv`` files: it names their columns in order
    (e.g. ``["text", "label"]`` for ``text<TAB>label`` lines); ``encoding`` is the local files' text encoding.
    ``cache_dir`` is the ``datasets`` cache for Hub tasks and the download cache of the offline
    default (default ``$LION_HF_CACHE`` or ``~/.cache/lion_hf``).

    Raises:
        ValueError: unknown task, unsupported extension, missing column, empty file, bad labels.
        FileNotFoundError: a named file or folder does not exist.
        RuntimeError: the Hub or the package registry could not be reached, or a download did
            not match its checksum.
    """
    if task is not None and task not in TASKS and task != DEFAULT_TASK:
        raise _unknown_task(task)
    if validation_file is not None and train_file is None:
        raise ValueError("validation_file needs train_file as well")

    if train_file is not None or data_dir is not None:
        if train_file is not None:
            train_path = Path(train_file)
            val_path = Path(validation_file) if validation_file is not None else None
            if data_dir is not None:
                logger.info("train_file given: ignoring data_dir=%s", data_dir)
        else:
            train_path, val_path = _resolve_data_dir(Path(data_dir))
        if task is not None:
            logger.info("local files given: ignoring task=%s", task)
        train_rows = _load_file(train_path, text_column, label_column, column_names, encoding)
        val_rows = (_load_file(val_path, text_column, label_column, column_names, encoding)
                    if val_path is not None else None)
        source = f"local files: train {train_path}" + (f", validation {val_path}" if val_path is not None else "")
        texts, labels, names, source = _from_rows(
            train_rows, val_rows, validation_fraction=validation_fraction, seed=seed, source=source
        )
    elif task is not None and task != DEFAULT_TASK:
        return _warn_if_small(_load_hub_task(task, TASKS[task], cache_dir, seed, max_train_samples, max_eval_samples))
    else:
        texts, labels, names, source = load_vader_movies(
            validation_fraction=validation_fraction, seed=seed, cache_dir=cache_dir
        )

    for split, limit, what in (
        ("train", max_train_samples, "max_train_samples"),
        ("validation", max_eval_samples, "max_eval_samples"),
    ):
        keep = _subset_indices(len(texts[split]), limit, seed, what)
        if keep is not None:
            texts[split] = [texts[split][i] for i in keep]
            labels[split] = [labels[split][i] for i in keep]
            source += f"; {split} subset {limit} (seed={seed})"
    return _warn_if_small(_build(texts, labels, names, source))


def _warn_if_small(data: SentimentData) -> SentimentData:
    rows = len(data.validation)
    if rows < SMALL_VALIDATION:
        logger.warning(
            "the validation split has %d row%s: one row moves the accuracy by %.1f points, so accuracy differences "
            "below that are noise; %d+ rows resolve a point (--max_eval_samples, --validation_fraction, "
            "--validation_file)", rows, "" if rows == 1 else "s", 100 / max(rows, 1), SMALL_VALIDATION,
        )
    return data


def tokenize_sentiment_data(data: SentimentData, tokenizer: Any, max_length: int):
    """Tokenize both splits (batched, truncated to ``max_length``, unpadded: a
    ``DataCollatorWithPadding`` pads per batch). Returns a ``DatasetDict`` with the tokenizer's
    columns (``input_ids``, ``attention_mask``, and ``token_type_ids`` where the model has them)
    and ``labels``."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    tokenized = data.dataset.map(encode, batched=True, remove_columns=["text"], desc="Tokenizing")
    return tokenized.rename_column("label", "labels")
