"""A task spec is read as an attacker may have written it: only Keras's built-in layers, sizes
within its limits, shapes recomputed, nothing built before the checks pass."""
from __future__ import annotations

import copy
import json

import keras
import numpy as np
import pytest

from processor import task_spec
from processor.ewc import model_inputs
from processor.task_spec import SpecError, build_model, check_model, read_spec

FEATURES = [{"kind": "numeric", "name": "age", "min": 0, "max": 120},
            {"kind": "categorical", "name": "country", "vocabulary": ["de", "fr", "it"]},
            {"kind": "id", "name": "item", "cardinality": 50}]


def offer_model(hidden: int = 8) -> dict:
    """Will this user open the offer: a model as a user would write it, with Keras's preprocessing."""
    inputs = {"age": keras.Input(shape=(1,), name="age"),
              "country": keras.Input(shape=(1,), name="country", dtype="string"),
              "item": keras.Input(shape=(1,), name="item", dtype="int32")}
    age = keras.layers.Normalization(mean=[40.0], variance=[100.0], name="age_norm")(inputs["age"])
    country = keras.layers.StringLookup(vocabulary=["de", "fr", "it"], output_mode="one_hot",
                                        name="country_lookup")(inputs["country"])
    item = keras.layers.Flatten(name="item_flat")(keras.layers.Embedding(50, 4, name="item_factors")(inputs["item"]))
    joined = keras.layers.Concatenate(name="joined")([age, country, item])
    hidden_layer = keras.layers.Dense(hidden, activation="relu", name="hidden")(joined)
    outputs = keras.layers.Dense(2, name="output")(hidden_layer)
    return json.loads(keras.Model(inputs=inputs, outputs=outputs).to_json())


def spec_document(model: dict | None = None, **changes) -> dict:
    return {"format": "fl-task/1", "name": "offer", "features": copy.deepcopy(FEATURES),
            "label": {"kind": "binary", "name": "opened", "classes": ["no", "yes"]},
            "model": offer_model() if model is None else model, "private_layers": [],
            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy", "auc"],
            "training": {"epochs": 2, "learning_rate": 0.1}, **changes}


def layer(document: dict, name: str) -> dict:
    return next(entry for entry in document["model"]["config"]["layers"] if entry["name"] == name)


def refused(document: dict, match: str, nothing_built: bool = False) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("Keras was asked to build the model")

    with pytest.MonkeyPatch.context() as patch:
        if nothing_built:  # the checks refuse it before Keras builds anything
            patch.setattr(keras.Model, "__init__", no_model)
        with pytest.raises(SpecError, match=match):
            read_spec(json.dumps(document))


def test_a_spec_with_keras_preprocessing_builds_the_model_it_describes():
    spec = read_spec(json.dumps(spec_document()))
    assert spec.plan.epochs == 2 and spec.outputs == 2
    model = build_model(spec)
    # age, 4 one-hot (3 countries and the unknown) and 4 item factors: (9 + 1) x 8, then (8 + 1) x 2; the
    # item table 50 x 4 (the normalization's statistics are constants)
    assert check_model(spec).parameters == 80 + 18 + 200
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 80 + 18 + 200
    rows = {"age": np.array([[30.0], [70.0]], np.float32), "country": np.array([["fr"], ["xx"]]),
            "item": np.array([[3], [49]], np.int32)}
    assert model(rows).shape == (2, 2)  # an unknown country is the lookup's out-of-vocabulary slot


