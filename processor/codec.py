"""Models and deltas as safetensors bytes: the only format that ever goes to IPFS.

safetensors parsing never runs code (unlike pickle). Decoding validates everything against the
task's architecture before a tensor is used: names, shapes, dtype, finite values, metadata. Only
the task's global tensors (`Task.spec`) are ever encoded; a file carrying a private one is refused.
"""
from __future__ import annotations

import math
import re
import struct
from typing import Annotated, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from safetensors.numpy import save

from processor.evaluation import Evaluation
from processor.penalty import Curvature, RoundCurvature
from processor.privacy import PrivacyPlan
from processor.tasks import Task
from processor.training import TrainingSettings
from processor.weights import Weights, is_private

FORMAT = "fl-ipfs/1"
STORED_DTYPES = {"float32": np.float32, "float16": np.float16}  # of deltas and of the Fisher
FLOAT16_MAX = float(np.finfo(np.float16).max)
# safetensors is little-endian; U32 holds a masked update's field elements (processor.secagg)
FILE_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "U32": np.dtype("<u4")}
MAX_HEADER_BYTES = 1 << 20


class CodecError(ValueError):
    """The bytes are not a valid model or delta for this task; the message says what is wrong."""


def _metadata(task: Task, kind: str, **fields) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind, "task": task.name, "arch": task.arch_id,
            **{k: str(v) for k, v in fields.items()}}


def _storable_dtype(values: Weights, dtype: str) -> str:
    """`dtype`, or float32 when a value lies beyond float16's range (it would become infinite)."""
    if dtype == "float16" and any(np.max(np.abs(v), initial=0.0) > FLOAT16_MAX for v in values.values()):
        return "float32"
    return dtype


def _fisher_tensors(task: Task, fisher: Weights) -> dict[str, np.ndarray]:
    """`fisher/<name>` tensors as float16, or as float32 should a value lie beyond float16's range."""
    dtype = STORED_DTYPES[_storable_dtype(fisher, "float16")]
    return {f"fisher/{n}": np.ascontiguousarray(fisher[n], dtype) for n in task.spec}


def _client_list(scales: dict[str, float]) -> str:
    return ",".join(f"{client}:{scale!r}" for client, scale in sorted(scales.items()))


def encode_model(task: Task, weights: Weights, fisher: Weights, round_id: int, plan: TrainingSettings,
                 published: dict[str, str] | None = None, curvature: RoundCurvature | None = None) -> bytes:
    """A base model: its weights as float32 and the Fisher information that anchors EWC as float16
    (a quarter less to move to every client; EWC's results are the same to 3 decimals,
    benchmarks/README.md); as float32 should a value lie beyond float16's range. `plan` is how
    every client trains from it this round; `published`, what else the organization states with it
    for anyone to read (how it merges, its own test metrics of the model). `curvature`: the last
    merged round's FedCurv statistics, as float32, with the clients they sum."""
    tensors = {f"weights/{n}": np.ascontiguousarray(weights[n], np.float32) for n in task.spec}
    tensors.update(_fisher_tensors(task, fisher))
    notes = dict(published or {})
    if curvature is not None:
        for prefix, part in (("curvature_fisher", curvature.total.fisher), ("curvature_pull", curvature.total.pull)):
            tensors.update({f"{prefix}/{n}": np.ascontiguousarray(part[n], np.float32) for n in task.spec})
        notes.update(curvature_round=str(curvature.round_id), curvature_clients=_client_list(curvature.scales))
    return save(tensors, metadata=_metadata(task, "base", round=round_id, plan=plan.to_json(), **notes))


