"""Tests of experiments.data.datasets: embedded digits, quadrant task, binarization and the checks in validate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vae_priors.experiments.config import ModelConfig, SVIConfig
from vae_priors.experiments.data.datasets import (
    Dataset,
    Split,
    binarize,
    from_arrays,
    load_digits,
    quadrant_task,
    split_indices,
    validate,
)
from vae_priors.experiments.registry import Pair, get_variant
from vae_priors.experiments.training.svi import fit


def grey_dataset(n: tuple[int, int, int] = (30, 10, 10), dim: int = 16, value: float = 0.3,
                 image_shape: tuple[int, int] = (4, 4)) -> Dataset:
    splits = [Split(torch.full((k, dim), value)) for k in n]
    return Dataset("grey", *splits, image_shape=image_shape)


def pixel_id_dataset(size: int, n: int = 3) -> Dataset:
    """Images whose pixel values are their own flat indices, so a cut shows which pixels went where."""
    x = torch.arange(size * size, dtype=torch.float32).repeat(n, 1)
    return Dataset("ids", Split(x), Split(x[:1]), Split(x[:1]), image_shape=(size, size))


def test_load_digits_has_fixed_split_sizes_and_unit_range():
    data = load_digits()
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 180, 360)
    assert data.x_dim == 64 and data.image_shape == (8, 8)
    for split in data.splits().values():
        assert split.x.dtype == torch.float32
        assert split.x.min() >= 0 and split.x.max() <= 1
        assert split.labels.shape == (len(split),)
    # 16 is the largest grey level of the scikit-learn digits, so some pixel must reach exactly 1.
    assert data.train.x.max() == 1.0
    assert validate(data, "bernoulli") is data


def test_load_digits_split_is_identical_on_every_call():
    first, second = load_digits(), load_digits()
    for a, b in zip(first.splits().values(), second.splits().values(), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)


def test_split_indices_partition_every_point_exactly_once():
    train, val, test = split_indices(50, val=7, test=11)
    assert (len(train), len(val), len(test)) == (32, 7, 11)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(50))


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("visible", [1, 2, 3])
def test_quadrant_task_cuts_the_visible_quadrants_into_x_and_the_rest_into_y(size, visible):
    task = quadrant_task(pixel_id_dataset(size), visible)
    half = size // 2
    # Brute force, Pyro's order: bottom-left first, then top-left, then top-right; bottom-right is always hidden.
    order = {(True, False): 0, (False, False): 1, (False, True): 2, (True, True): 3}
    in_x = [r * size + c for r in range(size) for c in range(size) if order[r >= half, c >= half] < visible]
    in_y = sorted(set(range(size * size)) - set(in_x))
    assert task.x_dim == visible * half * half and task.y_dim == (4 - visible) * half * half
    assert task.conditional and task.name == f"ids-quadrants{visible}"
    for row_x, row_y in zip(task.train.x, task.train.y, strict=True):
        assert row_x.long().tolist() == in_x
        assert row_y.long().tolist() == in_y
        assert sorted(torch.cat([row_x, row_y]).long().tolist()) == list(range(size * size))


@pytest.mark.parametrize("shape", [(7, 7), (8, 7), (5, 8)])
def test_quadrant_task_rejects_odd_image_sides(shape):
    data = Dataset("odd", *(Split(torch.zeros(2, shape[0] * shape[1])) for _ in range(3)), image_shape=shape)
    with pytest.raises(ValueError, match="even image sides"):
        quadrant_task(data, 1)


@pytest.mark.parametrize("visible", [0, 4])
def test_quadrant_task_rejects_visible_counts_other_than_1_2_3(visible):
    with pytest.raises(ValueError, match="must be 1, 2 or 3"):
        quadrant_task(pixel_id_dataset(8), visible)


def test_quadrant_task_needs_image_data():
    data = from_arrays("flat", np.zeros((10, 5)), None, val=2, test=2, image_shape=None)
    with pytest.raises(ValueError, match="needs image data"):
        quadrant_task(data, 1)


def test_static_binarization_is_deterministic_and_binary():
    data = grey_dataset(n=(400, 50, 50))
    first, second = binarize(data, "static"), binarize(data, "static")
    for a, b in zip(first.splits().values(), second.splits().values(), strict=True):
        assert torch.equal(a.x, b.x)
        assert set(a.x.unique().tolist()) <= {0.0, 1.0}
    assert not first.dynamic_binarization
    # 6400 Bernoulli(0.3) draws: the mean is 0.3 within 5 standard errors (sd = sqrt(0.21 / 6400) = 0.0057).
    assert abs(first.train.x.mean().item() - 0.3) < 5 * (0.21 / first.train.x.numel()) ** 0.5


def test_dynamic_binarization_keeps_train_grey_and_fixes_val_and_test():
    data = grey_dataset()
    dynamic, static = binarize(data, "dynamic"), binarize(data, "static")
    assert dynamic.dynamic_binarization
    assert torch.equal(dynamic.train.x, data.train.x)
    for name in ("val", "test"):
        assert set(getattr(dynamic, name).x.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(getattr(dynamic, name).x, getattr(static, name).x)


class RecordingModel(nn.Module):
    """Wraps a model and keeps a copy of every x it is called with."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_fit_redraws_binary_training_batches_each_epoch_under_dynamic_binarization():
    data = binarize(grey_dataset(n=(20, 4, 4), dim=16, value=0.5), "dynamic")
    pair = get_variant("vae").factory(data, ModelConfig(latent_dim=2, hidden=[8]), "bernoulli")
    recorder = RecordingModel(pair.model)
    config = SVIConfig(epochs=3, batch_size=20, patience=10)
    fit(Pair(recorder, pair.guide), data, config, seed=0, progress=False)
    train_batches = [x for x in recorder.seen if x.shape[0] == 20]
    # the contract check runs the model once on the first step's batch before the step itself: the same draw
    assert len(train_batches) == 4 and torch.equal(train_batches[0], train_batches[1])
    train_batches = train_batches[1:]
    for x in recorder.seen:
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    # Column sums do not depend on the shuffle order, so equal sums across epochs would mean a fixed draw.
    sums = [x.sum(dim=0) for x in train_batches]
    assert not torch.equal(sums[0], sums[1]) and not torch.equal(sums[1], sums[2])


