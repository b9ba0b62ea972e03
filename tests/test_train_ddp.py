"""Data-parallel training: two CPU processes (gloo) through torchrun stay in step, on one
node or on two nodes meeting through a c10d rendezvous, with the data in memory or streamed."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from carmodels.cli import main
from carmodels.distributed import (
    Rendezvous,
    no_buffer_sync_each_forward,
    rendezvous_from_flags,
    torchrun_command,
)
from carmodels.errors import InputError
from carmodels.train import load_checkpoint
from tests.conftest import free_port
from tests.test_train import IMAGE_SIZE, write_shards
from tests.test_train_data import train_keys, write_row_group_shards

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Source for the rank scripts: the names of the process's threads (Linux). gloo's threads
#: (``gloo_tcp_loop``, ``pt_gloo_runloop``) must be gone once ``shutdown`` has run: a group
#: that outlives it takes them into the interpreter's shutdown (carmodels.distributed). A
#: joined thread can stay listed in /proc for a moment after the join, so this waits for them
#: up to 5 s; threads of a group that is never freed stay for good.
THREAD_NAMES_SOURCE = """import glob, time
def _listed():
    names = []
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended after the listing
            pass
    return sorted(names)
def thread_names():
    for _ in range(50):
        names = _listed()
        if not any("gloo" in name for name in names):
            break
        time.sleep(0.1)
    return names"""


def assert_no_gloo_threads(threads: list[str]) -> None:
    assert threads, "no threads listed: is /proc mounted?"
    assert not [name for name in threads if "gloo" in name], threads


#: Each rank trains on its own slice through DDP and saves its weights for comparison.
RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from carmodels.distributed import device_for_rank, init_from_env, shutdown
    {thread_names}
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
    del trainer  # its DDP wrappers hold the group: released first, as train() does
    shutdown(context)
    with open(f"{{out}}/threads{{context.rank}}.json", "w") as f:
        json.dump(thread_names(), f)
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
    script.write_text(RANK_SCRIPT.format(size=IMAGE_SIZE, thread_names=THREAD_NAMES_SOURCE))
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
    for r in (0, 1):
        assert_no_gloo_threads(json.loads((tmp_path / f"threads{r}.json").read_text()))


@pytest.mark.slow
def test_cli_nproc_per_node_trains_and_rank0_writes(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", n_images=40)
    out = tmp_path / "run"
    completed = subprocess.run(
        _cli_train(shards, out, "--nproc-per-node", "2"),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trained 2 epochs (4 steps)") == 1  # rank 0 only
    assert "broadcast_buffers" not in completed.stderr  # no deprecation warning per rank
    checkpoint = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 4
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "epoch-0001.png",
        "epoch-0002.png",
    ]


def test_no_buffer_sync_each_forward_uses_the_keyword_torch_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.nn.parallel import DistributedDataParallel

    options = no_buffer_sync_each_forward()
    assert list(options.values()) == [False]
    assert set(options) <= set(inspect.signature(DistributedDataParallel.__init__).parameters)

    def older_init(self, module, device_ids=None, broadcast_buffers=True) -> None:  # noqa: ANN001
        """DDP's constructor before ``forward_sync_buffers`` (torch 2.11)."""

    monkeypatch.setattr(DistributedDataParallel, "__init__", older_init)
    assert no_buffer_sync_each_forward() == {"broadcast_buffers": False}


