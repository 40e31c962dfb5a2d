"""A round's published model, as anyone may take it out: named by its CID or by the round that
merged it (read from the chain), fetched from IPFS and checked against its CID and its task, then
scored on a data file or exported as a Keras file (`run.py score`, `run.py export`).

A device's private tensors (a recommender's users) are never published: the model is scored as
for a user it has never seen.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

from infra import chain, ipfs
from infra.settings import Settings
from processor import codec
from processor.spec_task import SpecTask, load_task
from processor.task_spec import MAX_SPEC_BYTES
from processor.tasks import Task
from processor.weights import Weights


class ModelError(ValueError):
    """The model asked for cannot be had: the message says why."""


class PublishedModel(NamedTuple):
    task: Task
    weights: Weights
    cid: str


def model_cid(settings: Settings, model: str) -> str:
    """The CID `model` names: a CID as it is, or a round's number: the model that round merged."""
    if not model.isdigit():
        ipfs.parse_cid(model)  # StorageError names what is wrong with it
        return model
    w3 = chain.connect(settings.chain_url)
    address = chain.find_deployment(w3, settings.contract_record)
    if address is None:
        raise ModelError(f"no round registry is recorded for this chain in {settings.contract_record}")
    info = chain.Registry(w3, address).round(int(model)) if 1 <= int(model) <= chain.MAX_ROUND else None
    if info is None or not info.model_cid:
        raise ModelError(f"round {model} has merged no model yet")
    return info.model_cid


def fetch_model(settings: Settings, task_reference: str, model: str) -> PublishedModel:
    """The model `model` names (as `model_cid` reads it), of the task `task_reference` names (a
    spec named by its CID is fetched too), checked against both."""
    store = ipfs.open_store(settings.ipfs_api, settings.state_dir, timeout=settings.timeout)
    task = load_task(task_reference, fetch=lambda cid: store.get(cid, max_bytes=MAX_SPEC_BYTES))
    cid = model_cid(settings, model)
    try:
        return PublishedModel(task, codec.decode_model(task, store.get(cid)).weights, cid)
    except codec.CodecError as exc:
        raise ModelError(f"{cid} is not a model of the task {task.name!r}: {exc}") from None


def score(published: PublishedModel, path: Path) -> tuple[dict[str, float] | None, dict[str, list]]:
    """The model's metrics on the data file at `path` (None when the file has no label column, which
    only a task spec's may leave out) and its answer for every row, as columns."""
    task = published.task
    if isinstance(task, SpecTask):
        from processor.device_data import read_spec_data

        x, y = read_spec_data(task.document, path, label_optional=True)
    else:
        x, y = task.read_device_data(path)
    outputs = task.logits(published.weights, x)
    return (None if y is None else task.metrics(outputs, y)), task.predictions(outputs)


def write_predictions(predictions: dict[str, list], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", *predictions])
        writer.writerows([i + 2, *values] for i, values in enumerate(zip(*predictions.values())))


def export(published: PublishedModel, path: Path) -> list[Path]:
    """The model as a Keras file at `path` (`keras.saving.load_model` reads it back, with Keras's
    own layers only), and for a task spec the spec beside it: the files written."""
    import keras

    from processor.ewc import set_weights

    task = published.task
    with task.lock:
        trained = task.model()
        set_weights(trained, {**published.weights, **task.initial_private()})
        keras.Model(inputs=trained.input, outputs=trained.output, name=task.name).save(path)
    written = [path]
    if isinstance(task, SpecTask):
        written.append(path.with_suffix(".spec.json"))
        written[-1].write_bytes(task.source)
    return written
