"""Tests of models.networks: the gated dense layer, He initialization and the reference code's clamped scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae_priors.models.mixture_priors import VampPrior
from vae_priors.models.networks import GatedDense, NormalHead, mlp


def test_gated_dense_is_a_linear_value_times_a_sigmoid_gate():
    layer = GatedDense(5, 3)
    x = torch.randn(7, 5)
    weight, bias = layer.linear.weight, layer.linear.bias
    value = x @ weight[:3].T + bias[:3]
    gate = torch.sigmoid(x @ weight[3:].T + bias[3:])
    torch.testing.assert_close(layer(x), value * gate)


def test_gated_mlp_has_he_initialized_weights():
    torch.manual_seed(0)
    net = mlp(784, [300, 300], 80, layer="gated")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3  # two gated hidden layers (one Linear each, twice as wide) and the output layer
    for m in linears:
        # He: weights ~ N(0, 2 / fan_in); the sample std of >= 24 000 weights is within 3 % of sqrt(2 / fan_in)
        assert m.weight.std().item() == pytest.approx(math.sqrt(2.0 / m.in_features), rel=0.03)
        assert abs(m.weight.mean().item()) < 0.01


def test_unknown_layer_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown hidden layer 'tanh'"):
        mlp(3, [4], 2, layer="tanh")


def test_gated_normal_head_scale_stays_in_the_reference_range():
    head = NormalHead(4, [8], 3, layer="gated")
    with torch.no_grad():
        head.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0, 0.0, 100.0]))  # raw log-var far below / above
        head.net[-1].weight.zero_()
    _, scale = head(torch.randn(5, 4))
    expected = torch.tensor([math.exp(-3.0), 1.0, math.exp(1.0)])  # log-var clamped to [-6, 2]
    torch.testing.assert_close(scale, expected.expand(5, 3))


def test_vamp_prior_hardtanh_link_keeps_pseudo_inputs_in_the_unit_interval():
    torch.manual_seed(0)
    init = VampPrior.reference_init(50, 10)
    assert init.mean().item() == pytest.approx(0.05, abs=0.005) and init.std().item() == pytest.approx(0.01, rel=0.2)

    class Encoder(nn.Module):
        def encode(self, x):
            raise AssertionError("not called in this test")

    prior = VampPrior(Encoder(), init, link="hardtanh")
    torch.testing.assert_close(prior.pseudo_inputs, init)  # inside (0, 1) the link is the identity
    with torch.no_grad():
        prior.raw_pseudo_inputs[0, :2] = torch.tensor([-0.5, 1.5])
    assert prior.pseudo_inputs[0, :2].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="pseudo-input link"):
        VampPrior(Encoder(), init, link="relu")
