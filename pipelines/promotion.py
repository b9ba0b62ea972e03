"""The champion generator and the checks on the evaluation.

``champion_generator`` reads the latest evaluation (``eval/metrics.json``; the evaluation
itself appended it to ``eval/history.parquet``) and asks :func:`carmodels.promotion.choose`
whether the evaluated checkpoint beats the champion, re-scoring the champion on the current
shards first when its score is on other data. It always materialises: a better candidate
replaces the champion (new data version), otherwise the champion is re-recorded with its
unchanged data version and ``promoted: false`` and the reason, so that a weekly run whose
model does not win still succeeds, and the designs drawn from the unchanged champion are not
redrawn. Its check ``candidate_beats_champion`` says how the comparison went.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from carmodels import promotion
from carmodels.layout import CHAMPION_DIR, EVAL_DIR, SHARDS_DIR, TRAIN_DIR, DataLayout
from carmodels.versioning import source_version
from pipelines.assets import EVAL_METRICS, FOLLOW_UPSTREAM, GPU_POOL, GROUP, evaluate_dcgan
from pipelines.metadata import image_preview
from pipelines.project_config import defaults_from_file
from pipelines.resources import StorageResource
from pipelines.versioning import Requires, require_upstream

BEATS_CHAMPION_CHECK = "candidate_beats_champion"


@defaults_from_file("champion_generator")
class ChampionGeneratorConfig(dg.Config):
    #: The metric to compare on (lower or higher is better, see
    #: `carmodels.promotion.METRIC_DIRECTIONS`). `judge_fd` works offline; `fid` needs the
    #: Inception weights at evaluation time.
    metric: str = promotion.PromotionConfig.metric
    min_relative_improvement: float = promotion.PromotionConfig.min_relative_improvement


@dg.asset(
    group_name=GROUP,
    # Re-scoring runs the evaluation, so its code is part of this step's.
    code_version=source_version(["carmodels.promotion", "carmodels.evaluate"]),
    deps=[evaluate_dcgan],
    kinds={"pytorch"},
    # Re-scoring the champion on new shards is an evaluation: it takes the GPU slot like one.
    pool=GPU_POOL,
    automation_condition=FOLLOW_UPSTREAM,
    check_specs=[
        dg.AssetCheckSpec(
            BEATS_CHAMPION_CHECK,
            asset="champion_generator",
            # Not blocking, and it warns rather than errs: a candidate that does not win is
            # an expected outcome of retraining, not a broken pipeline. Passing it would say
            # "beats the champion" of a candidate that did not; an ERROR would fail the
            # weekly run and block the designs of a champion that is perfectly usable. A
            # WARN shows at a glance that the latest training did not make it, and why.
            blocking=False,
            description=(
                "The evaluated generator beats the champion on the chosen metric, on the same "
                "data. Warns (the champion is kept) when it does not, when it lacks the metric "
                "or when its checkpoint is gone."
            ),
        )
    ],
)
def champion_generator(
    context: dg.AssetExecutionContext, config: ChampionGeneratorConfig, storage: StorageResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The generator in use: replaced only when a newly evaluated one beats it."""
    require_upstream(storage, Requires("evaluate_dcgan", EVAL_METRICS, "The evaluation metrics"))
    try:
        promotion_config = promotion.PromotionConfig(config.metric, config.min_relative_improvement)
    except ValueError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    with storage.working_copy(pull=[EVAL_DIR, TRAIN_DIR], push=[CHAMPION_DIR]) as layout:
        outcome = _decide(context, promotion_config, storage, layout)
    yield from outcome


