"""A learning task as a document: the columns of a device's data file, the label, the model as a
Keras functional config (what `model.to_json()` writes), which of its layers stay on the device,
the loss, the metrics, the training defaults and the limits.

A spec reaches a device from the organization through IPFS, so every byte of it is read as an
attacker may have written it. The model config is checked before Keras sees it: only the layers,
initializers, regularizers and constraints named here (Keras's own: nothing that runs code, so no
Lambda and no custom object), only named activations, vocabularies and statistics given inline
(never a file to read), every size within the spec's limits, and the shape each layer claims for
its inputs recomputed with Keras's own `compute_output_shape` on the unbuilt layers, so that the
parameter count is known before any weight is allocated. Keras then rebuilds the checked config in
safe mode.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from processor.training import TrainingSettings
from processor.weights import PRIVATE_PREFIX, is_private

FORMAT = "fl-task/1"
MAX_SPEC_BYTES = 16 * 2**20
MAX_COLUMNS = 4096
MAX_VOCABULARY = 100_000  # entries of a categorical column's vocabulary, rows of an id's table
MAX_CLASSES = 1000
MAX_LAYERS = 64
MAX_WIDTH = 65_536  # units of a layer, values of an input
MAX_PARAMETERS = 5_000_000  # the most a spec's own limit may allow
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class SpecError(ValueError):
    """A task spec that cannot be used, with the field that is wrong named."""


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericColumn(_Document):
    """A number, or with `size` > 1 a vector of numbers in columns `name_0` .. `name_{size-1}`."""
    kind: Literal["numeric"]
    name: Name
    size: int = Field(1, ge=1, le=MAX_WIDTH)
    min: float | None = None
    max: float | None = None

    @property
    def columns(self) -> list[str]:
        """The names of the data file's columns it takes."""
        return [self.name] if self.size == 1 else [f"{self.name}_{i}" for i in range(self.size)]

    @model_validator(mode="after")
    def _range(self) -> "NumericColumn":
        if self.min is not None and self.max is not None and not self.min <= self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


