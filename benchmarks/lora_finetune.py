"""Adapter-only federated fine-tuning (LoRA on an OMC-compressed base) against full fine-tuning,
and P2U stage quality of the centrally trained model, on Shakespeare.

    python benchmarks/lora_finetune.py --json benchmarks/results/lora_finetune.json
    python benchmarks/lora_finetune.py --quick --json /tmp/lora.json     # smoke run
    python benchmarks/lora_finetune.py --base runs/shakespeare_base.pt --only-transform \
        --json benchmarks/results/omc_transform_transformer.json           # OMC transform only

1. Central pretraining (in this process, one thread): examples/shakespeare/lora_task.py's
   `CharTransformer` trained with Adam on the training text of every role of the plays NOT in
   `--finetune-plays`.
2. P2U: every tensor of the trained model encoded in stages (`compression/p2u.py`, 2+2+4+8 and
   4+4+8 bits); next-character accuracy on the pretraining roles' held-out speeches after each
   stage against cumulative bytes (and with stage 0 on one group of tensors at a time), and
   the time to the model at 10 and 100 Mbit/s (transfer of
   the cumulative bytes plus the measured decode time) against a one-shot fp32 send.
3. OMC's transform (`omc_transform_transformer`): every weight matrix stored as OMC codes, one
   (alpha, beta) per variable against one shared by all, at `--transform-bits`; next-character
   accuracy against fp32; then OMC training (`omc_train_transformer`, 4-bit stochastic, per-variable
   against one shared transform, `--omc-train-steps` central SGD steps from the base;
   `--only-transform` stops here).
4. Federated fine-tuning through fedray (local Ray, 2 worker actors, the gRPC aggregation
   service) on the roles of `--finetune-plays` (held-out roles: unseen plays and speakers),
   every arm the same rounds, the same sampled clients, the same seed and codec (identity):
   `full` federates all of the model; `lora_omc8` federates peft LoRA adapters alone, the base
   frozen on each client as 8-bit OMC codes; `lora_fp32base` the same adapters on an fp32 base
   (what OMC's quantization of the base costs). Bytes up/down per round are the system's own
   counts (protobuf bytes streamed; the broadcast's payload bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "shakespeare"))

import fedray  # noqa: E402
from fedray.compression.frozen import frozen_bytes  # noqa: E402
from fedray.compression.p2u import P2UConfig, decode_stages, encode_stages  # noqa: E402
from fedray.orchestrator.engine import ensure_ray  # noqa: E402

import shakespeare_data as sd  # noqa: E402
from lora_task import CharTransformer, ShakespeareLoRATask, chunks_of, evaluate_chars, train_chars  # noqa: E402

FINETUNE_PLAYS = ("hamlet", "lear", "macbeth", "othello", "tempest", "twelfth_night")
RATES = {"10mbit": 10e6, "100mbit": 100e6}


def pretrain_data(args) -> tuple[list[str], list, object, object]:
    """The pretraining plays, their roles, and the roles' training and held-out chunks."""
    plays = [p for p in sd.play_names() if p not in set(args.finetune_plays)]
    roles = sd.load_roles(seq_len=args.seq_len, plays=plays)
    train = chunks_of(roles, args.seq_len, split="train")
    test = chunks_of(roles, args.seq_len, split="test", max_chunks=args.test_chunks)
    return plays, roles, train, test


def load_base(args, log) -> tuple[dict, dict]:
    """A base saved by `--save-base` (same --d/--layers/--heads/--seq-len) and the held-out chunks."""
    path = Path(args.base)
    if not path.is_file():
        raise SystemExit(f"--base: no file at {path} (write one with --save-base)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = CharTransformer(len(sd.VOCAB), d=args.d, layers=args.layers, heads=args.heads, context=args.seq_len)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"--base: {path} does not fit --d {args.d} --layers {args.layers} --heads {args.heads} "
                         f"--seq-len {args.seq_len}: {str(e).splitlines()[0]}") from None
    plays, roles, train, test = pretrain_data(args)
    ev = evaluate_chars(model, test)
    info = {"loaded_from": str(path), "plays": len(plays), "roles": len(roles), "test_chunks": len(test),
            "params": sum(p.numel() for p in model.parameters()), **{f"test_{k}": round(v, 4) for k, v in ev.items()}}
    log(f"loaded the base from {path}: held-out accuracy {ev['accuracy']:.4f}")
    return state, {"info": info, "train": train, "test": test}


