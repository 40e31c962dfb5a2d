"""Federated evaluation: what each device reports of a base model on its own held-out data, and
the round's sample-weighted mean of those reports. Pure functions; no chain or IPFS code here.

A report travels in the metadata of the device's update for the round (so it costs no extra
transaction or file) and is checked field by field: a report that does not fit is ignored, never
a reason to refuse the update, since the organization cannot verify it anyway.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

HOLDOUT_FRACTION = 0.1  # of a device's samples, kept out of training to evaluate each base on
MAX_REPORT_CHARS = 300


METRIC_LIMIT = 1e12  # of a reported RMSE or MAE, in the label's own units


class ReportSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    samples: int = Field(ge=1, le=10**9)
    loss: float = Field(ge=0.0, le=1e6)
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)  # of a class label
    auc: float | None = Field(default=None, ge=0.0, le=1.0)
    rmse: float | None = Field(default=None, ge=0.0, le=METRIC_LIMIT)  # of a numeric label
    mae: float | None = Field(default=None, ge=0.0, le=METRIC_LIMIT)


OPTIONAL_METRICS = ("accuracy", "auc", "rmse", "mae")  # as a task measures them: a class's, or a number's


@dataclass(frozen=True)
class Evaluation:
    """A model's metrics on `samples` held-out samples: the loss, then a class label's accuracy
    (and AUC for a two-class task) or a numeric label's RMSE and MAE."""
    samples: int
    loss: float
    accuracy: float | None = None
    auc: float | None = None
    rmse: float | None = None
    mae: float | None = None

    @classmethod
    def of(cls, metrics: dict[str, float], samples: int) -> "Evaluation":
        return cls(samples, metrics["loss"], **{name: metrics.get(name) for name in OPTIONAL_METRICS})

    def to_json(self) -> str:
        return orjson.dumps({k: v for k, v in asdict(self).items() if v is not None}).decode()

    @classmethod
    def from_json(cls, text: str) -> "Evaluation":
        """A report from its JSON text; ValueError says what does not fit."""
        if len(text) > MAX_REPORT_CHARS:
            raise ValueError(f"the evaluation report is longer than {MAX_REPORT_CHARS} characters")
        try:
            fields = ReportSchema.model_validate(orjson.loads(text))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"the evaluation report does not fit its schema: {exc}") from None
        values = fields.model_dump()
        if not all(math.isfinite(v) for v in values.values() if v is not None):
            raise ValueError("the evaluation report holds non-finite values")
        if (fields.accuracy is None) == (fields.rmse is None):
            raise ValueError("the evaluation report gives a class label's accuracy or a number's RMSE, one of them")
        return cls(**values)


def majority_baseline(labels: np.ndarray) -> dict[str, float | int]:
    """The accuracy of always answering the most common label of `labels`, and that label: the
    trivial baseline every accuracy is shown beside."""
    values, counts = np.unique(labels, return_counts=True)
    top = int(np.argmax(counts))
    return {"label": int(values[top]), "accuracy": float(counts[top] / counts.sum())}


def holdout_split(num_samples: int, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out) of a device's samples: `fraction` of them (at least one, when
    there are two or more) held out, drawn from `seed`."""
    order = np.random.default_rng(seed).permutation(num_samples)
    held = min(max(1, round(fraction * num_samples)), num_samples - 1) if num_samples > 1 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def weighted_mean(reports: Iterable[Evaluation]) -> dict[str, float] | None:
    """The reports' sample-weighted means, with the devices and samples they cover; None without
    reports. Each metric is averaged over the reports that have it; RMSE as the root of the mean
    squared error, as over the devices' rows pooled."""
    reports = list(reports)
    if not reports:
        return None
    samples = sum(r.samples for r in reports)
    mean = {"devices": len(reports), "samples": samples, "loss": sum(r.loss * r.samples for r in reports) / samples}
    for name in OPTIONAL_METRICS:
        having = [r for r in reports if getattr(r, name) is not None]
        if having:
            power = 2 if name == "rmse" else 1
            mean[name] = (sum(getattr(r, name) ** power * r.samples for r in having)
                          / sum(r.samples for r in having)) ** (1 / power)
    return mean
