"""History table and champion promotion: only a better candidate replaces the champion."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from carmodels.pictures import plot_promotion_history
from carmodels.promotion import (
    ALREADY_CHAMPION,
    CHAMPION_RECORD,
    FIRST_CHAMPION,
    INVALID_CANDIDATE,
    METRIC_DIRECTIONS,
    METRIC_MISSING,
    NOT_BETTER,
    OTHER_DATA,
    PLOTTED_METRICS,
    PROMOTED,
    InvalidCandidate,
    PromotionConfig,
    Rescore,
    append_history,
    champion_checkpoint,
    champion_version,
    choose,
    decide,
    eval_config_of,
    history_row,
    keep,
    promote,
    read_champion,
    read_history,
    record_evaluation,
    rescore_checkpoint,
)


def _candidate(tmp_path: Path, name: str, judge_fd: float | None, fid: float | None = None) -> dict:
    checkpoint = tmp_path / f"{name}.pt"
    checkpoint.write_bytes(name.encode() * 100)
    return {
        "checkpoint": str(checkpoint),
        "judge_fd": judge_fd,
        "fid": fid,
        "type_overlap": 0.5,
        "epoch": 3,
        "weights": "ema",
        "data_version": "train-v1",
        "eval_data_version": "data-v1",
        "fid_record": {"computed": fid is not None, "reason": "Inception weights not found"},
    }


def test_first_candidate_becomes_champion_then_only_better_ones(tmp_path: Path) -> None:
    champion_dir, config = tmp_path / "champion", PromotionConfig(metric="judge_fd")
    first = _candidate(tmp_path, "a", judge_fd=10.0)
    decision = decide(first, read_champion(champion_dir), config)
    assert decision.promote and "no champion yet" in decision.reason
    promote(first["checkpoint"], first, decision, champion_dir)
    assert champion_checkpoint(champion_dir).read_bytes() == Path(first["checkpoint"]).read_bytes()

    worse = _candidate(tmp_path, "b", judge_fd=12.0)
    decision = decide(worse, read_champion(champion_dir), config)
    assert not decision.promote
    assert (
        "does not beat" in decision.reason and "12" in decision.reason and "10" in decision.reason
    )
    with pytest.raises(ValueError, match="refusing"):
        promote(worse["checkpoint"], worse, decision, champion_dir)
    assert read_champion(champion_dir)["value"] == 10.0

    better = _candidate(tmp_path, "c", judge_fd=8.0)
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
    candidate = _candidate(tmp_path, "a", judge_fd=1.0) | {"type_overlap": 0.51}
    assert decide(candidate, champion, PromotionConfig(metric="type_overlap")).promote
    strict = PromotionConfig(metric="type_overlap", min_relative_improvement=0.05)
    decision = decide(candidate, champion, strict)
    assert not decision.promote and "at least 5%" in decision.reason


def test_missing_metric_keeps_the_champion_and_says_how_to_fix(tmp_path: Path) -> None:
    champion = {"metrics": {"fid": 30.0}, "eval_data_version": "data-v1", "checkpoint_sha256": "x"}
    candidate = _candidate(tmp_path, "a", judge_fd=1.0, fid=None)
    candidate["fid_record"]["how_to_supply"] = "Copy the weights to /cache."
    decision = decide(candidate, champion, PromotionConfig(metric="fid"))
    assert not decision.promote and decision.outcome == METRIC_MISSING
    assert "no fid" in decision.reason and "Inception weights not found" in decision.reason
    assert "Copy the weights to /cache" in decision.reason
    # The other way out names the config and the metrics this evaluation did compute.
    assert "champion_generator's `metric`" in decision.reason and "judge_fd" in decision.reason


def test_without_a_champion_a_candidate_lacking_the_metric_is_crowned(tmp_path: Path) -> None:
    candidate = _candidate(tmp_path, "a", judge_fd=1.0, fid=None)
    decision = decide(candidate, None, PromotionConfig(metric="fid"))
    assert decision.promote and decision.outcome == FIRST_CHAMPION
    assert "so that a generator is in use" in decision.reason and "no fid" in decision.reason


def test_same_checkpoint_and_other_data_are_explained(tmp_path: Path) -> None:
    champion = {
        "metrics": {"judge_fd": 5.0},
        "checkpoint_sha256": "abc",
        "eval_data_version": "old",
    }
    candidate = _candidate(tmp_path, "a", judge_fd=1.0)
    same = decide(candidate, champion, PromotionConfig(), candidate_sha256="abc")
    assert not same.promote and same.outcome == ALREADY_CHAMPION
    assert "already the champion" in same.reason
    # decide() alone never compares across data versions, however much better the candidate.
    other_data = decide(candidate, champion, PromotionConfig())
    assert not other_data.promote and other_data.outcome == OTHER_DATA
    assert "scored on data old" in other_data.reason


def test_scores_by_judges_of_other_sizes_say_the_sizes_differ(tmp_path: Path) -> None:
    champion = {
        "metrics": {"judge_fd": 5.0, "image_size": 128},
        "checkpoint_sha256": "abc",
        "eval_data_version": "data-v1",
        "judge_key": "classifier-128",
    }
    candidate = _candidate(tmp_path, "a", judge_fd=1.0) | {
        "eval_data_version": "data-v1",
        "judge_key": "classifier-64",
        "image_size": 64,
    }
    sizes = decide(candidate, champion, PromotionConfig())
    assert not sizes.promote and sizes.outcome == OTHER_DATA
    assert "draws 128 px images and the candidate 64 px" in sizes.reason
    assert "gate on fid" in sizes.reason
    # Same size, another judge (other settings or training data): re-scoring is the way out.
    same_size = decide(candidate | {"image_size": 128}, champion, PromotionConfig())
    assert same_size.outcome == OTHER_DATA and "Re-score the champion" in same_size.reason


def _crown(tmp_path: Path, name: str, judge_fd: float | None, data: str = "data-v1") -> Path:
    """A champion folder whose champion was scored on ``data``."""
    champion_dir = tmp_path / "champion"
    first = _candidate(tmp_path, name, judge_fd) | {"eval_data_version": data}
    promote(first["checkpoint"], first, decide(first, None, PromotionConfig()), champion_dir)
    return champion_dir


class _Rescorer:
    """Stands in for an evaluation of the champion: returns fixed metrics, counts calls."""

    def __init__(self, judge_fd: float | None, data: str = "data-v1") -> None:
        self.metrics = {"judge_fd": judge_fd, "eval_data_version": data, "fid": None}
        self.calls: list[Path] = []

    def __call__(self, checkpoint: Path) -> dict:
        self.calls.append(checkpoint)
        return dict(self.metrics)


def test_a_champion_scored_on_other_data_is_rescored_before_comparing(tmp_path: Path) -> None:
    # Scored 5.0 on the old data; the candidate's 6.0 on the new data would not beat that,
    # but on the new data the champion scores 7.0, so the candidate wins.
    champion_dir = _crown(tmp_path, "a", 5.0, data="data-v0")
    candidate = _candidate(tmp_path, "b", 6.0)
    rescorer = _Rescorer(7.0)
    choice = choose(candidate, champion_dir, PromotionConfig(), rescore=rescorer)
    assert rescorer.calls == [champion_checkpoint(champion_dir)]
    decision = choice.decision
    assert decision.promote and decision.outcome == PROMOTED and decision.champion_value == 7.0
    assert decision.rescore == Rescore("data-v0", "data-v1", 5.0, 7.0)
    assert "re-scored on data data-v1" in decision.reason
    record = promote(candidate["checkpoint"], candidate, decision, champion_dir)
    assert record["previous_value"] == 7.0 and record["decision"]["rescore"]["value_before"] == 5.0


def test_a_rescored_champion_that_still_wins_is_kept_with_its_new_scores(tmp_path: Path) -> None:
    champion_dir = _crown(tmp_path, "a", 5.0, data="data-v0")
    version = champion_version(read_champion(champion_dir))
    candidate = _candidate(tmp_path, "b", 6.0)
    rescorer = _Rescorer(5.5)
    choice = choose(candidate, champion_dir, PromotionConfig(), rescore=rescorer)
    assert not choice.decision.promote and choice.decision.outcome == NOT_BETTER
    assert "does not beat the champion's 5.5" in choice.decision.reason
    keep(champion_dir, choice)
    record = read_champion(champion_dir)
    assert record["eval_data_version"] == "data-v1" and record["value"] == 5.5
    assert record["rescored"]["previous_eval_data_version"] == "data-v0"
    # The checkpoint, and so the data version the designs follow, are unchanged; and the next
    # candidate on the same data is compared without evaluating the champion again.
    assert champion_version(record) == version
    again = choose(_candidate(tmp_path, "c", 5.8), champion_dir, PromotionConfig(), rescorer)
    assert len(rescorer.calls) == 1 and again.decision.rescore is None
    assert again.decision.outcome == NOT_BETTER


def test_shards_changed_after_the_evaluation_are_not_compared(tmp_path: Path) -> None:
    champion_dir = _crown(tmp_path, "a", 5.0, data="data-v0")
    candidate = _candidate(tmp_path, "b", 1.0)  # scored on data-v1, the shards are now v2
    choice = choose(candidate, champion_dir, PromotionConfig(), _Rescorer(9.0, data="data-v2"))
    assert not choice.decision.promote and choice.decision.outcome == OTHER_DATA
    assert "shards changed after the candidate was evaluated" in choice.decision.reason


def test_an_unscored_first_champion_is_scored_by_the_next_candidate(tmp_path: Path) -> None:
    champion_dir = _crown(tmp_path, "a", None)
    rescorer = _Rescorer(3.0)
    choice = choose(_candidate(tmp_path, "b", 4.0), champion_dir, PromotionConfig(), rescorer)
    assert len(rescorer.calls) == 1 and choice.decision.outcome == NOT_BETTER
    # A candidate without the metric cannot be compared: nothing is evaluated for it.
    missing = choose(_candidate(tmp_path, "c", None), champion_dir, PromotionConfig(), rescorer)
    assert len(rescorer.calls) == 1 and missing.decision.outcome == METRIC_MISSING


def test_an_invalid_candidate_fails_only_without_a_champion(tmp_path: Path) -> None:
    gone = _candidate(tmp_path, "a", 1.0)
    Path(gone["checkpoint"]).unlink()
    with pytest.raises(InvalidCandidate, match="no champion to keep"):
        choose(gone, tmp_path / "champion", PromotionConfig())
    champion_dir = _crown(tmp_path, "b", 5.0)
    choice = choose(gone, champion_dir, PromotionConfig())
    assert not choice.decision.promote and choice.decision.outcome == INVALID_CANDIDATE
    assert "does not exist" in choice.decision.reason
    # A checkpoint overwritten after its evaluation is not the one the metrics describe.
    retrained = _candidate(tmp_path, "c", 1.0) | {"checkpoint_sha256": "0" * 64}
    choice = choose(retrained, champion_dir, PromotionConfig())
    assert choice.decision.outcome == INVALID_CANDIDATE
    assert "changed after it was evaluated" in choice.decision.reason


def test_a_champion_whose_checkpoint_is_gone_is_replaced(tmp_path: Path) -> None:
    champion_dir = _crown(tmp_path, "a", 1.0)
    champion_checkpoint(champion_dir).unlink()
    choice = choose(_candidate(tmp_path, "b", 9.0), champion_dir, PromotionConfig())
    assert choice.decision.promote and "checkpoint" in choice.decision.reason
    # Even the champion's own checkpoint evaluated again is promoted: that restores the file.
    same = choose(_candidate(tmp_path, "a", 1.0), champion_dir, PromotionConfig())
    assert same.decision.promote and same.decision.outcome == PROMOTED


def test_eval_config_round_trips_through_metrics_json() -> None:
    from carmodels.evaluate import EvalConfig
    from carmodels.metrics.fid import FidConfig

    config = EvalConfig(n_samples=8, seed=3, fid_config=FidConfig(download=False, n_samples=4))
    recorded = json.loads(json.dumps(asdict(config))) | {"from_a_later_version": 1}
    assert eval_config_of({"config": recorded}) == config
    assert eval_config_of({}) == EvalConfig()


def test_rescoring_evaluates_the_champion_for_real_on_tiny_data(tmp_path: Path) -> None:
    """A stale, unbeatable score on old data is replaced by the champion's real score."""
    import torch

    from carmodels.evaluate import EvalConfig, evaluate
    from carmodels.train import TrainConfig, train
    from tests.conftest import write_blocky_shards

    shards = write_blocky_shards(tmp_path / "shards", ["train"] * 12 + ["val"] * 4, size=16)
    run = train(
        shards,
        tmp_path / "run",
        TrainConfig(
            preset="tiny",
            image_size=16,
            epochs=1,
            batch_size=8,
            max_steps_per_epoch=1,
            device="cpu",
        ),
    )
    assert run.checkpoint_path is not None
    # The same generator in a file with other bytes: a different checkpoint that must score
    # exactly what the champion scores, evaluated alike.
    state = torch.load(run.checkpoint_path, map_location="cpu", weights_only=False)
    torch.save(state | {"copied_for_test": True}, tmp_path / "candidate.pt")
    config = EvalConfig(
        n_samples=8, device="cpu", fid=False, type_metrics=False, record_history=False
    )
    evaluate(tmp_path / "candidate.pt", shards, tmp_path / "eval", config)
    candidate = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metric = PromotionConfig(metric="pixel_fd_16")
    stale = {"pixel_fd_16": 1e-9, "eval_data_version": "old-data", "checkpoint": "x"}
    champion_dir = tmp_path / "champion"
    promote(run.checkpoint_path, stale, decide(stale, None, metric), champion_dir)

    def rescore(checkpoint: Path) -> dict:
        return rescore_checkpoint(checkpoint, shards, candidate)

    choice = choose(candidate, champion_dir, metric, rescore)
    assert choice.decision.rescore is not None
    assert choice.decision.rescore.value_before == 1e-9
    assert choice.decision.champion_value == pytest.approx(candidate["pixel_fd_16"])
    assert choice.champion["eval_data_version"] == candidate["eval_data_version"]
    assert choice.decision.outcome == NOT_BETTER  # a tie keeps the champion


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
    assert frame["judge_fd"].tolist() == [10.0, 8.0]
    assert frame["fid_computed"].tolist() == [False, True]
    assert frame["kid_mean"].isna().tolist() == [True, False]
    plot = plot_promotion_history(
        read_history(history), tmp_path / "history.png", PLOTTED_METRICS, METRIC_DIRECTIONS
    )
    assert plot is not None and plot.stat().st_size > 0


