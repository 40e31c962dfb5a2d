"""How a client trains in a round: the one definition of these settings, and their command-line flags.

Every place that trains (the client app, the demo, the simulation, the benchmarks) takes a
TrainingSettings; run.py and the benchmarks get theirs from `add_flags` and `from_args`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields, replace

UPDATE_DTYPES = ("float16", "float32")  # processor.codec.STORED_DTYPES, without loading the codec
REGULARIZERS = ("ewc", "fedprox", "fedcurv")  # processor.penalty.REGULARIZERS, without loading NumPy


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = 1  # local epochs per round
    batch_size: int = 32
    learning_rate: float = 0.05  # of plain SGD
    ewc_lambda: float = 0.0  # strength of the penalty; 0 = plain FedAvg local training
    regularizer: str = "ewc"  # what the penalty pulls towards, and how hard per coordinate: processor.penalty
    update_dtype: str = "float16"  # of the published delta: half float32's bytes, no accuracy cost measured

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be at least 1, got {self.epochs} and {self.batch_size}")
        if not self.learning_rate > 0 or self.ewc_lambda < 0:
            raise ValueError(f"the learning rate must be positive and the EWC lambda not negative, got "
                             f"{self.learning_rate} and {self.ewc_lambda}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; choose one of {', '.join(REGULARIZERS)}")
        if self.update_dtype not in UPDATE_DTYPES:
            raise ValueError(f"unsupported update dtype {self.update_dtype!r}; "
                             f"choose one of {', '.join(UPDATE_DTYPES)}")

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser, defaults: "TrainingSettings | None" = None,
                  exclude: tuple[str, ...] = (), plans: "dict[str, TrainingSettings] | None" = None) -> None:
        """--epochs, --batch-size, --learning-rate, --ewc-lambda, --regularizer and --update-dtype (but
        those named in `exclude`), with the values of `defaults` (TrainingSettings() by default). With `plans`
        (each task's own plan, by name), a flag not given is None, its help lists the tasks' values,
        and `from_args` takes the task's plan for it."""
        default = defaults or TrainingSettings()
        helps = {
            "epochs": ("--epochs", int, "local epochs per round"),
            "batch_size": ("--batch-size", int, "local batch size"),
            "learning_rate": ("--learning-rate", float, "SGD learning rate"),
            "ewc_lambda": ("--ewc-lambda", float, "strength of the penalty (0 = plain FedAvg local training)"),
            "regularizer": ("--regularizer", str, "the penalty: ewc (the organization's Fisher, anchored at the "
                                                  "base), fedprox (uniform), fedcurv (the last round's clients' "
                                                  "Fishers, anchored at their weights)"),
            "update_dtype": ("--update-dtype", str, "dtype of the published update: float16 halves its bytes "
                                                    "(no accuracy cost measured: benchmarks/update_size.py)"),
        }
        choices = {"regularizer": REGULARIZERS, "update_dtype": UPDATE_DTYPES}
        for name, (flag, kind, text) in helps.items():
            if name in exclude:
                continue
            extra = {"choices": choices[name]} if name in choices else {}
            if plans:
                by_task = ", ".join(f"{task} {getattr(plan, name)}" for task, plan in plans.items())
                parser.add_argument(flag, dest=name, type=kind, default=None,
                                    help=f"{text} (default: the task's plan: {by_task})", **extra)
            else:
                parser.add_argument(flag, dest=name, type=kind, default=getattr(default, name),
                                    help=f"{text} (default: %(default)s)", **extra)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: "TrainingSettings | None" = None,
                  **overrides) -> "TrainingSettings":
        """The flags' settings; a flag left None takes `base`'s value (a task's plan)."""
        base = base or cls()
        values = {f.name: getattr(args, f.name) for f in fields(cls)
                  if hasattr(args, f.name) and getattr(args, f.name) is not None}
        return replace(base, **{**values, **overrides})

    def to_json(self) -> str:
        """The settings as the round plan carries them (in the base model's metadata)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainingSettings":
        """Settings from a round plan, checked field by field; ValueError says what is wrong."""
        try:
            values = json.loads(text) if len(text) <= 1000 else None
        except ValueError:
            values = None
        if not isinstance(values, dict):
            raise ValueError("the training plan is not a JSON object of at most 1000 characters")
        kinds = {"epochs": int, "batch_size": int, "learning_rate": float, "ewc_lambda": float, "regularizer": str,
                 "update_dtype": str}
        if set(values) != set(kinds):
            raise ValueError(f"the training plan has the fields {sorted(values)}, expected {sorted(kinds)}")
        for name, kind in kinds.items():
            value = values[name]
            accepted = (int, float) if kind is float else (kind,)
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise ValueError(f"the training plan's {name} is {value!r}, not a {kind.__name__}")
        return cls(**{**values, "learning_rate": float(values["learning_rate"]),
                      "ewc_lambda": float(values["ewc_lambda"])})

    def as_flags(self, exclude: tuple[str, ...] = ()) -> list[str]:
        """These settings as the flags `add_flags` defines, for starting another process."""
        return [part for name, value in asdict(self).items() if name not in exclude
                for part in (f"--{name.replace('_', '-')}", str(value))]
