"""Evaluation history and the champion generator.

Every evaluation of a new generator appends one row to a Parquet history table
(``history.parquet``) that is plotted over time (``history.png``): the callers of
:func:`carmodels.evaluate.evaluate` that score new generators (the ``evaluate_dcgan`` asset,
``carmodels evaluate``) call :func:`record_evaluation`; evaluating alone writes no history, so
re-scoring the champion (:func:`rescore_checkpoint`) adds no row. The *champion* is the
generator in use: a checkpoint copy plus ``champion.json`` describing it. A candidate replaces
it only when it is better on the chosen metric; :func:`choose` says whether and why,
:func:`promote` replaces it and :func:`keep` keeps it.

Scores are compared only when both were measured on the same data (``eval_data_version``,
the shards' content version that evaluation recorded): a champion scored on other data, or
without the chosen metric, is first re-evaluated on the current shards with the candidate's
settings (:func:`rescore_checkpoint`), and its record keeps the new scores. A candidate that
cannot be compared (no such metric, its checkpoint gone) leaves the champion in place and the
decision says why and what to change; only when there is no champion yet is a candidate
without the metric crowned anyway, since some generator must be in use.

Promotion is crash-safe: the checkpoint is copied under a content-addressed name first, then
``champion.json`` (the single commit point) is replaced atomically to point at it, and only
then are older champion checkpoints removed. A reader sees the old champion or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from carmodels.classifier import ClassifierConfig
from carmodels.evaluate import EvalConfig, evaluate
from carmodels.io import atomic_write, atomic_write_json, atomic_write_parquet
from carmodels.metrics.fid import FidConfig, sha256_of
from carmodels.pictures import plot_promotion_history
from carmodels.versioning import VERSION_LENGTH

HISTORY_FILE = "history.parquet"
HISTORY_PLOT = "history.png"
CHAMPION_RECORD = "champion.json"
#: Whether lower or higher is better, for every metric a champion can be chosen on.
METRIC_DIRECTIONS = {
    "fid": "lower",
    "kid_mean": "lower",
    "judge_fd": "lower",
    "judge_kid": "lower",
    "pixel_fd_16": "lower",
    "type_overlap": "higher",
    "diversity_ratio": "higher",
    "judge_density": "higher",
    "judge_coverage": "higher",
}
#: Plotted over time in history.png (those present in the table).
PLOTTED_METRICS = ("fid", "kid_mean", "judge_fd", "type_overlap", "pixel_fd_16", "nn_ratio")


@dataclass
class PromotionConfig:
    #: The metric a candidate must beat the champion on. ``judge_fd`` works offline and is
    #: validated by bench/judge.py (docs/benchmarks/judge.md); ``fid`` is the published
    #: standard where the Inception weights are available.
    metric: str = "judge_fd"
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


def record_evaluation(
    metrics_path: str | os.PathLike[str], history_dir: str | os.PathLike[str]
) -> tuple[pd.DataFrame, Path | None]:
    """Append the evaluation in ``metrics_path`` to the history and redraw the plot."""
    metrics_json = json.loads(Path(metrics_path).read_text())
    digest = metrics_json.get("checkpoint_sha256") or sha256_of(metrics_json["checkpoint"])
    row = history_row(metrics_json, digest)
    frame = append_history(Path(history_dir) / HISTORY_FILE, row)
    plot = plot_promotion_history(
        frame, Path(history_dir) / HISTORY_PLOT, PLOTTED_METRICS, METRIC_DIRECTIONS
    )
    return frame, plot


# --------------------------------------------------------------------------- champion

#: ``Decision.outcome``: what happened and why, in one word a dashboard can group by.
PROMOTED = "promoted"  # the candidate beats the champion (or the champion could not compete)
FIRST_CHAMPION = "first_champion"  # there was no champion: the candidate becomes it
ALREADY_CHAMPION = "already_champion"  # the evaluated checkpoint is the champion itself
NOT_BETTER = "not_better"  # compared on the same data, the candidate does not win
METRIC_MISSING = "metric_missing"  # the candidate lacks the chosen metric: nothing to compare
OTHER_DATA = "other_data"  # the two scores are on different data: never compared
INVALID_CANDIDATE = "invalid_candidate"  # the evaluated checkpoint is gone
_PROMOTING = frozenset({PROMOTED, FIRST_CHAMPION})


class InvalidCandidate(ValueError):
    """The candidate cannot be used, and there is no champion to keep instead."""


@dataclass
class Rescore:
    """The champion re-evaluated on the candidate's data before the comparison."""

    from_data_version: str | None
    to_data_version: str | None
    value_before: float | None
    value_after: float | None