def test_binarize_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="unknown binarization 'stochastic'"):
        binarize(grey_dataset(), "stochastic")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_binarize_rejects_values_outside_the_unit_interval(mode):
    data = grey_dataset(value=1.5)
    with pytest.raises(ValueError, match=r"needs x in \[0, 1\].*data.binarize = \"none\""):
        binarize(data, mode)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_validate_rejects_nan_and_inf_naming_the_split_and_row_count(bad):
    data = grey_dataset()
    data.val.x[1, 3] = bad
    data.val.x[2, 0] = bad
    with pytest.raises(ValueError, match="grey val split x has NaN or inf values in 2 rows"):
        validate(data, "bernoulli")


def test_validate_rejects_an_empty_split():
    data = grey_dataset(n=(5, 0, 5))
    with pytest.raises(ValueError, match="grey val split x is empty"):
        validate(data, "bernoulli")


def test_validate_rejects_values_outside_the_bernoulli_support_and_suggests_a_fix():
    data = grey_dataset(value=255.0)
    with pytest.raises(ValueError, match=r"\[255, 255\] but the bernoulli likelihood.*divide pixels by 255"):
        validate(data, "bernoulli")


def test_validate_accepts_any_finite_values_for_the_gaussian_likelihood():
    data = grey_dataset(value=-3.0)
    assert validate(data, "gaussian") is data


def test_validate_rejects_splits_of_different_widths():
    data = Dataset("mixed", Split(torch.zeros(3, 4)), Split(torch.zeros(3, 5)), Split(torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="mixed val split x has 5 features but train has 4"):
        validate(data, "bernoulli")


def test_validate_rejects_a_split_that_is_not_two_dimensional():
    data = Dataset("flat", Split(torch.zeros(3, 4)), Split(torch.zeros(3, 4)), Split(torch.zeros(12)))
    with pytest.raises(ValueError, match=r"flat test split x has shape \(12,\); expected \(num_points"):
        validate(data, "bernoulli")


def test_validate_checks_the_support_of_y_for_conditional_data():
    x, y = torch.zeros(3, 2), torch.full((3, 2), 2.0)
    data = Dataset("cond", Split(x, y), Split(x, y.clamp(max=1)), Split(x, y.clamp(max=1)))
    with pytest.raises(ValueError, match="cond train split has values in"):
        validate(data, "bernoulli")
