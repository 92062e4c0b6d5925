"""fedray's own models and data sets, as tasks registered by name. This is the one module that
knows the built-in data set names and model kinds; the job spec's `data:` and `model:` sections
(and `fedray demo --dataset --model`) are a `ClassificationTask` built here.

    task: {target: fashion-mnist-mlp}                      # a built-in by name
    task: {target: classification, params: {dataset: digits, model: cnn, hidden: [8, 16, 32]}}

Torch and the data loaders are imported only when a task is built (parsing a job spec stays
light).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .task import Task

__all__ = ["BUILTIN_TASKS", "ClassificationTask", "DATASETS", "MODELS", "PARTITIONS", "builtin_task"]

DATASETS = ("fashion-mnist", "digits", "japanese-vowels")
MODELS = ("mlp", "cnn", "conv1d", "gru")
PARTITIONS = ("iid", "dirichlet")


class ClassificationTask(Task):
    """A built-in data set split among `num_clients` clients (iid or Dirichlet, seeded; or
    `examples_per_client` drawn from a seed for populations far larger than the data set),
    and a built-in model (`fedray.workers.models.build_model`). Supports Federated Dropout.

    The data set is loaded on first use and travels with the task when it is pickled (Ray puts
    it into the object store once; worker actors read it without a copy).
    """

    def __init__(self, *, dataset: str = "fashion-mnist", model: str = "mlp", hidden=(200,), num_clients: int = 1000,
                 partition: str = "iid", alpha: float = 0.5, examples_per_client: int | None = None,
                 data_dir: str | None = None, seed: int = 0) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if model not in MODELS:
            raise ValueError(f"unknown model kind {model!r}; choose one of {', '.join(MODELS)}")
        if partition not in PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
        self.dataset, self.kind, self.hidden = dataset, model, tuple(int(h) for h in hidden)
        self.n, self.partition, self.alpha, self.per_client = int(num_clients), partition, alpha, examples_per_client
        self.data_dir, self.seed = data_dir, int(seed)
        self._data = None
        self._parts = None

    def describe(self) -> str:
        return f"{self.dataset} ({self.kind} {list(self.hidden)})"

    # -- data -----------------------------------------------------------------------------------

    @property
    def data(self):
        """The loaded data set (`fedray.workers.data.Dataset`)."""
        if self._data is None:
            self._data = load_builtin_dataset(self.dataset, self.data_dir, self.seed)
        return self._data

    @property
    def parts(self):
        """Which training examples each client holds (CSR `Partition` or `SeededPartition`)."""
        if self._parts is None:
            if self.per_client is not None:
                from fedray.orchestrator.population import SeededPartition

                self._parts = SeededPartition(len(self.data.y_train), self.n, examples_per_client=self.per_client,
                                              seed=self.seed)
            else:
                from fedray.workers.data import partition

                self._parts = partition(self.data.y_train, self.n, method=self.partition, alpha=self.alpha,
                                        seed=self.seed)
        return self._parts

    def num_clients(self) -> int:
        return self.n

    def client_sizes(self):
        return self.parts.sizes()

    def client_data(self, client_id: int):
        from fedray.workers.data import ArrayDataset

        d, idx = self.data, self.parts.client(int(client_id))
        return ArrayDataset(d.x_train[idx], d.y_train[idx], d.scale, d.shift)

    def test_data(self):
        from fedray.workers.data import ArrayDataset

        d = self.data
        return ArrayDataset(d.x_test, d.y_test, d.scale, d.shift)

    # -- model ----------------------------------------------------------------------------------

    def model(self):
        return self.fd_model(self.hidden)

    def fd_model(self, hidden):
        from fedray.workers.models import build_model

        return build_model(self.kind, self.data.input_shape, self.data.num_classes, hidden)

    def fd_layout(self):
        from fedray.workers.models import model_layout

        return model_layout(self.kind, self.data.input_shape, self.data.num_classes, self.hidden)

    def __getstate__(self):
        # Loaded before pickling, so that worker actors share the driver's copy.
        _ = self.parts
        return self.__dict__


def load_builtin_dataset(name: str, data_dir: str | None = None, seed: int = 0):
    """Load a built-in data set by name.

    Raises:
        DatasetMissingError: its files are not on this machine (the message says how to get them).
        ValueError: unknown name.
    """
    from fedray.workers import data as d

    loaders: dict[str, Callable[[], Any]] = {
        "fashion-mnist": lambda: d.load_fashion_mnist(data_dir),
        "digits": lambda: d.load_digits(seed),
        "japanese-vowels": lambda: d.load_japanese_vowels(data_dir),
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return loaders[name]()


def _preset(dataset: str, model: str, hidden) -> Callable[..., ClassificationTask]:
    def make(**params) -> ClassificationTask:
        kw = {"dataset": dataset, "model": model, "hidden": hidden}
        kw.update(params)
        return ClassificationTask(**kw)

    make.__name__ = f"{dataset}-{model}"
    return make


BUILTIN_TASKS: Mapping[str, Callable[..., Task]] = {
    "classification": ClassificationTask,
    "fashion-mnist-mlp": _preset("fashion-mnist", "mlp", (200,)),
    "fashion-mnist-cnn": _preset("fashion-mnist", "cnn", (16, 32, 64)),
    "digits-mlp": _preset("digits", "mlp", (64,)),
    "japanese-vowels-gru": _preset("japanese-vowels", "gru", (32,)),
    "japanese-vowels-conv1d": _preset("japanese-vowels", "conv1d", (32,)),
}


def builtin_task(name: str) -> Callable[..., Task] | None:
    """The factory registered as `name`, or None."""
    return BUILTIN_TASKS.get(name)


def task_from_sections(spec) -> ClassificationTask:
    """The task the spec's `data:` and `model:` sections describe."""
    d, m = spec.data, spec.model
    return ClassificationTask(dataset=d.dataset, model=m.kind, hidden=m.hidden, num_clients=d.num_clients,
                              partition=d.partition, alpha=d.alpha, examples_per_client=d.examples_per_client,
                              data_dir=d.data_dir, seed=spec.seed)
