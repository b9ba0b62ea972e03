"""DiffAugment: differentiable, seeded, shape- and layout-preserving augmentations."""

from __future__ import annotations

import pytest
import torch

from carmodels.augment import (
    ADA_IMAGES_TO_FULL,
    ADA_TARGET,
    POLICIES,
    DiffAugment,
    adapt_probability,
    augment_color,
    augment_cutout,
    augment_translation,
    parse_policy,
)

#: The public operations by policy name: what DiffAugment must reproduce.
OPERATIONS = {
    "color": augment_color,
    "translation": augment_translation,
    "cutout": augment_cutout,
}


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_parse_policy() -> None:
    assert parse_policy("") == ()
    assert parse_policy(" color, cutout ") == ("color", "cutout")
    with pytest.raises(ValueError, match="Unknown DiffAugment policy 'blur'"):
        parse_policy("color,blur")


def test_full_policy_is_seeded_differentiable_and_keeps_layout() -> None:
    augment = DiffAugment(",".join(POLICIES))
    images = _images().contiguous(memory_format=torch.channels_last).requires_grad_()
    first = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    other = augment(images, torch.Generator().manual_seed(2))
    assert first.shape == images.shape
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, again) and not torch.equal(first, other)
    first.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_empty_policy_is_identity() -> None:
    images = _images()
    augment = DiffAugment("")
    assert not augment
    assert augment(images, torch.Generator()) is images


def test_translation_shifts_content_and_pads_with_zero() -> None:
    images = _images(n=64)
    shifted = augment_translation(images, torch.Generator().manual_seed(0))
    # Some images move (zero borders appear), content is a shifted copy, never invented.
    assert (shifted == 0).any()
    assert set(shifted.unique().tolist()) <= set(images.unique().tolist()) | {0.0}


def test_cutout_zeroes_about_a_quarter() -> None:
    images = _images(n=64, size=32).abs() + 0.1  # no zeros before
    cut = augment_cutout(images, torch.Generator().manual_seed(0))
    zero_share = (cut == 0).float().mean().item()
    assert 0.1 < zero_share <= 0.25  # a half-size square, sometimes clipped by the border


def test_probability_zero_computes_nothing_and_draws_nothing() -> None:
    images = _images()
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert DiffAugment(",".join(POLICIES), probability=0.0)(images, generator) is images
    assert torch.equal(generator.get_state(), state)


def test_probability_one_is_diffaugment_as_published() -> None:
    # The same draws as before the probability existed, so fixed-policy runs train as before.
    images = _images(n=8)
    augment = DiffAugment(",".join(POLICIES), probability=1.0)
    expected, manual = images, torch.Generator().manual_seed(5)
    for name in POLICIES:
        expected = OPERATIONS[name](expected, manual)
    assert torch.equal(augment(images, torch.Generator().manual_seed(5)), expected)


def test_probability_augments_about_that_share_of_images() -> None:
    images = _images(n=400, size=8)
    # One operation, so an image is either untouched or augmented.
    augmented = DiffAugment("color", probability=0.25)(images, torch.Generator().manual_seed(0))
    changed = (augmented != images).flatten(1).any(dim=1).float().mean().item()
    assert 0.17 < changed < 0.33


def test_adaptive_probability_follows_ada() -> None:
    assert ADA_TARGET == 0.6
    # D too sure of the reals (r above the target): p rises by images / ADA_IMAGES_TO_FULL.
    p = adapt_probability(0.0, 0.9, ADA_IMAGES_TO_FULL // 10)
    assert p == pytest.approx(0.1)
    assert adapt_probability(p, 0.9, ADA_IMAGES_TO_FULL) == 1.0  # capped at 1
    p = adapt_probability(1.0, 0.2, ADA_IMAGES_TO_FULL // 4)
    assert p == pytest.approx(0.75)
    assert adapt_probability(p, ADA_TARGET, 10_000) == pytest.approx(0.75)  # on target: stays
    assert adapt_probability(p, float("nan"), 10_000) == pytest.approx(0.75)  # no reading
    assert adapt_probability(p, -1.0, 2 * ADA_IMAGES_TO_FULL) == 0.0  # floored at 0
    with pytest.raises(ValueError, match="target must be in"):
        adapt_probability(0.5, 0.9, 100, target=1.0)


@pytest.mark.parametrize("probability", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("channels_last", [False, True])
def test_below_one_an_operation_no_image_is_chosen_for_is_skipped_with_the_same_result(
    probability: float, channels_last: bool
) -> None:
    # The reference: every operation computed for every image, then the chosen ones kept (what
    # an accelerator does, and what the CPU did before it skipped operations no image is
    # chosen for). The same values, gradients and random stream, bit for bit.
    def reference(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for name in POLICIES:
            augmented = OPERATIONS[name](images, generator)
            chosen = torch.rand(images.shape[0], 1, 1, 1, generator=generator) < probability
            images = torch.where(chosen, augmented, images)
        return images

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    skipped = 0
    for seed in range(8):
        base = _images(n=4, size=16).contiguous(memory_format=memory_format)
        ours_in = base.clone().requires_grad_(True)
        theirs_in = base.clone().requires_grad_(True)
        generator, reference_generator = (torch.Generator().manual_seed(seed) for _ in range(2))
        ours = DiffAugment(",".join(POLICIES), probability)(ours_in, generator)
        theirs = reference(theirs_in, reference_generator)
        assert torch.equal(ours, theirs)
        assert ours.is_contiguous(memory_format=memory_format)
        assert torch.equal(generator.get_state(), reference_generator.get_state())
        upstream = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed + 100))
        upstream = upstream.contiguous(memory_format=memory_format)
        ours.backward(upstream)
        theirs.backward(upstream)
        assert torch.equal(ours_in.grad, theirs_in.grad)
        skipped += torch.equal(ours, base)
    # At p 0.05 most calls choose no image for any operation: the skip is exercised.
    assert skipped >= 4 if probability == 0.05 else skipped < 8
