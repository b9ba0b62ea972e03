"""Training recipes beyond the DCGAN: hinge loss, R1 penalty, spectral norm, width and norm
overrides; the defaults train exactly as before."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from carmodels.checkpoint import checkpoint_spec
from carmodels.cli import build_parser
from carmodels.conv_gemm import native_convolutions, set_cpu_gemm
from carmodels.errors import CheckpointError
from carmodels.models import ModelSpec, build_discriminator, count_flops_per_image, spec_for
from carmodels.train import TrainConfig, TrainStep, load_checkpoint, load_generator, train
from carmodels.train.step import discriminator_loss, generator_loss, r1_penalty
from tests.test_train import write_shards

SIZE = 16
CPU = torch.device("cpu")


def tiny_spec(**overrides: object) -> ModelSpec:
    return replace(spec_for("tiny", SIZE), **overrides)


def make_step(spec: ModelSpec | None = None, **options: object) -> TrainStep:
    settings: dict[str, object] = {
        "lr_g": 2e-3,
        "lr_d": 2e-3,
        "beta1": 0.5,
        "beta2": 0.999,
        "device": CPU,
        "amp_dtype": None,
        "channels_last": True,
        "compile": False,
        "ema_decay": 0.9,
        "seed": 5,
    }
    settings.update(options)
    return TrainStep.create(spec or tiny_spec(), **settings)  # type: ignore[arg-type]


def batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def run_config(**overrides: object) -> TrainConfig:
    base = TrainConfig(
        preset="tiny",
        image_size=SIZE,
        epochs=1,
        batch_size=4,
        max_steps_per_epoch=2,
        log_every_steps=2,
        device="cpu",
        seed=3,
        tensorboard=False,
        gif_frame_width=64,
    )
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), n_images=15, size=SIZE)


# --------------------------------------------------------------------------- (a) defaults


def test_the_default_recipe_is_the_explicit_bce_one() -> None:
    explicit = TrainConfig(
        loss="bce", r1_gamma=0.0, spectral_norm=False, base_channels=None, batch_norm=None
    )
    assert explicit.model_spec() == TrainConfig().model_spec()
    assert TrainConfig().model_spec().to_dict() == spec_for("seed").to_dict()
    assert "spectral_norm" not in TrainConfig().model_spec().to_dict()  # stored as before
    default, bce = make_step(), make_step(loss="bce", r1_gamma=0.0, r1_every=16)
    for step in (default, bce):
        for i in range(3):
            step(batch(i))
    assert_same(weights(default.generator), weights(bce.generator))
    assert_same(weights(default.discriminator), weights(bce.discriminator))
    assert default.drain() == bce.drain()


def test_a_default_run_trains_as_an_explicit_one(shards: Path, tmp_path: Path) -> None:
    default = train(shards, tmp_path / "default", run_config())
    explicit = train(
        shards,
        tmp_path / "explicit",
        run_config(loss="bce", r1_gamma=0.0, spectral_norm=False),
    )
    for key in ("generator", "discriminator", "ema_generator"):
        assert_same(
            load_checkpoint(default.checkpoint_path)[key],
            load_checkpoint(explicit.checkpoint_path)[key],
        )


# --------------------------------------------------------------------------- (b) spectral norm


def _largest_singular_values(discriminator: nn.Module) -> list[float]:
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        return [
            torch.linalg.matrix_norm(c.weight.reshape(c.weight.shape[0], -1), ord=2).item()
            for c in convs
        ]


def test_spectral_norm_keeps_d_weights_at_unit_norm() -> None:
    plain, normed = make_step(), make_step(tiny_spec(spectral_norm=True))
    for step in (plain, normed):
        for i in range(4):
            step(batch(i))
    assert normed.drain().is_finite()
    assert all(sigma <= 1.05 for sigma in _largest_singular_values(normed.discriminator))
    assert max(_largest_singular_values(plain.discriminator)) > 1.05  # the test can tell
    # Only D changes: G is built exactly as without it.
    assert not any("parametrizations" in k for k in normed.generator.state_dict())
    assert any("parametrizations" in k for k in normed.discriminator.state_dict())
    # The FLOP count (on the meta device) builds it too.
    assert count_flops_per_image(tiny_spec(spectral_norm=True)) == count_flops_per_image(
        tiny_spec()
    )


def test_spectral_norm_checkpoints_load_and_resume(shards: Path, tmp_path: Path) -> None:
    config = run_config(spectral_norm=True, epochs=2)
    straight = train(shards, tmp_path / "straight", config)
    train(shards, tmp_path / "resumed", replace(config, epochs=1))
    resumed = train(shards, tmp_path / "resumed", config, resume=True)
    expected, actual = (load_checkpoint(r.checkpoint_path) for r in (straight, resumed))
    assert expected["spec"]["spectral_norm"] is True
    assert checkpoint_spec(expected, straight.checkpoint_path) == config.model_spec()
    for key in ("generator", "discriminator", "ema_generator"):
        assert_same(expected[key], actual[key])
    generator, spec, _ = load_generator(resumed.checkpoint_path)
    assert spec.spectral_norm and generator(torch.randn(2, spec.nz)).shape == (2, 3, SIZE, SIZE)
    discriminator = build_discriminator(spec)
    discriminator.load_state_dict(actual["discriminator"])
    # A changed spec is refused, naming the overrides.
    with pytest.raises(CheckpointError, match="same preset.*spectral_norm"):
        train(shards, tmp_path / "resumed", replace(config, spectral_norm=False), resume=True)


def test_a_wider_generator_trains_loads_and_is_checked_on_resume(
    shards: Path, tmp_path: Path
) -> None:
    config = run_config(generator_channels=4, epochs=1)
    result = train(shards, tmp_path / "run", config)
    generator, spec, _ = load_generator(result.checkpoint_path)
    assert spec.generator_channels == 4 and spec == config.model_spec()
    first = next(m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d))
    assert first.out_channels == spec.generator_channel_plan()[0] != spec.channel_plan()[0]
    assert generator(torch.randn(2, spec.nz)).shape == (2, 3, SIZE, SIZE)
    with pytest.raises(CheckpointError, match="same preset.*generator_channels"):
        train(shards, tmp_path / "run", replace(config, generator_channels=None), resume=True)


def test_specs_without_the_field_still_load() -> None:
    stored = spec_for("tiny").to_dict()
    assert "spectral_norm" not in stored
    assert ModelSpec.from_dict(stored) == spec_for("tiny")
    normed = tiny_spec(spectral_norm=True)
    assert ModelSpec.from_dict(normed.to_dict()) == normed


# --------------------------------------------------------------------------- (c) hinge loss


def test_hinge_losses_follow_the_formula() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = 0, 0.5, 2; relu(1 + fake) = 0, 1, 1.5.
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(2.5 / 3 + 2.5 / 3)
    assert generator_loss(torch.tensor([1.0, -3.0]), "hinge").item() == pytest.approx(1.0)
    # bce is the binary cross-entropy of the logits with targets (1 - smoothing) and 0.
    bce = -(0.9 * torch.log(torch.sigmoid(real)) + 0.1 * torch.log(1 - torch.sigmoid(real)))
    expected = bce.mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    assert discriminator_loss(real, fake, "bce", 0.9).item() == pytest.approx(expected.item())
    expected_g = -torch.log(torch.sigmoid(torch.tensor([1.0, -3.0]))).mean()
    assert generator_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(expected_g.item())


def test_a_hinge_step_reports_its_loss_and_sigmoid_outputs() -> None:
    hinge, bce = make_step(loss="hinge"), make_step()
    x = batch(1)
    # The step's first D forward, redone by hand: the same D, noise and images.
    with torch.no_grad():
        hinge._seed_noise()
        z = torch.randn(4, hinge.nz, 1, 1, generator=hinge.noise)
        fake = hinge.generator(z)
        real = x.float().div(127.5).sub(1.0)
        logits = hinge.discriminator(torch.cat([real, fake]))
    hinge(x)
    bce(x)
    stats = hinge.drain()
    assert stats.loss_d == pytest.approx(discriminator_loss(*logits.split(4), "hinge").item())
    assert stats.d_x == pytest.approx(torch.sigmoid(logits[:4]).mean().item())
    assert stats.d_g_z == pytest.approx(torch.sigmoid(logits[4:]).mean().item())
    assert not torch.equal(hinge.generator.project[0].weight, bce.generator.project[0].weight)


# --------------------------------------------------------------------------- (d) R1


def test_r1_runs_every_r1_every_steps() -> None:
    step = make_step(r1_gamma=10.0, r1_every=4)
    due = []
    for i in range(9):
        due.append(step.r1_due())
        step(batch(i))
    assert due == [True, False, False, False, True, False, False, False, True]
    assert not make_step().r1_due()  # gamma 0: never


@pytest.mark.parametrize("at_step, applied", [(0, True), (1, False), (4, True)])
def test_r1_changes_d_only_on_its_steps(at_step: int, applied: bool) -> None:
    plain, penalised = make_step(), make_step(r1_gamma=10.0, r1_every=4)
    for step in (plain, penalised):
        step.step = at_step
        step(batch(at_step))
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            plain.discriminator.state_dict().values(),
            penalised.discriminator.state_dict().values(),
            strict=True,
        )
    )
    assert same is not applied
    assert penalised.drain().is_finite()


@pytest.mark.parametrize(
    "spec_overrides, options",
    [
        ({"batch_norm": True, "d_activation": "leakyrelu"}, {"diffaugment": "color,translation"}),
        ({"spectral_norm": True}, {"diffaugment": "color,translation,cutout", "loss": "hinge"}),
        ({}, {"channels_last": False}),
    ],
)
def test_r1_trains_with_norms_and_augmentation(
    spec_overrides: dict[str, object], options: dict[str, object]
) -> None:
    step = make_step(tiny_spec(**spec_overrides), r1_gamma=1.0, r1_every=2, **options)
    for i in range(3):
        step(batch(i))
    assert step.drain().is_finite()


def test_r1_under_cpu_bf16_autocast() -> None:
    step = make_step(r1_gamma=1.0, r1_every=1, amp_dtype=torch.bfloat16)
    step(batch())
    assert step.drain().is_finite()


def test_r1_penalty_is_exact_and_gemm_convolutions_refuse_a_double_backward() -> None:
    torch.manual_seed(0)
    spec = spec_for("tiny", 32)  # 8x8 and 4x4 layers run as matrix multiplies on the CPU
    gemm, native = build_discriminator(spec), build_discriminator(spec)
    native.load_state_dict(gemm.state_dict())
    set_cpu_gemm(native, False)
    x = torch.randn(3, 3, 32, 32)

    def penalty_grads(d: nn.Module) -> list[torch.Tensor]:
        real = x.clone().requires_grad_(True)
        with native_convolutions():
            penalty = r1_penalty(d(real), real)
        params = [p for name, p in d.named_parameters() if name != "classify.bias"]
        return list(torch.autograd.grad(penalty, params))

    for a, b in zip(penalty_grads(gemm), penalty_grads(native), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    real = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="native_convolutions"):
        r1_penalty(gemm(real), real)


# --------------------------------------------------------------------------- (e) overrides


def test_overrides_reach_the_built_networks() -> None:
    config = TrainConfig(preset="small", image_size=SIZE, base_channels=4, batch_norm=False)
    spec = config.model_spec()
    assert (spec.base_channels, spec.batch_norm, spec.spectral_norm) == (4, False, False)
    assert spec.d_activation == "leakyrelu"  # the rest stays the preset's
    assert config.hyperparameters() == TrainConfig(preset="small").hyperparameters()
    step = make_step(replace(config, spectral_norm=True).model_spec())
    d_convs = [m for m in step.discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert d_convs[0].out_channels == 4
    assert all(hasattr(c, "parametrizations") for c in d_convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in step.generator.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in step.discriminator.modules())
    on = TrainConfig(preset="tiny", batch_norm=True).model_spec()
    assert on.batch_norm and not TrainConfig(preset="tiny").model_spec().batch_norm
    assert any(
        isinstance(m, nn.BatchNorm2d)
        for m in make_step(replace(on, image_size=SIZE)).generator.modules()
    )


def test_a_wider_generator_leaves_the_discriminator_as_it_was() -> None:
    config = TrainConfig(preset="small", image_size=SIZE, base_channels=4, generator_channels=8)
    spec = config.model_spec()
    step = make_step(spec)
    g_convs = [m for m in step.generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    d_convs = [m for m in step.discriminator.modules() if isinstance(m, nn.Conv2d)]
    # The generator's plan doubles from 8 at its finest layer; the discriminator's from 4.
    assert [c.out_channels for c in g_convs[:-1]] == spec.generator_channel_plan()
    assert spec.generator_channel_plan() == [8 * 2**i for i in reversed(range(len(g_convs) - 1))]
    assert [c.out_channels for c in d_convs[:-1]] == list(reversed(spec.channel_plan()))
    assert d_convs[0].out_channels == 4
    same_d = make_step(replace(config, generator_channels=None).model_spec()).discriminator
    assert [p.shape for p in step.discriminator.parameters()] == [
        p.shape for p in same_d.parameters()
    ]
    # A checkpoint's spec keeps the width and reads back; unset, it is stored as before the
    # field existed, so older carmodels versions can still read the checkpoint.
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert "generator_channels" not in replace(spec, generator_channels=None).to_dict()
    with pytest.raises(ValueError, match="generator_channels"):
        replace(spec, generator_channels=0)


def test_cli_takes_the_new_options() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["train", "--loss", "hinge", "--r1-gamma", "2", "--r1-every", "8", "--spectral-norm"]
        + ["--base-channels", "32", "--generator-channels", "64", "--no-batch-norm"]
        + ["--amp", "off"]
    )
    assert (args.loss, args.r1_gamma, args.r1_every) == ("hinge", 2.0, 8)
    assert (args.spectral_norm, args.base_channels, args.batch_norm) == (True, 32, False)
    assert (args.generator_channels, args.amp) == (64, "off")
    left_out = parser.parse_args(["train"])
    assert left_out.spectral_norm is None and left_out.batch_norm is None  # the preset's
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--loss", "wgan"])
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--amp", "fp16"])


def test_torchrun_ranks_get_the_switches_as_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from carmodels import cli, distributed

    launched: list[list[str]] = []
    monkeypatch.setattr(
        distributed, "launch", lambda n, argv, rendezvous=None: launched.append(argv) or 0
    )
    argv = ["train", "--spectral-norm", "--no-batch-norm", "--r1-gamma", "1", "--loss", "hinge"]
    assert cli._launch_torchrun(build_parser().parse_args([*argv, "--nproc-per-node", "2"])) == 0
    forwarded = launched[0]
    assert "--spectral-norm" in forwarded and "--no-batch-norm" in forwarded
    assert forwarded[forwarded.index("--r1-gamma") + 1] == "1.0"
    # What a rank parses is what the launcher was given.
    rank = build_parser().parse_args(forwarded)
    assert (rank.spectral_norm, rank.batch_norm, rank.loss) == (True, False, "hinge")


def test_the_dagster_config_passes_the_recipe_on() -> None:
    from carmodels.errors import InputError
    from carmodels.train import MEASURED_RECIPE
    from pipelines.assets import TrainDcganConfig, training_config
    from pipelines.resources import TrainingDefaults

    recipe = {
        "loss": "hinge",
        "r1_gamma": 5.0,
        "spectral_norm": True,
        "base_channels": 32,
        "generator_channels": 64,
        "batch_norm": False,
    }
    config = training_config(TrainDcganConfig(**recipe), TrainingDefaults())
    assert {name: getattr(config, name) for name in recipe} == recipe
    # Left unset, the profile's recipe applies: under `full`, the measured one.
    assert training_config(TrainDcganConfig(), TrainingDefaults()) == TrainConfig(**MEASURED_RECIPE)
    with pytest.raises(InputError, match="TrainConfig.r1_gamma"):
        training_config(TrainDcganConfig(r1_gamma=-1.0), TrainingDefaults())


def test_the_profile_recipe_gives_way_to_the_asset_config() -> None:
    from carmodels.train import MEASURED_RECIPE
    from pipelines.assets import TrainDcganConfig, training_config
    from pipelines.resources import TrainingDefaults, demo_training

    # Another preset brings its own learning rates, not the measured recipe's.
    seed = training_config(TrainDcganConfig(preset="seed"), TrainingDefaults())
    assert (seed.lr_g, seed.lr_d) == (None, None)
    assert seed.hyperparameters()["lr_d"] == 3.5e-5
    # DiffAugment turned off in the asset's config takes its adaptive target with it.
    plain = training_config(TrainDcganConfig(diffaugment=""), TrainingDefaults())
    assert (plain.diffaugment, plain.diffaugment_target) == ("", None)
    assert plain.lr_g == MEASURED_RECIPE["lr_g"]
    fixed = training_config(TrainDcganConfig(lr_g=1e-4, diffaugment_target=0.8), TrainingDefaults())
    assert (fixed.lr_g, fixed.lr_d) == (1e-4, MEASURED_RECIPE["lr_d"])
    assert fixed.diffaugment_target == 0.8
    # The demo trains the small preset as tuned: its own learning rates, no augmentation.
    demo = training_config(TrainDcganConfig(), demo_training())
    assert (demo.preset, demo.lr_g, demo.diffaugment, demo.diffaugment_target) == (
        "small",
        None,
        "",
        None,
    )


# --------------------------------------------------------------------------- (f) validation


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"loss": "wgan"}, "loss"),
        ({"loss": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"r1_gamma": -1.0}, "r1_gamma"),
        ({"r1_gamma": math.nan}, "r1_gamma"),
        ({"r1_every": 0}, "r1_every"),
        ({"base_channels": 0}, "base_channels"),
        ({"generator_channels": 0}, "generator_channels"),
        ({"batch_norm": "yes"}, "batch_norm"),
        ({"spectral_norm": "no"}, "spectral_norm"),
        ({"diffaugment_target": 0.6}, "diffaugment_target"),  # nothing to adapt
        ({"diffaugment": "color", "diffaugment_target": 1.5}, "diffaugment_target"),
    ],
)
def test_invalid_recipes_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**settings)  # type: ignore[arg-type]