@dataclass
class Decision:
    promote: bool
    reason: str
    metric: str
    candidate_value: float | None
    #: The champion's value the candidate was compared with (after any re-scoring).
    champion_value: float | None
    outcome: str = ""
    rescore: Rescore | None = None


@dataclass
class Choice:
    """What :func:`choose` found: the decision, and the champion record as it now stands."""

    decision: Decision
    #: The champion's record, re-scored on the candidate's data when that was needed; None
    #: when there is no champion yet.
    champion: dict[str, Any] | None
    candidate_sha256: str | None


def read_champion(champion_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(champion_dir) / CHAMPION_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _value(metrics: dict[str, Any], metric: str) -> float | None:
    value = metrics.get(metric)
    return None if value is None else float(value)


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _numbers(metrics_json: dict[str, Any]) -> dict[str, Any]:
    """The flat numeric values of a metrics.json dict (what a champion record keeps)."""
    return {
        k: v
        for k, v in metrics_json.items()
        if v is None or (isinstance(v, int | float) and not isinstance(v, bool))
    }


def missing_metric_message(candidate: dict[str, Any], metric: str) -> str:
    """Which metric is missing from ``candidate``, why, and the two ways to fix it."""
    if metric in ("fid", "kid_mean"):
        record = candidate.get("fid_record", {})
        why = record.get("reason") or "FID/KID not computed"
        fix = record.get("how_to_supply") or (
            "Supply the Inception weights (evaluate_dcgan's `inception_weights`, or "
            "$CARMODELS_INCEPTION_WEIGHTS)"
        )
        fix = fix.rstrip(".") + ", then re-materialise evaluate_dcgan"
    elif metric.startswith("judge_") or metric == "type_overlap":
        why = candidate.get("type_record", {}).get("reason") or "judge metrics not computed"
        fix = "Give the listings a car `type` so the judge can be trained, and re-evaluate"
    else:
        why = "null in this evaluation, which needs at least 2 validation images"
        fix = "Rebuild the shards with a validation split, and re-evaluate"
    computed = sorted(m for m in METRIC_DIRECTIONS if _value(candidate, m) is not None)
    other = (
        f"; or set champion_generator's `metric` to one this evaluation computed "
        f"({', '.join(computed)})"
        if computed
        else ""
    )
    return f"the candidate has no {metric} ({why}). {fix}{other}"


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    config: PromotionConfig,
    candidate_sha256: str | None = None,
) -> Decision:
    """Whether ``candidate`` (a metrics.json dict) should replace ``champion`` (champion.json).

    Pure: it compares what the two records hold and never re-scores anything, so scores on
    different data are refused here (``OTHER_DATA``); :func:`choose` re-scores the champion on
    the candidate's data first.
    """
    metric = config.metric
    new = _value(candidate, metric)
    old = None if champion is None else _value(champion.get("metrics", {}), metric)

    def result(outcome: str, reason: str) -> Decision:
        return Decision(outcome in _PROMOTING, reason, metric, new, old, outcome)

    if (
        champion is not None
        and candidate_sha256 is not None
        and candidate_sha256 == champion.get("checkpoint_sha256")
    ):
        return result(
            ALREADY_CHAMPION,
            f"already the champion: the evaluated checkpoint (sha256 {candidate_sha256[:12]}) "
            "is the one in use; nothing to do.",
        )
    if new is None:
        missing = missing_metric_message(candidate, metric)
        if champion is None:
            # Something must be in use for the designs to be drawn: the first candidate is
            # crowned unscored, and the first later candidate that has the metric is compared
            # with it after re-scoring it (see `needs_rescore`).
            return result(
                FIRST_CHAMPION,
                f"no champion yet: the candidate becomes it so that a generator is in use, "
                f"but {missing}.",
            )
        return result(METRIC_MISSING, f"champion kept: {missing}.")
    if champion is None:
        return result(
            FIRST_CHAMPION, f"no champion yet: the candidate becomes it ({metric}={new:.4g})."
        )
    theirs, ours = champion.get("eval_data_version"), candidate.get("eval_data_version")
    if theirs != ours:
        return result(
            OTHER_DATA,
            f"champion kept: it was scored on data {theirs} and the candidate on {ours}; scores "
            "on different data are not compared. Re-score the champion on the candidate's data.",
        )
    sizes = _image_size(champion), _image_size(candidate)
    other_size = None not in sizes and sizes[0] != sizes[1]
    if _judged_by_another(candidate, champion, metric) and other_size:
        return result(
            OTHER_DATA,
            f"champion kept: it draws {sizes[0]} px images and the candidate {sizes[1]} px; "
            f"{metric} is measured by a judge working at the generator's side, so scores at "
            "different sizes are not compared. Train the candidate at the champion's size, or "
            "gate on fid (measured at Inception's size) to compare across sizes.",
        )
    if _judged_by_another(candidate, champion, metric):
        return result(
            OTHER_DATA,
            f"champion kept: it was scored by judge {champion.get('judge_key')} and the "
            f"candidate by {candidate.get('judge_key')}; scores by different judges are not "
            "compared. Re-score the champion with the candidate's judge.",
        )
    if old is None:
        return result(
            PROMOTED, f"the champion has no {metric}; the candidate ({new:.4g}) replaces it."
        )
    lower = METRIC_DIRECTIONS[metric] == "lower"
    margin = config.min_relative_improvement * abs(old)
    better = new < old - margin if lower else new > old + margin
    wanted = "lower" if lower else "higher"
    if better:
        return result(
            PROMOTED, f"{metric} {new:.4g} beats the champion's {old:.4g} ({wanted} is better)."
        )
    needed = f" by at least {config.min_relative_improvement:.0%}" if margin else ""
    return result(
        NOT_BETTER,
        f"champion kept: {metric} {new:.4g} does not beat the champion's {old:.4g} "
        f"({wanted} is better{needed}).",
    )