def _decide(
    context: dg.AssetExecutionContext,
    config: promotion.PromotionConfig,
    storage: StorageResource,
    layout: DataLayout,
) -> list[dg.MaterializeResult | dg.AssetCheckResult]:
    """Decide in the working copy; the caller pushes the champion folder afterwards."""
    champion_dir = layout.champion_dir
    candidate = json.loads((layout.eval_dir / "metrics.json").read_text())

    def rescore(champion_checkpoint: Path) -> dict[str, Any]:
        context.log.info(
            f"The champion's scores are on other data (or lack {config.metric}): re-evaluating "
            f"{champion_checkpoint.name} on the current shards with the candidate's settings."
        )
        # The shards are pulled only now: most decisions do not need them.
        with storage.working_copy(pull=[SHARDS_DIR]) as shards:
            return promotion.rescore_checkpoint(
                champion_checkpoint,
                shards.shards_dir,
                candidate,
                # Where evaluate_dcgan cached the judge (its default): the champion is scored
                # by the judge that scored the candidate.
                classifier_cache_dir=layout.eval_dir / "classifier",
                log=context.log.info,
            )

    try:
        choice = promotion.choose(candidate, champion_dir, config, rescore=rescore)
    except promotion.InvalidCandidate as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    decision = choice.decision
    context.log.info(f"{decision.outcome}: {decision.reason}")
    if decision.promote:
        record = promotion.promote(
            candidate["checkpoint"], candidate, decision, champion_dir, choice.candidate_sha256
        )
    else:
        record = promotion.keep(champion_dir, choice)
    assert record is not None  # promoted, or a champion was there to keep
    version = promotion.champion_version(record)
    history = promotion.read_history(layout.eval_dir / promotion.HISTORY_FILE)
    rescored = decision.rescore
    metadata: dict[str, object] = {
        "promoted": decision.promote,
        "outcome": decision.outcome,
        "reason": decision.reason,
        "metric": decision.metric,
        "candidate_value": decision.candidate_value,
        "champion_value": decision.champion_value,
        "candidate_checkpoint": str(candidate.get("checkpoint")),
        "eval_data_version": candidate.get("eval_data_version"),
        "champion_rescored": rescored is not None,
        "checkpoint": dg.MetadataValue.path(str((champion_dir / record["checkpoint"]).resolve())),
        "evaluations_in_history": len(history),
        "data_version": version,
        "dagster/uri": storage.uri(CHAMPION_DIR),
    }
    if rescored is not None:
        metadata |= {
            "champion_value_before_rescore": rescored.value_before,
            "champion_previous_data_version": rescored.from_data_version,
        }
    plot = layout.eval_dir / promotion.HISTORY_PLOT
    if plot.is_file():
        metadata["history"] = image_preview(plot)
    return [
        dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version)),
        _beats_champion_check(decision),
    ]


def _beats_champion_check(decision: promotion.Decision) -> dg.AssetCheckResult:
    """Passes when the candidate won (or already is the champion); warns otherwise."""
    metadata = {
        "outcome": decision.outcome,
        "metric": decision.metric,
        "candidate": decision.candidate_value,
        "champion": decision.champion_value,
        "champion_rescored": decision.rescore is not None,
    }
    # A first champion crowned without the metric is in use, but not judged: that needs the
    # same attention as a missing metric later on.
    unjudged = decision.candidate_value is None and decision.outcome != promotion.ALREADY_CHAMPION
    passed = (decision.promote or decision.outcome == promotion.ALREADY_CHAMPION) and not unjudged
    return dg.AssetCheckResult(
        check_name=BEATS_CHAMPION_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=decision.reason,
        metadata=metadata,
    )


@dg.asset_check(
    asset=evaluate_dcgan, description="FID/KID were computed (Inception weights found)."
)
def fid_computed(storage: StorageResource) -> dg.AssetCheckResult:
    with storage.working_copy(pull=[EVAL_DIR]) as layout:
        return _fid_check(layout.eval_dir / "metrics.json")


def _fid_check(metrics_path: Path) -> dg.AssetCheckResult:
    if not metrics_path.is_file():
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"No evaluation at {metrics_path}: materialise evaluate_dcgan.",
        )
    record = json.loads(metrics_path.read_text()).get("fid_record", {})
    if record.get("computed"):
        return dg.AssetCheckResult(
            passed=True,
            metadata={"fid": record["fid"], "weights_sha256": record["weights"]["sha256"]},
        )
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"FID not computed: {record.get('reason')}. {record.get('how_to_supply', '')}",
        metadata={"looked_for": dg.MetadataValue.json(record.get("looked_for", []))},
    )


PROMOTION_ASSETS = [champion_generator]
PROMOTION_CHECKS = [fid_computed]
