"""Throughput of the DCGAN training step on a GPU, in the variants worth comparing.

Times ``carmodels.train.TrainStep`` (the exact step the trainer runs, EMA included) on a
synthetic uint8 dataset held on the device, batches drawn as the trainer draws them, for:

* ``fp32``            eager, NCHW, no autocast (cuDNN may still use TF32 for convolutions:
                      the table header prints ``torch.backends.cudnn.allow_tf32``);
* ``bf16+cl``         bf16 autocast + channels_last (the trainer's default on CUDA);
* ``bf16+cl+compile`` the same with ``torch.compile`` on G and D.

After warm-up it reports images/s, achieved TFLOP/s (from
``carmodels.models.count_flops_per_image``) and the projected time of the 2019 schedule
(170 epochs of 59,816 images). ``--profile PATH`` then runs a few more steps of each variant
under ``torch.profiler`` and writes where their time went (the operators by self device time,
and by self CPU time), as evidence for what is left between the step and the card's peak.
Needs only torch, numpy and pyarrow::

    python bench/train_gpu.py                 # on a GPU: seed preset, 128 px, batch 128
    python bench/train_gpu.py --smoke         # seconds on a CPU: tiny preset, 32 px
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from carmodels.device import resolve_device  # noqa: E402
from carmodels.models import count_flops_per_image, get_preset, spec_for  # noqa: E402
from carmodels.train import TrainStep, epoch_batches, epoch_permutation  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool


VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32", amp=False, channels_last=False, compile=False),
        Variant("bf16+cl", amp=True, channels_last=True, compile=False),
        Variant("bf16+cl+compile", amp=True, channels_last=True, compile=True),
        Variant("bf16+compile", amp=True, channels_last=False, compile=True),
    )
}
#: The 2019 schedule the projection is for.
SEED_EPOCHS = 170
SEED_TRAIN_IMAGES = 59_816
#: The trainer reads its on-device loss sums this often; the benchmark does the same.
LOG_EVERY_STEPS = 20
#: Steps recorded by ``--profile``, after the timed ones (a multiple of LOG_EVERY_STEPS, so
#: that the recorded steps hold the trainer's periodic host sync in its proportion).
PROFILE_STEPS = 20
PROFILE_ROWS = 25
EMA_DECAY = 0.999


@dataclass
class Measurement:
    variant: str
    images_per_s: float
    tflops: float
    ms_per_step: float
    warmup_s: float
    projected_hours: float
    peak_memory_gib: float
    final_loss_d: float
    final_loss_g: float


def synthetic_images(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields (N x 3 x S x S uint8), made on the device in chunks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    coarse = max(size // 16, 2)
    chunks = []
    for start in range(0, n, 4096):
        count = min(4096, n - start)
        low = torch.rand(count, 3, coarse, coarse, device=device, generator=generator)
        smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        chunks.append(smooth.mul_(255).round_().to(torch.uint8))
    return torch.cat(chunks)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(
    trainer: TrainStep, batches: Iterator[torch.Tensor], device: torch.device, name: str, out: Path
) -> None:
    """Append to ``out`` where ``PROFILE_STEPS`` more steps spent their time: the wall time,
    the device's busy time, and the top operators by self device and self CPU time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        for step in range(1, PROFILE_STEPS + 1):
            trainer(next(batches))
            if step % LOG_EVERY_STEPS == 0:
                trainer.drain()
        synchronize(device)
    wall_ms = 1000 * (time.perf_counter() - started) / PROFILE_STEPS
    events = profiler.key_averages()
    device_ms = sum(e.self_device_time_total for e in events) / 1000 / PROFILE_STEPS
    head = f"== {name}: {PROFILE_STEPS} steps under the profiler, {wall_ms:.2f} ms a step wall time"
    lines = [head + " (the profiler itself adds time)"]
    if device.type == "cuda":
        lines[0] = (
            f"{head}, {device_ms:.2f} ms a step of kernels on the device "
            f"({100 * device_ms / wall_ms:.0f}% busy; the profiler itself adds time)"
        )
        lines.append(events.table(sort_by="self_device_time_total", row_limit=PROFILE_ROWS))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS))
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n\n")


