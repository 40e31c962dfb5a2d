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


class ReportSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    samples: int = Field(ge=1, le=10**9)
    accuracy: float = Field(ge=0.0, le=1.0)
    loss: float = Field(ge=0.0, le=1e6)
    auc: float | None = Field(default=None, ge=0.0, le=1.0)


@dataclass(frozen=True)
class Evaluation:
    """A model's metrics on `samples` held-out samples (AUC only for a two-class task)."""
    samples: int
    accuracy: float
    loss: float
    auc: float | None = None

    @classmethod
    def of(cls, metrics: dict[str, float], samples: int) -> "Evaluation":
        return cls(samples, metrics["accuracy"], metrics["loss"], metrics.get("auc"))

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
        if not all(math.isfinite(v) for v in (fields.accuracy, fields.loss, fields.auc or 0.0)):
            raise ValueError("the evaluation report holds non-finite values")
        return cls(**fields.model_dump())


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
    reports. AUC is averaged over the reports that have one."""
    reports = list(reports)
    if not reports:
        return None
    samples = sum(r.samples for r in reports)
    mean = {"devices": len(reports), "samples": samples,
            "accuracy": sum(r.accuracy * r.samples for r in reports) / samples,
            "loss": sum(r.loss * r.samples for r in reports) / samples}
    with_auc = [r for r in reports if r.auc is not None]
    if with_auc:
        mean["auc"] = sum(r.auc * r.samples for r in with_auc) / sum(r.samples for r in with_auc)
    return mean
