"""Evaluation history and the champion generator.

Every evaluation appends one row to a Parquet history table (``history.parquet``) that is
plotted over time (``history.png``). The *champion* is the generator in use: a checkpoint
copy plus ``champion.json`` describing it. A candidate replaces it only when it is better on
the chosen metric; :func:`decide` says whether and why, :func:`promote` does it.

Promotion is crash-safe: the checkpoint is copied under a content-addressed name first, then
``champion.json`` (the single commit point) is replaced atomically to point at it, and only
then are older champion checkpoints removed. A reader sees the old champion or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from carmodels.fid import sha256_of
from carmodels.io import (
    atomic_save_figure,
    atomic_write,
    atomic_write_json,
    atomic_write_parquet,
)

HISTORY_FILE = "history.parquet"
HISTORY_PLOT = "history.png"
CHAMPION_RECORD = "champion.json"
#: Whether lower or higher is better, for every metric a champion can be chosen on.
METRIC_DIRECTIONS = {
    "fid": "lower",
    "kid_mean": "lower",
    "type_fd": "lower",
    "pixel_fd_16": "lower",
    "type_overlap": "higher",
    "diversity_ratio": "higher",
}
#: Plotted over time in history.png (those present in the table).
PLOTTED_METRICS = ("fid", "kid_mean", "type_fd", "type_overlap", "pixel_fd_16", "nn_ratio")


@dataclass
class PromotionConfig:
    #: The metric a candidate must beat the champion on. ``type_fd`` works offline;
    #: ``fid`` is the published standard where the Inception weights are available.
    metric: str = "type_fd"
    #: The candidate must be better by at least this fraction of the champion's value
    #: (0.02 = 2%), so evaluation noise alone does not swap generators.
    min_relative_improvement: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRIC_DIRECTIONS:
            raise ValueError(
                f"PromotionConfig.metric {self.metric!r} is not one of {sorted(METRIC_DIRECTIONS)}"
            )
        if self.min_relative_improvement < 0:
            raise ValueError("PromotionConfig.min_relative_improvement must be >= 0")


@dataclass
class Decision:
    promote: bool
    reason: str
    metric: str
    candidate_value: float | None
    champion_value: float | None


# --------------------------------------------------------------------------- history


def history_row(
    metrics_json: dict[str, Any], checkpoint_sha256: str, evaluated_at: datetime | None = None
) -> dict[str, Any]:
    """One flat history row from an evaluation's ``metrics.json`` content."""
    row: dict[str, Any] = {
        "evaluated_at": evaluated_at or datetime.now(UTC),
        "checkpoint": metrics_json["checkpoint"],
        "checkpoint_sha256": checkpoint_sha256,
        "weights": metrics_json.get("weights"),
        "train_data_version": metrics_json.get("data_version"),
        "eval_data_version": metrics_json.get("eval_data_version"),
        "fid_computed": bool(metrics_json.get("fid_record", {}).get("computed", False)),
    }
    for key, value in metrics_json.items():
        if isinstance(value, bool) or key in row:
            continue
        if value is None or isinstance(value, int | float):
            row[key] = None if value is None else float(value)
    return row


def read_history(history_path: str | os.PathLike[str]) -> pd.DataFrame:
    path = Path(history_path)
    return pq.read_table(path).to_pandas() if path.is_file() else pd.DataFrame()


def append_history(history_path: str | os.PathLike[str], row: dict[str, Any]) -> pd.DataFrame:
    """Append one row (columns are the union of old and new ones) and rewrite atomically."""
    old = read_history(history_path)
    new = pd.DataFrame([row])
    frame = new if old.empty else pd.concat([old, new], ignore_index=True)
    for column in frame.columns:  # all-None columns would otherwise become untyped nulls
        numeric_or_null = frame[column].map(lambda v: v is None or isinstance(v, float)).all()
        if frame[column].dtype == object and numeric_or_null:
            frame[column] = frame[column].astype("float64")
    atomic_write_parquet(history_path, pa.Table.from_pandas(frame, preserve_index=False))
    return frame


def plot_history(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """One panel per metric against evaluation time; None when there is nothing to plot."""
    columns = [c for c in PLOTTED_METRICS if c in frame.columns and frame[c].notna().any()]
    if frame.empty or not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(columns), 1, figsize=(10, 2.4 * len(columns)), sharex=True)
    axes = [axes] if len(columns) == 1 else list(axes)
    when = pd.to_datetime(frame["evaluated_at"])
    for ax, column in zip(axes, columns, strict=True):
        ax.plot(when, frame[column], marker="o")
        direction = METRIC_DIRECTIONS.get(column)
        ax.set_ylabel(column + (f"\n({direction} is better)" if direction else ""))
        ax.grid(alpha=0.3)
    axes[0].set_title("Generator evaluations over time")
    axes[-1].set_xlabel("evaluated at (UTC)")
    fig.autofmt_xdate()
    fig.tight_layout()
    return atomic_save_figure(path, fig)


