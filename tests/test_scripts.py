"""The evaluation scripts: the Fréchet distance of scripts/mnist_accuracy.py."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from mnist_accuracy import frechet_distance  # noqa: E402


def test_frechet_distance_matches_its_closed_form():
    """Zero for a set against itself; for two Gaussians with commuting covariances,
    ‖μ_a − μ_b‖² + Σ (√λ_a − √λ_b)² (the eigenvalues of a shared basis), to sampling error."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-9
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]) + 1.0
    expected = 3 * 1.0 + (1 - 1) ** 2 + (1 - 2) ** 2 + (1 - 3) ** 2     # = 8
    assert abs(frechet_distance(a, b) - expected) < 0.2
    # a mean shift alone adds its squared length
    assert abs(frechet_distance(a, a + 2.0) - 12.0) < 1e-6