def test_record_evaluation_reads_metrics_json(tmp_path: Path) -> None:
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(_candidate(tmp_path, "a", 3.0)))
    frame, plot = record_evaluation(metrics_path, tmp_path / "eval")
    frame, plot = record_evaluation(metrics_path, tmp_path / "eval")
    assert len(frame) == 2 and plot is not None
    assert frame["checkpoint_sha256"].nunique() == 1 and len(frame["checkpoint_sha256"][0]) == 64


def _materialise_champion(
    tmp_path: Path, instance: object, candidate: dict, run_config: dict | None = None
) -> tuple[bool, dict, object]:
    """Write ``candidate`` as the evaluation and materialise champion_generator on it.

    Returns the run's success, the materialisation's metadata (values) with its data version,
    and the check's evaluation.
    """
    import dagster as dg

    from pipelines.promotion import champion_generator
    from pipelines.resources import StorageResource

    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(candidate))
    result = dg.materialize(
        [champion_generator],
        resources={"storage": StorageResource(root=str(tmp_path))},
        run_config=run_config,
        raise_on_error=False,
        instance=instance,
    )
    (materialisation,) = result.asset_materializations_for_node("champion_generator")
    metadata = {k: getattr(v, "value", v) for k, v in materialisation.metadata.items()}
    metadata["dagster/data_version"] = materialisation.tags["dagster/data_version"]
    (check,) = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    return result.success, metadata, check


