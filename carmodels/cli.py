"""`carmodels` command line: every pipeline stage, usable without Dagster.

Each subcommand calls the same library function as the matching Dagster asset. Paths default
to the storage layout under ``--data`` (``$CARMODELS_DATA`` or ``./data``), so the stages chain
without arguments: ``carmodels scrape --manifest m.csv && carmodels dedup && carmodels shard``.

Bad input (a missing or damaged file, a path that cannot be written, a wrong option) ends a
command with exit status 2 and one line on stderr, ``carmodels COMMAND: error: MESSAGE``, that
names the input and the fix. A traceback means a bug; ``--debug`` shows one for any error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from carmodels.errors import InputError, MissingInputError, one_line
from carmodels.layout import DATA_ROOT_ENV, DataLayout, default_data_root_url
from carmodels.options import add_dataclass_options, field_default, field_help, from_args

if TYPE_CHECKING:
    from carmodels.distributed import Rendezvous

#: What `build_parser` hands each command's ``add_*_arguments``.
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@contextlib.contextmanager
def _progress_bar(desc: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar driven by ``on_progress(done, total)`` callbacks."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, disable=None)

    def on_progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield on_progress
    finally:
        bar.close()


def _given(**kwargs: object) -> dict[str, object]:
    """The options the user set: unset ones (None) fall back to the library's defaults."""
    return {key: value for key, value in kwargs.items() if value is not None}


def _checkpoint(args: argparse.Namespace, layout: DataLayout) -> Path:
    """``--checkpoint``, else the newest checkpoint of the training run under ``--data``."""
    from carmodels import train

    checkpoint = args.checkpoint or train.latest_checkpoint(layout.train_dir)
    if checkpoint is None:
        raise MissingInputError(
            f"no checkpoint under {layout.train_dir}; pass --checkpoint or run `carmodels "
            "train` first."
        )
    return Path(checkpoint)


def _print_counts(title: str, counts: dict[str, int]) -> None:
    if not counts:
        print(f"{title}: none")
        return
    print(f"{title}:")
    for key, value in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {key:<28} {value}")


# --------------------------------------------------------------------------- commands
#
# Each command comes with the function that adds its subparser. Options that are settings of
# a library stage are made from its config dataclass (`carmodels.options`): the default, type,
# choices and help are stated there, once.

#: `ScrapeConfig` settings that `scrape` takes as options.
_SCRAPE_OPTIONS = (
    "concurrency",
    "per_host_limit",
    "per_host_rate",
    "fetch_processes",
    "retry_failed",
    "revalidate",
    "allow_private_networks",
)


def add_scrape_arguments(sub: _Subparsers) -> None:
    from carmodels.scrape import DEFAULT_MAX_PAGES, ScrapeConfig

    p = sub.add_parser("scrape", help="download listing images into raw Parquet shards")
    p.add_argument("--manifest", help="CSV, Parquet or JSONL file of image URLs and metadata")
    p.add_argument("--start-url", nargs="+", help="listing page(s) with schema.org JSON-LD")
    p.add_argument("--out", help="raw shards folder (default: DATA/raw)")
    p.add_argument("--url-column", help="manifest column holding image URLs")
    p.add_argument("--filter", help="pandas query to keep rows, e.g. \"`image-type` != 'sample'\"")
    p.add_argument(
        "--max-pages", type=int, help=f"listing pages to follow (default: {DEFAULT_MAX_PAGES})"
    )
    add_dataclass_options(p, ScrapeConfig, _SCRAPE_OPTIONS)
    p.add_argument("--dry-run", action="store_true", help="only count distinct valid URLs")
    p.set_defaults(func=cmd_scrape)