def encode_delta(task: Task, delta: Weights, round_id: int, base_cid: str, num_samples: int, client: str,
                 dtype: str = "float32", evaluation: Evaluation | None = None, fisher: Weights | None = None) -> bytes:
    """A client's update (local minus base), optionally stored as float16 to halve its size; as
    float32 all the same when a value lies beyond float16's range. `evaluation`: the client's
    metrics of the base on its held-out data (federated evaluation); `fisher`: the base's Fisher
    on its data, scaled to mean 1 (FedCurv), as float16 unless a value lies beyond its range."""
    if dtype not in STORED_DTYPES:
        raise CodecError(f"unsupported delta dtype {dtype!r}; choose one of {', '.join(STORED_DTYPES)}")
    dtype = _storable_dtype(delta, dtype)
    tensors = {f"delta/{n}": np.ascontiguousarray(delta[n], STORED_DTYPES[dtype]) for n in task.spec}
    if fisher is not None:
        tensors.update(_fisher_tensors(task, fisher))
    reported = {"evaluation": evaluation.to_json()} if evaluation else {}
    return save(tensors, metadata=_metadata(task, "delta", round=round_id, base_cid=base_cid,
                                            num_samples=num_samples, client=client, dtype=dtype, **reported))


# Bounds of the header's schema: far above what any task's model needs, and small enough that no
# header can cost much to check.
MAX_TENSORS = 256
MAX_DIMS = 8
MAX_NAME = 200
MAX_METADATA = 32
MAX_METADATA_VALUE = 512

_Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]


class TensorEntry(BaseModel):
    """One tensor's entry in a safetensors header."""
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    dtype: Annotated[str, StringConstraints(max_length=8)]
    shape: Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(max_length=MAX_DIMS)]
    data_offsets: Annotated[list[Annotated[int, Field(ge=0, le=2**62)]], Field(min_length=2, max_length=2)]


ROUND_NUMBER = r"[0-9]{1,20}"  # a round's number as metadata writes it
ADDRESS = r"0x[0-9a-fA-F]{40}"  # a client's Ethereum address


class DeltaMetadata(BaseModel):
    """The fields of a delta's metadata that the organization reads, beyond those of every artifact."""
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    round: Annotated[str, StringConstraints(pattern=rf"^{ROUND_NUMBER}$")]
    base_cid: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
    num_samples: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,19}$")]
    client: Annotated[str, StringConstraints(pattern=rf"^{ADDRESS}$")]


_TABLE = TypeAdapter(Annotated[dict[_Name, TensorEntry], Field(max_length=MAX_TENSORS)])
# The clients a base's FedCurv statistics sum, with each one's factor: one list as long as a round
# (about 60 characters a client), the only metadata value past MAX_METADATA_VALUE.
MAX_CLIENT_LIST = 1 << 17
_CLIENT_ENTRY = rf"{ADDRESS}:[0-9.e+-]{{1,24}}"
_CLIENT_LIST = TypeAdapter(Annotated[str, StringConstraints(max_length=MAX_CLIENT_LIST,
                                                            pattern=rf"^{_CLIENT_ENTRY}(,{_CLIENT_ENTRY})*$")],
                           config=ConfigDict(strict=True))
_METADATA = TypeAdapter(Annotated[dict[_Name, Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE)]],
                                  Field(max_length=MAX_METADATA)], config=ConfigDict(strict=True))


def _schema_error(what: str, exc: ValidationError) -> CodecError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    shown = repr(first["input"])
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = first["msg"][:1].lower() + first["msg"][1:]
    return CodecError(f"{what}{' ' + where if where else ''}: {message}, got {shown}{more}")