def needs_rescore(candidate: dict[str, Any], champion: dict[str, Any] | None, metric: str) -> bool:
    """Whether the champion must be re-evaluated before it can be compared with ``candidate``:
    its record is scored on other data, or lacks the metric the candidate has (it was crowned
    unscored, or the metric was switched). Not when the candidate lacks the metric: then there
    is nothing to compare, and an evaluation would be wasted."""
    if champion is None or _value(candidate, metric) is None:
        return False
    if champion.get("eval_data_version") != candidate.get("eval_data_version"):
        return True
    if _judged_by_another(candidate, champion, metric):
        return True
    return _value(champion.get("metrics", {}), metric) is None


def _image_size(record: dict[str, Any]) -> int | None:
    """The side of the images a candidate (metrics.json) or champion record's generator drew,
    where it was recorded (evaluations since 2026-12-06)."""
    size = record.get("image_size", (record.get("metrics") or {}).get("image_size"))
    return int(size) if isinstance(size, int | float) else None


def _judged_by_another(candidate: dict[str, Any], champion: dict[str, Any], metric: str) -> bool:
    """Whether ``metric`` is the judge's and another judge (format, settings or training data)
    scored the champion: a judge's distances are on its own scale."""
    if not metric.startswith("judge_"):
        return False
    return champion.get("judge_key") != candidate.get("judge_key")


