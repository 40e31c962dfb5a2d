"""A device's own data file: checked before the first round, with an error that says where."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from client.service import ClientConfig, ClientService
from demo import embedded_system
from infra.files import REPO_ROOT
from organization.service import OrganizationConfig
from processor import codec
from processor.device_data import DeviceDataError, read_device_data
from processor.tasks import get_task
from processor.training import TrainingSettings

DIGITS = get_task("digits")
INTEREST = get_task("interest")
HEADER = "label," + ",".join(f"pixel{i}" for i in range(64))


def digits_csv(path, rows: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The first `rows` training digits as a device's file; returns them as the task holds them."""
    data = DIGITS.data()
    x, y = data.x_train[:rows], data.y_train[:rows]
    lines = [HEADER] + [",".join([str(label), *(str(int(round(v * 16))) for v in image)])
                        for image, label in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    return x, y


def test_a_digits_file_reads_as_the_task_holds_its_data(tmp_path):
    expected_x, expected_y = digits_csv(tmp_path / "mine.csv")
    x, y = read_device_data(DIGITS, tmp_path / "mine.csv")
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_allclose(x, expected_x, atol=1e-6)


def test_an_interest_file_of_one_users_ratings_makes_the_tasks_features(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("item_id,rating,age,gender,occupation\n1,5,30,F,engineer\n50,2,30,F,engineer\n")
    x, y = read_device_data(INTEREST, path)
    assert x.shape == (2, INTEREST.input_dim) and list(y) == [1, 0]
    assert x[0, 0] == pytest.approx(0.30) and x[0, 1] == 1.0  # age / 100, gender F


@pytest.mark.parametrize("content, message", [
    (None, "no data file at"),
    ("", "is empty: it needs a header row"),
    (HEADER + "\n", "has a header but no rows"),
    (HEADER.replace(",pixel63", "") + "\n", "missing column(s) pixel63"),
    (HEADER + ",colour\n", "unexpected column(s) colour"),
    (HEADER + "\n" + ",".join(["3"] + ["x"] + ["0"] * 63), "row 2, column pixel0: 'x' is not an integer"),
    (HEADER + "\n" + ",".join(["3"] + ["17"] + ["0"] * 63), "row 2, column pixel0: 17 is outside 0-16"),
    (HEADER + "\n" + ",".join(["12"] + ["0"] * 64), "row 2, column label: 12 is outside 0-9"),
    (HEADER + "\n" + ",".join(["3"] + ["0"] * 10), "row 2: 11 values for 65 columns"),
])
def test_each_kind_of_bad_file_is_refused_with_where_and_why(tmp_path, content, message):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DeviceDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_device_data(DIGITS, path)


@pytest.mark.parametrize("rows, message", [
    ("1,5,30,X,engineer", "column gender: 'X' is not one of F, M"),
    ("1,5,30,F,astronaut", "column occupation: 'astronaut' is not one of"),
    ("1,6,30,F,engineer", "column rating: 6 is outside 1-5"),
    ("1,5,30,F,engineer\n2,4,31,F,engineer", "must be the same on every row"),
])
def test_bad_interest_rows_are_refused(tmp_path, rows, message):
    path = tmp_path / "ratings.csv"
    path.write_text("item_id,rating,age,gender,occupation\n" + rows + "\n")
    with pytest.raises(DeviceDataError, match=message):
        read_device_data(INTEREST, path)


def test_a_client_trains_and_publishes_from_its_own_file(tmp_path):
    digits_csv(tmp_path / "mine.csv", rows=60)
    system = embedded_system(tmp_path, OrganizationConfig(task="digits", training=TrainingSettings(epochs=2)),
                             [ClientConfig(client_id=0, task="digits", data_path=tmp_path / "mine.csv")])
    org, device = system.org.test_client(), system.clients[0].test_client()
    status = device.get("/api/status").get_json()
    # a tenth of the rows is held out: each round's base is evaluated on it (federated evaluation)
    assert (status["data"]["samples"], status["data"]["held_out"]) == (54, 6)
    assert status["data"]["source"] == str(tmp_path / "mine.csv")
    assert org.post("/api/deploy").status_code == 201
    assert org.post("/api/clients", json={"address": status["address"]}).status_code == 200
    assert org.post("/api/rounds").status_code == 201
    job = device.post("/api/participate", json={"wait": True}).get_json()
    assert job["state"] == "done" and job["result"]["num_samples"] == 54
    result = org.post("/api/rounds/1/aggregate").get_json()
    assert result["accepted"] == 1
    [verdict] = result["verdicts"].values()
    assert verdict["evaluation"]["samples"] == 6 and 0 <= verdict["evaluation"]["accuracy"] <= 1
    initial = org.get("/api/history").get_json()[0]
    assert initial["federated"] == {"devices": 1, "samples": 6, "accuracy": verdict["evaluation"]["accuracy"],
                                    "loss": verdict["evaluation"]["loss"]}


def test_run_py_says_what_is_wrong_with_the_file_in_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text(HEADER + ",colour\n")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), "client", "--id", "0", "--task", "digits",
                           "--data", str(tmp_path / "bad.csv"), "--chain-url", "embedded", "--ipfs-api", "embedded",
                           "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"client 0: {tmp_path / 'bad.csv'}: unexpected column(s) colour"


def test_an_interest_device_keeps_its_users_state_across_rounds_and_restarts(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("item_id,rating,age,gender,occupation\n"
                    + "".join(f"{i},{5 if i % 2 else 2},30,F,engineer\n" for i in range(1, 41)))
    config = ClientConfig(client_id=0, task="interest", data_path=path)
    system = embedded_system(tmp_path, OrganizationConfig(task="interest", training=TrainingSettings(learning_rate=0.5)),
                             [config])
    org, device = system.org.test_client(), system.clients[0].test_client()
    service = system.clients[0].extensions["client"]
    status = device.get("/api/status").get_json()
    assert (status["data"]["samples"], status["data"]["held_out"]) == (32, 8)  # the user's latest fifth
    assert all(np.all(t == 0) for t in service.private.values())  # a user the device has not trained yet
    assert org.post("/api/deploy").status_code == 201
    assert org.post("/api/clients", json={"address": status["address"]}).status_code == 200
    assert org.post("/api/rounds").status_code == 201
    assert device.post("/api/participate", json={"wait": True}).get_json()["state"] == "done"
    assert org.post("/api/rounds/1/aggregate").get_json()["accepted"] == 1

    learned = service.private
    assert learned["user_bias/embeddings"][0, 0] != 0 and not np.any(learned["user_bias/embeddings"][1:])
    published = system.store.get(service.last_tx["cid"])
    assert not any(name.startswith("delta/user_") for name in codec.read_header(published)[0])
    restarted = ClientService(system.settings, config, system.w3, system.store)
    assert all(np.array_equal(restarted.private[n], learned[n]) for n in INTEREST.private_spec)
    service.private_path.write_bytes(b"not a model of this task")  # e.g. left by another version
    afresh = ClientService(system.settings, config, system.w3, system.store)
    assert all(np.all(t == 0) for t in afresh.private.values())
