"""The supervised loss: response tokens only, averaged over tokens or over examples."""

from __future__ import annotations

import math

import torch

from xopd_core.train.sft import IGNORE, response_nll


def test_response_nll_means_by_hand() -> None:
    """Two examples over a 2-token vocabulary with uniform logits except one confident
    position: example 0 labels 3 tokens, example 1 labels 1 token."""
    logits = torch.zeros(2, 5, 2)
    logits[1, 3] = torch.tensor([0.0, math.log(3.0)])  # p(token 1) = 3/4 at position 3
    labels = torch.full((2, 5), IGNORE)
    labels[0, 2:5] = torch.tensor([0, 1, 0])  # predicted from positions 1..3: p = 1/2 each
    labels[1, 4] = 1  # predicted from position 3: p = 3/4
    half, three_quarters = -math.log(0.5), -math.log(0.75)
    by_token = (3 * half + three_quarters) / 4
    by_example = (half + three_quarters) / 2
    assert math.isclose(float(response_nll(logits, labels)), by_token, rel_tol=1e-6)
    assert math.isclose(float(response_nll(logits, labels, "examples")), by_example, rel_tol=1e-6)


def test_unlabelled_examples_do_not_count() -> None:
    logits = torch.zeros(3, 4, 2)
    labels = torch.full((3, 4), IGNORE)
    labels[1, 2] = 0
    expected = -math.log(0.5)
    assert math.isclose(float(response_nll(logits, labels, "examples")), expected, rel_tol=1e-6)
    nothing = torch.full((3, 4), IGNORE)
    for mean_over in ("tokens", "examples"):
        assert float(response_nll(logits, nothing, mean_over)) == 0.0  # type: ignore[arg-type]
