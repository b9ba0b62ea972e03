"""`make demo`: materialise the whole graph on the demo catalog and say where things are.

The materialisation goes through the `dagster` CLI against the instance in $DAGSTER_HOME, so
the runs it makes show up in the UI (`make ui`) like any other run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from carmodels.errors import InputError
from carmodels.layout import DataLayout
from pipelines.project_config import describe, project_config
from pipelines.resources import PROFILE_ENV

#: Everything up to the champion and its designs (restoration_examples is left out: it is
#: the slowest asset on a CPU and can be materialised from the UI).
SELECTION = "*design_samples"


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set; run this through `make demo`.", file=sys.stderr)
        return 2
    # The demo is the demo profile, whatever the shell exports; the project config file still
    # applies (a source named there is crawled instead of the built-in catalog).
    env = {**os.environ, PROFILE_ENV: "demo"}
    try:
        project_config()  # a broken file fails here in one line, not in every step
        print(describe(), flush=True)
    except InputError as exc:
        print(f"make demo: error: {exc}", file=sys.stderr)
        return 2
    dagster = shutil.which("dagster") or str(Path(sys.executable).with_name("dagster"))
    command = [
        dagster,
        "asset",
        "materialize",
        "-m",
        "pipelines.definitions",
        "--select",
        SELECTION,
    ]
    print("$ " + " ".join(command), flush=True)
    started = time.monotonic()
    status = subprocess.call(command, env=env)
    elapsed = time.monotonic() - started
    if status != 0:
        print(f"\nThe demo run failed after {elapsed:.0f} s (exit {status}); see the log above.")
        return status
    layout = DataLayout.at()
    print(f"\nDemo finished in {elapsed / 60:.1f} min. Outputs under {layout.root.resolve()}:")
    for label, path in [
        ("sample grid", layout.eval_dir / "samples_ema.png"),
        ("new designs", layout.root / "designs" / "grid.png"),
        ("loss curves", layout.eval_dir / "losses.png"),
        ("metrics", layout.eval_dir / "metrics.json"),
        ("training progress", layout.train_dir / "progress.gif"),
        ("duplicate clusters", layout.unique_dir / "clusters.png"),
        ("training shards", layout.shards_dir),
    ]:
        print(f"  {label:<20} {path}")
    print(
        "\nSee the runs, asset metadata and previews in the UI: run `make ui`, then open "
        "http://127.0.0.1:3000/asset-groups (Runs tab for the run this made)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
