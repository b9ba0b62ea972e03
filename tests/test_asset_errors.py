"""Bad input fails an asset's step with one line naming the input and the fix, no retry, and
nothing already written is touched."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from pipelines.assets import car_shards, listing_manifest, train_dcgan
from pipelines.pipes import pipes_subprocess_client
from pipelines.resources import StorageResource, profile_resources


def _failure(assets, root: Path, run_config: dict, profile: str = "full") -> str:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            assets,
            resources={
                "storage": StorageResource(root=str(root)),
                "pipes_subprocess_client": pipes_subprocess_client(),
                **profile_resources(profile),
            },
            instance=instance,
            run_config={"ops": run_config},
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    user = failure.step_failure_data.user_failure_data
    assert user is not None, failure.step_failure_data.error
    message = user.description or ""
    assert message and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, "does not exist"),
        ("make,model\nford,focus\n", "none of the URL columns"),
        ("url,make\n", "no rows"),
    ],
)
def test_a_bad_manifest_fails_the_step_in_one_line(tmp_path: Path, manifest, expected) -> None:
    path = tmp_path / "listings.csv"
    if manifest is not None:
        path.write_text(manifest)
    message = _failure(
        [listing_manifest],
        tmp_path / "data",
        {"listing_manifest": {"config": {"manifest_path": str(path)}}},
    )
    assert str(path) in message
    assert expected.lower() in message.lower()


def test_the_full_profile_without_a_source_says_where_to_name_one(tmp_path: Path) -> None:
    message = _failure([listing_manifest], tmp_path / "data", {})
    assert "manifest_path" in message and "carmodels.yaml" in message


def test_impossible_settings_name_the_asset_and_setting(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "unique").mkdir(parents=True)  # passes the upstream check; the config fails first
    (root / "raw").mkdir()
    message = _failure([car_shards], root, {"car_shards": {"config": {"val_fraction": 2.0}}})
    assert message.startswith("car_shards config:") and "val_fraction" in message

    (root / "shards").mkdir()
    (root / "shards" / "summary.json").write_text("{}")
    message = _failure([train_dcgan], root, {"train_dcgan": {"config": {"preset": "huge"}}})
    assert "huge" in message and "seed" in message  # names the preset and the choices
