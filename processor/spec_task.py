"""A task given as a spec document (processor.task_spec), run by the same round steps as every task.

Its rows are a table of the spec's features (a NumPy structured array, `TaskSpec.row_dtype`),
which the model is called on column by column (`processor.ewc.model_inputs`); its model is the
spec's, rebuilt by Keras in safe mode; its architecture is the spec's digest, so that a model or an
update made for another spec is refused. The organization's own rows, when it has any, are a
held-out file of the spec's columns: they measure every round and anchor EWC's Fisher, and the
organization never trains on them. A data pool (the simulation's, a benchmark's) is split as a
bundled dataset is, into a training pool and the organization's validation and test sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from processor import task_spec
from processor.task_spec import ClassLabel, NumericLabel, TaskSpec
from processor.tasks import TASKS, Task, TaskData, get_task, holdout_split


@dataclass
class SpecTask(Task):
    document: TaskSpec | None = None
    source: bytes = b""  # the spec's file as it was read: what the organization publishes

    @property
    def arch_id(self) -> str:
        return f"spec-{self.document.digest}"

    @property
    def numeric_label(self) -> bool:
        return isinstance(self.document.label, NumericLabel)

    def build_model(self, seed: int = 0):
        return task_spec.build_model(self.document, seed)

    def compile_settings(self) -> dict[str, Any]:
        import keras

        if not self.numeric_label:
            return super().compile_settings()
        loss = {"mean_squared_error": keras.losses.MeanSquaredError(),
                "mean_absolute_error": keras.losses.MeanAbsoluteError()}[self.document.loss]
        return {"loss": loss, "metrics": [keras.metrics.MeanAbsoluteError(name="mae")]}

    def read_device_data(self, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
        from processor.device_data import read_spec_data

        return read_spec_data(self.document, path)

    def metrics(self, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """A class label's metrics as every task's; a number's (`y` and `outputs` standardized): RMSE
        and MAE in the label's own units, and the loss it trains with, of the standardized numbers."""
        if not self.numeric_label:
            return super().metrics(outputs, y)
        error = outputs[:, 0].astype(np.float64) - y
        rmse, mae = float(np.sqrt(np.mean(error ** 2))), float(np.mean(np.abs(error)))
        std = self.document.label.std
        return {"rmse": rmse * std, "mae": mae * std,
                "loss": rmse ** 2 if self.document.loss == "mean_squared_error" else mae}

    def predictions(self, outputs: np.ndarray) -> dict[str, list]:
        """A class label's as every task's; a number's: the predicted number, in its own units."""
        if not self.numeric_label:
            return super().predictions(outputs)
        label = self.document.label
        return {"predicted": (outputs[:, 0].astype(np.float64) * label.std + label.mean).round(6).tolist()}

    def baseline(self) -> dict[str, Any]:
        """A class label's as every task's; a number's: always answering the test set's mean."""
        if not self.numeric_label:
            return super().baseline()
        label, y = self.document.label, self.data().y_test.astype(np.float64)
        return {"answer": float(y.mean() * label.std + label.mean), "rmse": float(y.std() * label.std),
                "mae": float(np.mean(np.abs(y - y.mean())) * label.std)}


def spec_task(spec: TaskSpec, pool: Path | str | None = None, held_out: Path | str | None = None,
              source: bytes = b"") -> SpecTask:
    """The task of `spec`. `held_out`: the organization's own file of rows (its test set, never
    trained on); `pool`: a file of rows to deal out to simulated devices, split into a training
    pool and held-out validation and test sets (its test set unless `held_out` is given). Files
    are read when the task's data is first asked for."""
    from processor.device_data import read_spec_data

    def load() -> TaskData:
        empty = (np.zeros(0, spec.row_dtype()), np.zeros(0, np.float32 if numeric else np.int64))
        data = TaskData(*empty, *empty, *empty)
        if pool is not None:
            data = holdout_split(*read_spec_data(spec, pool), stratify=not numeric)
        if held_out is not None:
            x, y = read_spec_data(spec, held_out)
            data = TaskData(data.x_train, data.y_train, *((data.x_val, data.y_val) if pool is not None else (x, y)),
                            x, y)
        return data

    numeric = isinstance(spec.label, NumericLabel)
    return SpecTask(spec.name, load, input_dim=0, hidden=(), num_classes=spec.outputs, plan=spec.plan,
                    label_names=tuple(spec.label.classes) if isinstance(spec.label, ClassLabel) else (),
                    document=spec, source=source)


def read_task_file(path: Path | str, pool: Path | str | None = None, held_out: Path | str | None = None) -> SpecTask:
    """The task of the spec file at `path` (SpecError naming what is wrong with it)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise task_spec.SpecError(f"cannot read the task spec {path}: {exc.strerror}") from None
    return spec_task(task_spec.read_spec(data), pool, held_out, source=data)


def is_spec_file(reference: str) -> bool:
    return reference.endswith(".json")


def is_fetched(reference: str) -> bool:
    """Whether `reference` names a task by the CID its spec was published under (neither a
    built-in task's name nor a spec file): `load_task` must fetch it."""
    return reference not in TASKS and not is_spec_file(reference)


def load_task(reference: str, held_out: Path | str | None = None,
              fetch: Callable[[str], bytes] | None = None) -> Task:
    """The task `reference` names: a built-in task's name, a task spec file (`*.json`), or, given
    `fetch` (which returns the verified bytes of a CID), the CID a spec was published under.
    `held_out`: the organization's own rows of a spec's columns, its test set."""
    if reference in TASKS:
        if held_out is not None:
            raise ValueError(f"the built-in task {reference!r} has its own test set: it takes no held-out file")
        return get_task(reference)
    if is_spec_file(reference):
        return read_task_file(reference, held_out=held_out)
    if fetch is None:
        raise ValueError(f"unknown task {reference!r}: name one of {', '.join(TASKS)}, or a task spec file (*.json)")
    data = fetch(reference)
    return spec_task(task_spec.read_spec(data), held_out=held_out, source=data)