@pytest.fixture
def instance() -> Iterator[object]:
    """One Dagster instance across a test's materialisations, as in a deployment."""
    import dagster as dg

    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_champion_asset_always_succeeds_and_replaces_only_on_a_win(
    tmp_path: Path, instance: object
) -> None:
    import dagster as dg

    success, first, check = _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "a", 10.0)
    )
    assert success and first["promoted"] and first["outcome"] == FIRST_CHAMPION and check.passed
    version = first["dagster/data_version"]

    # The same evaluation again (a second `make demo`): a no-op that succeeds.
    success, again, check = _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "a", 10.0)
    )
    assert success and not again["promoted"] and again["outcome"] == ALREADY_CHAMPION
    assert "already the champion" in again["reason"] and check.passed
    assert again["dagster/data_version"] == version  # so the designs are not redrawn

    # A worse candidate (a weekly run that did not win): success, champion kept, reason given.
    success, worse, check = _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "b", 12.0)
    )
    assert success and not worse["promoted"] and worse["outcome"] == NOT_BETTER
    assert "does not beat the champion's 10" in worse["reason"]
    assert worse["dagster/data_version"] == version
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "does not beat" in check.description
    assert read_champion(tmp_path / "champion")["value"] == 10.0

    # A better one replaces it, under a new data version.
    success, better, check = _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "c", 8.0)
    )
    assert success and better["promoted"] and check.passed
    assert better["dagster/data_version"] != version
    assert read_champion(tmp_path / "champion")["value"] == 8.0