def pretrain(args, log) -> tuple[dict, dict]:
    plays, roles, train, test = pretrain_data(args)
    torch.manual_seed(args.seed)
    model = CharTransformer(len(sd.VOCAB), d=args.d, layers=args.layers, heads=args.heads, context=args.seq_len)
    t0 = time.perf_counter()
    out = train_chars(model, train, lr=args.pretrain_lr, batch_size=args.batch, epochs=1 << 20,
                      generator=torch.Generator().manual_seed(args.seed), max_steps=args.pretrain_steps)
    wall = time.perf_counter() - t0
    ev = evaluate_chars(model, test)
    info = {"plays": len(plays), "roles": len(roles), "train_chunks": len(train), "test_chunks": len(test),
            "steps": out["steps"], "batch": args.batch, "lr": args.pretrain_lr, "train_loss": round(out["loss"], 4),
            "wall_s": round(wall, 1), "step_s": round(wall / max(out["steps"], 1), 4),
            "params": sum(p.numel() for p in model.parameters()), **{f"test_{k}": round(v, 4) for k, v in ev.items()}}
    log(f"pretrain: {info['steps']} steps of {args.batch} x {args.seq_len} chars on {len(roles)} roles of "
        f"{len(plays)} plays, {wall:.1f} s ({info['step_s']} s/step); held-out accuracy {ev['accuracy']:.4f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, {"info": info, "train": train, "test": test}


def p2u_curve(state: dict, test, args, stage_bits: tuple[int, ...], log) -> dict:
    model = CharTransformer(len(sd.VOCAB), d=args.d, layers=args.layers, heads=args.heads, context=args.seq_len)
    cfg = P2UConfig(stage_bits=stage_bits)
    t0 = time.perf_counter()
    stages = {k: encode_stages(v, cfg=cfg) for k, v in state.items()}
    encode_s = time.perf_counter() - t0
    fp32_bytes = 4 * sum(v.numel() for v in state.values())
    model.load_state_dict(state)
    fp32_acc = evaluate_chars(model, test)["accuracy"]
    rows, cum = [], 0
    for k in range(cfg.num_stages):
        cum += sum(len(s[k].data) for s in stages.values())
        t0 = time.perf_counter()
        approx = {n: decode_stages(s[: k + 1]) for n, s in stages.items()}
        decode_s = time.perf_counter() - t0
        model.load_state_dict(approx)
        acc = evaluate_chars(model, test)["accuracy"]
        bits = sum(stage_bits[: k + 1])
        rows.append({"stage": k, "bits": bits, "cum_bytes": cum, "accuracy": round(acc, 4),
                     "delta_pts": round(100 * (acc - fp32_acc), 2), "decode_s": round(decode_s, 4),
                     "time_to_model_s": {r: round(8 * cum / bps + decode_s, 4) for r, bps in RATES.items()}})
        log(f"  p2u {'+'.join(map(str, stage_bits))} stage {k} ({bits} bits): acc {acc:.4f} (fp32 {fp32_acc:.4f}) "
            f"bytes {cum} t={rows[-1]['time_to_model_s']}")
    # Where stage 0 loses: one group of tensors at stage 0, the rest fp32.
    first = {n: decode_stages(s[:1]) for n, s in stages.items()}
    only = {}
    for group, prefixes in GROUPS.items():
        model.load_state_dict({n: first[n] if n.startswith(prefixes) else v for n, v in state.items()})
        only[group] = round(evaluate_chars(model, test)["accuracy"], 4)
    log(f"  p2u {'+'.join(map(str, stage_bits))} stage 0 on one group only: {only}")
    usable = next((r for r in rows if r["delta_pts"] >= -1.0), rows[-1])
    one_shot = {r: round(8 * fp32_bytes / bps, 4) for r, bps in RATES.items()}
    return {"stage_bits": list(stage_bits), "fp32_bytes": fp32_bytes, "fp32_accuracy": round(fp32_acc, 4),
            "encode_s": round(encode_s, 4), "stages": rows, "stage0_only_group_accuracy": only, "first_within_1pt": usable["stage"],
            "fp32_one_shot_s": one_shot,
            "speedup_stage0": {r: round(one_shot[r] / rows[0]["time_to_model_s"][r], 2) for r in RATES},
            "speedup_first_within_1pt": {r: round(one_shot[r] / usable["time_to_model_s"][r], 2) for r in RATES}}


def omc_transform_transformer(state: dict, test, args, log) -> dict:
    """OMC's stored form (`compression.omc.stored_form`: its transform and quantizer, round to
    nearest) of every weight matrix of the trained model (token and position embeddings, qkv,
    proj, fc, out, head), one (alpha, beta) per variable against one shared by all, and one for the
    embeddings with another for the Linear weights (`shared_by_kind`); biases and LayerNorm stay
    fp32. Next-character accuracy on the held-out chunks against fp32."""
    from fedray.compression.omc import stored_form

    model = CharTransformer(len(sd.VOCAB), d=args.d, layers=args.layers, heads=args.heads, context=args.seq_len)
    model.load_state_dict(state)
    fp32 = evaluate_chars(model, test)["accuracy"]
    mats = {k: v for k, v in state.items() if v.dim() >= 2}
    ranges = {k: [round(float(v.min()), 4), round(float(v.max()), 4)] for k, v in mats.items()}
    emb = {k: v for k, v in mats.items() if k.startswith(GROUPS["embeddings"])}
    lin = {k: v for k, v in mats.items() if k not in emb}
    rows = []
    for bits in args.transform_bits:
        for transform in ("per_variable", "shared", "shared_by_kind"):
            if transform == "shared_by_kind":  # one range for the two embeddings, one for the Linear weights
                q = {**stored_form(emb, bits=bits, per_variable=False), **stored_form(lin, bits=bits, per_variable=False)}
            else:
                q = stored_form(mats, bits=bits, per_variable=transform == "per_variable")
            model.load_state_dict({**state, **q})
            acc = evaluate_chars(model, test)["accuracy"]
            rows.append({"bits": bits, "transform": transform,
                         "per_variable": {"per_variable": True, "shared": False}.get(transform),
                         "accuracy": round(acc, 4), "delta_pts": round(100 * (acc - fp32), 2)})
            log(f"  omc transform {bits} bits {transform}: acc {acc:.4f} ({rows[-1]['delta_pts']:+.2f} pts vs fp32 {fp32:.4f})")
    log(f"  weight ranges: {ranges}")
    return {"seed": args.seed, "fp32_accuracy": round(fp32, 4), "test_chunks": len(test), "ranges": ranges,
            "quantized": list(mats), "rows": rows}


OMC_TRAIN_ARMS = {"fp32_sgd": None, "omc_int4_sr": True, "omc_int4_sr_global": False}  # value: per_variable


def omc_train_transformer(state: dict, train, test, args, log) -> list[dict]:
    """OMC training (`OMCModel`, 4-bit codes, stochastic rounding, plain SGD) of the trained
    model for `--omc-train-steps` central steps, with a per-variable transform (`omc_int4_sr`)
    against one shared by every matrix (`omc_int4_sr_global`, compression_quality's arm), and
    fp32 SGD on the same batches; held-out accuracy at the start (after quantization) and every
    100 steps."""
    from fedray.compression.omc import OMCConfig, OMCModel

    rows = []
    for arm, per_variable in OMC_TRAIN_ARMS.items():
        model = CharTransformer(len(sd.VOCAB), d=args.d, layers=args.layers, heads=args.heads, context=args.seq_len)
        model.load_state_dict(state)
        om = None if per_variable is None else OMCModel(
            model, OMCConfig(bits=4, stochastic=True, per_variable=per_variable), seed=args.seed)
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True,
                                             generator=torch.Generator().manual_seed(args.seed))
        curve = [{"step": 0, "accuracy": round(evaluate_chars(model, test)["accuracy"], 4)}]
        t0, steps, batches = time.perf_counter(), 0, iter(loader)
        model.train()
        while steps < args.omc_train_steps:
            x, y = next(batches, (None, None))
            if x is None:
                batches = iter(loader)
                continue
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            if om is not None:
                om.step(args.omc_train_lr)
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= args.omc_train_lr * p.grad
                        p.grad = None
            steps += 1
            if steps % 100 == 0 or steps == args.omc_train_steps:
                curve.append({"step": steps, "accuracy": round(evaluate_chars(model, test)["accuracy"], 4)})
        rows.append({"arm": arm, "bits": None if om is None else 4, "per_variable": per_variable,
                     "steps": steps, "lr": args.omc_train_lr, "batch": args.batch, "accuracy": curve[-1]["accuracy"],
                     "wall_s": round(time.perf_counter() - t0, 1), "curve": curve})
        log(f"  omc training {arm}: accuracy {' -> '.join(str(c['accuracy']) for c in curve)} "
            f"({steps} steps, {rows[-1]['wall_s']} s)")
    return rows