def record_evaluation(
    metrics_path: str | os.PathLike[str], history_dir: str | os.PathLike[str]
) -> tuple[pd.DataFrame, Path | None]:
    """Append the evaluation in ``metrics_path`` to the history and redraw the plot."""
    metrics_json = json.loads(Path(metrics_path).read_text())
    row = history_row(metrics_json, sha256_of(metrics_json["checkpoint"]))
    frame = append_history(Path(history_dir) / HISTORY_FILE, row)
    return frame, plot_history(frame, Path(history_dir) / HISTORY_PLOT)


# --------------------------------------------------------------------------- champion


def read_champion(champion_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(champion_dir) / CHAMPION_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _value(metrics: dict[str, Any], metric: str) -> float | None:
    value = metrics.get(metric)
    return None if value is None else float(value)


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    config: PromotionConfig,
    candidate_sha256: str | None = None,
) -> Decision:
    """Whether ``candidate`` (a metrics.json dict) should replace ``champion`` (champion.json)."""
    metric = config.metric
    new = _value(candidate, metric)
    old = None if champion is None else _value(champion.get("metrics", {}), metric)

    def result(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, metric, new, old)

    if new is None:
        why = (
            candidate.get("fid_record", {}).get("reason") if metric in ("fid", "kid_mean") else None
        )
        return result(
            False,
            f"the candidate has no {metric}"
            + (f" ({why})" if why else "")
            + "; the champion is kept. Choose a metric this evaluation computes.",
        )
    if champion is None:
        return result(True, f"no champion yet: the candidate becomes it ({metric}={new:.4g}).")
    if candidate_sha256 is not None and candidate_sha256 == champion.get("checkpoint_sha256"):
        return result(False, "the candidate is the champion's own checkpoint; nothing to replace.")
    if old is None:
        return result(True, f"the champion has no {metric}; the candidate ({new:.4g}) replaces it.")
    lower = METRIC_DIRECTIONS[metric] == "lower"
    margin = config.min_relative_improvement * abs(old)
    better = new < old - margin if lower else new > old + margin
    caveat = ""
    if champion.get("eval_data_version") != candidate.get("eval_data_version"):
        caveat = (
            f" Note: the champion was scored on data {champion.get('eval_data_version')}, the "
            f"candidate on {candidate.get('eval_data_version')}."
        )
    wanted = "lower" if lower else "higher"
    if better:
        return result(
            True, f"{metric} {new:.4g} beats the champion's {old:.4g} ({wanted} is better).{caveat}"
        )
    needed = f" by at least {config.min_relative_improvement:.0%}" if margin else ""
    return result(
        False,
        f"{metric} {new:.4g} does not beat the champion's {old:.4g} ({wanted} is better"
        f"{needed}); the champion is kept.{caveat}",
    )


def promote(
    checkpoint_path: str | os.PathLike[str],
    candidate: dict[str, Any],
    decision: Decision,
    champion_dir: str | os.PathLike[str],
    checkpoint_sha256: str | None = None,
) -> dict[str, Any]:
    """Make the candidate the champion (see the module docstring for the crash safety)."""
    if not decision.promote:
        raise ValueError(f"refusing to promote: {decision.reason}")
    champion_dir = Path(champion_dir)
    digest = checkpoint_sha256 or sha256_of(checkpoint_path)
    target = champion_dir / f"champion-{digest[:16]}.pt"
    if not target.is_file():
        atomic_write(target, lambda tmp: shutil.copyfile(checkpoint_path, tmp))
    record = {
        "checkpoint": target.name,
        "checkpoint_sha256": digest,
        "source_checkpoint": str(checkpoint_path),
        "promoted_at": datetime.now(UTC).isoformat(),
        "metric": decision.metric,
        "value": decision.candidate_value,
        "previous_value": decision.champion_value,
        "reason": decision.reason,
        "eval_data_version": candidate.get("eval_data_version"),
        "train_data_version": candidate.get("data_version"),
        "metrics": {k: v for k, v in candidate.items() if v is None or isinstance(v, int | float)},
        "decision": asdict(decision),
    }
    atomic_write_json(champion_dir / CHAMPION_RECORD, record)
    for old in champion_dir.glob("champion-*.pt"):
        if old != target:
            old.unlink()
    return record


def champion_checkpoint(champion_dir: str | os.PathLike[str]) -> Path | None:
    """The champion's checkpoint file, or None when there is no champion yet."""
    record = read_champion(champion_dir)
    return None if record is None else Path(champion_dir) / record["checkpoint"]
