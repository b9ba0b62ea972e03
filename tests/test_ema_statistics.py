"""The EMA generator's batch-norm statistics are its own (standing statistics), not the
training generator's, and computing them changes nothing in training."""

from __future__ import annotations

import torch
from torch import nn

from carmodels.train.step import (
    STANDING_STATISTICS_BATCH,
    STANDING_STATISTICS_PASSES,
    STANDING_STATISTICS_SEED,
    TrainStep,
)
from tests.test_train_recipes import assert_same, batch, make_step, tiny_spec, weights


def norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def trained_step(steps: int = 3, read_between: bool = False) -> TrainStep:
    step = make_step(tiny_spec(batch_norm=True))
    for index in range(steps):
        step(batch(index))
        if read_between:
            step.sampling_generator()
            step.state_dict()
    return step


def standing_latents(nz: int) -> torch.Tensor:
    latents = torch.Generator().manual_seed(STANDING_STATISTICS_SEED)
    passes = [
        torch.randn(STANDING_STATISTICS_BATCH, nz, generator=latents)
        for _ in range(STANDING_STATISTICS_PASSES)
    ]
    return torch.cat(passes)


def test_the_first_norm_gets_the_mean_and_variance_of_the_averaged_weights_own_inputs() -> None:
    step = trained_step()
    ema = step.sampling_generator()
    assert ema is not step.generator and not ema.training
    z = standing_latents(ema.spec.nz)
    with torch.no_grad():
        # The first norm's input is the projection's convolution of z: no batch norm before
        # it, so the cumulative average of the passes' means is the mean over all latents.
        first_input = ema.project[0](z[:, :, None, None])
    first = norms(ema)[0]
    torch.testing.assert_close(first.running_mean, first_input.mean(dim=(0, 2, 3)))
    per_pass_var = torch.stack(
        [c.var(dim=(0, 2, 3)) for c in first_input.split(STANDING_STATISTICS_BATCH)]
    )
    torch.testing.assert_close(first.running_var, per_pass_var.mean(dim=0))
    trained = norms(step.generator)[0]
    assert not torch.allclose(first.running_mean, trained.running_mean)


def test_the_checkpoint_holds_the_standing_statistics() -> None:
    step = trained_step()
    saved = step.state_dict()["ema_generator"]
    sampler = step.sampling_generator()
    assert_same(saved, sampler.state_dict())
    raw = step.generator.state_dict()
    name = next(k for k in saved if k.endswith("running_mean"))
    assert not torch.equal(saved[name], raw[name])


def test_reading_the_ema_generator_changes_nothing_in_training() -> None:
    rng_before = torch.get_rng_state()
    plain = trained_step(steps=3)
    rng_plain = torch.get_rng_state()
    torch.set_rng_state(rng_before)
    read = trained_step(steps=3, read_between=True)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    for module in ("generator", "discriminator"):
        assert_same(weights(getattr(plain, module)), weights(getattr(read, module)))
    assert_same(plain.state_dict()["ema_generator"], read.state_dict()["ema_generator"])


def test_statistics_are_computed_once_per_update() -> None:
    step = trained_step(steps=1)
    calls: list[int] = []
    assert step.ema is not None
    step.ema.module.register_forward_hook(lambda *_: calls.append(1))
    step.sampling_generator()
    step.state_dict()
    assert len(calls) == STANDING_STATISTICS_PASSES
    step(batch(9))
    step.state_dict()
    assert len(calls) == 2 * STANDING_STATISTICS_PASSES


def test_a_generator_without_batch_norm_is_not_run() -> None:
    step = make_step(tiny_spec(batch_norm=False))
    step(batch(0))
    assert step.ema is not None
    calls: list[int] = []
    step.ema.module.register_forward_hook(lambda *_: calls.append(1))
    assert_same(step.state_dict()["ema_generator"], step.ema.module.state_dict())
    step.sampling_generator()
    assert calls == []


def test_a_resumed_step_recomputes_the_statistics_of_the_loaded_weights() -> None:
    step = trained_step()
    state = step.state_dict()
    resumed = make_step(tiny_spec(batch_norm=True))
    resumed.load_state_dict(state)
    assert_same(resumed.state_dict()["ema_generator"], state["ema_generator"])
