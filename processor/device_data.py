"""A device's own training data: a CSV file whose columns the task names, checked before any round.

- mnist: `label` (0-9) and `pixel0` ... `pixel783`, integers 0-255 (a 28x28 image, row by row);
- digits: `label` (0-9) and `pixel0` ... `pixel63`, integers 0-16 (an 8x8 image);
- interest: one row per rating the device's user gave: `item_id` (a MovieLens-100K item),
  `rating` (1-5), and the user's own `age` (1-120), `gender` (M or F) and `occupation` (one of
  MovieLens's), oldest rating first (the device holds out the latest fifth to evaluate on).
  Features are made as for the bundled dataset: the user's profile beside the item's genres and
  year from the public item catalogue; a rating of 4 or more is "interested".

Every problem is a DeviceDataError that names the file, the row and the column.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from processor.tasks import Task, movielens_features, read_movielens

MAX_ROWS = 1_000_000  # as many samples as the contract accepts by default (infra.chain.DEFAULT_MAX_SAMPLES)


class DeviceDataError(ValueError):
    """The device's data file cannot be used for its task; the message says why and where."""


@dataclass(frozen=True)
class Column:
    name: str
    low: int | None = None  # an integer column's range, inclusive
    high: int | None = None
    choices: tuple[str, ...] | None = None  # a text column's allowed values

    def parse(self, text: str, where: str) -> int | str:
        if self.choices is not None:
            if text not in self.choices:
                shown = ", ".join(self.choices) if len(self.choices) <= 8 else f"{len(self.choices)} known values"
                raise DeviceDataError(f"{where}, column {self.name}: {text!r} is not one of {shown}")
            return text
        try:
            value = int(text)
        except ValueError:
            raise DeviceDataError(f"{where}, column {self.name}: {text!r} is not an integer") from None
        if not self.low <= value <= self.high:
            raise DeviceDataError(f"{where}, column {self.name}: {value} is outside {self.low}-{self.high}")
        return value


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


def _rows(path: Path, columns: list[Column]) -> list[dict[str, int | str]]:
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
            missing = [n for n in expected if n not in names]
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
                if len(rows) == MAX_ROWS:
                    raise DeviceDataError(f"{path} has more than {MAX_ROWS} rows")
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
