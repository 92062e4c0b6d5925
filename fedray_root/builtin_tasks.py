"""fedray's own models and data sets, as tasks registered by name. This is the one module that
maps the built-in data set names and model kinds to loaders and builders (the spec's
`fedray.config` only lists the names, to validate them); the job spec's `data:` and `model:` sections
(and `fedray demo --dataset --model`) are a `ClassificationTask` built here.

    task: {target: fashion-mnist-mlp}                      # a built-in by name
    task: {target: classification, params: {dataset: digits, model: cnn, hidden: [8, 16, 32]}}

Torch and the data loaders are imported only when a task is built (parsing a job spec stays
light).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .task import Task

__all__ = ["BUILTIN_TASKS", "ClassificationTask", "DATASETS", "MODELS", "PARTITIONS", "build_builtin_model",
           "builtin_model_layout", "builtin_task", "load_builtin_dataset", "task_from_sections"]

from .config.sections import DATASETS, MODELS, PARTITIONS  # noqa: E402  (declared with the spec's data: and model:)


class ClassificationTask(Task):
    """A built-in data set split among `num_clients` clients (iid or Dirichlet, seeded; or
    `examples_per_client` drawn from a seed for populations far larger than the data set),
    and a built-in model (`build_builtin_model`). Supports Federated Dropout.

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
        # A seeded partition derives each client's size from (seed, id): a function of ids.
        return getattr(self.parts, "sizes_of", None) or self.parts.sizes()

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
        return build_builtin_model(self.kind, self.data.input_shape, self.data.num_classes, hidden)

    def fd_layout(self):
        return builtin_model_layout(self.kind, self.data.input_shape, self.data.num_classes, self.hidden)

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


def check_builtin_dataset_files(name: str, data_dir: str | None = None) -> None:
    """Check that a built-in data set's files are where its loader looks, without reading them
    (`digits` ships inside scikit-learn).

    Raises:
        DatasetMissingError: a file is missing (the message says how to get it).
    """
    from fedray.workers import data as d

    checks: dict[str, Callable[[], Any]] = {
        "fashion-mnist": lambda: d.check_fashion_mnist_files(data_dir),
        "japanese-vowels": lambda: d.check_japanese_vowels_files(data_dir),
    }
    if name in checks:
        checks[name]()


def _model_kinds():
    from fedray.workers import models as m

    # kind: (builder(input_shape, num_classes, hidden), axes(model, input_shape, hidden))
    return {"mlp": (m.mlp, m.sequential_axes), "cnn": (m.cnn, m.sequential_axes),
            "conv1d": (m.conv1d, m.conv1d_axes), "gru": (m.gru, m.gru_axes)}


def build_builtin_model(kind: str, input_shape, num_classes: int, hidden):
    """Build a built-in model.

    - `mlp`: flatten, then Linear+ReLU per hidden width, then a Linear head.
    - `cnn`: images (H, W) or (C, H, W), H and W divisible by 4; `hidden` = (c1, c2, fc):
      conv5x5(c1)-ReLU-maxpool2, conv5x5(c2)-ReLU-maxpool2, Linear(fc)-ReLU, Linear head.
    - `conv1d`: sequences (T, F); one conv3(width)-ReLU per hidden width over time, mean over
      time, Linear head.
    - `gru`: sequences (T, F), left zero-padded; one single-layer GRU per hidden width, Linear
      head on the last time step.

    Every hidden width can be changed independently, which is how a Federated Dropout sub-model
    is built (`fedray.compression.fd.submodel_hidden`).

    Raises:
        ValueError: unknown kind, or a shape the kind cannot take.
    """
    kinds = _model_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODELS}")
    hidden = tuple(int(h) for h in hidden)
    input_shape = tuple(int(s) for s in input_shape)
    model = kinds[kind][0](input_shape, int(num_classes), hidden)
    model.fedray_arch = (kind, input_shape, int(num_classes), hidden)
    return model


def builtin_model_layout(kind: str, input_shape, num_classes: int, hidden):
    """The Federated Dropout layout (`ModelLayout`) of `build_builtin_model(...)`.

    Raises:
        ValueError: as `build_builtin_model`.
    """
    from fedray.workers.models import layout_from_axes

    model = build_builtin_model(kind, input_shape, num_classes, hidden)
    return layout_from_axes(model, _model_kinds()[kind][1])


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
