"""CPU training throughput: the seed's own setup against the carmodels training step.

Both sides train the ``seed`` model (128 px, SELU, no batch norm, the 2019 hyperparameters)
on the same photos, in one process, alternating in rounds so that a change in machine load
hits both alike:

* **seed loop**: what the 2019 code did, after pytorch/examples/dcgan: torchvision
  ``ImageFolder`` + ``DataLoader`` (2 workers) decoding and resizing JPEGs every step
  (Resize + CenterCrop to 128, Normalize), fp32 NCHW, D ending in ``Sigmoid`` with
  ``BCELoss``, D run separately on the real and fake batch, D's weight gradients computed in
  the G step too, and a ``.item()`` read of the losses every step;
* **carmodels**: :class:`carmodels.train.TrainStep`, the step ``carmodels train`` runs, on
  the same images decoded once into a uint8 tensor (as the trainer holds its shards), in the
  precision ``carmodels train`` picks by default (``amp="auto"``: bf16 autocast where the CPU
  computes in bf16 natively and the start-up probe of :mod:`carmodels.train.cpu_amp` measures
  it faster, else fp32; printed, and in the JSON as ``amp``).

After a warm-up, each round times ``--steps`` steps of each, the two sides taking turns to
go first (ABBA), so that a load that rises or falls during the run hits both alike. Each side's
rate is its images over its seconds summed over all rounds; the per-round ratios are printed
for their spread. On a machine shared with other jobs run it two or three times. Last line::

    train: carmodels X img/s, seed loop Y img/s, ratio R

Usage: ``python bench/train.py [--images DIR] [--batch-size 32] [--rounds 8] [--steps 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from carmodels.models import (  # noqa: E402
    build_discriminator,
    build_generator,
    count_flops_per_image,
    get_preset,
    set_cpu_gemm,
)
from carmodels.train import (  # noqa: E402
    AmpChoice,
    TrainConfig,
    TrainStep,
    choose_amp,
    epoch_batches,
    epoch_permutation,
)

DEFAULT_IMAGES = Path("/work/shared/data/cars-sample/images")
IMAGE_SIZE = 128
PRESET = "seed"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def seed_transform() -> object:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(IMAGE_SIZE),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )


def image_folder(images_dir: Path, workdir: Path) -> object:
    """``ImageFolder`` over a flat folder of photos: it wants one sub-folder per class, so
    link the folder in as the single class ``cars`` (nothing is copied)."""
    from torchvision.datasets import ImageFolder

    root = workdir / "imagefolder"
    root.mkdir()
    (root / "cars").symlink_to(images_dir.resolve(), target_is_directory=True)
    return ImageFolder(str(root), transform=seed_transform())


def endless(loader: object) -> Iterator[torch.Tensor]:
    while True:
        for images, _ in loader:  # type: ignore[attr-defined]
            yield images


class SeedLoop:
    """The 2019 training step (pytorch/examples/dcgan style)."""

    def __init__(self, batches: Iterator[torch.Tensor]) -> None:
        preset = get_preset(PRESET)
        torch.manual_seed(0)
        # The 2019 layers: torch's own convolutions, not carmodels' matrix-multiply path.
        self.net_g = set_cpu_gemm(build_generator(preset.spec), False)
        self.net_d = nn.Sequential(
            set_cpu_gemm(build_discriminator(preset.spec), False), nn.Sigmoid()
        )
        self.criterion = nn.BCELoss()
        betas = (preset.beta1, preset.beta2)
        self.opt_g = torch.optim.Adam(self.net_g.parameters(), lr=preset.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.net_d.parameters(), lr=preset.lr_d, betas=betas)
        self.nz = preset.spec.nz
        self.batches = batches

    def step(self) -> int:
        real = next(self.batches)
        n = real.shape[0]
        real_label, fake_label = torch.full((n,), 1.0), torch.full((n,), 0.0)
        self.net_d.zero_grad()
        output = self.net_d(real)
        err_d_real = self.criterion(output, real_label)
        err_d_real.backward()
        d_x = output.mean().item()
        fake = self.net_g(torch.randn(n, self.nz, 1, 1))
        output = self.net_d(fake.detach())
        err_d_fake = self.criterion(output, fake_label)
        err_d_fake.backward()
        self.opt_d.step()
        self.net_g.zero_grad()
        output = self.net_d(fake)
        err_g = self.criterion(output, real_label)
        err_g.backward()
        self.opt_g.step()
        # The seed printed these every step.
        _ = (err_d_real + err_d_fake).item(), err_g.item(), d_x, output.mean().item()
        return n


class CarmodelsLoop:
    """carmodels.train.TrainStep on images decoded once into a uint8 tensor."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        preset = get_preset(PRESET)
        cpu = torch.device("cpu")
        # As `carmodels train` decides it (TrainConfig's default amp, "auto").
        self.amp: AmpChoice = choose_amp(TrainConfig().amp, cpu, preset.spec, batch_size)
        self.trainer = TrainStep.create(
            preset.spec,
            lr_g=preset.lr_g,
            lr_d=preset.lr_d,
            beta1=preset.beta1,
            beta2=preset.beta2,
            device=cpu,
            amp_dtype=self.amp.dtype,
            channels_last=True,
            compile=False,
            ema_decay=TrainConfig().ema_decay,  # the trainer's default
            seed=0,
        )
        self.images, self.batch_size = images, batch_size
        self.batches = self._batches()

    def _batches(self) -> Iterator[torch.Tensor]:
        cpu, epoch = torch.device("cpu"), 0
        steps = self.images.shape[0] // self.batch_size
        while True:
            epoch += 1
            permutation = epoch_permutation(self.images.shape[0], 0, epoch, cpu)
            yield from epoch_batches(self.images, permutation, self.batch_size, steps)

    def step(self) -> int:
        batch = next(self.batches)
        self.trainer(batch)
        return batch.shape[0]

    def finish(self) -> None:
        self.trainer.drain()  # the trainer reads its losses every few steps


