"""The truncation trick measured: fidelity against diversity as latents are truncated.

``carmodels generate --truncation T`` draws latents from a truncated normal. This benchmark
samples one trained generator with each truncation method and value, and scores the samples
with the validated judge (``bench/judge.py``) against the real val photos: precision and density
(fidelity: do the designs fall among real cars?), recall and coverage (diversity: how much of
the real set do they reach?) and ``judge_fd`` (both at once). The method and suggested value of
``carmodels generate`` come from this curve (docs/benchmarks/truncation.md).

Methods (:data:`carmodels.latent.TRUNCATION_METHODS`):

* ``coordinates``: every coordinate redrawn until it lies in [-t, t] (BigGAN's trick). At
  t = 0.7 a 100-d latent's norm falls from about 10 to about 4, inside the shell the generator
  was trained on;
* ``sphere``: the same, then the latent rescaled to the norm sqrt(nz) that N(0, I) latents
  have: the direction is truncated, the norm stays where training put it.

Last line::

    truncation: best METHOD T (FD X, precision P, recall R) vs none (FD Y, precision P0, recall R0)

Usage: ``python bench/truncation.py --checkpoint PT --shards DIR [--judge-cache DIR] [--json P]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when a test loads this

from _common import add_judge_cache_option, study_judge, write_report  # noqa: E402

from carmodels.checkpoint import load_generator  # noqa: E402
from carmodels.latent import TRUNCATION_METHODS, sample_noise  # noqa: E402
from carmodels.metrics.domain import feature_scores  # noqa: E402
from carmodels.metrics.pixel import to_uint8  # noqa: E402
from carmodels.pictures import save_image_grid  # noqa: E402
from carmodels.shards import fit_image_size, load_images  # noqa: E402

VALUES = (0.5, 0.7, 1.0, 1.5, 2.0)
SEED = 1234


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True, help="shards with a val split")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_judge_cache_option(parser)
    args = parser.parse_args(argv)
    judge = study_judge(args.shards, args.judge_cache, None)
    generator, spec, _ = load_generator(args.checkpoint, device="cpu", ema=True)
    val = fit_image_size(load_images(args.shards, "val"), spec.image_size, str(args.shards))
    real = judge.features_and_predictions(val)[0]
    out = args.json.parent if args.json else Path(".")
    rows = []
    settings = [(None, None)] + [(m, v) for m in TRUNCATION_METHODS for v in VALUES]
    for method, value in settings:
        z = sample_noise(len(val), spec.nz, SEED, value, method or "coordinates")
        with torch.no_grad():
            images = to_uint8(torch.cat([generator(chunk) for chunk in z.split(256)]))
        scores = feature_scores(real, judge.features_and_predictions(images)[0])
        name = "none" if method is None else f"{method}-{value}"
        save_image_grid(
            images[:64].float().div(127.5).sub(1), out / f"truncation-{name}.png", nrow=8
        )
        rows.append(
            {"method": method, "value": value, "norm": float(z.norm(dim=1).mean()), **scores}
        )
        print(
            f"  {name:<16} |z| {rows[-1]['norm']:5.2f} judge_fd {scores['judge_fd']:7.2f} "
            f"precision {scores['judge_precision']:.3f} recall {scores['judge_recall']:.3f} "
            f"density {scores['judge_density']:.3f} coverage {scores['judge_coverage']:.3f}",
            flush=True,
        )
    none = rows[0]
    best = min(rows[1:], key=lambda row: row["judge_fd"])
    if args.json:
        write_report(args.json, args, judge_key=judge.key, rows=rows, best=best)
    print(
        f"truncation: best {best['method']} {best['value']} (FD {best['judge_fd']:.2f}, precision "
        f"{best['judge_precision']:.3f}, recall {best['judge_recall']:.3f}) vs none (FD "
        f"{none['judge_fd']:.2f}, precision {none['judge_precision']:.3f}, recall "
        f"{none['judge_recall']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
