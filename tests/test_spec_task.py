"""A task given as a spec runs through the same round steps as a built-in one: its rows a table of
named columns, its model the spec's, a class or a number to predict."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from processor import codec, rounds, task_spec
from processor.evaluation import Evaluation, weighted_mean
from processor.simulation import SimulationConfig, simulate
from processor.spec_task import spec_task
from processor.training import TrainingSettings


def write_rows(path, count: int, seed: int = 0, numeric: bool = False) -> None:
    """Rows whose label follows from a number and a category: "yes" when x + (1 if town is b) > 1,
    or with `numeric` the number 100 + 30 x + 20 [town is b] plus noise."""
    rng = np.random.default_rng(seed)
    x, town = rng.uniform(0, 2, count), rng.choice(["a", "b", "c"], count)
    lines = ["x,town,label"]
    for value, place in zip(x, town):
        if numeric:
            label = f"{100 + 30 * value + 20 * (place == 'b') + rng.normal(0, 2):.3f}"
        else:
            label = "yes" if value + (place == "b") > 1 else "no"
        lines.append(f"{value:.4f},{place},{label}")
    path.write_text("\n".join(lines) + "\n")


def drafted(path, label: str = "label"):
    return task_spec.read_spec(json.dumps(task_spec.draft_spec(path, label, "offer")))


def test_a_spec_s_class_task_learns_in_the_simulation_from_a_table_with_a_category(tmp_path):
    write_rows(tmp_path / "pool.csv", 600)
    task = spec_task(drafted(tmp_path / "pool.csv"), pool=tmp_path / "pool.csv")
    data = task.data()
    assert data.x_train.dtype.names == ("x", "town") and len(data.y_test) == 120
    config = SimulationConfig(num_clients=3, rounds=4, training=TrainingSettings(epochs=3, learning_rate=0.1),
                              holdout=True)
    result = simulate(task, config)
    baseline = task.baseline()
    assert baseline["answer"] in ("no", "yes")
    assert result.rounds[-1].test["accuracy"] > baseline["accuracy"] + 0.25
    assert result.rounds[-1].federated["accuracy"] > baseline["accuracy"]
    # the base model names the spec it was built for: a model of another spec is refused
    base = rounds.make_base(task, result.final_weights)
    encoded = codec.encode_model(task, base.weights, base.fisher, 1, task.plan)
    assert codec.decode_model(task, encoded).weights.keys() == base.weights.keys()
    other = spec_task(task_spec.read_spec(json.dumps({**task_spec.draft_spec(tmp_path / "pool.csv", "label", "offer"),
                                                      "metrics": ["accuracy"]})))
    assert other.spec == task.spec and other.arch_id != task.arch_id
    with pytest.raises(codec.CodecError, match="arch"):
        codec.decode_model(other, encoded)


def test_the_fisher_of_a_table_of_one_column_is_the_closed_form_s_and_agrees_with_per_sample_gradients(
        tmp_path, monkeypatch):
    import keras

    from processor import ewc

    inputs = keras.Input(shape=(2,), name="v")
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs={"v": inputs}, outputs=keras.layers.Dense(2, name="output")(hidden))
    document = {"format": task_spec.FORMAT, "name": "pairs", "features": [{"kind": "numeric", "name": "v", "size": 2}],
                "label": {"kind": "binary", "name": "label", "classes": ["no", "yes"]},
                "model": json.loads(model.to_json()), "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    path = tmp_path / "pool.csv"
    path.write_text("v_0,v_1,label\n" + "".join(f"{i % 7},{(3 * i) % 5},{'yes' if i % 3 else 'no'}\n" for i in range(50)))
    task = spec_task(task_spec.read_spec(json.dumps(document)), pool=path)
    x, y = task.data().x_train, task.data().y_train
    built, per_sample_fisher = task.model(), ewc._per_sample_fisher
    with monkeypatch.context() as patch:
        patch.setattr(ewc, "_per_sample_fisher", None)  # a Dense chain on one column: the closed form only
        closed = ewc.fisher_diagonal(built, x, y)
    per_sample = per_sample_fisher(built, x, y, 16, numeric=False)
    assert set(closed) == {"hidden/kernel", "hidden/bias", "output/kernel", "output/bias"}
    for name in closed:
        np.testing.assert_allclose(closed[name], per_sample[name], rtol=1e-4, atol=1e-7)
    assert sum(float(f.sum()) for f in closed.values()) > 0


def test_a_numeric_label_trains_standardized_and_is_measured_in_its_own_units(tmp_path):
    write_rows(tmp_path / "pool.csv", 500, numeric=True)
    spec = drafted(tmp_path / "pool.csv")
    assert spec.label.kind == "numeric" and spec.label.std > 10  # the price spreads over tens
    task = spec_task(spec, pool=tmp_path / "pool.csv")
    baseline = task.baseline()
    assert baseline["rmse"] > 15 and 110 < baseline["answer"] < 150
    config = SimulationConfig(num_clients=3, rounds=4, training=TrainingSettings(epochs=3, learning_rate=0.05),
                              holdout=True)
    result = simulate(task, config)
    final = result.rounds[-1]
    assert final.test["rmse"] < baseline["rmse"] / 2 and final.test["mae"] < final.test["rmse"]
    assert "accuracy" not in final.test and final.federated["rmse"] < baseline["rmse"] / 2
    report = Evaluation.of(final.test, 100)
    assert Evaluation.from_json(report.to_json()) == report and report.accuracy is None


def test_a_report_gives_a_class_s_metrics_or_a_number_s_and_rmse_pools_as_a_root_mean_square():
    with pytest.raises(ValueError, match="accuracy or a number's RMSE"):
        Evaluation.from_json('{"samples": 3, "loss": 0.5}')
    with pytest.raises(ValueError, match="accuracy or a number's RMSE"):
        Evaluation.from_json('{"samples": 3, "loss": 0.5, "accuracy": 0.5, "rmse": 1.0}')
    mean = weighted_mean([Evaluation(1, 1.0, rmse=3.0), Evaluation(3, 1.0, rmse=1.0)])
    assert mean["rmse"] == pytest.approx(np.sqrt((9 + 3) / 4)) and "accuracy" not in mean


def test_a_round_of_a_task_spec_through_the_apps_one_device_holding_only_the_cid_the_organization_published(
        tmp_path, capsys):
    """No code for the problem anywhere: the organization is given a spec file and its held-out rows,
    one device the same spec file, the other only the CID the first base model names."""
    import client
    from client.service import ClientConfig, WrongNetwork
    from demo import embedded_system
    from infra import chain, ipfs
    from organization.service import OrganizationConfig

    for name, count, seed in (("pool", 300, 0), ("org", 200, 1), ("device0", 150, 2), ("device1", 150, 3)):
        write_rows(tmp_path / f"{name}.csv", count, seed)
    spec_path = tmp_path / "offer.json"
    spec_path.write_text(json.dumps(task_spec.draft_spec(tmp_path / "pool.csv", "label", "offer"), indent=1))
    plan = TrainingSettings(epochs=3, learning_rate=0.1)
    with pytest.raises(ValueError, match="its test set: it never trains on them"):
        embedded_system(tmp_path / "pretrained", OrganizationConfig(task=str(spec_path), held_out=tmp_path / "org.csv",
                                                                    pretrain_epochs=2))
    system = embedded_system(tmp_path / "net", OrganizationConfig(task=str(spec_path), held_out=tmp_path / "org.csv",
                                                                  training=plan),
                             [ClientConfig(client_id=0, task=str(spec_path), data_path=tmp_path / "device0.csv")])
    org = system.org.test_client()
    assert org.post("/api/deploy").status_code == 201
    for k in range(2):  # the second device starts once the round names the spec's CID: enrolled by its address
        assert org.post("/api/clients", json={"address": chain.client_address(k)}).status_code == 200
    first = org.post("/api/rounds").get_json()
    base = system.store.get(first["base_cid"])
    spec_cid = codec.read_header(base)[1]["task_spec"]
    assert system.store.get(spec_cid) == spec_path.read_bytes()  # the spec as the organization was given it
    shared = {"SETTINGS": system.settings, "W3": system.w3, "STORE": system.store}
    by_cid = client.create_app({**shared, "CLIENT_CONFIG": ClientConfig(client_id=1, task=spec_cid,
                                                                        data_path=tmp_path / "device1.csv")})
    devices = [system.clients[0].test_client(), by_cid.test_client()]
    for device in devices:
        job = device.post("/api/participate", json={"wait": True}).get_json()
        assert job.get("state") == "done", job
    result = org.post("/api/rounds/1/aggregate").get_json()
    assert result["accepted"] == 2
    assert result["metrics"]["accuracy"] > first["metrics"]["accuracy"] + 0.1

    # the merged model taken out by its round, scored on the organization's file and on rows without
    # a label, and exported as a Keras file that scores the same
    import keras

    import run
    from processor.ewc import model_inputs
    from processor.spec_task import read_task_file

    where = ["--chain-url", "embedded", "--ipfs-api", "embedded", "--state-dir", str(tmp_path / "net"),
             "--contract-record", str(system.settings.contract_record), "--task", spec_cid]
    run.main(["score", "1", str(tmp_path / "org.csv"), "--output", str(tmp_path / "answers.csv"), *where])
    printed = capsys.readouterr().out
    assert f"200 rows, test accuracy {result['metrics']['accuracy']:.4f} ({result['model_cid']})" in printed
    answers = (tmp_path / "answers.csv").read_text().splitlines()
    assert answers[0] == "row,predicted,p_no,p_yes" and len(answers) == 201 and answers[1].split(",")[1] in ("no", "yes")
    unlabelled = tmp_path / "new.csv"
    unlabelled.write_text("x,town\n0.2,a\n1.9,b\n")
    run.main(["score", result["model_cid"], str(unlabelled), "--output", str(tmp_path / "new_answers.csv"), *where])
    assert "2 rows scored" in capsys.readouterr().out
    assert [line.split(",")[1] for line in (tmp_path / "new_answers.csv").read_text().splitlines()[1:]] == ["no", "yes"]
    run.main(["export", "1", "--output", str(tmp_path / "offer.keras"), *where])
    assert (tmp_path / "offer.spec.json").read_bytes() == spec_path.read_bytes()
    exported = keras.saving.load_model(tmp_path / "offer.keras")  # Keras's own layers: no custom object needed
    task = read_task_file(spec_path, held_out=tmp_path / "org.csv")
    data = task.data()
    accuracy = np.mean(np.argmax(exported(model_inputs(data.x_test)), axis=1) == data.y_test)
    assert accuracy == pytest.approx(result["metrics"]["accuracy"])
    with pytest.raises(SystemExit, match="round 2 has merged no model yet"):
        run.main(["score", "2", str(tmp_path / "org.csv"), *where])
    # a device given another problem is told which spec the network learns, by its CID
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(spec_path.read_text()), "metrics": ["accuracy"]}))
    with pytest.raises(WrongNetwork, match=f"learn the task spec {spec_cid} .* start it with --task {spec_cid}"):
        client.create_app({**shared, "CLIENT_CONFIG": ClientConfig(client_id=2, task=str(other),
                                                                    data_path=tmp_path / "device1.csv")})
    with pytest.raises(ipfs.StorageError):  # a CID nobody published is not a task
        client.create_app({**shared, "CLIENT_CONFIG": ClientConfig(
            client_id=3, task=ipfs.compute_cid(b"{}"), data_path=tmp_path / "device1.csv")})


def test_a_numeric_spec_s_round_through_the_apps_is_shown_by_its_rmse(tmp_path):
    from client.service import ClientConfig
    from demo import embedded_system
    from infra import chain
    from organization.service import OrganizationConfig

    for name, count, seed in (("pool", 300, 0), ("org", 150, 1), ("device0", 150, 2)):
        write_rows(tmp_path / f"{name}.csv", count, seed, numeric=True)
    spec_path = tmp_path / "price.json"
    spec_path.write_text(json.dumps(task_spec.draft_spec(tmp_path / "pool.csv", "label", "price")))
    with pytest.raises(ValueError, match="predicts a number: it has no accuracy to stop at"):
        embedded_system(tmp_path / "target", OrganizationConfig(task=str(spec_path), held_out=tmp_path / "org.csv",
                                                                target_accuracy=0.9))
    system = embedded_system(tmp_path / "net", OrganizationConfig(task=str(spec_path), held_out=tmp_path / "org.csv",
                                                                  training=TrainingSettings(epochs=5)),
                             [ClientConfig(client_id=0, task=str(spec_path), data_path=tmp_path / "device0.csv")])
    org, device = system.org.test_client(), system.clients[0].test_client()
    assert org.post("/api/deploy").status_code == 201
    assert org.post("/api/clients", json={"address": chain.client_address(0)}).status_code == 200
    first = org.post("/api/rounds").get_json()
    job = device.post("/api/participate", json={"wait": True}).get_json()
    assert job["result"]["metric"] == "rmse" and job["result"]["after"] < job["result"]["before"]
    result = org.post("/api/rounds/1/aggregate").get_json()
    assert result["metrics"]["rmse"] < first["metrics"]["rmse"] and "accuracy" not in result["metrics"]
    page = org.get("/").get_data(as_text=True)
    assert "Error per round" in page and "has an RMSE of" in page
    assert org.get("/chart.png").mimetype == "image/png"
    device_page = device.get("/").get_data(as_text=True)
    assert "Local RMSE" in device_page and "the label spreads by" in device_page


def test_a_device_s_wrong_file_is_said_before_the_chain_or_ipfs_is_asked_anything(tmp_path):
    import client
    from client.service import ClientConfig
    from infra.settings import Settings
    from processor.device_data import DeviceDataError

    write_rows(tmp_path / "pool.csv", 50)
    spec_path = tmp_path / "offer.json"
    spec_path.write_text(json.dumps(task_spec.draft_spec(tmp_path / "pool.csv", "label", "offer")))
    (tmp_path / "device.csv").write_text("x,town,label\n0.5,z,yes\n")
    nowhere = Settings.from_env(state_dir=tmp_path, chain_url="http://127.0.0.1:9", ipfs_api="http://127.0.0.1:9")
    for task in (str(spec_path), "digits"):
        data = tmp_path / "device.csv"
        with pytest.raises(DeviceDataError, match="row 2, column (town: 'z' is not one of a, b, c|)|missing column"):
            client.create_app({"SETTINGS": nowhere, "CLIENT_CONFIG": ClientConfig(task=task, data_path=data)})


def test_score_says_in_one_line_when_the_chain_or_the_model_cannot_be_had(tmp_path, capsys):
    import run

    where = ["--ipfs-api", "embedded", "--state-dir", str(tmp_path), "--task", "digits"]
    with pytest.raises(SystemExit, match="no Ethereum JSON-RPC node answers at http://127.0.0.1:9"):
        run.main(["score", "3", str(tmp_path / "rows.csv"), "--chain-url", "http://127.0.0.1:9", *where])
    with pytest.raises(SystemExit, match="not a valid CID"):
        run.main(["score", "bafy-not-a-cid", str(tmp_path / "rows.csv"), *where])


def test_an_organization_without_rows_of_its_own_shows_the_devices_evaluation(tmp_path):
    from client.service import ClientConfig
    from demo import embedded_system
    from infra import chain
    from organization.service import OrganizationConfig

    for name, count, seed in (("pool", 200, 0), ("device0", 150, 2), ("device1", 150, 3)):
        write_rows(tmp_path / f"{name}.csv", count, seed)
    spec_path = tmp_path / "offer.json"
    spec_path.write_text(json.dumps(task_spec.draft_spec(tmp_path / "pool.csv", "label", "offer")))
    with pytest.raises(ValueError, match="EWC anchors on the Fisher of the organization's own rows"):
        embedded_system(tmp_path / "ewc", OrganizationConfig(task=str(spec_path), training=TrainingSettings(
            ewc_lambda=1.0)))
    system = embedded_system(tmp_path / "net", OrganizationConfig(task=str(spec_path), training=TrainingSettings(
        epochs=3, learning_rate=0.1)), [ClientConfig(client_id=k, task=str(spec_path),
                                                     data_path=tmp_path / f"device{k}.csv") for k in range(2)])
    org, devices = system.org.test_client(), [app.test_client() for app in system.clients]
    assert org.post("/api/deploy").status_code == 201
    for k in range(2):
        assert org.post("/api/clients", json={"address": chain.client_address(k)}).status_code == 200
    assert org.post("/api/rounds").get_json()["metrics"] == {}
    for round_id in (1, 2):
        for device in devices:
            assert device.post("/api/participate", json={"wait": True}).get_json().get("state") == "done"
        assert org.post(f"/api/rounds/{round_id}/aggregate").get_json()["accepted"] == 2
    history = org.get("/api/history").get_json()
    assert [sorted(set(point) & {"accuracy", "loss"}) for point in history] == [[], [], []]
    # each model's held-out evaluation comes with the next round's updates: round 2's are in
    assert history[0]["federated"]["devices"] == 2 and history[1]["federated"]["accuracy"] > 0.6
    assert history[2]["federated"] is None and history[2]["model_cid"]
    page = org.get("/").get_data(as_text=True)
    assert "No test set" in page and "no test set" in page
    assert org.get("/chart.png").mimetype == "image/png"


def test_a_group_of_devices_shares_one_spec_task_each_reading_its_own_file(tmp_path):
    from client.group import ClientGroup, GroupConfig
    from client.service import ClientConfig
    from demo import embedded_system
    from organization.service import OrganizationConfig

    for k, count in enumerate((40, 70)):
        write_rows(tmp_path / f"device{k}.csv", count, seed=k)
    spec_path = tmp_path / "offer.json"
    spec_path.write_text(json.dumps(task_spec.draft_spec(tmp_path / "device0.csv", "label", "offer")))
    system = embedded_system(tmp_path / "net", OrganizationConfig(task=str(spec_path)))
    first = ClientConfig(task=str(spec_path), data_path=tmp_path / "device{id}.csv", agent=True)
    group = ClientGroup(system.settings, GroupConfig(first, count=2), system.w3, system.store, None)
    assert group.services[0].task is group.services[1].task  # one working model for the process
    assert [len(s.y) + len(s.y_eval) for s in group.services] == [40, 70]
    with pytest.raises(ValueError, match=r"each read their own file: name them with \{id\}"):
        ClientGroup(system.settings, GroupConfig(replace(first, data_path=tmp_path / "device0.csv"), count=2),
                    system.w3, system.store, None)
