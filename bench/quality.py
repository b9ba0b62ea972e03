"""A recipe study: GAN recipes trained on the same real photos at equal images seen, each scored
by the validated judge (``bench/judge.py``) with at least two seeds.

Recipes (every one changes one thing from the seed recipe, except ``combined``):

* ``seed``: the 2019 recipe, SELU without batch norm, BCE, lr 2e-4 (G) / 3.5e-5 (D), raw weights;
* ``ema``: the same runs, scored with the moving average of G (decay 0.999) instead;
* ``batchnorm``: DCGAN with batch norm (Radford et al.: ReLU in G, LeakyReLU in D, lr 2e-4 both);
* ``diffaugment``: the seed recipe with DiffAugment (colour, translation, cutout) on D's inputs,
  the standard cure for a discriminator that memorises a small set (Zhao et al. 2020);
* ``sn_hinge``: spectral norm on D with the hinge loss (Miyato et al. 2018), lr 2e-4 both;
* ``r1``: the seed recipe with the R1 penalty on D (Mescheder et al. 2018), gamma 1, lazy;
* ``crop``: the seed recipe on photos cropped to a square instead of letterboxed (scored
  against cropped val photos: its own reference);
* ``combined``: ``carmodels.train.MEASURED_RECIPE``, what the ``full`` profile trains: batch
  norm at lr 8e-4 (G and D), DiffAugment whose probability adapts as ADA's does (it starts at
  0 and rises only while D is too sure of the real photos), and EMA weights;
* ``bn_diffaugment_ema`` (only when ``--recipes`` names it): the recipe chosen before, batch
  norm at lr 2e-4 with DiffAugment on every image and EMA weights.

Every recipe uses the same widths (``base_channels``, ``generator_channels``) and batch size,
and trains for the same number of images. Budgets: ``cpu64`` (64 px, width 16 with a generator
of width 32, batch 8, 2 runs at a time on one thread each, each scored in its worker; the 14
trainings and their scoring took 17.7 minutes on a 2-core Xeon with AMX) and ``gpu128``
(128 px, the seed's width 64, on one GPU; ``bench/gpu_session.sh`` runs it on a lent GPU
machine from ``bench/device_pack.py``'s pack).
The judge is trained once per photo set and kept in a cache shared with ``bench/judge.py``,
which validates it (18 minutes more, the first time); ``--judge-pack`` takes it from a pack
instead.

Scores: ``judge_fd`` (Fréchet distance in the judge's features, generated vs real val photos at
the model's size), ``judge_kid`` and precision/recall/density/coverage, per run; then mean ±
half range over seeds per recipe. The seed-to-seed spread of the seed recipe is the noise every
gain is held against: the script says whether the best recipe's gain over the seed recipe
exceeds it on both FD and KID, as the spread reported after "±" (half the range) and as the
whole range. Recipes whose seeds' FD range overlaps the best one's are named as not told apart. A
64-image grid per recipe (first seed) lies beside the JSON. Last line::

    quality: best RECIPE FD X vs seed FD Y, ratio R, budget B

Usage: ``python bench/quality.py [--images DIR] [--budget cpu64|gpu128] [--seeds 0,1]
[--recipes a,b] [--work DIR] [--judge-cache DIR | --judge-pack DIR] [--json PATH]``
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when a test loads this

from _common import (  # noqa: E402
    SHARED_DATA,
    STUDY_SHARD_SIZE,
    RealReference,
    add_judge_cache_option,
    build_sample_shards,
    lacks_manifest,
    score_generator,
    study_judge,
    write_report,
)

from carmodels.device import retain_freed_cpu_memory  # noqa: E402
from carmodels.errors import InputError  # noqa: E402
from carmodels.parallel import map_in_processes  # noqa: E402
from carmodels.shards import load_images  # noqa: E402
from carmodels.train import MEASURED_RECIPE, TrainConfig, train  # noqa: E402

DEFAULT_IMAGES = SHARED_DATA / "cars-train-6k"
#: The latents every generator is scored with.
SAMPLE_SEED = 1234


@dataclass(frozen=True)
class Budget:
    image_size: int
    base_channels: int
    batch_size: int
    images_seen: int
    device: str
    jobs: int
    threads: int
    #: The generator's width where it differs from ``base_channels`` (the discriminator's);
    #: None = the same.
    generator_channels: int | None = None
    #: ``TrainConfig.amp`` for every run. Fixed per budget, because "auto" on a CPU lets a
    #: timing probe pick bf16 or fp32 run by run, and a study compares recipes, not precisions.
    amp: str = "auto"


BUDGETS = {
    # 28,500 images per run (6 epochs of the 4,755 train photos, 3,564 steps at batch 8), a
    # generator of width 32 and a discriminator of width 16: so that the 14 trainings and
    # their scoring fit 20 minutes on 2 cores. At this budget the generator's updates and its
    # width are what draw wheels (docs/benchmarks/quality.md, pilots and History):
    # - batch 8 drew car bodies with wheels in many cells where batch 16 drew bodies (batch 4
    #   more still, at 1.5x the seconds of batch 16: over the 20 minutes; batch 64, 625
    #   updates, one pattern of spots in every cell);
    # - a generator twice as wide as the discriminator drew wheels in most cells, at about a
    #   third more seconds a run, where widening both (width 24) cost half as much again and
    #   drew no more. 6 epochs instead of 7 pay for it and drew as many.
    # fp32: with the generator of width 32 the step passes the CPU probe's 2 GFLOP floor, and
    # in a study run with "auto" the probe chose bf16 for some runs and fp32 for others, even
    # for the two seeds of one recipe (docs/benchmarks/quality.md, History).
    "cpu64": Budget(64, 16, 8, 28_500, "cpu", jobs=2, threads=1, generator_channels=32, amp="off"),
    # 250,000 images per run (53 epochs, 1,961 steps at batch 128): the 14 trainings need
    # about 3.5 million images, 4.2 minutes at the seed model's 13,900 img/s on one H100
    # (bf16, docs/benchmarks/train-gpu.md) and more for the recipes that add DiffAugment,
    # R1 or spectral norm, so that the study fits the 8 minutes there. Not measured
    # yet: no GPU has been lent since.
    # 8 threads: the judge scores on CPU cores (the GPU machines have 16). "auto" is bf16
    # autocast for every run on CUDA.
    "gpu128": Budget(128, 64, 128, 250_000, "cuda", jobs=1, threads=8),
}
DIFFAUGMENT = "color,translation,cutout"
#: TrainConfig settings per recipe on top of the budget's; "weights" picks raw or EMA weights;
#: "framing" the shards.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {"train": {"preset": "seed"}},
    "ema": {"train": {"preset": "seed"}, "weights": "ema"},
    "batchnorm": {"train": {"preset": "dcgan"}},
    "diffaugment": {"train": {"preset": "seed", "diffaugment": DIFFAUGMENT}},
    "sn_hinge": {"train": {"preset": "seed", "spectral_norm": True, "loss": "hinge", "lr_d": 2e-4}},
    "r1": {"train": {"preset": "seed", "r1_gamma": 1.0}},
    "crop": {"train": {"preset": "seed"}, "framing": "crop"},
    # What the full profile trains: batch norm at lr 8e-4, adaptive DiffAugment, EMA weights.
    "combined": {"train": dict(MEASURED_RECIPE), "weights": "ema"},
    # The recipe chosen before (DiffAugment on every image, lr 2e-4): named with --recipes, not
    # run by default, so that the default study stays within its 20 minutes.
    "bn_diffaugment_ema": {
        "train": {"preset": "dcgan", "diffaugment": DIFFAUGMENT},
        "weights": "ema",
    },
}
#: The recipes the study runs unless --recipes names others.
DEFAULT_RECIPES = [recipe for recipe in RECIPES if recipe != "bn_diffaugment_ema"]
EMA_DECAY = 0.999


@dataclass
class Run:
    recipe: str
    seed: int
    scores: dict[str, float | None]
    train_s: float
    grid: str


def _training_key(recipe: str) -> tuple[tuple[str, Any], ...]:
    """Recipes that train the same way share runs (``ema`` scores the ``seed`` runs)."""
    spec = RECIPES[recipe]
    return (*sorted(spec["train"].items()), ("framing", spec.get("framing", "letterbox")))


def train_run(
    shards_dir: Path,
    run_dir: Path,
    overrides: dict[str, Any],
    seed: int,
    budget: Budget,
    n_train: int,
) -> tuple[Path, float]:
    """Train one run (or reuse one finished in ``run_dir`` with the same settings: a kept
    ``--work`` folder must not hand a changed budget or recipe an old run); its checkpoint and
    seconds."""
    steps_per_epoch = max(1, n_train // budget.batch_size)
    epochs = max(1, round(budget.images_seen / (steps_per_epoch * budget.batch_size)))
    config = TrainConfig(
        image_size=budget.image_size,
        base_channels=budget.base_channels,
        generator_channels=budget.generator_channels,
        amp=budget.amp,
        batch_size=budget.batch_size,
        epochs=epochs,
        device=budget.device,
        seed=seed,
        ema_decay=EMA_DECAY,
        tensorboard=False,
        keep_last=1,
        keep_best=False,
        sample_every=epochs,
        checkpoint_every=epochs,  # only the last is scored; one per epoch costs time on a GPU
        **overrides,
    )
    settings = repr(config)
    done = run_dir / "checkpoints" / "latest.pt"
    marker = run_dir / "trained.json"
    if done.is_file() and marker.is_file():
        record = json.loads(marker.read_text())
        if record["settings"] == settings:
            return done, record["seconds"]
    shutil.rmtree(run_dir, ignore_errors=True)  # another budget's or recipe's run
    started = time.perf_counter()
    result = train(shards_dir, run_dir, config, log=lambda message: None)
    seconds = time.perf_counter() - started
    assert result.checkpoint_path is not None
    marker.write_text(json.dumps({"settings": settings, "seconds": seconds}))
    return result.checkpoint_path, seconds


@dataclass(frozen=True)
class Scoring:
    """One score of a training: the recipe it counts for, which weights, where its grid goes."""

    recipe: str
    ema: bool
    grid: Path


#: A finished job: its seed, training seconds, and each scoring's scores.
JobResult = tuple[int, float, list[tuple[Scoring, dict[str, float | None]]]]


def _job(
    overrides: dict[str, Any],
    seed: int,
    shards_dir: Path,
    run_dir: Path,
    budget: Budget,
    n_train: int,
    reference: RealReference,
    scorings: list[Scoring],
) -> JobResult:
    """Train one run, then score it for every recipe it serves, in the same worker: the
    scoring of one run overlaps the training of the next instead of waiting for all."""
    checkpoint, seconds = train_run(shards_dir, run_dir, overrides, seed, budget, n_train)
    scores = [
        (s, score_generator(reference, checkpoint, s.grid, SAMPLE_SEED, s.ema)) for s in scorings
    ]
    return seed, seconds, scores


def _job_with_threads(job: tuple, threads: int) -> JobResult:
    torch.set_num_threads(threads)  # each training's share of the cores, in whichever process
    return _job(*job)


def run_jobs(jobs: list[tuple], budget: Budget) -> Iterator[JobResult]:
    """Every training job with its scores, in order: ``budget.jobs`` at a time in worker
    processes, or in this one."""
    run = functools.partial(_job_with_threads, threads=budget.threads)
    return map_in_processes(run, jobs, budget.jobs)


def summarise(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Mean and half range over seeds of every score, per recipe."""
    table: dict[str, dict[str, Any]] = {}
    for recipe in dict.fromkeys(r.recipe for r in runs):
        picked = [r for r in runs if r.recipe == recipe]
        row: dict[str, Any] = {
            "seeds": len(picked),
            "train_s": statistics.fmean(r.train_s for r in picked),
        }
        for name in picked[0].scores:
            values = [r.scores[name] for r in picked if r.scores[name] is not None]
            if values:
                row[name] = statistics.fmean(values)
                row[f"{name}_spread"] = (max(values) - min(values)) / 2
        table[recipe] = row
    return table