def test_champion_asset_with_a_missing_metric_keeps_the_champion(
    tmp_path: Path, instance: object
) -> None:
    import dagster as dg

    _materialise_champion(tmp_path, instance, _candidate(tmp_path, "a", 10.0))
    run_config = {"ops": {"champion_generator": {"config": {"metric": "fid"}}}}
    success, metadata, check = _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "b", 1.0, fid=None), run_config
    )
    assert success and not metadata["promoted"] and metadata["outcome"] == METRIC_MISSING
    assert "no fid" in metadata["reason"] and "Inception weights" in metadata["reason"]
    assert "champion_generator's `metric`" in check.description
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert read_champion(tmp_path / "champion")["value"] == 10.0


def test_champion_asset_rescores_a_champion_from_other_data(
    tmp_path: Path, instance: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "a", 5.0) | {"eval_data_version": "v0"}
    )
    calls = []

    def fake_rescore(checkpoint: Path, shards_dir: Path, candidate: dict, **kwargs: object) -> dict:
        calls.append((checkpoint, candidate["eval_data_version"]))
        return {"judge_fd": 7.0, "eval_data_version": candidate["eval_data_version"]}

    monkeypatch.setattr("carmodels.promotion.rescore_checkpoint", fake_rescore)
    success, metadata, check = _materialise_champion(
        tmp_path, instance, _candidate(tmp_path, "b", 6.0)
    )
    assert success and metadata["promoted"] and check.passed and len(calls) == 1
    assert metadata["champion_rescored"] and metadata["champion_value"] == 7.0
    assert metadata["champion_value_before_rescore"] == 5.0
    assert metadata["champion_previous_data_version"] == "v0"


def test_champion_asset_fails_in_one_line_without_candidate_or_champion(
    tmp_path: Path, instance: object
) -> None:
    import dagster as dg

    from pipelines.promotion import champion_generator
    from pipelines.resources import StorageResource

    candidate = _candidate(tmp_path, "a", 1.0)
    Path(candidate["checkpoint"]).unlink()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(candidate))
    result = dg.materialize(
        [champion_generator],
        resources={"storage": StorageResource(root=str(tmp_path))},
        raise_on_error=False,
        instance=instance,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "does not exist" in message and "no champion to keep" in message


def test_fid_check_warns_without_inception_weights(tmp_path: Path) -> None:
    import dagster as dg

    from pipelines.promotion import fid_computed
    from pipelines.resources import StorageResource

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(_candidate(tmp_path, "a", 1.0)))
    evaluation = fid_computed(dg.build_asset_check_context(), StorageResource(root=str(tmp_path)))
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "FID not computed" in evaluation.description