def _distinct(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("names a value twice")
    return values


Tokens = Annotated[list[Token], AfterValidator(_distinct)]


class CategoricalColumn(_Document):
    kind: Literal["categorical"]
    name: Name
    vocabulary: Tokens = Field(min_length=1, max_length=MAX_VOCABULARY)


class IdColumn(_Document):
    """An integer id from 0 to cardinality - 1 (an item, a user slot)."""
    kind: Literal["id"]
    name: Name
    cardinality: int = Field(ge=1, le=MAX_VOCABULARY)


Column = Annotated[NumericColumn | CategoricalColumn | IdColumn, Field(discriminator="kind")]


class ClassLabel(_Document):
    """A class out of `classes`, as the data file writes them; the model gives one logit per class."""
    kind: Literal["binary", "multiclass"]
    name: Name
    classes: Tokens = Field(min_length=2, max_length=MAX_CLASSES)

    @model_validator(mode="after")
    def _classes(self) -> "ClassLabel":
        if (self.kind == "binary") != (len(self.classes) == 2):
            raise ValueError(f"a {self.kind} label has {'2' if self.kind == 'binary' else 'more than 2'} classes, "
                             f"this one {len(self.classes)}")
        return self


class NumericLabel(_Document):
    """A number to predict (regression). The model gives it standardized, (y - mean) / std, so that
    it trains in units of the label's spread whatever its own units; metrics are in its own units."""
    kind: Literal["numeric"]
    name: Name
    mean: float = Field(0.0, allow_inf_nan=False)
    std: float = Field(1.0, gt=0.0, allow_inf_nan=False)


Label = Annotated[ClassLabel | NumericLabel, Field(discriminator="kind")]

# What each kind of label may be trained and measured with.
LOSSES = {"binary": ("sparse_categorical_crossentropy",), "multiclass": ("sparse_categorical_crossentropy",),
          "numeric": ("mean_squared_error", "mean_absolute_error")}
METRICS = {"binary": ("accuracy", "auc", "loss"), "multiclass": ("accuracy", "loss"),
           "numeric": ("rmse", "mae", "loss")}


class Limits(_Document):
    parameters: int = Field(1_000_000, ge=1, le=MAX_PARAMETERS)
    rows: int = Field(1_000_000, ge=1, le=10_000_000)  # of one device's data file


class TaskSpec(_Document):
    format: Literal["fl-task/1"]
    name: Name
    features: list[Column] = Field(min_length=1, max_length=MAX_COLUMNS)
    label: Label
    model: dict[str, Any]  # a Keras functional model's config: one input per feature, named after it
    private_layers: list[Name] = Field(default_factory=list, max_length=MAX_LAYERS)  # kept on each device
    loss: str
    metrics: list[str] = Field(min_length=1, max_length=8)
    training: dict[str, int | float | str] = Field(default_factory=dict)  # TrainingSettings' fields
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        names = [column.name for column in self.features]
        if len(set(names)) != len(names):
            raise ValueError("two features have the same name")
        if self.label.name in names:
            raise ValueError(f"the label {self.label.name!r} is also a feature")
        if self.loss not in LOSSES[self.label.kind]:
            raise ValueError(f"loss {self.loss!r} does not fit a {self.label.kind} label; choose one of "
                             f"{', '.join(LOSSES[self.label.kind])}")
        for metric in self.metrics:
            if metric not in METRICS[self.label.kind]:
                raise ValueError(f"metric {metric!r} does not fit a {self.label.kind} label; choose from "
                                 f"{', '.join(METRICS[self.label.kind])}")
        try:
            TrainingSettings(**self.training)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training: {exc}") from None
        return self

    @property
    def plan(self) -> TrainingSettings:
        """How devices train unless the organization's round plan says otherwise."""
        return TrainingSettings(**self.training)

    @functools.cached_property
    def checked(self) -> "CheckedModel":
        """The model config as check_model checks it, once for the spec (SpecError if it does not hold)."""
        return check_model(self)

    @functools.cached_property
    def digest(self) -> str:
        """Names what the spec says, whatever the order or spacing of its file: a task's architecture,
        so that a model or an update made for another spec is refused."""
        canonical = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:32]

    def row_dtype(self):
        """A table of the spec's rows, one field per feature as its model input takes it (a numeric
        feature's `size` numbers, a category's text, an id): a NumPy structured dtype."""
        import numpy as np

        kinds = {"numeric": np.float32, "categorical": object, "id": np.int64}
        return np.dtype([(column.name, kinds[column.kind], (getattr(column, "size", 1),)) for column in self.features])

    @property
    def outputs(self) -> int:
        """The width of the model's output: a logit per class, or the one predicted value."""
        return len(self.label.classes) if isinstance(self.label, ClassLabel) else 1