def read_header(data: bytes) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensor table and the metadata of safetensors bytes, read without touching the tensors
    and checked against the header's schema: anything that does not fit is a CodecError."""
    if len(data) < 8:
        raise CodecError(f"not a safetensors file: {len(data)} bytes is shorter than its header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise CodecError(f"not a safetensors file, or truncated: header of {size} bytes in a {len(data)}-byte file")
    try:
        # orjson refuses nesting beyond 1,024 levels by itself, with no recursion on Python's stack
        header = orjson.loads(data[8:8 + size])
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CodecError("not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    clients = metadata.pop("curvature_clients", None) if isinstance(metadata, dict) else None
    try:
        metadata = _METADATA.validate_python(metadata)
    except ValidationError as exc:
        raise _schema_error("metadata", exc) from None
    if clients is not None:
        try:
            metadata["curvature_clients"] = _CLIENT_LIST.validate_python(clients)
        except ValidationError as exc:
            raise _schema_error("metadata curvature_clients", exc) from None
    try:
        table = _TABLE.validate_python(header)
    except ValidationError as exc:
        raise _schema_error("tensor", exc) from None
    return table, metadata


def _check_metadata(task: Task, metadata: dict[str, str], kind: str) -> None:
    expected = {"format": FORMAT, "kind": kind, "task": task.name, "arch": task.arch_id}
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise CodecError(f"metadata {key} is {metadata.get(key)!r}, expected {value!r}")


def _all_finite(tensor: np.ndarray) -> bool:
    flat = tensor.ravel()
    # a BLAS dot is finite exactly when every value is, unless huge finite values overflow it:
    # only then pay for the elementwise check
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.dot(flat, flat)) or np.all(np.isfinite(flat)))


def _tensor_views(data: bytes, header_size: int, table: dict[str, TensorEntry]) -> dict[str, np.ndarray]:
    """Read-only arrays over the tensors' bytes (no copy), once their offsets tile the body exactly."""
    body = len(data) - 8 - header_size
    position = 0
    for name, entry in sorted(table.items(), key=lambda item: item[1].data_offsets):
        start, end = entry.data_offsets
        size = math.prod(entry.shape) * FILE_DTYPES[entry.dtype].itemsize
        if start != position or end - start != size:
            raise CodecError(f"corrupt safetensors file: tensor {name} at bytes {entry.data_offsets} does not "
                             f"follow byte {position} with {size} bytes")
        position = end
    if position != body:
        raise CodecError(f"corrupt safetensors file: the tensors cover {position} of its {body} data bytes")
    return {name: np.frombuffer(data, FILE_DTYPES[entry.dtype], offset=8 + header_size + entry.data_offsets[0],
                                count=math.prod(entry.shape)).reshape(entry.shape)
            for name, entry in table.items()}


def _decode(task: Task, data: bytes, kind: str, prefixes: dict[str, tuple[str, ...]], spec: dict | None = None,
            header: tuple[dict[str, TensorEntry], dict[str, str]] | None = None):
    """The tensors of `data` as float32, each under a prefix of `prefixes` (mapped to the file
    dtypes allowed for it) for every tensor of `spec` (the task's global ones by default), and its
    metadata. `header`: what `read_header` gave, when the caller read it already."""
    spec = task.spec if spec is None else spec
    table, metadata = header or read_header(data)
    _check_metadata(task, metadata, kind)
    expected = {f"{p}/{n}": shape for p in prefixes for n, shape in spec.items()}
    missing = sorted(set(expected) - set(table))
    unknown = sorted(set(table) - set(expected))
    private = [name for name in unknown if is_private(name.split("/", 1)[-1])]
    if private:
        raise CodecError(f"private tensor(s) {', '.join(private)}: a device's user state never leaves it")
    if missing:
        raise CodecError(f"missing tensor(s): {', '.join(missing)}")
    if unknown:
        raise CodecError(f"unknown tensor(s): {', '.join(unknown)}")
    for name, entry in table.items():
        if tuple(entry.shape) != expected[name]:
            raise CodecError(f"tensor {name} has shape {tuple(entry.shape)}, expected {expected[name]}")
        dtypes = prefixes[name.split("/", 1)[0]]
        if entry.dtype not in dtypes:
            raise CodecError(f"tensor {name} has dtype {entry.dtype}, expected {' or '.join(dtypes)}")
    (header_size,) = struct.unpack("<Q", data[:8])
    tensors = _tensor_views(data, header_size, table)
    for name, tensor in tensors.items():
        if tensor.dtype.kind == "u":  # field elements: every value is one
            continue
        if tensor.dtype != np.float32:
            # float16 has no BLAS: its dot is a slow loop (50x float32's) that overflows at once, and
            # then the elementwise check runs too; one measured round spent 0.23 s validating its 5
            # updates. Widened here once.
            tensors[name] = tensor = tensor.astype(np.float32)
        if not _all_finite(tensor):
            raise CodecError(f"tensor {name} holds non-finite values (NaN or Inf)")
    return tensors, metadata


