"""DiffAugment: differentiable, seeded, shape- and layout-preserving augmentations."""

from __future__ import annotations

import pytest
import torch

from carmodels.augment import (
    POLICIES,
    DiffAugment,
    augment_cutout,
    augment_translation,
    parse_policy,
)


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