def read_spec(data: bytes | str) -> TaskSpec:
    """The task spec in the JSON `data`; SpecError naming what is wrong, the model checked too."""
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"a task spec is at most {MAX_SPEC_BYTES} bytes, this one {len(data)}")
    try:
        spec = TaskSpec.model_validate(orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise SpecError(f"the task spec is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the spec"
        raise SpecError(f"{where}: {first['msg']}") from None
    spec.checked  # its model is checked as it is read, and kept for build_model
    return spec


# ---- the model config --------------------------------------------------------------------------

# (module, class name) of every object a config may name; anything else is refused, whatever it is.
LAYERS = ("InputLayer", "Dense", "Embedding", "Normalization", "StringLookup", "IntegerLookup", "CategoryEncoding",
          "Discretization", "Concatenate", "Add", "Subtract", "Multiply", "Average", "Dot", "Flatten", "Reshape",
          "Dropout", "Activation", "BatchNormalization", "LayerNormalization")
ALLOWED_OBJECTS = {
    *(("keras.layers", name) for name in LAYERS),
    *(("keras.initializers", name) for name in (
        "Zeros", "Ones", "Constant", "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform",
        "LecunNormal", "RandomNormal", "RandomUniform", "TruncatedNormal", "Orthogonal")),
    *(("keras.regularizers", name) for name in ("L1", "L2", "L1L2")),
    *(("keras.constraints", name) for name in ("MaxNorm", "NonNeg", "UnitNorm", "MinMaxNorm")),
    ("keras", "DTypePolicy"),
}
ACTIVATIONS = ("linear", "relu", "sigmoid", "softmax", "tanh", "gelu", "elu", "selu", "swish", "silu", "softplus",
               "leaky_relu", "relu6")
TENSOR = "__keras_tensor__"  # a reference to another layer's output in an inbound node
INPUT_DTYPES = {"numeric": ("float32",), "categorical": ("string",), "id": ("int32", "int64")}
# Fields that must hold values, never the path of a file for Keras to read.
INLINE_FIELDS = {"StringLookup": ("vocabulary",), "IntegerLookup": ("vocabulary",), "Normalization": ("mean", "variance")}


def _refuse(where: str, why: str) -> None:
    raise SpecError(f"model: {where}: {why}")


def _check_objects(value: Any, where: str, in_node: bool = False) -> None:
    """Every object the config names is one Keras makes without running anything of the spec's."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_objects(item, f"{where}[{i}]", in_node)
    elif isinstance(value, dict):
        if "class_name" in value:
            reference = (value.get("module"), value["class_name"])
            if not (reference in ALLOWED_OBJECTS or (in_node and value["class_name"] == TENSOR
                                                      and "module" not in value)):
                _refuse(where, f"{reference[1]!r} of module {reference[0]!r} is not one of the built-in Keras "
                               "objects a task may use")
            registered = value.get("registered_name")
            if registered not in (None, reference[1]):
                _refuse(where, f"registered name {registered!r} is not Keras's own")
        for key, item in value.items():
            if key == "activation" and item not in ACTIVATIONS:
                _refuse(where, f"activation {item!r} is not one of {', '.join(ACTIVATIONS)}")
            _check_objects(item, f"{where}.{key}", in_node or key == "inbound_nodes")


def _shape(value: Any, where: str) -> tuple[int | None, ...]:
    if not (isinstance(value, list) and 1 <= len(value) <= 4 and value[0] is None
            and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_WIDTH for n in value[1:])):
        _refuse(where, f"a shape is [null, then 1 to 3 sizes from 1 to {MAX_WIDTH}], not {value!r}")
    if math.prod(value[1:]) > MAX_WIDTH:
        _refuse(where, f"a tensor of shape {value} holds more than {MAX_WIDTH} values a row")
    return tuple(value)


def _tensors(args: Any, where: str) -> list[dict]:
    """The tensor references among a node's arguments (a list of them for a merging layer)."""
    if isinstance(args, dict) and args.get("class_name") == TENSOR:
        return [args]
    if isinstance(args, list) and len(args) <= MAX_LAYERS:
        return [tensor for i, item in enumerate(args) for tensor in _tensors(item, f"{where}[{i}]")]
    _refuse(where, "a layer's arguments are the outputs of earlier layers")


def _parameters(layer, class_name: str, config: dict, inputs: list[tuple]) -> int:
    """The weights `layer` (unbuilt) will hold once built on `inputs`, from its config."""
    last = inputs[0][-1] if inputs else 0
    if class_name == "Dense":
        return (last + bool(config.get("use_bias", True))) * layer.units
    if class_name == "Embedding":
        return layer.input_dim * layer.output_dim
    if class_name == "BatchNormalization":
        return 4 * last
    if class_name == "LayerNormalization":
        return 2 * last
    return 0  # a Normalization's statistics, given in its config, are constants


@dataclass(frozen=True)
class CheckedModel:
    parameters: int  # the weights the model holds, trainable or not
    config: dict  # what Keras is given: the checked parts of the spec's config only


def check_model(spec: TaskSpec) -> CheckedModel:
    """Check `spec.model` as the module's docstring says. What Keras will be given is rebuilt from
    the checked parts alone: no layer's build config (Keras would build the layer on the shape it
    claims before the graph gives one) and no compile config (its optimizer and loss are objects)."""
    import keras

    config = spec.model
    if (config.get("class_name"), config.get("module")) != ("Functional", "keras.src.models.functional"):
        _refuse("class_name", "a task's model is a Keras functional model (what model.to_json() writes)")
    if config.get("registered_name") not in (None, "Functional"):
        _refuse("registered_name", "not Keras's own")
    body = config.get("config")
    if not isinstance(body, dict) or not isinstance(body.get("layers"), list):
        _refuse("config.layers", "missing")
    layers = body["layers"]
    checked_layers = []
    if not 2 <= len(layers) <= MAX_LAYERS:
        _refuse("config.layers", f"a model has 2 to {MAX_LAYERS} layers, this one {len(layers)}")
    _check_objects(layers, "config.layers")
    features = {column.name: column for column in spec.features}
    outputs: dict[str, tuple] = {}  # layer name -> the shape of its output
    weights: dict[str, int] = {}
    total = 0
    for i, entry in enumerate(layers):
        where = f"layer {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict) or not set(entry) <= set(LAYER_KEYS):
            _refuse(where, f"a layer is an object with its config and no other fields than {', '.join(LAYER_KEYS)}")
        class_name, layer_config, name = entry.get("class_name"), entry["config"], entry.get("name")
        checked_layers.append({"module": "keras.layers", "class_name": class_name, "config": layer_config,
                               "registered_name": None, "name": name, "inbound_nodes": entry.get("inbound_nodes")})
        if not isinstance(name, str) or name != layer_config.get("name") or name in outputs:
            _refuse(where, f"each layer has a name of its own, the same in its config (got {name!r})")
        where = f"layer {name!r}"
        if class_name not in LAYERS:
            _refuse(where, f"{class_name!r} is not one of the layers a task may use: {', '.join(LAYERS)}")
        for field in INLINE_FIELDS.get(class_name, ()):
            held = layer_config.get(field)
            if held is not None and not isinstance(held, list):
                _refuse(where, f"{field} must be given as a list of values, not {type(held).__name__}")
            if isinstance(held, list) and len(held) > MAX_VOCABULARY:
                _refuse(where, f"{field} holds {len(held)} values, more than {MAX_VOCABULARY}")
        if class_name == "InputLayer":
            column = features.get(name)
            if column is None:
                _refuse(where, "an input that is not one of the spec's features")
            shape = _shape(layer_config.get("batch_shape"), f"{where}.batch_shape")
            expected = (None, column.size if isinstance(column, NumericColumn) else 1)
            if shape != expected or layer_config.get("dtype") not in INPUT_DTYPES[column.kind]:
                _refuse(where, f"the {column.kind} feature's input is of shape {list(expected)} and dtype "
                               f"{' or '.join(INPUT_DTYPES[column.kind])}, not {list(shape)} "
                               f"{layer_config.get('dtype')!r}")
            outputs[name] = shape
            continue
        if class_name == "Normalization" and layer_config.get("mean") is None:
            _refuse(where, "a Normalization layer carries its mean and variance (a device adapts nothing)")
        nodes = entry.get("inbound_nodes")
        if not (isinstance(nodes, list) and len(nodes) == 1 and isinstance(nodes[0], dict)
                and set(nodes[0]) <= {"args", "kwargs"}):
            _refuse(where, "a layer is called once, on earlier layers' outputs")
        if any(value is not None and not isinstance(value, bool) for value in (nodes[0].get("kwargs") or {}).values()):
            _refuse(where, "a call's keyword arguments are flags only")
        inputs = []
        for tensor in _tensors(nodes[0].get("args"), f"{where}.inbound_nodes"):
            history = tensor.get("config", {}).get("keras_history")
            if not (isinstance(history, list) and len(history) == 3 and history[0] in outputs
                    and history[1:] == [0, 0]):
                _refuse(where, f"its input {history!r} is not an earlier layer's output")
            claimed = _shape(tensor["config"].get("shape"), f"{where}'s input")
            if claimed != outputs[history[0]]:
                _refuse(where, f"its input from {history[0]!r} is claimed to be of shape {list(claimed)}, but that "
                               f"layer gives {list(outputs[history[0]])}")
            inputs.append(claimed)
        if not inputs:
            _refuse(where, "a layer is called on at least one earlier layer's output")
        try:
            layer = keras.saving.deserialize_keras_object(
                {"module": "keras.layers", "class_name": class_name, "config": layer_config}, safe_mode=True)
            shape = layer.compute_output_shape(inputs if len(inputs) > 1 or class_name in MERGING else inputs[0])
        except Exception as exc:  # Keras's own word on a config or shapes that do not fit
            _refuse(where, f"{type(exc).__name__}: {exc}")
        outputs[name] = _shape(list(shape), f"{where}'s output")
        weights[name] = _parameters(layer, class_name, layer_config, inputs)
        total += weights[name]
        if total > spec.limits.parameters:
            _refuse(where, f"the model holds more than the spec's limit of {spec.limits.parameters} parameters")
    _check_ends(spec, body, outputs, weights)
    return CheckedModel(total, {"module": "keras.src.models.functional", "class_name": "Functional",
                                "registered_name": "Functional",
                                "config": {"name": spec.name, "trainable": True, "layers": checked_layers,
                                           "input_layers": body["input_layers"],
                                           "output_layers": body["output_layers"]}})


LAYER_KEYS = ("module", "class_name", "config", "registered_name", "name", "inbound_nodes", "build_config")
MERGING = ("Concatenate", "Add", "Subtract", "Multiply", "Average", "Dot")


def _check_ends(spec: TaskSpec, body: dict, outputs: dict[str, tuple], weights: dict[str, int]) -> None:
    inputs = body.get("input_layers")
    named = sorted(inputs) if isinstance(inputs, dict) else None
    if named != sorted(column.name for column in spec.features) or any(
            inputs[name] != [name, 0, 0] for name in named):
        _refuse("config.input_layers", "the model's inputs are the spec's features, each by its name")
    output = body.get("output_layers")
    if not (isinstance(output, list) and len(output) == 3 and output[0] in outputs and output[1:] == [0, 0]):
        _refuse("config.output_layers", "the model has one output, an earlier layer's")
    if outputs[output[0]] != (None, spec.outputs):
        _refuse("config.output_layers", f"the output is of shape {list(outputs[output[0]])}, where the "
                                        f"{spec.label.kind} label needs [null, {spec.outputs}]")
    for name in spec.private_layers:
        if not weights.get(name):
            _refuse("private_layers", f"{name!r} is not a layer of the model that holds weights")
        if not is_private(name):  # the codec, the merge and the devices know private tensors by that prefix
            _refuse("private_layers", f"{name!r}: a private layer's name starts with {PRIVATE_PREFIX!r}")
    unlisted = [name for name, count in weights.items() if count and is_private(name)
                and name not in spec.private_layers]
    if unlisted:
        _refuse("private_layers", f"{unlisted[0]!r} is named as a private layer ({PRIVATE_PREFIX}...) but not listed")


def build_model(spec: TaskSpec, seed: int = 0):
    """The spec's model, checked first, rebuilt by Keras in safe mode, with the EWC train step
    (`processor.ewc.EWCModel`) over the same layers."""
    import keras

    from processor.ewc import EWCModel

    checked = spec.checked
    keras.utils.set_random_seed(seed)
    # Keras takes the config apart as it reads it: it is given a copy, and the spec's is kept for the next model
    functional = keras.saving.deserialize_keras_object(copy.deepcopy(checked.config), safe_mode=True)
    if functional.count_params() != checked.parameters:
        raise SpecError(f"model: Keras built {functional.count_params()} parameters where its config gives "
                        f"{checked.parameters}")
    return EWCModel(inputs=functional.input, outputs=functional.output)


# ---- drafting a spec from a data file ------------------------------------------------------------

DRAFT_HIDDEN = 32  # the drafted model's one hidden layer
NUMERIC_LABEL_MIN_VALUES = 20  # a numeric label with fewer distinct values is drafted as classes


def draft_spec(path, label: str, name: str = "task", max_rows: int = 100_000) -> dict:
    """A first spec for the CSV at `path` (a header, then rows), predicting its column `label`: a
    column whose values are all numbers is numeric (unbounded; the model's Normalization layer
    has its mean and variance from the file), any other is categorical (its values, one-hot
    through a StringLookup); the label is numeric when it is a number with many values, else a
    class. The model: the features side by side, one ReLU layer, the output. A draft to read and
    edit (kinds, the numbers' ranges, the model), then to check with read_spec."""
    import csv

    import keras
    import numpy as np

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [column.strip() for column in next(reader, [])]
        rows = [row for _, row in zip(range(max_rows), reader) if any(field.strip() for field in row)]
    if label not in header:
        raise SpecError(f"{path} has no column {label!r} (its columns: {', '.join(header[:10])})")
    if not rows or any(len(row) != len(header) for row in rows):
        raise SpecError(f"{path}: every row holds one value per column of its header, and there is at least one")
    values = {column: [row[i].strip() for row in rows] for i, column in enumerate(header)}

    def numbers(column: str) -> np.ndarray | None:
        try:
            parsed = np.array([float(value) for value in values[column]], np.float64)
        except ValueError:
            return None
        return parsed if np.all(np.isfinite(parsed)) else None

    features, inputs, parts = [], {}, []
    for column in header:
        if column == label:
            continue
        parsed = numbers(column)
        if parsed is not None:
            # unbounded: the range one file shows is not every device's (a user adds the bounds that hold)
            features.append({"kind": "numeric", "name": column})
            inputs[column] = keras.Input(shape=(1,), name=column)
            parts.append(keras.layers.Normalization(mean=[float(parsed.mean())], variance=[float(parsed.var()) or 1.0],
                                                    name=f"{column}_scaled")(inputs[column]))
        else:
            vocabulary = sorted(set(values[column]))
            features.append({"kind": "categorical", "name": column, "vocabulary": vocabulary})
            inputs[column] = keras.Input(shape=(1,), name=column, dtype="string")
            parts.append(keras.layers.StringLookup(vocabulary=vocabulary, output_mode="one_hot",
                                                   name=f"{column}_onehot")(inputs[column]))
    if not features:
        raise SpecError(f"{path} holds no column beside the label to learn from")
    targets = numbers(label)
    if targets is not None and len(np.unique(targets)) >= NUMERIC_LABEL_MIN_VALUES:
        label_spec = {"kind": "numeric", "name": label, "mean": float(targets.mean()), "std": float(targets.std()) or 1.0}
        outputs = 1
        loss, metrics = "mean_squared_error", ["rmse", "mae"]
    else:
        classes = sorted(set(values[label]), key=float if targets is not None else str)
        label_spec = {"kind": "binary" if len(classes) == 2 else "multiclass", "name": label, "classes": classes}
        outputs, loss = len(classes), "sparse_categorical_crossentropy"
        metrics = ["accuracy", "auc"] if len(classes) == 2 else ["accuracy"]
    joined = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="features")(parts)
    hidden = keras.layers.Dense(DRAFT_HIDDEN, activation="relu", name="hidden")(joined)
    model = keras.Model(inputs=inputs, outputs=keras.layers.Dense(outputs, name="output")(hidden))
    return {"format": FORMAT, "name": name, "features": features, "label": label_spec,
            "model": orjson.loads(model.to_json()), "private_layers": [], "loss": loss, "metrics": metrics,
            "training": {}, "limits": Limits().model_dump()}
