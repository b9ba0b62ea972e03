"""History table and champion promotion: only a better candidate replaces the champion."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from carmodels.promotion import (
    CHAMPION_RECORD,
    PromotionConfig,
    append_history,
    champion_checkpoint,
    decide,
    history_row,
    plot_history,
    promote,
    read_champion,
    read_history,
    record_evaluation,
)


def _candidate(tmp_path: Path, name: str, type_fd: float | None, fid: float | None = None) -> dict:
    checkpoint = tmp_path / f"{name}.pt"
    checkpoint.write_bytes(name.encode() * 100)
    return {
        "checkpoint": str(checkpoint),
        "type_fd": type_fd,
        "fid": fid,
        "type_overlap": 0.5,
        "epoch": 3,
        "weights": "ema",
        "data_version": "train-v1",
        "eval_data_version": "data-v1",
        "fid_record": {"computed": fid is not None, "reason": "Inception weights not found"},
    }


def test_first_candidate_becomes_champion_then_only_better_ones(tmp_path: Path) -> None:
    champion_dir, config = tmp_path / "champion", PromotionConfig(metric="type_fd")
    first = _candidate(tmp_path, "a", type_fd=10.0)
    decision = decide(first, read_champion(champion_dir), config)
    assert decision.promote and "no champion yet" in decision.reason
    promote(first["checkpoint"], first, decision, champion_dir)
    assert champion_checkpoint(champion_dir).read_bytes() == Path(first["checkpoint"]).read_bytes()

    worse = _candidate(tmp_path, "b", type_fd=12.0)
    decision = decide(worse, read_champion(champion_dir), config)
    assert not decision.promote
    assert (
        "does not beat" in decision.reason and "12" in decision.reason and "10" in decision.reason
    )
    with pytest.raises(ValueError, match="refusing"):
        promote(worse["checkpoint"], worse, decision, champion_dir)
    assert read_champion(champion_dir)["value"] == 10.0

    better = _candidate(tmp_path, "c", type_fd=8.0)
    decision = decide(better, read_champion(champion_dir), config)
    assert decision.promote and decision.champion_value == 10.0
    record = promote(better["checkpoint"], better, decision, champion_dir)
    assert record["value"] == 8.0 and record["previous_value"] == 10.0
    assert champion_checkpoint(champion_dir).read_bytes() == Path(better["checkpoint"]).read_bytes()
    # The old champion's checkpoint is gone; exactly one checkpoint and its record remain.
    assert sorted(p.name for p in champion_dir.iterdir())[-1] == CHAMPION_RECORD
    assert len(list(champion_dir.glob("champion-*.pt"))) == 1


def test_higher_is_better_metrics_and_margin(tmp_path: Path) -> None:
    champion = {"metrics": {"type_overlap": 0.5}, "eval_data_version": "data-v1"}
    candidate = _candidate(tmp_path, "a", type_fd=1.0) | {"type_overlap": 0.51}
    assert decide(candidate, champion, PromotionConfig(metric="type_overlap")).promote
    strict = PromotionConfig(metric="type_overlap", min_relative_improvement=0.05)
    decision = decide(candidate, champion, strict)
    assert not decision.promote and "at least 5%" in decision.reason


def test_missing_metric_keeps_the_champion_and_says_why(tmp_path: Path) -> None:
    candidate = _candidate(tmp_path, "a", type_fd=1.0, fid=None)
    decision = decide(candidate, None, PromotionConfig(metric="fid"))
    assert not decision.promote
    assert "no fid" in decision.reason and "Inception weights not found" in decision.reason


def test_same_checkpoint_and_other_data_are_explained(tmp_path: Path) -> None:
    champion = {"metrics": {"type_fd": 5.0}, "checkpoint_sha256": "abc", "eval_data_version": "old"}
    candidate = _candidate(tmp_path, "a", type_fd=1.0)
    same = decide(candidate, champion, PromotionConfig(), candidate_sha256="abc")
    assert not same.promote and "own checkpoint" in same.reason
    other_data = decide(candidate, champion, PromotionConfig())
    assert other_data.promote and "scored on data old" in other_data.reason


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        PromotionConfig(metric="accuracy")


def test_history_appends_with_changing_columns_and_plots(tmp_path: Path) -> None:
    history = tmp_path / "history.parquet"
    start = datetime(2025, 1, 1, tzinfo=UTC)
    first = history_row(_candidate(tmp_path, "a", 10.0), "sha-a", start)
    append_history(history, first)
    second = history_row(
        _candidate(tmp_path, "b", 8.0, fid=40.0) | {"kid_mean": 0.02},
        "sha-b",
        start + timedelta(days=7),
    )
    frame = append_history(history, second)
    assert len(frame) == 2 and len(read_history(history)) == 2
    assert frame["type_fd"].tolist() == [10.0, 8.0]
    assert frame["fid_computed"].tolist() == [False, True]
    assert frame["kid_mean"].isna().tolist() == [True, False]
    plot = plot_history(read_history(history), tmp_path / "history.png")
    assert plot is not None and plot.stat().st_size > 0


def test_record_evaluation_reads_metrics_json(tmp_path: Path) -> None:
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(_candidate(tmp_path, "a", 3.0)))
    frame, plot = record_evaluation(metrics_path, tmp_path / "eval")
    frame, plot = record_evaluation(metrics_path, tmp_path / "eval")
    assert len(frame) == 2 and plot is not None
    assert frame["checkpoint_sha256"].nunique() == 1 and len(frame["checkpoint_sha256"][0]) == 64


def test_champion_asset_is_replaced_only_by_a_better_candidate(tmp_path: Path) -> None:
    import dagster as dg

    from pipelines.promotion import champion_generator, fid_computed
    from pipelines.resources import StorageResource

    (tmp_path / "eval").mkdir()
    resources = {"storage": StorageResource(root=str(tmp_path))}
    outcomes = []
    for name, type_fd in (("a", 10.0), ("b", 12.0), ("c", 8.0)):
        candidate = _candidate(tmp_path, name, type_fd)
        (tmp_path / "eval" / "metrics.json").write_text(json.dumps(candidate))
        result = dg.materialize([champion_generator], resources=resources, raise_on_error=False)
        checks = [
            e.event_specific_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        ]
        materialised = len(result.asset_materializations_for_node("champion_generator"))
        outcomes.append((result.success, materialised, checks[0].passed))
        if name == "b":
            assert "does not beat" in checks[0].description
    assert outcomes == [(True, 1, True), (False, 0, False), (True, 1, True)]
    assert read_champion(tmp_path / "champion")["value"] == 8.0

    evaluation = fid_computed(dg.build_asset_check_context(), StorageResource(root=str(tmp_path)))
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "FID not computed" in evaluation.description