def run_variant(
    variant: Variant, images: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> Measurement:
    preset = get_preset(args.preset)
    spec = spec_for(preset, args.image_size)
    trainer = TrainStep.create(
        spec,
        lr_g=preset.lr_g,
        lr_d=preset.lr_d,
        beta1=preset.beta1,
        beta2=preset.beta2,
        device=device,
        amp_dtype=torch.bfloat16 if variant.amp else None,
        channels_last=variant.channels_last,
        compile=variant.compile,
        ema_decay=EMA_DECAY,
        seed=0,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_images = images.shape[0]
    total_steps = args.warmup + args.steps + (PROFILE_STEPS if args.profile else 0)
    permutation = torch.cat(
        [
            epoch_permutation(n_images, seed=0, epoch=epoch, device=device)
            for epoch in range(1, 2 + total_steps * args.batch_size // n_images)
        ]
    )
    batches = epoch_batches(images, permutation, args.batch_size, total_steps)

    started = time.perf_counter()
    for _ in range(args.warmup):
        trainer(next(batches))
    trainer.drain()
    synchronize(device)
    warmup_s = time.perf_counter() - started

    started = time.perf_counter()
    stats = None
    for step in range(1, args.steps + 1):
        trainer(next(batches))
        if step % LOG_EVERY_STEPS == 0:
            stats = trainer.drain()
    stats = trainer.drain() or stats
    synchronize(device)
    elapsed = time.perf_counter() - started

    if args.profile:
        try:
            profile_steps(trainer, batches, device, variant.name, args.profile)
        except Exception as error:  # the profiler's tables are extra: keep the timing
            with args.profile.open("a") as f:
                f.write(f"== {variant.name}: profiling failed: {type(error).__name__}: {error}\n\n")

    images_per_s = args.steps * args.batch_size / elapsed
    epoch_images = (SEED_TRAIN_IMAGES // args.batch_size) * args.batch_size
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return Measurement(
        variant=variant.name,
        images_per_s=images_per_s,
        tflops=images_per_s * count_flops_per_image(spec) / 1e12,
        ms_per_step=1000 * elapsed / args.steps,
        warmup_s=warmup_s,
        projected_hours=SEED_EPOCHS * epoch_images / images_per_s / 3600,
        peak_memory_gib=peak,
        final_loss_d=stats.loss_d if stats else float("nan"),
        final_loss_g=stats.loss_g if stats else float("nan"),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=60_000, help="synthetic dataset size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        help=f"after timing, profile {PROFILE_STEPS} more steps of each variant; tables here",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny preset, 32 px, a few steps: checks it runs"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.image_size, args.batch_size = "tiny", 32, 8
        args.images, args.warmup, args.steps = 64, 1, 2
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    variants = [VARIANTS[name] for name in args.variants.split(",")]
    if device.type != "cuda" and args.smoke:
        # Inductor on a CPU needs a C++ toolchain and minutes; a smoke run skips it.
        variants = [v for v in variants if not v.compile]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer does
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    spec = spec_for(args.preset, args.image_size)
    flops = count_flops_per_image(spec)
    print(
        f"device {name} | torch {torch.__version__} | cudnn.allow_tf32 "
        f"{torch.backends.cudnn.allow_tf32} | preset {args.preset} {args.image_size}px | "
        f"batch {args.batch_size} | {flops / 1e9:.2f} GFLOP/image | {args.images} images"
    )
    if args.profile:
        args.profile.write_text(f"device {name} | torch {torch.__version__}\n\n")  # a new file
    images = synthetic_images(args.images, args.image_size, device)
    results: list[Measurement] = []
    failures: dict[str, str] = {}
    for variant in variants:
        try:
            result = run_variant(variant, images, args, device)
        except Exception as error:  # one failing variant should not hide the others
            print(f"  {variant.name}: FAILED {type(error).__name__}: {str(error)[:300]}")
            failures[variant.name] = f"{type(error).__name__}: {error}"
            continue
        finally:
            if variant.compile:
                torch._dynamo.reset()  # the next variant compiles from scratch
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(f"  {variant.name}: {result.images_per_s:,.0f} img/s", flush=True)

    header = (
        f"{'variant':<18}{'img/s':>10}{'TFLOP/s':>10}{'ms/step':>10}"
        f"{f'{SEED_EPOCHS} ep (h)':>12}{'warm-up s':>11}{'peak GiB':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.variant:<18}{r.images_per_s:>10,.0f}{r.tflops:>10.1f}{r.ms_per_step:>10.1f}"
            f"{r.projected_hours:>12.2f}{r.warmup_s:>11.1f}{r.peak_memory_gib:>10.1f}"
        )
    if args.json:
        report = {
            "device": name,
            "torch": str(torch.__version__),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "flops_per_image": flops,
            "results": [asdict(r) for r in results],
            "failures": failures,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
