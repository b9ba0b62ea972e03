"""The champion generator and the checks on the evaluation.

``champion_generator`` reads the latest evaluation (``eval/metrics.json``; the evaluation
itself appended it to ``eval/history.parquet``) and asks :func:`carmodels.promotion.decide`
whether the evaluated checkpoint beats the champion. Its blocking check
``candidate_beats_champion`` passes only then. When it fails, the champion files are left
untouched, no materialisation is recorded (the asset's output is optional), the check's
description says why, and anything downstream is blocked.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from carmodels import promotion
from carmodels.fid import sha256_of
from carmodels.layout import CHAMPION_DIR, EVAL_DIR, TRAIN_DIR, DataLayout
from carmodels.versioning import files_version
from pipelines.assets import EVAL_METRICS, FOLLOW_UPSTREAM, GROUP, evaluate_dcgan
from pipelines.metadata import image_preview
from pipelines.resources import StorageResource
from pipelines.versioning import Requires, require_upstream

BEATS_CHAMPION_CHECK = "candidate_beats_champion"


class ChampionGeneratorConfig(dg.Config):
    metric: str = promotion.PromotionConfig.metric
    min_relative_improvement: float = promotion.PromotionConfig.min_relative_improvement


@dg.asset(
    group_name=GROUP,
    code_version="1",
    deps=[evaluate_dcgan],
    kinds={"pytorch"},
    output_required=False,
    automation_condition=FOLLOW_UPSTREAM,
    check_specs=[
        dg.AssetCheckSpec(
            BEATS_CHAMPION_CHECK,
            asset="champion_generator",
            blocking=True,
            description="The evaluated generator beats the champion on the chosen metric.",
        )
    ],
)
def champion_generator(
    context: dg.AssetExecutionContext, config: ChampionGeneratorConfig, storage: StorageResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The generator in use: replaced only when a newly evaluated one beats it."""
    require_upstream(storage, Requires("evaluate_dcgan", EVAL_METRICS, "The evaluation metrics"))
    with storage.working_copy(pull=[EVAL_DIR, TRAIN_DIR], push=[CHAMPION_DIR]) as layout:
        outcome = _decide_and_promote(context, config, layout)
    yield from outcome


def _decide_and_promote(
    context: dg.AssetExecutionContext, config: ChampionGeneratorConfig, layout: DataLayout
) -> list[dg.MaterializeResult | dg.AssetCheckResult]:
    """Decide in the working copy; the caller pushes the champion folder afterwards."""
    champion_dir = layout.champion_dir
    candidate = json.loads((layout.eval_dir / "metrics.json").read_text())
    checkpoint = Path(candidate["checkpoint"])
    digest = sha256_of(checkpoint)
    history = promotion.read_history(layout.eval_dir / promotion.HISTORY_FILE)
    plot = layout.eval_dir / promotion.HISTORY_PLOT
    decision = promotion.decide(
        candidate,
        promotion.read_champion(champion_dir),
        promotion.PromotionConfig(config.metric, config.min_relative_improvement),
        candidate_sha256=digest,
    )
    context.log.info(f"promote={decision.promote}: {decision.reason}")
    check_metadata = {
        "metric": decision.metric,
        "candidate": decision.candidate_value,
        "champion": decision.champion_value,
    }
    if not decision.promote:
        return [
            dg.AssetCheckResult(
                check_name=BEATS_CHAMPION_CHECK,
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=decision.reason,
                metadata=check_metadata,
            )
        ]
    record = promotion.promote(checkpoint, candidate, decision, champion_dir, digest)
    version = files_version([champion_dir / promotion.CHAMPION_RECORD])
    metadata: dict[str, object] = {
        "metric": decision.metric,
        "value": decision.candidate_value,
        "previous_value": decision.champion_value,
        "reason": decision.reason,
        "checkpoint": dg.MetadataValue.path(str((champion_dir / record["checkpoint"]).resolve())),
        "evaluations_in_history": len(history),
        "data_version": version,
        "dagster/uri": str(champion_dir.resolve()),
    }
    if plot.is_file():
        metadata["history"] = image_preview(plot)
    return [
        dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version)),
        dg.AssetCheckResult(
            check_name=BEATS_CHAMPION_CHECK,
            passed=True,
            description=decision.reason,
            metadata=check_metadata,
        ),
    ]


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