def cmd_scrape(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import scrape

    if bool(args.manifest) == bool(args.start_url):
        raise InputError("give exactly one source: --manifest FILE or --start-url URL.")
    if args.manifest:
        manifest = scrape.read_manifest(
            args.manifest, url_column=args.url_column, row_filter=args.filter
        )
    else:
        manifest = scrape.crawl_listings(
            args.start_url,
            allow_private_networks=args.allow_private_networks,
            **_given(max_pages=args.max_pages),
        )
    summary = scrape.manifest_summary(manifest)
    if not args.manifest and not summary["distinct_urls"]:
        # read_manifest refuses an empty manifest itself; a crawl that found nothing is as
        # certainly a mistake (a wrong page, a site without schema.org listings).
        raise InputError(
            f"no image URLs found on {' '.join(args.start_url)}; check that the page lists "
            "cars with schema.org JSON-LD, or pass --manifest FILE."
        )
    if args.dry_run:
        rows_read = summary.get("rows_read", summary["rows"])
        print(f"{summary['distinct_urls']} distinct valid image URLs in {rows_read} rows")
        for key in ("filtered_out", "invalid_urls", "duplicate_urls"):
            if key in summary:
                print(f"  dropped {key.replace('_', ' ')}: {summary[key]}")
        print(f"  hosts: {summary['hosts']}")
        for host, count in summary["top_hosts"].items():
            print(f"    {host:<40} {count}")
        return 0
    out = Path(args.out) if args.out else layout.raw_dir
    # First, so that an --out that cannot be created fails before the stored manifest under
    # --data is replaced by this one.
    out.mkdir(parents=True, exist_ok=True)
    scrape.write_manifest(manifest, layout.manifest_path)
    config = from_args(scrape.ScrapeConfig, args, _SCRAPE_OPTIONS)
    with _progress_bar("download", "img") as on_progress:
        result = scrape.download_images(manifest, out, config, on_progress=on_progress)
    print(
        f"{result.n_urls} URLs: fetched {result.n_fetched}, already had "
        f"{result.n_skipped_existing}, {result.images_per_s:.0f} img/s -> {out}"
    )
    _print_counts("outcomes", result.outcome_counts)
    if result.revalidation_counts:
        _print_counts("revalidated", result.revalidation_counts)
    return 0


#: `DedupConfig` settings that `dedup` takes as options, and their flags where renamed.
_DEDUP_OPTIONS = ("hash_method", "threshold", "flip_aware")
_DEDUP_FLAGS = {"hash_method": "--hash", "flip_aware": "--no-flip"}


def add_dedup_arguments(sub: _Subparsers) -> None:
    from carmodels.dedup import DedupConfig

    p = sub.add_parser("dedup", help="remove exact and near-duplicate images")
    p.add_argument("--raw", help="raw shards folder (default: DATA/raw)")
    p.add_argument("--out", help="output folder (default: DATA/unique)")
    add_dataclass_options(p, DedupConfig, _DEDUP_OPTIONS, flags=_DEDUP_FLAGS)
    p.set_defaults(func=cmd_dedup)


def cmd_dedup(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import dedup

    raw = Path(args.raw) if args.raw else layout.raw_dir
    out = Path(args.out) if args.out else layout.unique_dir
    config = from_args(dedup.DedupConfig, args, _DEDUP_OPTIONS)
    with _progress_bar("hash", "img") as on_progress:
        result = dedup.deduplicate(raw, out, config, on_progress=on_progress)
    print(
        f"{result.n_input} images -> {result.n_kept} kept "
        f"({result.n_exact_duplicates} exact, {result.n_near_duplicates} near duplicates "
        f"in {result.n_clusters} clusters; {result.n_undecodable} undecodable) -> {out}"
    )
    if result.n_undecodable:
        _print_counts("undecodable (dropped)", result.undecodable_by_reason)
    if result.contact_sheet_path:
        print(f"largest clusters: {result.contact_sheet_path}")
    return 0


#: `ImagingConfig` and `ShardConfig` settings that `shard` takes as options.
_IMAGING_OPTIONS = ("framing", "face", "min_side", "drop_front_rear")
_SHARD_OPTIONS = ("val_fraction",)


def add_shard_arguments(sub: _Subparsers) -> None:
    from carmodels.shards import ImagingConfig, ShardConfig

    p = sub.add_parser("shard", help="normalise images into 128x128 Parquet shards")
    p.add_argument("--unique", help="dedup output folder (default: DATA/unique)")
    p.add_argument("--raw", help="raw shards folder (default: DATA/raw)")
    p.add_argument("--out", help="shards folder (default: DATA/shards, or DATA/shards/PARTITION)")
    p.add_argument(
        "--partition",
        help="build one partition of an incremental dedup's index (its kept images only)",
    )
    add_dataclass_options(p, ImagingConfig, _IMAGING_OPTIONS)
    add_dataclass_options(p, ShardConfig, _SHARD_OPTIONS)
    p.set_defaults(func=cmd_shard)


def cmd_shard(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import shards

    unique = Path(args.unique) if args.unique else layout.unique_dir
    raw = Path(args.raw) if args.raw else layout.raw_dir
    out = Path(args.out) if args.out else layout.shards_dir / (args.partition or "")
    imaging = from_args(shards.ImagingConfig, args, _IMAGING_OPTIONS)
    config = from_args(shards.ShardConfig, args, _SHARD_OPTIONS, imaging=imaging)
    with _progress_bar("normalise", "img") as on_progress:
        result = shards.build_shards(
            unique, raw, out, config, on_progress=on_progress, partition=args.partition
        )
    print(
        f"{result.n_input} images -> {result.n_written} written "
        f"(train {result.n_train}, val {result.n_val}) -> {out}"
    )
    _print_counts("rejected", result.rejects_by_reason)
    if result.rejects_by_reason:
        print(f"rejects listed in {result.summary_path.parent / shards.REJECTS_FILE}")
    print(f"preview: {result.preview_path}")
    return 0


#: `TrainConfig` settings that `train` takes as options.
_TRAIN_OPTIONS = (
    "preset",
    "image_size",
    "epochs",
    "batch_size",
    "lr_g",
    "lr_d",
    "device",
    "amp",
    "seed",
    "max_steps_per_epoch",
    "memory_budget_mb",
    "label_smoothing",
    "diffaugment",
    "diffaugment_target",
    "loss",
    "r1_gamma",
    "r1_every",
    "spectral_norm",
    "base_channels",
    "generator_channels",
    "batch_norm",
)
#: `train` options forwarded to every torchrun rank as ``--dest-name VALUE``, or as
#: ``--dest-name`` / ``--no-dest-name`` for a true / false switch (``--resume``, a switch, is
#: forwarded on its own).
_TRAIN_FORWARDED = ("shards", "out", *_TRAIN_OPTIONS)


def add_train_arguments(sub: _Subparsers) -> None:
    from carmodels.train import TrainConfig

    p = sub.add_parser("train", help="train the DCGAN on the shards")
    p.add_argument("--shards", help="shards folder (default: DATA/shards)")
    p.add_argument("--out", help="run folder (default: DATA/train)")
    add_dataclass_options(p, TrainConfig, _TRAIN_OPTIONS)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="data-parallel processes (one per GPU) through torchrun; unset = one process "
        "(one per node with --nnodes)",
    )
    multi_node = p.add_argument_group(
        "several machines",
        "run the same command on every node; the nodes meet through torchrun's c10d "
        "rendezvous, which assigns their ranks",
    )
    multi_node.add_argument("--nnodes", type=int, help="machines in the job")
    multi_node.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="address every node reaches and a free port there, where the nodes meet (the "
        "node on HOST serves the rendezvous)",
    )
    multi_node.add_argument(
        "--rdzv-id",
        help="the job's rendezvous id, the same on every node; unset = " + _default_rdzv_id(),
    )
    multi_node.add_argument(
        "--local-addr",
        help="this node's address as the others reach it; unset = its hostname",
    )
    p.set_defaults(func=cmd_train)


def _default_rdzv_id() -> str:
    from carmodels.distributed import DEFAULT_RDZV_ID

    return DEFAULT_RDZV_ID


def _launch_torchrun(args: argparse.Namespace, rendezvous: Rendezvous | None = None) -> int:
    """Re-run this train command through torchrun: --nproc-per-node ranks on this machine,
    alone or as one node of a multi-node job."""
    from carmodels.distributed import launch

    forwarded = ["--data", args.data] if args.data else []
    if args.debug:
        forwarded.insert(0, "--debug")
    forwarded.append("train")
    for dest in _TRAIN_FORWARDED:
        value = getattr(args, dest)
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            forwarded.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            forwarded += [flag, str(value)]
    if args.resume:
        forwarded.append("--resume")
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    return launch(nproc, forwarded, rendezvous)


def cmd_train(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import train
    from carmodels.distributed import launched_by_torchrun, rendezvous_from_flags

    if not launched_by_torchrun():
        rendezvous = rendezvous_from_flags(
            args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.local_addr
        )
        if args.nproc_per_node is not None or rendezvous is not None:
            return _launch_torchrun(args, rendezvous)
    shards_dir = Path(args.shards) if args.shards else layout.shards_dir
    out = Path(args.out) if args.out else layout.train_dir
    config = from_args(train.TrainConfig, args, _TRAIN_OPTIONS)
    with _progress_bar("train", "step") as on_progress:
        result = train.train(shards_dir, out, config, on_progress=on_progress, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    print(
        f"trained {result.epochs_completed} epochs ({result.steps} steps) on {result.device} "
        f"at {result.images_per_s:.0f} img/s"
    )
    print(f"checkpoint: {result.checkpoint_path}")
    print(f"samples:    {result.grid_path}")
    print(f"losses:     {result.loss_plot_path}")
    if result.best_checkpoint_path:
        print(f"best:       {result.best_checkpoint_path}")
    if result.tensorboard_dir:
        print(f"tensorboard --logdir {result.tensorboard_dir}")
    return 0


#: `EvalConfig` and `FidConfig` settings that `evaluate` takes as options; FidConfig's
#: ``n_samples`` is ``--fid-samples`` (dest ``fid_samples``: EvalConfig has an ``n_samples``).
_EVAL_OPTIONS = ("n_samples", "seed", "fid")
_FID_OPTIONS = ("weights_path",)


def add_evaluate_arguments(sub: _Subparsers) -> None:
    from carmodels.evaluate import EvalConfig
    from carmodels.metrics.fid import FidConfig

    p = sub.add_parser("evaluate", help="sample grid, loss plot and metrics of a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint .pt (default: latest under DATA/train)")
    p.add_argument("--shards", help="shards folder (default: DATA/shards)")
    p.add_argument("--out", help="output folder (default: DATA/eval)")
    add_dataclass_options(p, EvalConfig, _EVAL_OPTIONS, flags={"fid": "--no-fid"})
    add_dataclass_options(p, FidConfig, _FID_OPTIONS, flags={"weights_path": "--inception-weights"})
    gpu_samples, cpu_samples = (field_default(FidConfig, n) for n in ("gpu_samples", "cpu_samples"))
    p.add_argument(
        "--fid-samples",
        type=int,
        help=f"{field_help(FidConfig, 'n_samples')} (gpu_samples: {gpu_samples}, "
        f"cpu_samples: {cpu_samples})",
    )
    p.add_argument("--offline", action="store_true", help="never download the Inception weights")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import evaluate

    checkpoint = _checkpoint(args, layout)
    shards_dir = Path(args.shards) if args.shards else layout.shards_dir
    out = Path(args.out) if args.out else layout.eval_dir
    from carmodels.metrics.fid import FidConfig

    fid_config = from_args(
        FidConfig,
        args,
        _FID_OPTIONS,
        n_samples=args.fid_samples,
        download=False if args.offline else None,
    )
    config = from_args(evaluate.EvalConfig, args, _EVAL_OPTIONS, fid_config=fid_config)
    result = evaluate.evaluate(checkpoint, shards_dir, out, config)
    if config.record_history:  # evaluating writes no history: the callers record it
        from carmodels.promotion import record_evaluation

        record_evaluation(result.metrics_path, out)
    for key, value in result.metrics.items():
        print(f"  {key:<28} {value}")
    if not result.fid_record.get("computed"):
        print(f"FID not computed: {result.fid_record.get('reason')}")
        if result.fid_record.get("how_to_supply"):
            print(f"  {result.fid_record['how_to_supply']}")
    print(f"samples: {result.samples_path}")
    return 0


#: `GenerateConfig` settings that `generate` takes as options (``interpolation_steps`` is
#: ``--steps``).
_GENERATE_OPTIONS = ("n", "seed", "truncation")
_INTERPOLATE_OPTIONS = ("interpolation_steps",)


def add_generate_arguments(sub: _Subparsers) -> None:
    from carmodels.generate import GenerateConfig

    p = sub.add_parser("generate", help="generate new car designs from a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint .pt (default: latest under DATA/train)")
    add_dataclass_options(p, GenerateConfig, _GENERATE_OPTIONS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--interpolate",
        nargs=2,
        type=int,
        metavar=("SEED_A", "SEED_B"),
        help="instead of designs, write linear and spherical strips from the design of "
        "--n 1 --seed SEED_A to that of --n 1 --seed SEED_B",
    )
    add_dataclass_options(
        p, GenerateConfig, _INTERPOLATE_OPTIONS, flags={"interpolation_steps": "--steps"}
    )
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import generate

    checkpoint = _checkpoint(args, layout)
    config = from_args(generate.GenerateConfig, args, (*_GENERATE_OPTIONS, *_INTERPOLATE_OPTIONS))
    if args.interpolate:
        seed_a, seed_b = args.interpolate
        walk = generate.interpolate(
            checkpoint,
            seed_a,
            seed_b,
            steps=config.interpolation_steps,
            out_dir=Path(args.out),
            truncation=config.truncation,
            device=config.device,
        )
        for mode, path in walk.strip_paths.items():
            print(f"{mode:<10} {path}")
        return 0
    result = generate.generate(
        checkpoint,
        n=config.n,
        seed=config.seed,
        out_dir=Path(args.out),
        truncation=config.truncation,
        device=config.device,
    )
    print(f"{len(result.image_paths)} designs in {args.out}; grid: {result.grid_path}")
    return 0


#: `RestoreConfig` settings that `restore` takes as options (``--finetune-steps`` has a
#: default of its own, `DEFAULT_FINETUNE_STEPS` with ``--finetune``).
_RESTORE_OPTIONS = ("upscale_factor", "restarts", "steps", "seed", "device")


def add_restore_arguments(sub: _Subparsers) -> None:
    from carmodels.restore import DEFAULT_FINETUNE_STEPS, RestoreConfig

    p = sub.add_parser(
        "restore",
        help="inpaint, denoise or upscale a photo with the generator as prior",
        description="Fit the generator to the known pixels of IMAGE by optimising its latent "
        "vector (several restarts, the best kept), optionally fine-tune the generator on the "
        "image, and blend the fit with the known pixels. Any image size works: it is "
        "letterboxed to the model's size and mapped back.",
    )
    p.add_argument("image", help="damaged photo (any size; for upscale: the small one)")
    p.add_argument("--task", required=True, choices=["inpaint", "denoise", "upscale"])
    p.add_argument("--mask", help="inpaint: image of IMAGE's size, white = damaged, black = keep")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--checkpoint", help="checkpoint .pt (default: latest under DATA/train)")
    add_dataclass_options(p, RestoreConfig, _RESTORE_OPTIONS, flags={"upscale_factor": "--scale"})
    p.add_argument(
        "--finetune", action="store_true", help="then fine-tune the generator on the image"
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        help=f"fine-tune steps (default with --finetune: {DEFAULT_FINETUNE_STEPS})",
    )
    p.set_defaults(func=cmd_restore)


def cmd_restore(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import restore

    checkpoint = _checkpoint(args, layout)
    finetune_steps = args.finetune_steps
    if finetune_steps is None and args.finetune:
        finetune_steps = restore.DEFAULT_FINETUNE_STEPS
    config = from_args(restore.RestoreConfig, args, _RESTORE_OPTIONS, finetune_steps=finetune_steps)
    result = restore.restore_file(
        checkpoint, args.image, args.task, args.out, mask_path=args.mask, config=config
    )
    height, width = result.image.shape[:2]
    print(
        f"{args.task}: {width}x{height} -> {args.out} (fit error {result.data_loss:.5f}, "
        f"best of {len(result.restart_losses)} restarts, {result.elapsed_s:.1f} s)"
    )
    return 0


#: `RestorationEvalConfig` and `RestoreConfig` settings that `restore-eval` takes as options
#: (``--seed`` is the evaluation's: the seed of the damage).
_RESTORATION_EVAL_OPTIONS = ("n_images", "seed")
_RESTORE_EVAL_RESTORE_OPTIONS = ("restarts", "steps", "device")


def add_restore_eval_arguments(sub: _Subparsers) -> None:
    from carmodels.restoration_eval import RestorationEvalConfig
    from carmodels.restore import DEFAULT_FINETUNE_STEPS, RestoreConfig

    p = sub.add_parser(
        "restore-eval",
        help="PSNR/SSIM of restoration on validation images against classical baselines",
    )
    p.add_argument("--checkpoint", help="checkpoint .pt (default: latest under DATA/train)")
    p.add_argument("--shards", help="shards folder (default: DATA/shards)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, table.md, preview)")
    add_dataclass_options(p, RestorationEvalConfig, _RESTORATION_EVAL_OPTIONS)
    add_dataclass_options(p, RestoreConfig, _RESTORE_EVAL_RESTORE_OPTIONS)
    p.add_argument(
        "--finetune-steps",
        type=int,
        help=f"fine-tune steps, 0 = none (default: {DEFAULT_FINETUNE_STEPS})",
    )
    p.set_defaults(func=cmd_restore_eval)


def cmd_restore_eval(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import restoration_eval, restore

    checkpoint = _checkpoint(args, layout)
    shards_dir = Path(args.shards) if args.shards else layout.shards_dir
    # The evaluation scores fine-tuning too, so it is on unless the user sets the steps.
    finetune_steps = args.finetune_steps
    if finetune_steps is None:
        finetune_steps = restore.DEFAULT_FINETUNE_STEPS
    restore_config = from_args(
        restore.RestoreConfig, args, _RESTORE_EVAL_RESTORE_OPTIONS, finetune_steps=finetune_steps
    )
    config = from_args(
        restoration_eval.RestorationEvalConfig,
        args,
        _RESTORATION_EVAL_OPTIONS,
        restore=restore_config,
    )
    with _progress_bar("restore", "case") as on_progress:
        result = restoration_eval.evaluate_restoration(
            checkpoint, shards_dir, Path(args.out), config, on_progress=on_progress
        )
    print(restoration_eval.format_table(result.table))
    print(f"preview: {result.preview_path}")
    return 0


#: `DemoServerConfig` settings that `demo-server` takes as options (``n_listings`` is
#: ``--listings``).
_DEMO_SERVER_OPTIONS = ("host", "port", "seed", "n_listings")


def add_demo_server_arguments(sub: _Subparsers) -> None:
    from carmodels.demo.server import DemoServerConfig

    p = sub.add_parser("demo-server", help="serve the built-in demo car catalog over HTTP")
    add_dataclass_options(
        p, DemoServerConfig, _DEMO_SERVER_OPTIONS, flags={"n_listings": "--listings"}
    )
    p.set_defaults(func=cmd_demo_server)


def cmd_demo_server(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels.demo.server import DemoServerConfig, run_demo_server

    config = from_args(DemoServerConfig, args, _DEMO_SERVER_OPTIONS)
    run_demo_server(
        host=config.host, port=config.port, seed=config.seed, n_listings=config.n_listings
    )
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block first; with a dozen options it buries the one
        # line that says what is wrong. ``--help`` still shows the usage.
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see `{self.prog} --help`\n")


_DEBUG_HELP = "on an error, show the full traceback instead of one line"


def build_parser() -> argparse.ArgumentParser:
    from carmodels import __version__

    parser = _Parser(
        prog="carmodels",
        description="Car-listing photos to new car designs: scrape, dedup, shard, train, "
        "evaluate, generate. Paths default to the storage layout under --data.",
    )
    parser.add_argument("--version", action="version", version=f"carmodels {__version__}")
    parser.add_argument(
        "--data",
        default=None,
        help="storage root for all stages (default: $CARMODELS_DATA or ./data)",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_arguments in (
        add_scrape_arguments,
        add_dedup_arguments,
        add_shard_arguments,
        add_train_arguments,
        add_evaluate_arguments,
        add_generate_arguments,
        add_restore_arguments,
        add_restore_eval_arguments,
        add_demo_server_arguments,
    ):
        add_arguments(sub)
    for command in sub.choices.values():
        # Also accepted after the command (`carmodels dedup --debug`); SUPPRESS keeps an
        # absent one from resetting `carmodels --debug dedup`.
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
    return parser


def _layout(data: str | None) -> DataLayout:
    """The storage layout under ``--data`` (else ``$CARMODELS_DATA`` or ``./data``).

    A URL is parsed by `StorageRoot.parse`, so a mistyped one fails with its message; a remote
    root is refused, as the commands read and write local files (Dagster syncs remote ones).
    """
    given = data if data is not None else default_data_root_url()
    if "://" not in given:
        return DataLayout(Path(given))
    from carmodels.storage import StorageRoot  # only for URLs: fsspec is slow to import

    source = "--data" if data is not None else f"${DATA_ROOT_ENV}"
    root = StorageRoot.parse(given)
    if root.is_remote:
        raise InputError(
            f"{source} {given} is a remote storage root; the CLI works on local folders: pass a "
            "folder, or run the pipeline through Dagster, which syncs a remote root."
        )
    return DataLayout(root.local_root)


#: What to do about an OSError, by errno, in the one-line message.
_OS_ERROR_FIXES = {
    errno.ENOTDIR: "a part of this path is a file, not a folder: pass another path",
    errno.EEXIST: "a file is in the way: move it or pass another path",
    errno.EISDIR: "this is a folder, a file was expected: pass a file",
    errno.ENOENT: "check the path",
    errno.EACCES: "no permission: fix the permissions or pass another path",
    errno.EPERM: "no permission: fix the permissions or pass another path",
    errno.EROFS: "the file system is read-only: pass a writable path",
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
}


def _error_message(exc: Exception) -> str | None:
    """The one line to print for ``exc``, or None when it is a bug that needs its traceback.

    Input errors are meant for people; so is an OSError with a path (a folder under a regular
    file, no permission, a full disk). Plain ValueErrors are how the library has always
    rejected bad options (``ShardConfig(val_fraction=2)``), so they get one line too.
    """
    if isinstance(exc, InputError):
        return one_line(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        path = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
        fix = _OS_ERROR_FIXES.get(exc.errno or 0)
        return one_line(f"{path}: {exc.strerror or exc}" + (f"; {fix}" if fix else ""))
    if isinstance(exc, OSError | ValueError):
        # No path or no InputError: most likely bad input, but say where to look if not.
        return one_line(f"{exc} (carmodels --debug ... shows where)")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        if not exit_.code:
            raise  # --help, --version: argparse is done, and says so by exiting
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return int(args.func(args, _layout(args.data)) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _error_message(exc)
        if message is None or args.debug:
            raise
        print(f"carmodels {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