class DecodedModel(NamedTuple):
    weights: Weights
    fisher: Weights
    metadata: dict[str, str]
    curvature: RoundCurvature | None  # the last merged round's FedCurv statistics, when it carries them


def _non_negative(fisher: Weights, what: str) -> Weights:
    if any(np.any(f < 0) for f in fisher.values()):
        raise CodecError(f"{what} holds negative values")
    return fisher


def decode_model(task: Task, data: bytes) -> DecodedModel:
    """The weights, Fisher, metadata and FedCurv statistics of a base model built for `task`."""
    header = read_header(data)
    prefixes = {"weights": ("F32",), "fisher": ("F32", "F16")}
    carries_curvature = "curvature_round" in header[1]
    if carries_curvature:
        prefixes.update(curvature_fisher=("F32",), curvature_pull=("F32",))
    tensors, metadata = _decode(task, data, "base", prefixes, header=header)
    weights = {n: tensors[f"weights/{n}"] for n in task.spec}
    fisher = _non_negative({n: tensors[f"fisher/{n}"] for n in task.spec}, "the Fisher information")
    curvature = None
    if carries_curvature:
        total = Curvature(_non_negative({n: tensors[f"curvature_fisher/{n}"] for n in task.spec},
                                        "the FedCurv statistics' Fisher"),
                          {n: tensors[f"curvature_pull/{n}"] for n in task.spec})
        curvature = RoundCurvature(total, _round_number(metadata["curvature_round"]),
                                   _client_scales(metadata.get("curvature_clients", "")))
    return DecodedModel(weights, fisher, metadata, curvature)


def _round_number(text: str) -> int:
    if not re.fullmatch(ROUND_NUMBER, text):
        raise CodecError(f"metadata curvature_round is {text!r}, not a round number")
    return int(text)


def _client_scales(text: str) -> dict[str, float]:
    """Client -> factor, from a base's list of the clients its FedCurv statistics sum."""
    if not text:
        raise CodecError("metadata curvature_clients is missing: the FedCurv statistics name no client")
    scales: dict[str, float] = {}
    for entry in text.split(","):
        client, _, factor = entry.partition(":")
        try:
            scale = float(factor)
        except ValueError:
            scale = math.nan
        if not 0 < scale <= 1:
            raise CodecError(f"metadata curvature_clients gives {client} the factor {factor!r}, not in (0, 1]")
        if client.lower() in scales:
            raise CodecError(f"metadata curvature_clients names {client} twice")
        scales[client.lower()] = scale
    return scales


def training_plan(metadata: dict[str, str]) -> TrainingSettings:
    """How the round's clients train, from a base model's metadata."""
    if "plan" not in metadata:
        raise CodecError("the base model carries no training plan")
    try:
        return TrainingSettings.from_json(metadata["plan"])
    except ValueError as exc:
        raise CodecError(str(exc)) from None


def privacy_plan(metadata: dict[str, str]) -> PrivacyPlan:
    """How the round's clients privatize their deltas, from a base model's metadata; a base that
    carries no plan (published before plans had one) asks for no privacy."""
    if "privacy" not in metadata:
        return PrivacyPlan()
    try:
        return PrivacyPlan.from_json(metadata["privacy"])
    except ValueError as exc:
        raise CodecError(str(exc)) from None


def reported_evaluation(metadata: dict[str, str]) -> Evaluation | None:
    """The client's evaluation of the base in an update's metadata; None when it has none.
    Raises CodecError for a report that does not fit its schema."""
    if "evaluation" not in metadata:
        return None
    try:
        return Evaluation.from_json(metadata["evaluation"])
    except ValueError as exc:
        raise CodecError(str(exc)) from None


