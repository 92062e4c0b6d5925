"""One client's work in one round: receive the global model, cut its sub-model (Federated
Dropout), evaluate it on local data (optional), train, encode the update with the job's codec.

This is the one implementation of the client step. Worker actors run it for their virtual
clients (`workers/client.py`, which adds batching and uploads); real clients outside Ray run it
for themselves (`workers/remote.py`). Every seed comes from (job seed, round, client id), so a
client's update does not depend on where it is computed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from fedray.compression import CodecContext, CodecState, CodecStateStore, get_codec
from fedray.compression.fd import (SubnetSpec, extract, flops_per_example, input_scales, inverted_scaling, keep_rate_for,
                                   submodel_hidden)
from fedray.compression.omc import OMCModel
from fedray.task import Task, TrainContext, overrides

from .broadcast import Broadcast
from .conv_kernels import channels_last_training
from .data import as_arrays
from .models import set_params
from .train import TrainConfig, train_local

__all__ = ["ClientError", "ClientStep", "StepOutput", "client_seed"]


def client_seed(job_seed: int, round: int, client_id: int) -> int:
    """The seed of one client's work in one round: independent of which worker runs it."""
    return int(np.random.SeedSequence([job_seed, round, client_id]).generate_state(1, np.uint64)[0])


class ClientError(RuntimeError):
    """A client failed; carries the stage ('data', 'train', 'encode', 'upload'), client id and round."""

    def __init__(self, stage: str, client_id: int, round: int, cause: BaseException) -> None:
        super().__init__(f"client {client_id}, round {round}, stage {stage}: {type(cause).__name__}: {cause}")
        self.stage, self.client_id, self.round = stage, client_id, round


@dataclass(frozen=True)
class StepOutput:
    """One client's encoded update and what it cost."""

    client_id: int
    round: int
    tensors: list  # [(name, Payload)] in the global model's order
    examples: int
    loss: float
    train_s: float
    subnet_seed: int = 0  # Federated Dropout: the seed the shard regenerates the subnet from
    keep_rate: float = 1.0
    weights: bool = False  # OMC: the upload is the trained weights, not a delta
    flops: int = 0
    param_memory_bytes: int = 0
    eval_metrics: Mapping[str, float] | None = None
    train_metrics: Mapping[str, float] = field(default_factory=dict)


