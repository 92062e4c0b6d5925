"""Flower's half of benchmarks/vs_flower.py. Runs inside the Flower venv (flwr[simulation] 1.41,
ray 2.55), never in fedray's.

The task is fedray's `demo --dataset digits` task exactly: the digits split and IID partition
come from fedray's own `workers/data.py` (loaded by file path: it needs only numpy), local
training is `train_plain` below, the plain-SGD path of fedray's `workers/train.py` `train_local`
(the same batch order from the same seed, the same loss), the initial MLP is built with the same seed, and the global model is evaluated centrally on the same test split
after every round. Flower's part is everything else: ServerApp, FedAvg (Message API),
ClientApp, and its Ray simulation backend.

    python benchmarks/flower_side.py --rounds 5 --json out.json

Everything Flower ships to its Ray workers is importable module-level code of this file (the
client_fn, the ClientApp), configured through one environment variable that the workers inherit,
as a Flower app's code lives in its package: a function defined inside main() would be pickled
by value into every task (cloudpickle walks sys.modules for it), which cost the previous version
of this benchmark most of Flower's time (57 updates/s where Flower does 133-145).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def _process_data(seed: int, clients: int):
    """fedray's digits split and IID partition (workers/data.py, loaded by file path: it needs
    only numpy), loaded once per process and kept in sys.modules, which a Ray worker keeps
    across tasks while the functions shipped to it are unpickled afresh each time."""
    import types

    cache = sys.modules.get("_flower_side_data")
    if cache is None:
        data_mod = _load("fedray_bench_data", "workers/data.py")
        d = data_mod.load_digits(seed)
        cache = types.ModuleType("_flower_side_data")
        cache.d, cache.parts = d, data_mod.partition(d.y_train, clients, method="iid", seed=seed)
        sys.modules["_flower_side_data"] = cache
    return cache.d, cache.parts


_TASK_ENV = "FEDRAY_FLOWER_TASK"


def _task() -> dict:
    return json.loads(os.environ[_TASK_ENV])


def new_model(seed: int) -> nn.Module:
    t = _task()
    d, _ = _process_data(t["seed"], t["clients"])
    return build_mlp(int(np.prod(d.input_shape)), tuple(t["hidden"]), d.num_classes, seed)


def fit(pid: int, rnd: int, model: nn.Module) -> tuple[float, int]:
    """Train partition `pid` for round `rnd`: fedray's client seed, batches and loss."""
    t = _task()
    torch.set_num_threads(1)
    d, parts = _process_data(t["seed"], t["clients"])
    idx = parts.indices[parts.offsets[pid] : parts.offsets[pid + 1]]
    seed = int(np.random.SeedSequence([t["seed"], rnd, pid]).generate_state(1, np.uint64)[0])
    return train_plain(model, d.x_train[idx], d.y_train[idx], float(d.scale), float(d.shift), t["epochs"],
                       t["batch_size"], t["lr"], seed)


_KEYS: list[str] = []


def _to_state(arrays):
    from collections import OrderedDict

    if not _KEYS:
        _KEYS.extend(new_model(0).state_dict())
    return OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in zip(_KEYS, arrays))


# -- what Flower's workers import: the legacy client_fn and the Message-API ClientApp ----------

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402


class LegacyClient(NumPyClient):
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters, config):
        model = new_model(0)
        model.load_state_dict(_to_state(parameters))
        loss, n = fit(self.pid, int(config["server_round"]), model)
        return [v.detach().numpy() for v in model.state_dict().values()], n, {"train_loss": loss}


def legacy_client_fn(context):
    return LegacyClient(int(context.node_config["partition-id"])).to_client()


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    model = new_model(0)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, n = fit(int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"]), model)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": n})})
    return Message(content=content, reply_to=msg)


def build_mlp(input_dim: int, hidden: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The same layers, in the same order, as fedray's build_model("mlp"), under the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Flatten()]
        d = input_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        return nn.Sequential(*layers)


def _features(x: np.ndarray, scale: float, shift: float) -> torch.Tensor:
    out = np.asarray(x, dtype=np.float32) * np.float32(scale)
    out += np.float32(shift)
    return torch.from_numpy(out)


def train_plain(model: nn.Module, x, y, scale: float, shift: float, epochs: int, batch_size: int, lr: float,
                seed: int) -> tuple[float, int]:
    """fedray's train_local without its options: minibatch SGD, batch order from `seed`."""
    xt, yt = _features(x, scale, shift), torch.from_numpy(np.asarray(y, dtype=np.int64))
    n = len(yt)
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), n