def test_torchrun_command_validates() -> None:
    command = torchrun_command(2, ["train", "--epochs", "1"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert command[-4:] == ["carmodels.cli", "train", "--epochs", "1"]
    with pytest.raises(ValueError, match="nproc-per-node"):
        torchrun_command(0, ["train"])


def test_torchrun_command_for_a_node_of_several() -> None:
    rendezvous = Rendezvous("node0.example:29400", nnodes=3, local_addr="10.0.0.2")
    command = torchrun_command(4, ["train"], rendezvous)
    assert "--standalone" not in command
    assert command[3:9] == [
        "--nnodes=3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0.example:29400",
        "--rdzv-id=carmodels-train",
        "--local-addr=10.0.0.2",
        "--nproc-per-node=4",
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((2, None, None, None), r"--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        ((2, "node0", None, None), r"--rdzv-endpoint 'node0' is not HOST:PORT"),
        ((2, "node0:http", None, None), r"is not HOST:PORT"),
        ((0, "node0:29400", None, None), r"--nnodes must be >= 1"),
        ((None, None, "job-7", None), r"--rdzv-id applies to a multi-node job only"),
        ((None, None, None, "10.0.0.2"), r"--local-addr applies to a multi-node job only"),
    ],
)
def test_bad_multi_node_flags_name_the_flag_and_the_fix(
    flags: tuple[int | None, str | None, str | None, str | None], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        rendezvous_from_flags(*flags)


def test_multi_node_flags_on_the_command_line_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data", str(tmp_path), "train", "--nnodes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("carmodels train: error: --nnodes 2 needs --rdzv-endpoint HOST:PORT")
    assert rendezvous_from_flags(None, None, None, None) is None
    assert rendezvous_from_flags(2, "127.0.0.1:29400", None, None) == Rendezvous(
        "127.0.0.1:29400", 2
    )


def test_a_node_of_several_is_launched_with_its_rendezvous_and_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carmodels import distributed

    launched: list[tuple[int, list[str], Rendezvous | None]] = []
    monkeypatch.setattr(
        distributed,
        "launch",
        lambda n, argv, rendezvous=None: launched.append((n, argv, rendezvous)),
    )
    node = ["--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job-7"]
    assert main(["--data", str(tmp_path), "train", "--memory-budget-mb", "64", *node]) == 0
    ((nproc, argv, rendezvous),) = launched
    assert nproc == 1  # one process a node unless --nproc-per-node says otherwise
    assert rendezvous == Rendezvous("node0:29400", 2, run_id="job-7")
    # The ranks get the training settings, not the launcher's flags.
    assert argv[argv.index("--memory-budget-mb") + 1] == "64"
    assert "--nnodes" not in argv and "--rdzv-endpoint" not in argv


def _cli_train(shards: Path, out: Path, *extra: str) -> list[str]:
    """`carmodels train` on the tiny model: 2 epochs of 2 steps of 8 images."""
    return [
        sys.executable,
        "-m",
        "carmodels.cli",
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
        *extra,
    ]


def _run_together(
    commands: list[list[str]], timeout: float, env: dict[str, str]
) -> list[subprocess.CompletedProcess]:
    """Start the commands at once (each in its own process group) and wait for all of them;
    on a timeout, end every process they started."""
    processes = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
        for command in commands
    ]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
        return [
            subprocess.CompletedProcess(process.args, process.returncode, out, err)
            for process, (out, err) in zip(processes, outputs, strict=True)
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = load_checkpoint(run / "checkpoints" / "latest.pt")
    return {k: checkpoint[k] for k in ("generator", "discriminator", "ema_generator")}


@pytest.mark.slow
def test_two_nodes_over_c10d_train_as_two_ranks_on_one_node(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", n_images=40)
    # One thread a process in both jobs (torchrun's default for a node of several processes,
    # not for one): the thread count changes the rounding of the CPU's reductions.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one_node = subprocess.run(
        _cli_train(shards, tmp_path / "one", "--nproc-per-node", "2"),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
        env=env,
    )
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    # Two torchrun agents, one process each, meet at a port of 127.0.0.1: the first to bind
    # it serves the rendezvous store, the other joins as a client.
    node = [
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        f"test-{os.getpid()}",
        "--local-addr",
        "127.0.0.1",
    ]
    nodes = _run_together([_cli_train(shards, tmp_path / "two", *node)] * 2, 240, env)
    for completed in nodes:
        assert completed.returncode == 0, completed.stderr[-3000:]
    # The node that got rank 0 reports; the other is quiet.
    assert sum(c.stdout.count("trained 2 epochs (4 steps)") for c in nodes) == 1
    expected, actual = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for model, state in expected.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, actual[model][name]), f"{model}.{name} differs"


#: Trains on shards streamed under a 1 MiB budget and writes which images each step saw.
STREAMED_RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from carmodels.train import TrainConfig, TrainStep, train
    {thread_names}

    shards, out = sys.argv[1], sys.argv[2]
    seen = []
    step = TrainStep.__call__

    def recording(self, batch):
        seen.append(
            [hashlib.sha256(i.contiguous().numpy().tobytes()).hexdigest() for i in batch.cpu()]
        )
        step(self, batch)

    TrainStep.__call__ = recording
    config = TrainConfig(
        preset="tiny", image_size={size}, epochs=2, batch_size=16, device="cpu", seed=3,
        memory_budget_mb=1, log_every_steps=4,
    )
    result = train(shards, out + "/run", config)
    with open(f"{{out}}/seen-{{os.environ['RANK']}}.json", "w") as f:
        json.dump({{"seen": seen, "steps": result.steps, "threads": thread_names()}}, f)
    """
)


@pytest.mark.slow
def test_two_ranks_streaming_see_disjoint_parts_covering_each_epoch(tmp_path: Path) -> None:
    # 160 images at 64 px, 128 of them train (1.5 MiB, over the 1 MiB budget); 2 ranks of 8
    # images a step divide them: each epoch every train image exactly once, on one rank.
    shards = write_row_group_shards(tmp_path / "shards", n_images=160, size=64)
    everything = {key.hex() for key in train_keys(shards, size=IMAGE_SIZE)}
    assert len(everything) == 128
    script = tmp_path / "rank.py"
    script.write_text(
        STREAMED_RANK_SCRIPT.format(size=IMAGE_SIZE, thread_names=THREAD_NAMES_SOURCE)
    )
    completed = subprocess.run(
        _torchrun(2, str(script), str(shards), str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 16  # 8 steps an epoch on each rank
    for r in ranks:
        assert_no_gloo_threads(r["threads"])
    for epoch in (0, 1):
        parts = [
            [k for batch in r["seen"][epoch * 8 : (epoch + 1) * 8] for k in batch] for r in ranks
        ]
        assert len(parts[0]) == len(parts[1]) == 64
        assert not set(parts[0]) & set(parts[1])
        assert Counter(parts[0] + parts[1]) == Counter(everything)
