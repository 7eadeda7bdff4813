"""Local training data for ``igulora finetune``: jsonl, csv/tsv with a header, or label-text lines."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "jsonl", "csv", "tsv", "label-text")


class DataError(ValueError):
    """Bad data input: the message names the file, the line or the column."""


@dataclass
class Example:
    text: str
    text_pair: str | None = None
    label: int | None = None


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    if path.suffix.lower() not in by_suffix:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; pass --data-format "
            f"(one of {', '.join(FORMATS[1:])})"
        )
    return by_suffix[path.suffix.lower()]


def _lines(path: Path, encoding: str) -> list[str]:
    """The file's lines, split on newlines only (``str.splitlines`` also splits on characters such
    as U+0085, which latin-1 text holds inside sentences)."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\n") for line in f]


def _records(path: Path, fmt: str, encoding: str) -> list[dict[str, str]]:
    if fmt == "jsonl":
        records = []
        for number, line in enumerate(_lines(path, encoding), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return records
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding=encoding) as f:
            return list(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"))
    records = []  # label-text: "<label> <text>" per line (the SST-2 files of shared/data)
    for number, line in enumerate(_lines(path, encoding), 1):
        if line.strip():
            label, space, text = line.partition(" ")
            if not space:  # an empty text after the label is an example (CR has four)
                raise DataError(f"{path}:{number}: expected '<label> <text>'")
            records.append({"label": label, "text": text})
    return records


def load_examples(
    path: str | Path,
    *,
    task: str,
    data_format: str = "auto",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    encoding: str = "utf-8",
) -> list[Example]:
    """Read ``path`` (text in ``encoding``) into examples; classification needs integer labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if data_format not in FORMATS:
        raise DataError(f"--data-format {data_format!r} is not one of {', '.join(FORMATS)}")
    try:
        records = _records(path, _format_of(path, data_format), encoding)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not valid {encoding} ({error.reason} at byte {error.start}); pass its encoding"
        ) from None
    if not records:
        raise DataError(f"{path}: no examples")
    wanted = [text_column] + ([text_pair_column] if text_pair_column else [])
    wanted += [label_column] if task == "classification" else []
    missing = [c for c in wanted if c not in records[0]]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; columns are {sorted(records[0])}")
    examples = []
    for number, record in enumerate(records, 1):
        label = None
        if task == "classification":
            label = _integer(record[label_column])
            if label is None:
                raise DataError(f"{path}: example {number}: label {record[label_column]!r} is not an integer")
        pair = str(record[text_pair_column]) if text_pair_column else None
        examples.append(Example(str(record[text_column]), pair, label))
    return examples


def _integer(value) -> int | None:
    """``value`` as an integer label (an int, an integral float, or the text of an integer), or None;
    ``int()`` alone would turn JSON's 1.5 into 1 and ``true`` into 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _listing(values, most: int = 8) -> str:
    values = sorted(values)
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")


def class_count(
    train: list[Example],
    evals: list[Example] = (),
    *,
    label_column: str = "label",
    data: str | Path = "--data",
    eval_data: str | Path | None = None,
) -> int:
    """K, the number of classes of a classification run, once the labels are checked to be class
    indices: the training labels are exactly 0..K-1 with K >= 2, and every evaluation label is one
    of them. Anything else (one class, a negative label, 1-based labels, a gap, an evaluation
    class never trained) is a DataError naming the label column and the classes found."""
    column = f"--label-column {label_column!r}"
    found = {e.label for e in train}
    negative = sorted(v for v in found | {e.label for e in evals} if v < 0)
    if negative:
        raise DataError(f"{column}: label {negative[0]} is negative; labels must be class indices 0..K-1")
    if len(found) < 2:
        raise DataError(
            f"{column}: {data} has one class ({_listing(found)}); classification needs at least 2 "
            "distinct labels"
        )
    k = max(found) + 1
    missing = sorted(set(range(k)) - found)
    if missing:
        hint = " (1-based labels? subtract 1)" if missing == [0] else ""
        raise DataError(
            f"{column}: labels must be class indices 0..K-1, but {data} has {_listing(found)} and lacks "
            f"{_listing(missing)}{hint}"
        )
    unseen = {e.label for e in evals} - found
    if unseen:
        raise DataError(
            f"{column}: {eval_data or 'the evaluation data'} has label {_listing(unseen)}, which {data} "
            f"never has (its classes: {_listing(found)})"
        )
    return k