def eval_config_of(candidate: dict[str, Any]) -> EvalConfig:
    """The EvalConfig a metrics.json dict was computed with (defaults where it does not say).

    Keys the current dataclasses do not know are dropped, so an evaluation written by another
    version of the code still gives a usable config.
    """

    def known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in values.items() if k in names}

    raw = dict(candidate.get("config") or {})
    values = known(EvalConfig, raw)
    values["fid_config"] = FidConfig(**known(FidConfig, raw.get("fid_config") or {}))
    values["classifier_config"] = ClassifierConfig(
        **known(ClassifierConfig, raw.get("classifier_config") or {})
    )
    return EvalConfig(**values)


def rescore_checkpoint(
    checkpoint: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    candidate: dict[str, Any],
    *,
    classifier_cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``shards_dir`` exactly as ``candidate`` was evaluated.

    The same EvalConfig (sample counts, seeds, FID settings) makes the two scores comparable;
    its pictures go to a temporary folder and nothing is appended to the history, which
    records the evaluations of new generators. ``classifier_cache_dir`` should be where the
    candidate's evaluation cached its judge: the judge is cached by data version and side, so
    the champion is then scored by the very judge that scored the candidate, and none is
    trained again.
    """
    config = replace(eval_config_of(candidate), record_history=False)
    if config.classifier_cache_dir is None and classifier_cache_dir is not None:
        config = replace(config, classifier_cache_dir=str(classifier_cache_dir))
    with tempfile.TemporaryDirectory(prefix="champion-rescore-") as out:
        result = evaluate(checkpoint, shards_dir, out, config, log)
        return json.loads(result.metrics_path.read_text())


def rescored_record(champion: dict[str, Any], rescored: dict[str, Any]) -> dict[str, Any]:
    """``champion``'s record with the scores of its re-evaluation (a metrics.json dict)."""
    record = dict(champion)
    record["rescored"] = {
        "at": datetime.now(UTC).isoformat(),
        "previous_eval_data_version": champion.get("eval_data_version"),
        "previous_metrics": champion.get("metrics", {}),
    }
    record["eval_data_version"] = rescored.get("eval_data_version")
    record["judge_key"] = rescored.get("judge_key")
    record["metrics"] = _numbers(rescored)
    if record.get("metric"):
        record["value"] = _value(record["metrics"], record["metric"])
    return record


def choose(
    candidate: dict[str, Any],
    champion_dir: str | os.PathLike[str],
    config: PromotionConfig,
    rescore: Callable[[Path], dict[str, Any]] | None = None,
) -> Choice:
    """The whole decision on an evaluated candidate, without changing any file.

    ``rescore(champion_checkpoint)`` evaluates the champion on the current shards with the
    candidate's settings (e.g. via :func:`rescore_checkpoint`); it is called only when the
    champion's record cannot be compared as it is (:func:`needs_rescore`). Without it, a
    champion scored on other data is kept (``OTHER_DATA``). Raises :class:`InvalidCandidate`
    when the candidate's checkpoint is gone and there is no champion to keep instead.
    """
    champion = read_champion(champion_dir)
    metric = config.metric

    def invalid(problem: str, fix: str) -> Choice:
        if champion is None:
            raise InvalidCandidate(f"{problem} and there is no champion to keep: {fix}.")
        decision = Decision(
            False,
            f"champion kept: {problem}; {fix}.",
            metric,
            _value(candidate, metric),
            _value(champion.get("metrics", {}), metric),
            INVALID_CANDIDATE,
        )
        return Choice(decision, champion, None)

    problem = _checkpoint_problem(candidate)
    if problem is not None:
        return invalid(*problem)
    digest = sha256_of(candidate["checkpoint"])
    champion, note, rescore_info = _comparable_champion(
        champion, Path(champion_dir), candidate, digest, metric, rescore
    )
    decision = decide(candidate, champion, config, digest)
    decision.rescore = rescore_info
    if rescore_info is not None:
        _explain_rescore(decision, rescore_info, candidate, metric)
    if note:
        decision.reason = note + decision.reason
        if decision.outcome == FIRST_CHAMPION:
            decision.outcome = PROMOTED
    return Choice(decision, champion, digest)


def _checkpoint_problem(candidate: dict[str, Any]) -> tuple[str, str] | None:
    """``(problem, fix)`` when the evaluated checkpoint cannot be promoted, else None."""
    checkpoint = candidate.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        return (
            f"the evaluated checkpoint {checkpoint} does not exist (any more)",
            "re-materialise train_dcgan and evaluate_dcgan",
        )
    digest = sha256_of(checkpoint)
    evaluated = candidate.get("checkpoint_sha256")  # absent from older evaluations
    if evaluated is not None and evaluated != digest:
        # The trainer wrote a new checkpoint under the same name after this evaluation:
        # promoting the file would crown a generator nobody evaluated.
        return (
            f"the checkpoint {checkpoint} changed after it was evaluated (sha256 "
            f"{evaluated[:12]} then, {digest[:12]} now)",
            "re-materialise evaluate_dcgan",
        )
    return None


def _comparable_champion(
    champion: dict[str, Any] | None,
    champion_dir: Path,
    candidate: dict[str, Any],
    digest: str,
    metric: str,
    rescore: Callable[[Path], dict[str, Any]] | None,
) -> tuple[dict[str, Any] | None, str, Rescore | None]:
    """The champion's record as the candidate is compared with it: ``(record, note, rescore)``.

    A record whose checkpoint is gone counts as no champion (``note`` says so); one scored on
    other data (or without the metric) is re-scored when ``rescore`` is given."""
    if champion is None:
        return None, "", None
    champion_file = champion_dir / champion.get("checkpoint", "")
    if not champion_file.is_file():
        # A record without its checkpoint generates nothing and cannot be re-scored: the
        # candidate takes its place as if there were no champion (even the same
        # checkpoint: promoting it puts the file back).
        return None, f"the champion's checkpoint {champion_file} is missing; ", None
    if (
        champion.get("checkpoint_sha256") == digest
        or rescore is None
        or not needs_rescore(candidate, champion, metric)
    ):
        return champion, "", None
    rescored = rescored_record(champion, rescore(champion_file))
    info = Rescore(
        champion.get("eval_data_version"),
        rescored.get("eval_data_version"),
        _value(champion.get("metrics", {}), metric),
        _value(rescored["metrics"], metric),
    )
    return rescored, "", info


def _explain_rescore(
    decision: Decision, info: Rescore, candidate: dict[str, Any], metric: str
) -> None:
    """Say in ``decision.reason`` that (and how) the champion was re-scored."""
    if decision.outcome == OTHER_DATA:
        # Re-scored on the shards as they are now, which are no longer the ones the
        # candidate was evaluated on: still nothing comparable.
        decision.reason = (
            f"champion kept: the shards changed after the candidate was evaluated (it was "
            f"scored on data {candidate.get('eval_data_version')}, the shards are now "
            f"{info.to_data_version}); re-materialise evaluate_dcgan."
        )
    else:
        decision.reason += (
            f" The champion was re-scored on data {info.to_data_version}: {metric} "
            f"{_number(info.value_before)} on data {info.from_data_version} "
            f"-> {_number(info.value_after)}."
        )


def keep(champion_dir: str | os.PathLike[str], choice: Choice) -> dict[str, Any] | None:
    """Keep the champion; store its re-scored record when it was re-scored, so the next
    candidate on the same data is compared without evaluating it again. The checkpoint is
    untouched, and so is :func:`champion_version`."""
    if choice.decision.promote:
        raise ValueError(f"keep() on a decision to promote: {choice.decision.reason}")
    if choice.decision.rescore is not None and choice.champion is not None:
        atomic_write_json(Path(champion_dir) / CHAMPION_RECORD, choice.champion)
    return choice.champion


def champion_version(record: dict[str, Any]) -> str:
    """The champion's data version: that of its checkpoint, the only thing its users read.

    Not the record's: re-scoring rewrites the record, and that must not make the designs drawn
    from an unchanged generator look stale.
    """
    return str(record["checkpoint_sha256"])[:VERSION_LENGTH]


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
        "judge_key": candidate.get("judge_key"),
        "train_data_version": candidate.get("data_version"),
        "metrics": _numbers(candidate),
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
