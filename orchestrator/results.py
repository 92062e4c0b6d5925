"""A job's results directory: summary, per-round history, final model and plots.

    summary.json            JobResult.summary() (the `--json` contract)
    rounds.json, rounds.csv one record per round (RoundRecord's fields)
    model.pt                torch state dict of the final global model
    accuracy.png            test accuracy per round
    accuracy_vs_bytes.png   test accuracy against cumulative bytes (up + down), and the fp32 reference
    metrics.png             every metric the task's evaluate returns, per round
    bytes_per_round.png     bytes per round, up and down

`write_results` is pure apart from the files it writes: it takes any object with `rounds`,
`params` and `summary()` (a `JobResult`) and never touches Ray.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

__all__ = ["FP32_LABEL", "RESULT_FILES", "ResultLike", "accuracy_vs_bytes_figure", "load_results", "round_rows",
           "write_results"]

RESULT_FILES = (
    "summary.json", "rounds.json", "rounds.csv", "model.pt",
    "accuracy.png", "accuracy_vs_bytes.png", "bytes_per_round.png", "metrics.png",
)


class ResultLike(Protocol):
    """What `write_results` needs from a finished job (`JobResult` has it)."""

    rounds: Sequence[Any]
    params: Mapping[str, Any]

    def summary(self) -> dict: ...


def round_rows(rounds: Sequence[Any]) -> list[dict[str, Any]]:
    """Rounds as plain dicts (dataclass records or mappings), in order."""
    return [asdict(r) if is_dataclass(r) else dict(r) for r in rounds]


def write_results(result: ResultLike, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write the results directory of `result` into `out_dir` (created if missing).

    Returns the written files by name (see RESULT_FILES).

    Raises:
        OSError: `out_dir` cannot be created or written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = round_rows(result.rounds)
    files = {
        "summary.json": _write_json(out / "summary.json", result.summary()),
        "rounds.json": _write_json(out / "rounds.json", rows),
        "rounds.csv": _write_csv(out / "rounds.csv", _flat(rows)),
        "model.pt": _write_model(out / "model.pt", result.params),
    }
    if plots:
        files.update(_write_plots(out, rows, codec=result.summary().get("codec")))
    return files


def load_results(out_dir: str | os.PathLike, *, model: bool = True) -> dict[str, Any]:
    """Read a results directory back: {"summary", "rounds", "model" (state dict or None)}.

    Raises:
        FileNotFoundError: summary.json is not in `out_dir`.
    """
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    state = None
    if model and (out / "model.pt").is_file():
        import torch

        state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    return {"summary": summary, "rounds": summary.get("rounds", []), "model": state}


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the CSV: the `metrics` mapping becomes one `metric_<name>` column per metric
    (the union over rounds; empty where a round lacks one)."""
    names: list[str] = []
    for r in rows:
        names += [k for k in (r.get("metrics") or {}) if k not in names]
    out = []
    for r in rows:
        m = r.get("metrics") or {}
        row = {k: v for k, v in r.items() if k != "metrics"}
        row.update({f"metric_{k}": m.get(k, "") for k in names})
        out.append(row)
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def _write_model(path: Path, params: Mapping[str, Any]) -> Path:
    import torch

    torch.save({k: v.detach().cpu().clone() for k, v in params.items()}, path)
    return path


def _write_plots(out: Path, rows: list[dict[str, Any]], *, codec: str | None = None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and in CI
    import matplotlib.pyplot as plt

    rnd = [r["round"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    up = [r["bytes_up"] / 1e6 for r in rows]
    down = [r["bytes_down"] / 1e6 for r in rows]
    files = {}

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rnd, acc, marker="o")
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round")
    files["accuracy.png"] = _save(fig, out / "accuracy.png")

    files["accuracy_vs_bytes.png"] = _save(accuracy_vs_bytes_figure(rows, codec=codec), out / "accuracy_vs_bytes.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = sorted({k for r in rows for k in (r.get("metrics") or {})})
    for name in names:
        ax.plot([r["round"] for r in rows if name in (r.get("metrics") or {})],
                [r["metrics"][name] for r in rows if name in (r.get("metrics") or {})], marker="o", label=name)
    ax.set(xlabel="round", ylabel="value", title="Evaluation metrics per round")
    if names:
        ax.legend(loc="best")
    files["metrics.png"] = _save(fig, out / "metrics.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    w = 0.4
    ax.bar([x - w / 2 for x in rnd], up, width=w, label="up")
    ax.bar([x + w / 2 for x in rnd], down, width=w, label="down")
    ax.set(xlabel="round", ylabel="MB", title="Bytes per round")
    ax.legend(loc="best")
    files["bytes_per_round.png"] = _save(fig, out / "bytes_per_round.png")
    return files


FP32_LABEL = "fp32 (uncompressed)"


def accuracy_vs_bytes_figure(rows: Sequence[Mapping[str, Any]], *, codec: str | None = None):
    """Test accuracy against cumulative MB (up + down), with the fp32 reference line: the same
    accuracy curve at the bytes the rounds would have cost uncompressed (`bytes_*_fp32`), so the
    gap between the lines is the saving. Returns the matplotlib Figure (the caller saves it).
    The x axis is logarithmic: a 4x and a 100x saving both stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r["accuracy"] for r in rows]
    sent = _cumulative_mb(rows, "bytes_up", "bytes_down")
    fp32 = _cumulative_mb(rows, "bytes_up_fp32", "bytes_down_fp32")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sent, acc, marker="o", label=f"sent ({codec})" if codec else "sent")
    if any(fp32):
        ax.plot(fp32, acc, marker="x", linestyle="--", color="grey", label=FP32_LABEL)
    if all(x > 0 for x in sent + fp32):
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter

        # 0.5, 2, 20 instead of 5x10^-1; between decades only the 2s and 5s, so labels never crowd
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in "25" else ""))
    ax.set(xlabel="cumulative MB (up + down)", ylabel="test accuracy", title="Accuracy against bytes")
    ax.legend(loc="best")
    return fig


def _cumulative_mb(rows: Sequence[Mapping[str, Any]], *keys: str) -> list[float]:
    out, total = [], 0.0
    for r in rows:
        total += sum(float(r.get(k) or 0) for k in keys) / 1e6
        out.append(total)
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
