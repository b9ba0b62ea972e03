"""Training checkpoints: the file layout, safe loading, and the one generator loader.

A checkpoint is a ``torch.save``'d dictionary of tensors and primitives only (so it loads with
``weights_only=True``): the keys in :data:`CHECKPOINT_KEYS` plus ``format``, and, from the
trainer, ``hyperparameters``, ``best`` and ``amp`` (what ``config["amp"]`` resolved to). A
run keeps ``checkpoints/epoch-NNNN.pt`` files, ``latest.pt`` (always the newest) and
``best.pt`` (the lowest ``sample_fd``), each of the two a hard link to (or copy of) an epoch
file, so pruning old epochs never removes them.

Everything that reads a trained generator (generate, evaluate, restore, promotion) goes through
:func:`load_generator`, as stylegan2's ``legacy.py`` is its one loader; the trainer writes
with :func:`save`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from carmodels.device import resolve_device
from carmodels.errors import CheckpointError, MissingInputError, one_line
from carmodels.io import atomic_write
from carmodels.models import Generator, ModelSpec, build_generator

#: Version of the checkpoint dictionary layout.
CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"
#: Keys every checkpoint written by ``train`` holds and some reader indexes.
CHECKPOINT_KEYS = (
    "generator",
    "discriminator",
    "opt_g",
    "opt_d",
    "ema_generator",
    "step",
    "rng",
    "epoch",
    "spec",
    "config",
    "data_version",
    "history",
    "torch_version",
)
#: The fix named by every checkpoint error.
_CHECKPOINT_FIX = (
    "pass a checkpoint written by `carmodels train` (e.g. DATA/train/checkpoints/latest.pt) "
    "or train again"
)


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint dictionary, loaded safely (tensors and primitives only).

    Raises ``MissingInputError`` when there is no file, ``CheckpointError`` when it is not a
    complete carmodels checkpoint of this format (truncated, another program's, a text file).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"No checkpoint at {path}: train first (`carmodels train` / materialise train_dcgan)."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # the file system's trouble (permissions, I/O), not the file's content
    except Exception as error:
        # A damaged or foreign file fails in torch's zip reader (RuntimeError) or unpickler
        # (UnpicklingError, even KeyError): whatever it is, the file is not a checkpoint.
        # torch's own text is left to --debug: it is long and mostly about weights_only.
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}): it is truncated "
            f"or not a torch file; {_CHECKPOINT_FIX}."
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint)
        raise CheckpointError(
            f"{path} is not a carmodels checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found {found!r}); {_CHECKPOINT_FIX}."
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (no {missing}); {_CHECKPOINT_FIX}."
        )
    return checkpoint


def checkpoint_spec(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> ModelSpec:
    """The model spec a loaded checkpoint was trained with (``path`` names it in errors)."""
    try:
        return ModelSpec.from_dict(checkpoint["spec"])
    except (TypeError, ValueError) as error:  # fields this version does not know, bad values
        raise CheckpointError(
            f"{path} holds a model spec this carmodels cannot build ({one_line(error, 160)}); "
            f"{_CHECKPOINT_FIX}."
        ) from error


def load_generator(
    checkpoint_path: str | os.PathLike[str], device: str = "cpu", ema: bool = True
) -> tuple[Generator, ModelSpec, dict[str, Any]]:
    """The trained generator in eval mode, its spec, and the checkpoint's metadata.

    ``ema=True`` loads the moving-average weights when the run kept them (else the raw ones);
    ``meta["weights"]`` says which were loaded.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    use_ema = ema and checkpoint["ema_generator"] is not None
    spec = checkpoint_spec(checkpoint, checkpoint_path)
    try:
        generator = build_generator(spec)
        generator.load_state_dict(
            checkpoint["ema_generator"] if use_ema else checkpoint["generator"]
        )
    except (TypeError, ValueError, RuntimeError) as error:
        # A spec this version cannot build, or weights of another shape: the file's fault.
        raise CheckpointError(
            f"{checkpoint_path} holds a model this carmodels cannot load ({type(error).__name__}: "
            f"{one_line(error, 160)}); {_CHECKPOINT_FIX}."
        ) from error
    generator.to(resolve_device(device)).eval().requires_grad_(False)
    meta = {
        key: checkpoint[key]
        for key in ("epoch", "step", "config", "data_version", "history", "torch_version")
    }
    meta["weights"] = "ema" if use_ema else "generator"
    meta["checkpoint_path"] = str(checkpoint_path)
    return generator, spec, meta


def epoch_name(epoch: int, suffix: str) -> str:
    """``epoch-NNNN<suffix>``: the name of an epoch's checkpoint (and of its sample grid)."""
    return f"epoch-{epoch:04d}{suffix}"


def _link_or_copy(source: Path, target: Path) -> Path:
    """Atomically make ``target`` a hard link to (or, failing that, a copy of) ``source``."""

    def write(tmp: Path) -> None:
        try:
            os.link(source, tmp)  # no copy of hundreds of MB when the filesystem allows it
        except OSError:
            tmp.write_bytes(source.read_bytes())

    return atomic_write(target, write)


def save(
    state: dict[str, Any],
    checkpoint_dir: Path,
    epoch: int,
    keep_last: int | None,
    is_best: bool = False,
) -> Path:
    """Write epoch-NNNN.pt, point latest.pt (and best.pt) at it atomically, prune old epochs.

    ``best.pt`` is its own link, so pruning the epoch file it came from does not remove it.
    """
    path = checkpoint_dir / epoch_name(epoch, ".pt")
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    _link_or_copy(path, checkpoint_dir / LATEST_NAME)
    if is_best:
        _link_or_copy(path, checkpoint_dir / BEST_NAME)
    if keep_last is not None:
        for old in sorted(checkpoint_dir.glob("epoch-*.pt"))[:-keep_last]:
            old.unlink()
    return path


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of a training run folder, or None when it has none."""
    latest = Path(run_dir) / CHECKPOINT_DIR / LATEST_NAME
    return latest if latest.is_file() else None


def best_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run's checkpoint with the lowest ``sample_fd``, or None when it kept none."""
    best = Path(run_dir) / CHECKPOINT_DIR / BEST_NAME
    return best if best.is_file() else None


def resume_path(resume: bool | str | os.PathLike[str], checkpoint_dir: Path) -> Path | None:
    """The checkpoint ``train(resume=...)`` continues from: latest.pt for True (when there is
    one), the given file for a path, None for False."""
    if resume is False:
        return None
    if resume is True:
        latest = checkpoint_dir / LATEST_NAME
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise MissingInputError(f"resume={str(resume)!r}: no checkpoint file there.")
    return path