@pytest.mark.parametrize("change, match", [
    (lambda d: d["features"].append({"kind": "numeric", "name": "age"}), "two features have the same name"),
    (lambda d: d.update(loss="mean_squared_error"), "loss 'mean_squared_error' does not fit a binary label"),
    (lambda d: d.update(metrics=["rmse"]), "metric 'rmse' does not fit a binary label"),
    (lambda d: d.update(training={"epochs": 0}), "training: epochs and batch size must be at least 1"),
    (lambda d: d.update(training={"optimizer": "adam"}), "training: .*unexpected keyword argument 'optimizer'"),
    (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
    (lambda d: d["label"].update(classes=["no", "yes", "maybe"]), "a binary label has 2 classes, this one 3"),
    (lambda d: d["features"][1].update(vocabulary=[]), "features.1.categorical.vocabulary"),
    (lambda d: d["features"][1].update(vocabulary=["de", "de"]), "vocabulary: Value error, names a value twice"),
    (lambda d: d["features"][0].update(name="age; rm"), "features.0.numeric.name"),
])
def test_a_spec_that_does_not_hold_together_is_refused_naming_the_field(change, match):
    document = spec_document()
    change(document)
    refused(document, match)


def test_a_lambda_layer_or_an_object_of_any_other_module_is_refused_before_anything_is_built():
    document = spec_document()
    hidden = layer(document, "hidden")
    hidden.update(class_name="Lambda")
    refused(document, "layer 4|'Lambda' of module 'keras.layers' is not one of the built-in", nothing_built=True)
    document = spec_document()
    layer(document, "hidden")["config"]["kernel_initializer"] = {
        "module": "os", "class_name": "system", "config": {"command": "touch /tmp/owned"}, "registered_name": None}
    refused(document, "'system' of module 'os' is not one of the built-in Keras objects", nothing_built=True)
    document = spec_document()
    layer(document, "hidden")["registered_name"] = "custom>Evil"
    refused(document, "registered name 'custom>Evil' is not Keras's own", nothing_built=True)
    document = spec_document()
    layer(document, "hidden")["config"]["activation"] = "keras.src.utils.file_utils.get_file"
    refused(document, "activation 'keras.src.utils.file_utils.get_file' is not one of", nothing_built=True)


def test_a_vocabulary_or_statistics_given_as_a_file_to_read_are_refused():
    document = spec_document()
    layer(document, "country_lookup")["config"]["vocabulary"] = "/etc/passwd"
    refused(document, "vocabulary must be given as a list of values, not str", nothing_built=True)
    document = spec_document()
    layer(document, "age_norm")["config"].update(mean=None, variance=None)
    refused(document, "carries its mean and variance", nothing_built=True)


def test_sizes_past_the_limits_are_refused_before_any_weight_is_allocated():
    refused(spec_document(model=offer_model(hidden=2000), limits={"parameters": 10_000}),
            "'hidden': the model holds more than the spec's limit of 10000 parameters", nothing_built=True)
    document = spec_document()
    layer(document, "hidden")["config"]["units"] = 10**9  # its output's shape gives it away
    refused(document, "a shape is .*not \\[None, 1000000000\\]", nothing_built=True)
    refused(spec_document(limits={"parameters": 10**9}), "limits.parameters", nothing_built=True)


def test_a_shape_a_layer_claims_for_its_input_is_checked_against_what_keras_computes():
    document = spec_document()
    hidden = layer(document, "hidden")
    hidden["inbound_nodes"][0]["args"][0]["config"]["shape"] = [None, 2]  # the real width is 9
    hidden["build_config"] = {"input_shape": [None, 10**6]}  # never given to Keras
    refused(document, "its input from 'joined' is claimed to be of shape \\[None, 2\\], but that layer gives "
                      "\\[None, 9\\]", nothing_built=True)
    document = spec_document()
    layer(document, "hidden")["build_config"] = {"input_shape": [None, 10**6]}
    model = build_model(read_spec(json.dumps(document)))
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 80 + 18 + 200


def test_the_model_s_inputs_are_the_spec_s_features_and_its_output_fits_the_label():
    document = spec_document(features=FEATURES[:2])
    refused(document, "layer 'item': an input that is not one of the spec's features")
    document = spec_document(features=FEATURES + [{"kind": "numeric", "name": "income"}])
    refused(document, "config.input_layers: the model's inputs are the spec's features")
    document = spec_document()
    document["features"] = copy.deepcopy(FEATURES)
    document["features"][0]["size"] = 3
    refused(document, "the numeric feature's input is of shape \\[None, 3\\] and dtype float32")
    document = spec_document(label={"kind": "multiclass", "name": "opened", "classes": ["a", "b", "c"]},
                             metrics=["accuracy"])
    refused(document, "the output is of shape \\[None, 2\\], where the multiclass label needs \\[null, 3\\]")
    refused(spec_document(private_layers=["joined"]), "'joined' is not a layer of the model that holds weights")
    # a private layer stays on the device only under the name every part knows it by
    refused(spec_document(private_layers=["item_factors"]), "'item_factors': a private layer's name starts with 'user_'")
    private = json.loads(json.dumps(offer_model()).replace('"item_factors"', '"user_factors"'))
    refused(spec_document(model=private), "'user_factors' is named as a private layer \\(user_...\\) but not listed")
    spec = read_spec(json.dumps(spec_document(model=private, private_layers=["user_factors"])))
    assert spec.private_layers == ["user_factors"]
    from processor.spec_task import spec_task

    task = spec_task(spec)
    assert set(task.private_spec) == {"user_factors/embeddings"} and "user_factors/embeddings" not in task.spec


def test_what_is_not_a_spec_at_all_is_refused_clearly():
    with pytest.raises(SpecError, match="not JSON"):
        read_spec(b"{not json")
    with pytest.raises(SpecError, match="format"):
        read_spec(json.dumps({**spec_document(), "format": "fl-task/2"}))
    with pytest.raises(SpecError, match="at most"):
        read_spec(b" " * (task_spec.MAX_SPEC_BYTES + 1))


def test_a_device_s_file_is_read_and_checked_against_the_spec_row_by_row(tmp_path):
    from processor.device_data import DeviceDataError, read_spec_data

    spec = read_spec(json.dumps(spec_document()))
    path = tmp_path / "device.csv"
    path.write_text("age,country,item,opened\n30,fr,3,yes\n70.5,de,49,no\n")
    rows, labels = read_spec_data(spec, path)
    assert rows["age"].tolist() == [[30.0], [70.5]] and rows["country"].tolist() == [["fr"], ["de"]]
    assert rows["item"].tolist() == [[3], [49]] and labels.tolist() == [1, 0]
    assert rows[::-1]["country"].tolist() == [["de"], ["fr"]]  # a table: rows are taken as one
    assert build_model(spec)(model_inputs(rows)).shape == (2, 2)
    for text, match in [("30,es,3,yes", "row 2, column country: 'es' is not one of de, fr, it"),
                        ("130,fr,3,yes", "row 2, column age: 130 is outside 0-120"),
                        ("30,fr,50,yes", "row 2, column item: 50 is outside 0-49"),
                        ("30,fr,3,maybe", "row 2, column opened: 'maybe' is not one of no, yes"),
                        ("nan,fr,3,yes", "row 2, column age: 'nan' is not a finite number")]:
        path.write_text(f"age,country,item,opened\n{text}\n")
        with pytest.raises(DeviceDataError, match=match):
            read_spec_data(spec, path)
    path.write_text("age,item,opened\n30,3,yes\n")
    with pytest.raises(DeviceDataError, match="missing column\\(s\\) country"):
        read_spec_data(spec, path)


def test_a_drafted_spec_is_a_valid_one_a_number_with_many_values_a_numeric_label(tmp_path):
    from processor.device_data import read_spec_data

    path = tmp_path / "houses.csv"
    path.write_text("rooms,area,town,price\n" + "".join(f"{1 + i % 5},{50 + 3 * i},{'ab'[i % 2]},{100 + 7 * i}\n"
                                                        for i in range(30)))
    document = task_spec.draft_spec(path, "price", "houses")
    spec = read_spec(json.dumps(document))
    assert spec.label.kind == "numeric" and spec.loss == "mean_squared_error" and spec.outputs == 1
    assert [column.kind for column in spec.features] == ["numeric", "numeric", "categorical"]
    rows, prices = read_spec_data(spec, path)
    assert build_model(spec)(model_inputs(rows)).shape == (30, 1)
    # the model learns the price standardized by the file's mean and spread
    assert spec.label.mean == pytest.approx(100 + 7 * 14.5) and prices.mean() == pytest.approx(0, abs=1e-6)
    assert prices.std() == pytest.approx(1, abs=1e-6)
    with pytest.raises(SpecError, match="has no column 'cost'"):
        task_spec.draft_spec(path, "cost")
