"""Data-parallel training: two CPU processes (gloo) through torchrun stay in step."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from carmodels.distributed import torchrun_command
from carmodels.train import load_checkpoint
from tests.conftest import free_port
from tests.test_train import IMAGE_SIZE, write_shards

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Each rank trains on its own slice through DDP and saves its weights for comparison.
RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from carmodels.distributed import device_for_rank, init_from_env, shutdown
    from carmodels.models import spec_for
    from carmodels.train import TrainStep, epoch_batches, epoch_permutation

    out = sys.argv[1]
    context = init_from_env("cpu")
    assert context.world_size == 2, context
    torch.manual_seed(100 + context.rank)  # different data on each rank
    images = torch.randint(0, 256, (16, 3, {size}, {size}), dtype=torch.uint8)
    device = device_for_rank(torch.device("cpu"), context)
    spec = spec_for("tiny", {size})
    trainer = TrainStep.create(
        spec, lr_g=2e-3, lr_d=2e-3, beta1=0.5, beta2=0.999, device=device, amp_dtype=None,
        channels_last=True, compile=False, ema_decay=0.9, seed=3, dist_context=context,
    )
    initial = {{k: v.clone() for k, v in trainer.generator.state_dict().items()}}
    perm = epoch_permutation(16, 3, 1, device, rank=context.rank)
    for batch in epoch_batches(images, perm, 4, 4):
        trainer(batch)
    stats = trainer.drain()
    torch.save(
        {{
            "generator": trainer.generator.state_dict(),
            "discriminator": trainer.discriminator.state_dict(),
            "initial": initial,
            "loss_d": stats.loss_d,
        }},
        f"{{out}}/rank{{context.rank}}.pt",
    )
    shutdown(context)
    """
)


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *args,
    ]


@pytest.mark.slow
def test_two_gloo_ranks_train_in_step(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(size=IMAGE_SIZE))
    completed = subprocess.run(
        _torchrun(2, str(script), str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for model in ("generator", "discriminator"):
        for name, tensor in rank0[model].items():
            assert torch.equal(tensor, rank1[model][name]), f"{model}.{name} differs by rank"
    # They trained (the weights moved), on different data, to the same averaged result.
    moved = [not torch.equal(t, rank0["initial"][k]) for k, t in rank0["generator"].items()]
    assert any(moved)
    assert rank0["loss_d"] == rank1["loss_d"]  # drained stats are averaged over ranks


@pytest.mark.slow
def test_cli_nproc_per_node_trains_and_rank0_writes(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", n_images=40)
    out = tmp_path / "run"
    args = [
        "train",
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--image-size",
        str(IMAGE_SIZE),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--max-steps-per-epoch",
        "2",
        "--nproc-per-node",
        "2",
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "carmodels.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trained 2 epochs (4 steps)") == 1  # rank 0 only
    checkpoint = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 4
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "epoch-0001.png",
        "epoch-0002.png",
    ]


def test_torchrun_command_validates() -> None:
    command = torchrun_command(2, ["train", "--epochs", "1"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert command[-4:] == ["carmodels.cli", "train", "--epochs", "1"]
    with pytest.raises(ValueError, match="nproc-per-node"):
        torchrun_command(0, ["train"])
