"""Slicing, joining and comparing batches of distributions gives the same densities as the original batch."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from vae_priors.experiments.diagnostics.distribution_batches import (
    batch_tensors,
    cat_batch,
    map_batch,
    shared_component,
)
from vae_priors.models.mixture_distributions import GaussianMixture


def batches() -> list[torch.distributions.Distribution]:
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(6, 3, generator=g), torch.rand(6, 3, generator=g) + 0.5
    tril = torch.linalg.cholesky(torch.eye(3) + 0.1 * torch.ones(3, 3)).expand(6, 3, 3)
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.randn(6, 2, generator=g)),
                                     dist.Normal(torch.randn(6, 2, 3, generator=g), 1.0).to_event(1))
    shared = GaussianMixture(torch.randn(6, 4, generator=g), torch.randn(4, 3, generator=g), torch.ones(4, 3))
    torch.manual_seed(0)
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(6, 3), 1.0).to_event(1),
                                        [dist.transforms.Spline(3), dist.transforms.AffineTransform(0.5, 2.0)])
    affine = dist.TransformedDistribution(dist.Normal(torch.zeros(6, 3), 1.0).to_event(1),
                                          [dist.transforms.AffineTransform(loc, scale, event_dim=1)])
    return [dist.Normal(loc, scale).to_event(1), dist.MultivariateNormal(loc, scale_tril=tril), mixture, shared, flow,
            affine]


@pytest.mark.parametrize("d", batches(), ids=["independent-normal", "mvn", "mixture", "gaussian-mixture",
                                              "shared-flow", "batched-affine"])
def test_slices_joined_again_have_the_original_log_density(d):
    z = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(1))
    parts = [map_batch(d, lambda t: t[:2]), map_batch(d, lambda t: t[2:])]
    assert [p.batch_shape for p in parts] == [torch.Size([2]), torch.Size([4])]
    joined = cat_batch(parts)
    torch.testing.assert_close(joined.log_prob(z), d.log_prob(z))
    torch.testing.assert_close(parts[1].log_prob(z[:, 2:]), d.log_prob(z)[:, 2:])


def test_shared_component_is_found_only_when_every_member_is_equal():
    same = dist.Normal(torch.zeros(5, 2), torch.ones(5, 2)).to_event(1)
    different = dist.Normal(torch.arange(10.0).reshape(5, 2), torch.ones(5, 2)).to_event(1)
    assert shared_component(same).batch_shape == torch.Size([1])
    assert shared_component(different) is None


def test_a_shared_row_joined_from_chunks_stays_one_expanded_row():
    """Chunks of a prior shared by every point join without materializing N copies of its K logits."""
    g = torch.Generator().manual_seed(2)
    mixture = GaussianMixture(torch.randn(1, 7, generator=g), torch.randn(7, 3, generator=g),
                              torch.rand(7, 3, generator=g) + 0.5)
    chunks = [mixture.expand((4,)), mixture.expand((3,))]
    joined = cat_batch(chunks)
    logits = batch_tensors(joined)[0]
    assert joined.batch_shape == torch.Size([7]) and logits.stride(0) == 0
    assert joined.mixture_distribution.logits.stride(0) == 0  # not normalized row by row into a copy
    z = torch.randn(5, 7, 3, generator=g)
    torch.testing.assert_close(joined.log_prob(z), mixture.log_prob(z[..., None, :]).squeeze(-1).expand(5, 7))
    assert shared_component(joined).batch_shape == torch.Size([1])
    different = [mixture.expand((2,)), GaussianMixture(torch.randn(1, 7, generator=g), mixture.loc,
                                                      mixture.scale).expand((2,))]
    assert batch_tensors(cat_batch(different))[0].stride(0) != 0  # unequal rows are copied, not shared
