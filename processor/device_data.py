"""A device's own training data: a CSV file whose columns the task names, checked before any round.

- mnist: `label` (0-9) and `pixel0` ... `pixel783`, integers 0-255 (a 28x28 image, row by row);
- digits: `label` (0-9) and `pixel0` ... `pixel63`, integers 0-16 (an 8x8 image);
- interest: one row per rating the device's user gave: `item_id` (a MovieLens-100K item),
  `rating` (1-5), and the user's own `age` (1-120), `gender` (M or F) and `occupation` (one of
  MovieLens's), oldest rating first (the device holds out the latest fifth to evaluate on).
  Features are made as for the bundled dataset: the user's profile beside the item's genres and
  year from the public item catalogue; a rating of 4 or more is "interested".

For a task given as a spec (processor.task_spec), the label's column and each feature's, as
`spec_columns` lists them.

Every problem is a DeviceDataError that names the file, the row and the column.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from processor.task_spec import CategoricalColumn, NumericColumn, NumericLabel, TaskSpec
from processor.tasks import Task, movielens_features, read_movielens

MAX_ROWS = 1_000_000  # as many samples as the contract accepts by default (infra.chain.DEFAULT_MAX_SAMPLES)


class DeviceDataError(ValueError):
    """The device's data file cannot be used for its task; the message says why and where."""


@dataclass(frozen=True)
class Column:
    name: str
    low: int | float | None = None  # a number column's range, inclusive (None: unbounded on that side)
    high: int | float | None = None
    choices: tuple[str, ...] | None = None  # a text column's allowed values
    real: bool = False  # a real number, not an integer

    def parse(self, text: str, where: str) -> int | float | str:
        if self.choices is not None:
            if text not in self.choices:
                shown = ", ".join(self.choices) if len(self.choices) <= 8 else f"{len(self.choices)} known values"
                raise DeviceDataError(f"{where}, column {self.name}: {text!r} is not one of {shown}")
            return text
        try:
            value = float(text) if self.real else int(text)
        except ValueError:
            raise DeviceDataError(f"{where}, column {self.name}: {text!r} is not "
                                  f"{'a number' if self.real else 'an integer'}") from None
        if self.real and not np.isfinite(value):
            raise DeviceDataError(f"{where}, column {self.name}: {text!r} is not a finite number")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise DeviceDataError(f"{where}, column {self.name}: {_shown(value)} is outside "
                                  f"{_shown(self.low)}-{_shown(self.high)}")
        return value


def _shown(number: int | float | None) -> str:
    return "" if number is None else f"{number:g}" if isinstance(number, float) else str(number)


def _image_columns(pixels: int, max_value: int) -> list[Column]:
    return [Column("label", 0, 9), *(Column(f"pixel{i}", 0, max_value) for i in range(pixels))]


@functools.lru_cache(maxsize=1)
def _catalogue() -> tuple[dict, dict]:
    """The bundled MovieLens users (for the occupations) and items (genres, year); read once (read-only)."""
    _, users, items = read_movielens(Path(str(resources.files("recbole") / "dataset_example" / "ml-100k")))
    return users, items


def columns_for(task: Task) -> list[Column]:
    """The columns a device's file holds for `task`."""
    if task.name == "mnist":
        return _image_columns(784, 255)
    if task.name == "digits":
        return _image_columns(64, 16)
    if task.name == "interest":
        users, items = _catalogue()
        return [Column("item_id", min(items), max(items)), Column("rating", 1, 5), Column("age", 1, 120),
                Column("gender", choices=("F", "M")),
                Column("occupation", choices=tuple(sorted({u[2] for u in users.values()})))]
    raise DeviceDataError(f"task {task.name!r} takes no device data file")