@torch.no_grad()
def evaluate(model: nn.Module, x, y, scale: float, shift: float) -> tuple[float, float]:
    model.eval()
    out = model(_features(x, scale, shift))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return float((out.argmax(1) == yt).float().mean()), float(nn.functional.cross_entropy(out, yt))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--clients-per-round", type=int, default=100)
    ap.add_argument("--hidden", default="64")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of Flower's Ray")
    ap.add_argument("--cpus-per-client", type=float, default=1.0)
    ap.add_argument("--api", choices=["message", "legacy"], default="message",
                    help="message: run_simulation + Message-API FedAvg (current); legacy: start_simulation + "
                         "NumPyClient + flwr.server.strategy.FedAvg (deprecated since 1.13, still shipped)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    t_process = time.perf_counter()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    task = {"seed": a.seed, "clients": a.clients, "hidden": [int(x) for x in a.hidden.split(",") if x],
            "epochs": a.local_epochs, "batch_size": a.batch_size, "lr": a.lr}
    os.environ[_TASK_ENV] = json.dumps(task)  # Ray's workers inherit it (Ray starts below)
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, here)
    import flower_side as app  # this file as an importable module: what the workers import too

    d, _ = app._process_data(a.seed, a.clients)
    x_test, y_test, scale, shift = d.x_test, d.y_test, float(d.scale), float(d.shift)
    del d
    torch.set_num_threads(1)
    new_model = app.new_model

    times: dict[int, dict] = {}
    accuracy: dict[int, float] = {}
    eval_model = new_model(a.seed)

    def central_eval(server_round: int, state_dict) -> tuple[float, float]:
        eval_model.load_state_dict(state_dict)
        acc, loss = evaluate(eval_model, x_test, y_test, scale, shift)
        accuracy[server_round] = acc
        if server_round in times:
            times[server_round]["end"] = time.perf_counter()
        return acc, loss

    logging.getLogger("flwr").setLevel(logging.WARNING)
    t_sim = time.perf_counter()
    runner = _run_legacy if a.api == "legacy" else _run_message
    runner(a, times, app, central_eval)
    t_end = time.perf_counter()
    rounds = []
    prev_end = None
    for r in sorted(times):
        t = times[r]
        # A round runs from configure_train/configure_fit to the end of the centralized
        # evaluation, the span fedray's per-round wall_s covers (sample, broadcast, train,
        # aggregate, evaluate).
        rounds.append({"round": r, "clients": t.get("clients", 0), "wall_s": t["end"] - t["start"],
                       "gap_s": (t["start"] - prev_end) if prev_end else None, "accuracy": accuracy.get(r)})
        prev_end = t["end"]
    out = {"system": "flower", "api": a.api, "flwr": _version("flwr"), "ray": _version("ray"), "rounds": rounds,
           "simulation_s": t_end - t_sim, "process_s": t_end - t_process, "final_accuracy": accuracy.get(a.rounds)}
    Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


def _run_message(a, times, app, central_eval) -> None:
    """Flower's current API: run_simulation, ClientApp, Message-API FedAvg."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    new_model = app.new_model

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            times.setdefault(server_round, {})["start"] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            times[server_round]["clients"] = sum(1 for r in replies if not r.has_error())
            return super().aggregate_train(server_round, replies)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc, loss = central_eval(server_round, arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": acc, "loss": loss})

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context) -> None:
        strategy = TimedFedAvg(fraction_train=a.clients_per_round / a.clients, fraction_evaluate=0.0,
                               min_train_nodes=a.clients_per_round, min_available_nodes=a.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(new_model(a.seed).state_dict()), num_rounds=a.rounds,
                       train_config=ConfigRecord({"lr": a.lr}), evaluate_fn=evaluate_fn)

    run_simulation(
        server_app=server_app, client_app=app.client_app, num_supernodes=a.clients,
        backend_config={"client_resources": {"num_cpus": a.cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"num_cpus": a.num_cpus, "logging_level": "ERROR"}},
    )


def _run_legacy(a, times, app, central_eval) -> None:
    """Flower's legacy API (deprecated, still shipped in 1.41): start_simulation, NumPyClient,
    flwr.server.strategy.FedAvg, VirtualClientEngineActorPool."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import start_simulation

    new_model, to_state = app.new_model, app._to_state

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            times.setdefault(server_round, {})["start"] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            times[server_round]["clients"] = len(results)
            return super().aggregate_fit(server_round, results, failures)

    def evaluate_fn(server_round, arrays, config):
        acc, loss = central_eval(server_round, to_state(arrays))
        return loss, {"accuracy": acc}

    strategy = TimedFedAvg(
        fraction_fit=a.clients_per_round / a.clients, fraction_evaluate=0.0, min_fit_clients=a.clients_per_round,
        min_evaluate_clients=0, min_available_clients=a.clients, evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server_round": r},
        initial_parameters=ndarrays_to_parameters([v.numpy() for v in new_model(a.seed).state_dict().values()]),
    )
    start_simulation(
        client_fn=app.legacy_client_fn, num_clients=a.clients, config=ServerConfig(num_rounds=a.rounds), strategy=strategy,
        client_resources={"num_cpus": a.cpus_per_client, "num_gpus": 0.0},
        ray_init_args={"num_cpus": a.num_cpus, "include_dashboard": False, "logging_level": "ERROR"},
    )


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