def decode_once(dataset: object) -> torch.Tensor:
    """Every image through the seed's transform, back to uint8 (what the shards hold)."""
    tensors = [dataset[i][0] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack(tensors).add_(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def timed(loop: SeedLoop | CarmodelsLoop, steps: int) -> tuple[int, float]:
    """Images trained and seconds taken by ``steps`` steps."""
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += loop.step()
    if isinstance(loop, CarmodelsLoop):
        loop.finish()
    return images, time.perf_counter() - start


def spread(rates: list[float]) -> str:
    return f"median {statistics.median(rates):.1f}, min {min(rates):.1f}, max {max(rates):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per loop and round")
    parser.add_argument("--max-images", type=int, default=512, help="photos decoded for both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if not args.images.is_dir():
        print(
            f"bench/train.py: error: no image folder at {args.images}; pass --images DIR "
            "(a folder of car photos, e.g. ../shared/data/cars-sample/images).",
            file=sys.stderr,
        )
        return 2
    n_photos = sum(1 for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if n_photos < args.batch_size:
        print(
            f"bench/train.py: error: {args.images} holds {n_photos} photos, fewer than "
            f"--batch-size {args.batch_size}.",
            file=sys.stderr,
        )
        return 2

    with tempfile.TemporaryDirectory() as workdir:
        dataset = image_folder(args.images, Path(workdir))
        subset = torch.utils.data.Subset(dataset, range(min(args.max_images, len(dataset))))
        loader = torch.utils.data.DataLoader(
            subset, batch_size=args.batch_size, shuffle=True, num_workers=2, drop_last=True
        )
        n_used = len(subset)
        seed = SeedLoop(endless(loader))
        carmodels = CarmodelsLoop(decode_once(subset), args.batch_size)

        print(
            f"seed preset, {IMAGE_SIZE}px, batch {args.batch_size}, {len(subset)} photos from "
            f"{args.images}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}; carmodels: "
            f"{carmodels.amp.describe()}"
        )
        for loop in (seed, carmodels):
            timed(loop, args.warmup)
        rounds: list[dict[str, tuple[int, float]]] = []
        for round_index in range(1, args.rounds + 1):
            order = [("seed", seed), ("carmodels", carmodels)]
            if round_index % 2 == 0:
                order.reverse()
            rounds.append({name: timed(loop, args.steps) for name, loop in order})
            rates = {name: n / seconds for name, (n, seconds) in rounds[-1].items()}
            print(
                f"round {round_index} ({order[0][0]} first): seed loop {rates['seed']:.1f} "
                f"img/s, carmodels {rates['carmodels']:.1f} img/s",
                flush=True,
            )
        del loader

    def total_rate(name: str) -> float:
        return sum(r[name][0] for r in rounds) / sum(r[name][1] for r in rounds)

    def per_round(name: str) -> list[float]:
        return [r[name][0] / r[name][1] for r in rounds]

    gflop = count_flops_per_image(PRESET) / 1e9
    ours, theirs = total_rate("carmodels"), total_rate("seed")
    ratios = [c / s for c, s in zip(per_round("carmodels"), per_round("seed"), strict=True)]
    ratio = ours / theirs
    print(f"seed loop img/s per round: {spread(per_round('seed'))}")
    print(f"carmodels img/s per round: {spread(per_round('carmodels'))}")
    print(f"per-round ratio: {spread(ratios)}")
    if args.json:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_average": list(os.getloadavg()),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amp": carmodels.amp.to_dict(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "n_photos": n_used,
            "gflop_per_image": gflop,
            "rounds": [
                {name: {"images": n, "seconds": sec} for name, (n, sec) in r.items()}
                for r in rounds
            ],
            "carmodels_images_per_s": ours,
            "seed_loop_images_per_s": theirs,
            "carmodels_gflop_per_s": ours * gflop,
            "ratio": ratio,
            "per_round_ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"carmodels: {ours * gflop:.0f} GFLOP/s")
    print(f"train: carmodels {ours:.1f} img/s, seed loop {theirs:.1f} img/s, ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
