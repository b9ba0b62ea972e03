"""`carmodels` command line: every pipeline stage, usable without Dagster.

Each subcommand calls the same library function as the matching Dagster asset. Paths default
to the storage layout under ``--data`` (``$CARMODELS_DATA`` or ``./data``), so the stages chain
without arguments: ``carmodels scrape --manifest m.csv && carmodels dedup && carmodels shard``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from carmodels.layout import DataLayout


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


def _print_counts(title: str, counts: dict[str, int]) -> None:
    print(f"{title}:")
    for key, value in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {key:<28} {value}")


# --------------------------------------------------------------------------- commands


def cmd_scrape(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import scrape

    if bool(args.manifest) == bool(args.start_url):
        raise SystemExit("scrape: give exactly one source: --manifest FILE or --start-url URL.")
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
    scrape.write_manifest(manifest, layout.manifest_path)
    config = scrape.ScrapeConfig(
        allow_private_networks=args.allow_private_networks,
        retry_failed=args.retry_failed,
        **_given(concurrency=args.concurrency),
    )
    with _progress_bar("download", "img") as on_progress:
        result = scrape.download_images(manifest, out, config, on_progress=on_progress)
    print(
        f"{result.n_urls} URLs: fetched {result.n_fetched}, already had "
        f"{result.n_skipped_existing}, {result.images_per_s:.0f} img/s -> {out}"
    )
    _print_counts("outcomes", result.outcome_counts)
    return 0


def cmd_dedup(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import dedup

    raw = Path(args.raw) if args.raw else layout.raw_dir
    out = Path(args.out) if args.out else layout.unique_dir
    config = dedup.DedupConfig(
        flip_aware=not args.no_flip, **_given(hash_method=args.hash, threshold=args.threshold)
    )
    with _progress_bar("hash", "img") as on_progress:
        result = dedup.deduplicate(raw, out, config, on_progress=on_progress)
    print(
        f"{result.n_input} images -> {result.n_kept} kept "
        f"({result.n_exact_duplicates} exact, {result.n_near_duplicates} near duplicates "
        f"in {result.n_clusters} clusters) -> {out}"
    )
    if result.contact_sheet_path:
        print(f"largest clusters: {result.contact_sheet_path}")
    return 0


def cmd_shard(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import shards

    unique = Path(args.unique) if args.unique else layout.unique_dir
    raw = Path(args.raw) if args.raw else layout.raw_dir
    out = Path(args.out) if args.out else layout.shards_dir
    config = shards.ShardConfig(
        imaging=shards.ImagingConfig(
            drop_front_rear=args.drop_front_rear,
            **_given(framing=args.framing, face=args.face, min_side=args.min_side),
        ),
        **_given(val_fraction=args.val_fraction),
    )
    with _progress_bar("normalise", "img") as on_progress:
        result = shards.build_shards(unique, raw, out, config, on_progress=on_progress)
    print(
        f"{result.n_input} images -> {result.n_written} written "
        f"(train {result.n_train}, val {result.n_val}) -> {out}"
    )
    _print_counts("rejected", result.rejects_by_reason)
    print(f"preview: {result.preview_path}")
    return 0


def cmd_train(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import train

    shards_dir = Path(args.shards) if args.shards else layout.shards_dir
    out = Path(args.out) if args.out else layout.train_dir
    config = train.TrainConfig(
        **_given(
            preset=args.preset,
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr_g=args.lr_g,
            lr_d=args.lr_d,
            device=args.device,
            seed=args.seed,
        )
    )
    with _progress_bar("train", "step") as on_progress:
        result = train.train(shards_dir, out, config, on_progress=on_progress, resume=args.resume)
    print(
        f"trained {result.epochs_completed} epochs ({result.steps} steps) on {result.device} "
        f"at {result.images_per_s:.0f} img/s"
    )
    print(f"checkpoint: {result.checkpoint_path}")
    print(f"samples:    {result.grid_path}")
    print(f"losses:     {result.loss_plot_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import evaluate, train

    checkpoint = args.checkpoint or train.latest_checkpoint(layout.train_dir)
    if checkpoint is None:
        raise SystemExit(
            f"evaluate: no checkpoint under {layout.train_dir}; pass --checkpoint or train first."
        )
    shards_dir = Path(args.shards) if args.shards else layout.shards_dir
    out = Path(args.out) if args.out else layout.eval_dir
    config = evaluate.EvalConfig(**_given(n_samples=args.n_samples, seed=args.seed))
    result = evaluate.evaluate(checkpoint, shards_dir, out, config)
    for key, value in result.metrics.items():
        print(f"  {key:<28} {value}")
    print(f"samples: {result.samples_path}")
    return 0


def cmd_generate(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels import generate, train

    checkpoint = args.checkpoint or train.latest_checkpoint(layout.train_dir)
    if checkpoint is None:
        raise SystemExit(
            f"generate: no checkpoint under {layout.train_dir}; pass --checkpoint or train first."
        )
    result = generate.generate(
        checkpoint, n=args.n, seed=args.seed, out_dir=Path(args.out), truncation=args.truncation
    )
    print(f"{len(result.image_paths)} designs in {args.out}; grid: {result.grid_path}")
    return 0


def cmd_demo_server(args: argparse.Namespace, layout: DataLayout) -> int:
    from carmodels.demo import run_demo_server

    run_demo_server(host=args.host, port=args.port, seed=args.seed, n_listings=args.listings)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from carmodels import __version__
    from carmodels.demo.catalog import DEFAULT_N_LISTINGS
    from carmodels.models import PRESETS

    parser = argparse.ArgumentParser(
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scrape", help="download listing images into raw Parquet shards")
    p.add_argument("--manifest", help="CSV, Parquet or JSONL file of image URLs and metadata")
    p.add_argument("--start-url", nargs="+", help="listing page(s) with schema.org JSON-LD")
    p.add_argument("--out", help="raw shards folder (default: DATA/raw)")
    p.add_argument("--url-column", help="manifest column holding image URLs")
    p.add_argument("--filter", help="pandas query to keep rows, e.g. \"`image-type` != 'sample'\"")
    p.add_argument("--max-pages", type=int, help="listing pages to follow (default 50)")
    p.add_argument("--concurrency", type=int, help="simultaneous downloads (default 64)")
    p.add_argument("--retry-failed", action="store_true", help="refetch transient failures")
    p.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="allow loopback/private addresses (needed for the local demo server)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count distinct valid URLs")
    p.set_defaults(func=cmd_scrape)

    p = sub.add_parser("dedup", help="remove exact and near-duplicate images")
    p.add_argument("--raw", help="raw shards folder (default: DATA/raw)")
    p.add_argument("--out", help="output folder (default: DATA/unique)")
    p.add_argument(
        "--hash", choices=["phash", "dhash", "whash", "colorhash"], help="default: phash"
    )
    p.add_argument("--threshold", type=int, help="max Hamming distance of the hashes (default 10)")
    p.add_argument("--no-flip", action="store_true", help="do not treat mirrored copies as dupes")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("shard", help="normalise images into 128x128 Parquet shards")
    p.add_argument("--unique", help="dedup output folder (default: DATA/unique)")
    p.add_argument("--raw", help="raw shards folder (default: DATA/raw)")
    p.add_argument("--out", help="shards folder (default: DATA/shards)")
    p.add_argument("--framing", choices=["letterbox", "crop"], help="default: letterbox")
    p.add_argument(
        "--face", choices=["left", "right", "none"], help="direction cars face (default left)"
    )
    p.add_argument("--min-side", type=int, help="reject photos smaller than this (default 64)")
    p.add_argument("--drop-front-rear", action="store_true", help="keep side views only")
    p.add_argument("--val-fraction", type=float, help="validation share (default 0.1)")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="train the DCGAN on the shards")
    p.add_argument("--shards", help="shards folder (default: DATA/shards)")
    p.add_argument("--out", help="run folder (default: DATA/train)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="model preset (default: seed; small and tiny for CPUs)",
    )
    p.add_argument("--image-size", type=int, help="train at this size: 64 or 128 (default)")
    p.add_argument("--epochs", type=int, help="epochs to train (default: 170)")
    p.add_argument("--batch-size", type=int, help="images per step (default: 128)")
    p.add_argument("--lr-g", type=float, help="generator learning rate (default: the preset's)")
    p.add_argument("--lr-d", type=float, help="discriminator learning rate (default: preset's)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="sample grid, loss plot and metrics of a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint .pt (default: latest under DATA/train)")
    p.add_argument("--shards", help="shards folder (default: DATA/shards)")
    p.add_argument("--out", help="output folder (default: DATA/eval)")
    p.add_argument("--n-samples", type=int, help="generated images to score (default: 256)")
    p.add_argument("--seed", type=int, help="random seed of the samples (default: 0)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="generate new car designs from a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint .pt (default: latest under DATA/train)")
    p.add_argument("--n", type=int, default=64, help="number of designs (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same designs (default: 0)")
    p.add_argument("--truncation", type=float, default=None, help="latent truncation, e.g. 0.7")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo-server", help="serve the built-in demo car catalog over HTTP")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--seed", type=int, default=0, help="catalog seed (default: 0)")
    p.add_argument(
        "--listings", type=int, default=DEFAULT_N_LISTINGS, help="listings (default: 300)"
    )
    p.set_defaults(func=cmd_demo_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    layout = DataLayout.at(args.data)
    try:
        return int(args.func(args, layout) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"carmodels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