def gains_beyond_seed_spread(table: dict[str, dict[str, Any]], best: str) -> tuple[bool, bool]:
    """Whether the best recipe's gains over the seed recipe, on ``judge_fd`` and on
    ``judge_kid`` both, exceed the seed recipe's seed-to-seed spread: read as the spread the
    table reports after "±" (half the range over seeds), and as the stricter whole range."""
    base, top = table["seed"], table[best]
    gains = [base[m] - top[m] for m in ("judge_fd", "judge_kid")]
    halves = [base[f"{m}_spread"] for m in ("judge_fd", "judge_kid")]
    return (
        all(g > h for g, h in zip(gains, halves, strict=True)),
        all(g > 2 * h for g, h in zip(gains, halves, strict=True)),
    )


def tied_with_best(table: dict[str, dict[str, Any]]) -> list[str]:
    """The other recipes whose seeds' judge_fd range overlaps the best one's: two seeds cannot
    tell them apart, so the fidelity/diversity scores and the grids decide between them."""
    best = min(table, key=lambda r: table[r]["judge_fd"])
    top = table[best]["judge_fd"] + table[best]["judge_fd_spread"]
    return [
        recipe
        for recipe, row in table.items()
        if recipe != best and row["judge_fd"] - row["judge_fd_spread"] <= top
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="photos + manifest")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu64")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument(
        "--recipes",
        default=",".join(DEFAULT_RECIPES),
        help=f"comma-separated recipes, of {', '.join(RECIPES)}",
    )
    parser.add_argument("--images-seen", type=int, help="override the budget's images per run")
    parser.add_argument("--work", type=Path, help="keep shards and runs here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_judge_cache_option(parser)
    parser.add_argument(
        "--judge-pack",
        type=Path,
        help="score with the judge bench/device_pack.py packed here (trained on the same photos "
        "on another machine) instead of the cache: for a lent GPU machine",
    )
    args = parser.parse_args(argv)
    if lacks_manifest(args.images, "quality"):
        return 2
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown or "seed" not in recipes:
        parser.error(f"--recipes must include seed and name only {list(RECIPES)}: {unknown}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budget = BUDGETS[args.budget]
    if args.images_seen:
        budget = Budget(**{**budget.__dict__, "images_seen": args.images_seen})
    if budget.device == "cuda" and not torch.cuda.is_available():
        print("quality: the gpu128 budget needs a CUDA device", file=sys.stderr)
        return 2

    retain_freed_cpu_memory()  # the judge and the scoring; train() asks in each worker too
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        out = args.json.parent if args.json else work
        started = time.perf_counter()
        shards = {"letterbox": build_sample_shards(args.images, work, STUDY_SHARD_SIZE)[0]}
        if any(RECIPES[r].get("framing") == "crop" for r in recipes):
            shards["crop"] = build_sample_shards(
                args.images, work / "crop", STUDY_SHARD_SIZE, framing="crop"
            )[0]
        try:
            # The validated 128 px judge; 64 px samples are scaled up to it.
            judge = study_judge(
                shards["letterbox"], args.judge_cache, STUDY_SHARD_SIZE, args.judge_pack
            )
        except InputError as error:
            print(f"quality: {error}", file=sys.stderr)
            return 2
        n_train = {k: len(load_images(p, "train")) for k, p in shards.items()}
        print(
            f"quality: budget {args.budget} ({budget.images_seen} images per run at "
            f"{budget.image_size} px, width {budget.base_channels}"
            f"{f' (G {budget.generator_channels})' if budget.generator_channels else ''}, batch "
            f"{budget.batch_size}), seeds {seeds}, judge "
            f"{judge.key} (type accuracy {judge.val_accuracy:.3f}, "
            f"{'from the cache' if judge.from_cache else 'trained'}); setup "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        runs_started = time.perf_counter()
        references = {framing: RealReference(judge, path) for framing, path in shards.items()}
        for reference in references.values():  # judged here once, then sent with each job
            reference.features(budget.image_size)
        trainings: dict[tuple, list[str]] = {}  # the recipes each distinct training serves
        for recipe in recipes:
            trainings.setdefault(_training_key(recipe), []).append(recipe)
        jobs = [
            (
                RECIPES[served[0]]["train"],
                seed,
                shards[framing],
                work / "runs" / args.budget / f"{served[0]}-seed{seed}",
                budget,
                n_train[framing],
                references[framing],
                [
                    Scoring(
                        recipe,
                        RECIPES[recipe].get("weights") == "ema",
                        out / f"quality-{args.budget}-{recipe}-seed{seed}.png",
                    )
                    for recipe in served
                ],
            )
            for served in trainings.values()
            for framing in [RECIPES[served[0]].get("framing", "letterbox")]
            for seed in seeds
        ]
        finished: dict[tuple[str, int], Run] = {}
        for seed, seconds, scored in run_jobs(jobs, budget):
            for scoring, scores in scored:
                finished[(scoring.recipe, seed)] = Run(
                    scoring.recipe, seed, scores, seconds, str(scoring.grid)
                )
                print(
                    f"  {scoring.recipe} seed {seed}: trained in {seconds:.0f} s, judge_fd "
                    f"{scores['judge_fd']:.2f} kid {scores['judge_kid']:.4f} precision "
                    f"{scores['judge_precision']:.3f} recall {scores['judge_recall']:.3f}",
                    flush=True,
                )
        runs = [finished[(recipe, seed)] for recipe in recipes for seed in seeds]
        table = summarise(runs)
        total_s = time.perf_counter() - started
        runs_s = time.perf_counter() - runs_started  # trainings and scoring, the setup left out
        base = table["seed"]
        noise_fd, noise_kid = base["judge_fd_spread"] * 2, base["judge_kid_spread"] * 2
        best = min(table, key=lambda r: table[r]["judge_fd"])
        ratio = table[best]["judge_fd"] / base["judge_fd"]
        kid_ratio = table[best]["judge_kid"] / base["judge_kid"] if base["judge_kid"] > 0 else None
        beats_spread, beats = gains_beyond_seed_spread(table, best)
        tied = tied_with_best(table)
        print(
            "recipe | seeds | judge_fd | judge_kid | precision | recall | density | coverage"
            " | train s"
        )
        for recipe, row in table.items():
            print(
                f"{recipe} | {row['seeds']} | "
                f"{row['judge_fd']:.2f} ± {row['judge_fd_spread']:.2f} | "
                f"{row['judge_kid']:.4f} ± {row['judge_kid_spread']:.4f} | "
                + " | ".join(
                    f"{row.get('judge_' + m, float('nan')):.3f}"
                    for m in ("precision", "recall", "density", "coverage")
                )
                + f" | {row['train_s']:.0f}"
            )
        if args.json:
            write_report(
                args.json,
                args,
                budget=budget.__dict__,
                judge_key=judge.key,
                judge_accuracies=judge.accuracies,
                runs=[r.__dict__ for r in runs],
                table=table,
                best=best,
                fd_ratio=ratio,
                kid_ratio=kid_ratio,
                seed_noise_fd=noise_fd,
                seed_noise_kid=noise_kid,
                best_beats_seed_beyond_spread=beats_spread,
                best_beats_seed_beyond_noise=beats,
                tied_with_best=tied,
                total_s=total_s,
                runs_s=runs_s,
                judge_from_cache=judge.from_cache,
            )
    print(
        "quality: best gain beyond the seed recipe's seed-to-seed spread (± half range) on FD "
        f"and KID: {'yes' if beats_spread else 'no'}; beyond its whole range: "
        f"{'yes' if beats else 'no'}"
        f" (KID ratio {kid_ratio if kid_ratio is None else f'{kid_ratio:.2f}'}); total "
        f"{total_s / 60:.1f} min, of which {runs_s / 60:.1f} min training and scoring "
        f"(judge {'from the cache' if judge.from_cache else 'trained in the setup'})"
    )
    print(
        f"quality: within {best}'s seed range on judge_fd (not told apart by {len(seeds)} seeds): "
        f"{', '.join(tied) or 'none'}"
    )
    print(
        f"quality: best {best} FD {table[best]['judge_fd']:.2f} vs seed FD {base['judge_fd']:.2f}, "
        f"ratio {ratio:.2f}, budget {args.budget}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