class ClientStep:
    """The client step for one process: holds the task's model (and FD sub-models), the job's
    codec and each client's codec state (error-feedback memory) across rounds."""

    def __init__(self, setup, task: Task | None, device: torch.device) -> None:
        """`task=None`: only `finish` (a model trained by the caller's own loop) is available."""
        self.setup, self.task, self.device = setup, task, device
        self.model = task.model().to(device) if task is not None else None
        if self.model is not None and setup.omc is None:  # OMC packs weights from flat memory
            channels_last_training(self.model)  # conv weights channels_last where that trains faster; encode() flattens
        self.layout = task.fd_layout() if task is not None else None
        if setup.dropout is not None and task is not None and self.layout is None:
            raise ValueError(f"Federated Dropout needs the task's fd_layout(); {task.describe()} has none")
        self.codec = get_codec(setup.codec, **dict(setup.codec_params))
        self.custom_train = task is not None and overrides(task, "train")
        self._submodels: dict[tuple[int, ...], torch.nn.Module] = {}
        self._states = CodecStateStore()  # error feedback / warm starts of the clients that trained, bounded
        self._keep = setup.dropout  # a DropoutSpec is a KeepRateConfig (or None)

    # -- pieces the batched path shares -----------------------------------------------------------

    def data(self, round: int, cid: int):
        """Client `cid`'s local data set, from the task.

        Raises:
            ClientError: stage 'data', when `client_data` raises.
        """
        try:
            return self.task.client_data(int(cid))
        except Exception as e:
            raise ClientError("data", cid, round, e) from e

    def state(self, cid: int) -> CodecState | None:
        return self._states.setdefault(cid, CodecState()) if self.codec.stateful else None

    def encode(self, round: int, cid: int, seed: int, params: Mapping[str, torch.Tensor],
               base: Mapping[str, torch.Tensor]) -> list:
        """Encode `params - base` tensor by tensor with the job's codec (and the client's state).

        Raises:
            ClientError: stage 'encode'.
        """
        try:
            state = self.state(cid)
            return [(k, self.codec.encode((params[k] - base[k]).cpu().contiguous(), CodecContext(seed=seed, state=state, key=k)))
                    for k in base]
        except Exception as e:
            raise ClientError("encode", cid, round, e) from e

    def flops(self, sub: SubnetSpec | None, examples: int) -> int:
        if self.layout is None:
            return 0
        return flops_per_example(self.layout, sub) * examples * self.setup.train.local_epochs

    def context(self, round: int, cid: int, seed: int, mask=None) -> TrainContext:
        t = self.setup.train
        return TrainContext(round=round, client_id=cid, seed=seed, local_epochs=t.local_epochs,
                            batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, device=self.device,
                            prox_mu=self.setup.prox_mu, mask=mask)

    # -- the step -------------------------------------------------------------------------------

    def run(self, round: int, start: Mapping[str, torch.Tensor], cid: int, broadcast: Broadcast) -> StepOutput:
        """The whole step for client `cid` from the decoded global model `start`.

        Raises:
            ClientError: with the stage that failed ('data', 'train', 'encode').
        """
        s = self.setup
        seed = client_seed(s.seed, round, cid)
        data = self.data(round, cid)
        stage = "train"
        try:
            t0 = time.perf_counter()
            sub, keep, model, base = None, 1.0, self.model, start
            if self._keep is not None:  # Federated Dropout: a real, smaller dense model
                keep = keep_rate_for(cid, round, self._keep, seed=s.seed)
                sub = SubnetSpec(seed=seed, keep_rate=keep, policy=s.dropout.policy, round=round, client=cid)
                base = extract(start, self.layout, sub)
                model = self._model_for(submodel_hidden(self.layout, sub))
            set_params(model, base)
            ev = dict(self.task.evaluate(model, data)) if s.client_eval else None
            mem = 4 * sum(int(v.numel()) for v in base.values())
            if s.omc is not None:
                x, y, scale, shift = as_arrays(data)
                om = OMCModel(model, s.omc, seed=seed)
                try:
                    om.load_payloads(dict(broadcast.stages[0]))
                    st = train_local(model, x, y, scale, shift, s.train, seed, omc=om)
                    stage = "encode"
                    up = om.to_payloads()
                finally:
                    om.release()
                tensors = [(k, up[k]) for k in start]
                examples, loss, mem, out = st.examples, st.loss, st.param_memory_bytes or mem, {}
            else:
                mask = {k: v != 0 for k, v in base.items() if v.dim() >= 2} if s.pruning else None
                scaling = getattr(s.dropout, "scaling", "none")
                scales = input_scales(self.layout, sub, scaling) if sub is not None else {}
                with inverted_scaling(model, scales):  # Federated Dropout's inverted dropout, when asked
                    out = dict(self.task.train(model, data, self.context(round, cid, seed, mask)) or {})
                examples = int(out.get("examples", len(data)))
                loss = float(out.get("loss", math.nan))
                stage = "encode"
                tensors = self.encode(round, cid, seed, model.state_dict(), base)
        except ClientError:
            raise
        except Exception as e:
            raise ClientError(stage, cid, round, e) from e
        return self._output(round, cid, tensors, examples, loss, time.perf_counter() - t0, out, sub=sub, keep=keep,
                            seed=seed, mem=mem, ev=ev)

    def finish(self, round: int, cid: int, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
               *, examples: int, metrics: Mapping[str, float] | None = None, train_s: float = 0.0) -> StepOutput:
        """The step's second half for a model trained elsewhere (the receive/send API): encode
        `trained - start` with the job's codec and this client's codec state.

        Raises:
            ClientError: stage 'encode' (also when `trained` lacks a tensor of the model).
        """
        if self.setup.dropout is not None or self.setup.omc is not None:
            raise ClientError("encode", cid, round, ValueError(
                "a model trained outside fedray cannot take part in a job with dropout or omc"))
        missing = [k for k in start if k not in trained]
        if missing:
            raise ClientError("encode", cid, round, KeyError(f"the sent weights lack {', '.join(missing[:3])}"))
        seed = client_seed(self.setup.seed, round, cid)
        tensors = self.encode(round, cid, seed, {k: trained[k].detach().to(start[k].dtype) for k in start}, start)
        m = dict(metrics or {})
        return self._output(round, cid, tensors, int(examples), float(m.get("loss", math.nan)), train_s, m,
                            sub=None, keep=1.0, seed=seed, mem=4 * sum(int(v.numel()) for v in start.values()), ev=None)

    def _output(self, round, cid, tensors, examples, loss, train_s, out, *, sub, keep, seed, mem, ev) -> StepOutput:
        metrics = {k: float(v) for k, v in out.items() if k != "examples" and _is_number(v)}
        return StepOutput(cid, round, tensors, examples, loss, train_s,
                          subnet_seed=seed if sub is not None else 0, keep_rate=keep,
                          weights=self.setup.omc is not None, flops=self.flops(sub, examples),
                          param_memory_bytes=mem, eval_metrics=ev, train_metrics=metrics)

    def _model_for(self, hidden: tuple[int, ...]) -> torch.nn.Module:
        m = self._submodels.get(hidden)
        if m is None:
            m = self._submodels[hidden] = self.task.fd_model(hidden).to(self.device)
        return m


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def train_config(tr) -> TrainConfig:
    """The `TrainConfig` of a spec's `training` section (a TrainingSpec is one)."""
    return tr
