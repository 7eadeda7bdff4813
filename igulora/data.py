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


def _records(path: Path, fmt: str) -> list[dict[str, str]]:
    if fmt == "jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return records
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"))
    records = []  # label-text: "<label> <text>" per line (the SST-2 files of shared/data)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            label, _, text = line.partition(" ")
            if not text:
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
) -> list[Example]:
    """Read ``path`` into examples; classification needs integer labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if data_format not in FORMATS:
        raise DataError(f"--data-format {data_format!r} is not one of {', '.join(FORMATS)}")
    records = _records(path, _format_of(path, data_format))
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
            try:
                label = int(record[label_column])
            except (TypeError, ValueError):
                raise DataError(
                    f"{path}: example {number}: label {record[label_column]!r} is not an integer"
                ) from None
        pair = str(record[text_pair_column]) if text_pair_column else None
        examples.append(Example(str(record[text_column]), pair, label))
    return examples