GROUPS = {"embeddings": ("tok.", "pos."), "blocks": ("blocks.",), "final_norm": ("ln.",), "head": ("head.",)}

ARMS = {
    "full": {"lora": None, "base_bits": None},
    "lora_omc8": {"lora": {"r": 4, "alpha": 8}, "base_bits": 8},
    "lora_fp32base": {"lora": {"r": 4, "alpha": 8}, "base_bits": None},
}


def federate(name: str, base: dict, args, log) -> dict:
    params = dict(ARMS[name])
    if params["lora"] is not None:
        params["lora"] = {**params["lora"], "r": args.rank, "alpha": 2 * args.rank}
    task = ShakespeareLoRATask(plays=list(args.finetune_plays), base=base, d=args.d, layers=args.layers,
                               heads=args.heads, seq_len=args.seq_len, max_clients=args.clients,
                               max_chunks_per_client=args.chunks_per_client, max_test_chunks=args.test_chunks, **params)
    lr = args.full_lr if params["lora"] is None else args.lora_lr
    spec = {"name": f"lora-bench-{name}", "seed": args.seed,
            "training": {"rounds": args.rounds, "clients_per_round": args.per_round, "local_epochs": args.epochs,
                         "batch_size": args.local_batch, "lr": lr},
            "compression": {"codec": "identity", "broadcast": "identity"},
            "resources": {"num_workers": 2}}
    probe = task.model()
    before = task.evaluate(probe, task.test_data())
    t0 = time.perf_counter()
    result = fedray.run(task, spec, log=lambda *_: None)
    wall = time.perf_counter() - t0
    fed = {k: v.numel() for k, v in result.params.items()}
    rounds = [{"round": r.round, "clients": r.clients, "failed": r.failed, "accuracy": round(r.accuracy, 4),
               "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "wall_s": round(r.wall_s, 2)} for r in result.rounds]
    ok = [r for r in result.rounds if r.clients]
    row = {
        "arm": name, "lr": lr, "federated_tensors": len(fed), "federated_params": sum(fed.values()),
        "model_params": sum(v.numel() for v in task.base_model().state_dict().values()),
        "base_stored_bytes_per_client": _base_bytes(probe), "accuracy_before": round(before["accuracy"], 4),
        "accuracy": round(result.rounds[-1].accuracy, 4),
        "bytes_up_per_round": int(np.mean([r.bytes_up for r in ok])),
        "bytes_down_per_round": int(np.mean([r.bytes_down for r in ok])),
        "bytes_up_per_client": int(np.mean([r.bytes_up / r.clients for r in ok])),
        "failed_clients": sum(r.failed for r in result.rounds), "wall_s": round(wall, 1), "rounds": rounds,
    }
    log(f"{name}: {row['federated_params']} federated params of {row['model_params']}, accuracy "
        f"{row['accuracy_before']:.4f} -> {row['accuracy']:.4f}, up {row['bytes_up_per_round']} B/round, "
        f"down {row['bytes_down_per_round']} B/round, {wall:.1f} s")
    return row


def _base_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the frozen base a client holds and of the same tensors in fp32; for a fully
    trainable model, its fp32 parameter bytes."""
    stored, fp32 = frozen_bytes(model)
    if not stored:
        stored = fp32 = 4 * sum(p.numel() for p in model.parameters())
    return {"stored": stored, "fp32": fp32}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps and rounds")
    ap.add_argument("--save-base", help="also write the pretrained base's state_dict here (torch.save), e.g. "
                                        "for examples/shakespeare/lora_job.yaml")
    ap.add_argument("--base", help="load this saved base (--save-base) instead of pretraining")
    ap.add_argument("--only-transform", action="store_true",
                    help="run only OMC's per-variable against shared transform on the base (omc_transform_transformer)")
    ap.add_argument("--transform-bits", type=int, nargs="+", default=[8, 4, 3])
    ap.add_argument("--omc-train-steps", type=int, default=300,
                    help="central OMC training steps from the base per arm (omc_train_transformer); 0 skips it")
    ap.add_argument("--omc-train-lr", type=float, default=0.05, help="SGD learning rate of omc_train_transformer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-plays", nargs="+", default=list(FINETUNE_PLAYS))
    ap.add_argument("--d", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=80)
    ap.add_argument("--batch", type=int, default=32, help="pretraining batch")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--test-chunks", type=int, default=300)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--clients", type=int, default=24, help="roles of the fine-tuning plays (the most speeches)")
    ap.add_argument("--per-round", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--chunks-per-client", type=int, default=32)
    ap.add_argument("--local-batch", type=int, default=8)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    args = ap.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.rounds, args.per_round, args.clients = 30, 2, 3, 6
        args.chunks_per_client, args.test_chunks, args.arms = 8, 60, ["full", "lora_omc8"]
        args.omc_train_steps = min(args.omc_train_steps, 20)
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    load0 = os.getloadavg()[0]
    if any(not 2 <= b <= 16 for b in args.transform_bits):
        raise SystemExit(f"--transform-bits: each must be 2..16, got {args.transform_bits}")
    if args.omc_train_steps < 0 or args.omc_train_lr <= 0:
        raise SystemExit(f"--omc-train-steps must be >= 0 and --omc-train-lr > 0, got {args.omc_train_steps}, "
                         f"{args.omc_train_lr}")
    base, pre = load_base(args, log) if args.base else pretrain(args, log)
    if args.save_base:
        Path(args.save_base).parent.mkdir(parents=True, exist_ok=True)
        torch.save(base, args.save_base)
        log(f"saved the base to {args.save_base}")
    transform = omc_transform_transformer(base, pre["test"], args, log)
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": 1, "python": platform.python_version(),
                    "load_avg_start": round(load0, 1)},
        "model": {"kind": "CharTransformer", "d": args.d, "layers": args.layers, "heads": args.heads,
                  "seq_len": args.seq_len, "vocab": len(sd.VOCAB)},
        "pretrain": pre["info"], "omc_transform_transformer": transform,
    }
    if args.omc_train_steps > 0:
        out["omc_train_transformer"] = omc_train_transformer(base, pre["train"], pre["test"], args, log)
    if args.only_transform:
        return _write(out, args, t_all, log)
    p2u = [p2u_curve(base, pre["test"], args, bits, log) for bits in ((2, 2, 4, 8), (4, 4, 8))]
    started = ensure_ray(2)
    try:
        arms = [federate(a, base, args, log) for a in args.arms]
    finally:
        if started:
            import ray

            ray.shutdown()
    full = next((a for a in arms if a["arm"] == "full"), None)
    for a in arms:
        if full is not None:
            a["delta_vs_full_pts"] = round(100 * (a["accuracy"] - full["accuracy"]), 2)
            a["up_ratio_vs_full"] = round(full["bytes_up_per_round"] / a["bytes_up_per_round"], 2)
            a["down_ratio_vs_full"] = round(full["bytes_down_per_round"] / a["bytes_down_per_round"], 2)
    out.update(p2u=p2u, finetune={
        "plays": list(args.finetune_plays), "clients": args.clients, "per_round": args.per_round,
        "rounds": args.rounds, "local_epochs": args.epochs, "chunks_per_client": args.chunks_per_client,
        "local_batch": args.local_batch, "rank": args.rank, "codec": "identity", "arms": arms})
    return _write(out, args, t_all, log)


def _write(out: dict, args, t_all: float, log) -> dict:
    out["machine"]["load_avg_end"] = round(os.getloadavg()[0], 1)
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.json} ({out['wall_s']} s)")
    return out


if __name__ == "__main__":
    main()