def _rows(path: Path, columns: list[Column], max_rows: int = MAX_ROWS,
          optional: tuple[str, ...] = ()) -> list[dict[str, int | float | str]]:
    """The rows of the file at `path`, each value parsed by its column; a column named in
    `optional` may be left out of the file."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DeviceDataError(f"no data file at {path}") from None
    except OSError as exc:
        raise DeviceDataError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise DeviceDataError(f"{path} is empty: it needs a header row naming its columns")
            names = [name.strip() for name in header]
            expected = [c.name for c in columns]
            missing = [n for n in expected if n not in names and n not in optional]
            extra = [n for n in names if n not in expected]
            if missing or extra or len(set(names)) != len(names):
                problems = [f"missing column(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                            if missing else "", f"unexpected column(s) {', '.join(extra[:5])}" if extra else "",
                            "repeated column names" if len(set(names)) != len(names) else ""]
                raise DeviceDataError(f"{path}: {'; '.join(p for p in problems if p)}")
            by_name = {c.name: c for c in columns}
            rows = []
            for number, fields in enumerate(reader, start=2):
                if not any(f.strip() for f in fields):
                    continue
                where = f"{path}, row {number}"
                if len(fields) != len(names):
                    raise DeviceDataError(f"{where}: {len(fields)} values for {len(names)} columns")
                if len(rows) == max_rows:
                    raise DeviceDataError(f"{path} has more than {max_rows} rows")
                rows.append({name: by_name[name].parse(text.strip(), where) for name, text in zip(names, fields)})
        except UnicodeDecodeError:
            raise DeviceDataError(f"{path} is not UTF-8 text") from None
        except csv.Error as exc:
            raise DeviceDataError(f"{path} is not a CSV file: {exc}") from None
    if not rows:
        raise DeviceDataError(f"{path} has a header but no rows: there is nothing to train on")
    return rows


def read_device_data(task: Task, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the device's file at `path`, in the task's model's input format."""
    path = Path(path)
    columns = columns_for(task)
    rows = _rows(path, columns)
    if task.name == "interest":
        users, items = _catalogue()
        missing = sorted({row["item_id"] for row in rows} - set(items))
        if missing:
            raise DeviceDataError(f"{path}: item_id {missing[0]} is not in the item catalogue")
        device_user = -1  # the device's one user, beside the catalogue's (which fix the occupations)
        profile = (rows[0]["age"], rows[0]["gender"], rows[0]["occupation"])
        if any((row["age"], row["gender"], row["occupation"]) != profile for row in rows):
            raise DeviceDataError(f"{path}: age, gender and occupation must be the same on every row "
                                  "(one device, one user)")
        ratings = np.array([[device_user, row["item_id"], row["rating"]] for row in rows], np.float64)
        x, y, _ = movielens_features(ratings, {**users, device_user: profile}, items)
    else:
        scale = 255.0 if task.name == "mnist" else 16.0
        table = np.array([[row[c.name] for c in columns] for row in rows], np.float32)
        x, y = table[:, 1:] / scale, table[:, 0].astype(np.int64)
    if x.shape[1] != task.input_dim:
        raise DeviceDataError(f"{path} makes {x.shape[1]} features, but the task's model takes {task.input_dim}")
    return x.astype(np.float32), y


def spec_columns(spec: TaskSpec) -> list[Column]:
    """The columns of a device's file for `spec`: its label's, then each feature's."""
    label = spec.label
    columns = [Column(label.name, real=True) if isinstance(label, NumericLabel)
               else Column(label.name, choices=tuple(label.classes))]
    for feature in spec.features:
        if isinstance(feature, NumericColumn):
            columns += [Column(name, feature.min, feature.max, real=True) for name in feature.columns]
        elif isinstance(feature, CategoricalColumn):
            columns.append(Column(feature.name, choices=tuple(feature.vocabulary)))
        else:
            columns.append(Column(feature.name, 0, feature.cardinality - 1))
    return columns


def read_spec_data(spec: TaskSpec, path: Path | str,
                   label_optional: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, a table of the features as the spec's model takes them (`TaskSpec.row_dtype`);
    labels: class indices, or the numbers of a numeric label standardized by its mean and std) of
    the data file at `path`, checked against `spec` row by row. With `label_optional`, a file
    without the label's column is read too, its labels None (rows to score)."""
    path = Path(path)
    label = spec.label
    rows = _rows(path, spec_columns(spec), min(MAX_ROWS, spec.limits.rows),
                 optional=(label.name,) if label_optional else ())
    table = _table(spec, rows)
    if label.name not in rows[0]:  # left out, as `label_optional` allows
        return table, None
    if isinstance(label, NumericLabel):
        return table, ((np.array([row[label.name] for row in rows], np.float64) - label.mean) / label.std).astype(np.float32)
    index = {name: i for i, name in enumerate(label.classes)}
    return table, np.array([index[row[label.name]] for row in rows], np.int64)


def _table(spec: TaskSpec, rows: list[dict]) -> np.ndarray:
    table = np.zeros(len(rows), spec.row_dtype())
    for feature in spec.features:
        names = feature.columns if isinstance(feature, NumericColumn) else [feature.name]
        table[feature.name] = [[row[name] for name in names] for row in rows]
    return table