class DecodedDelta(NamedTuple):
    delta: Weights
    metadata: dict[str, str]
    fisher: Weights | None  # the base's Fisher on the client's data (FedCurv rounds)


def decode_delta(task: Task, data: bytes, expected_round: int | None = None,
                 expected_base_cid: str | None = None, with_fisher: bool = False) -> DecodedDelta:
    """The delta as float32, the metadata and (`with_fisher`, which FedCurv rounds ask for; then the
    file must carry it, and otherwise must not) the Fisher of a client's update, checked against
    the round it claims.

    Float32 tensors are read-only views of `data` (no copy); float16 ones are converted.
    """
    prefixes = {"delta": ("F32", "F16"), **({"fisher": ("F32", "F16")} if with_fisher else {})}
    tensors, metadata = _decode(task, data, "delta", prefixes)
    try:
        fields = DeltaMetadata.model_validate(metadata)
    except ValidationError as exc:
        raise _schema_error("metadata", exc) from None
    if expected_round is not None and fields.round != str(expected_round):
        raise CodecError(f"the update is for round {fields.round}, expected round {expected_round}")
    if expected_base_cid is not None and fields.base_cid != expected_base_cid:
        raise CodecError(f"the update was trained from base {fields.base_cid}, expected {expected_base_cid}")
    fisher = _non_negative({n: tensors[f"fisher/{n}"] for n in task.spec}, "the update's Fisher") \
        if with_fisher else None
    return DecodedDelta({n: tensors[f"delta/{n}"] for n in task.spec}, metadata, fisher)


# A masked update's one tensor beside the model's: its sample count, masked like its values, so that
# only a group's total is ever read.
SAMPLES_TENSOR = "samples"
_SAMPLES_SHAPE = (1,)


def encode_masked_delta(task: Task, masked: Weights, round_id: int, base_cid: str, client: str) -> bytes:
    """A client's update in a secure round: its quantized delta and its sample count plus its masks,
    as uint32 field elements (processor.secagg), which alone look uniformly random. The header's
    sample count is 1: the real one is in the masked tensor SAMPLES_TENSOR."""
    names = [*task.spec, SAMPLES_TENSOR]
    tensors = {f"masked/{n}": np.ascontiguousarray(masked[n], np.uint32) for n in names}
    return save(tensors, metadata=_metadata(task, "masked_delta", round=round_id, base_cid=base_cid,
                                            num_samples=1, client=client))


def decode_masked_delta(task: Task, data: bytes, expected_round: int, expected_base_cid: str,
                        expected_client: str) -> Weights:
    """The field elements of a masked update (the model's tensors and SAMPLES_TENSOR), checked
    against the round, base and client it must be for."""
    spec = {**task.spec, SAMPLES_TENSOR: _SAMPLES_SHAPE}
    tensors, metadata = _decode(task, data, "masked_delta", {"masked": ("U32",)}, spec)
    try:
        fields = DeltaMetadata.model_validate(metadata)
    except ValidationError as exc:
        raise _schema_error("metadata", exc) from None
    claimed = (fields.round, fields.base_cid, fields.client.lower())
    if claimed != (str(expected_round), expected_base_cid, expected_client.lower()):
        raise CodecError(f"the update is of {fields.client} for round {fields.round} from base {fields.base_cid}, "
                         f"expected {expected_client} for round {expected_round} from {expected_base_cid}")
    return {n: tensors[f"masked/{n}"] for n in spec}


def encode_private(task: Task, private: Weights) -> bytes:
    """A device's private tensors (its users' state), as float32, for its own disk only."""
    tensors = {f"private/{n}": np.ascontiguousarray(private[n], np.float32) for n in task.private_spec}
    return save(tensors, metadata=_metadata(task, "private"))


def decode_private(task: Task, data: bytes) -> Weights:
    """A device's private tensors from `encode_private`'s bytes, checked as every file is."""
    tensors, _ = _decode(task, data, "private", {"private": ("F32",)}, task.private_spec)
    return {n: np.array(tensors[f"private/{n}"]) for n in task.private_spec}
