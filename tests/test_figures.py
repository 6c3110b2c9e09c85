"""Tests of figures.py, the teaching figures for D3PM (Austin et al. 2021, arXiv:2107.03006).

Run:  python -m pytest tests/test_figures.py -q      (CPU only, well under a minute)

  1. the survival curves: P(x_t = x_0) falls from 1; I(x_t; x_0) starts at H(x_0), equals a
     brute-force sum over the joint of (x_0, x_t) with Q̄_t an explicit product of Q_t, ends
     at 0 for absorbing, and is (1 - t/T) H(x_0) for absorbing when x_0 never takes the
     absorbing value (the property the paper's schedule is chosen for, §3.2)
  2. the inverse-CDF sampler draws from Cat(x_0 Q̄_t) (chi-square)
  3. make_figures on a tiny fake MNIST (K=8, T=10) writes valid, non-blank images, and with a
     tiny trained checkpoint adds the bound and x̂_0 figures
"""
import os
import struct
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_runner as d3  # noqa: E402
import figures  # noqa: E402

F64 = torch.float64


def write_fake_mnist(root, n=8, seed=0):
    """n train and n test 28x28 images in torchvision's raw IDX layout under root/MNIST/raw:
    a bright disc (the "digit") of random radius and grey level on black, plus some noise."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    for split in ("train", "t10k"):
        r = 4 + 8 * torch.rand(n, 1, 1, generator=g)
        level = 150 + 105 * torch.rand(n, 1, 1, generator=g)
        disc = ((yy - 14) ** 2 + (xx - 14) ** 2 < r ** 2).float() * level
        noise = (torch.rand(n, 28, 28, generator=g) < 0.05).float() * 255 * torch.rand(n, 28, 28, generator=g)
        images = (disc + noise).clamp(0, 255).to(torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">iiii", 2051, n, 28, 28) + images.numpy().tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">ii", 2049, n) + labels.numpy().tobytes())
    return root


def check_image(path, min_side=40):
    """Exists, is a valid PNG/GIF, is not tiny and is not one flat colour."""
    assert os.path.isfile(path), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_side, (path, img.size)
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 50, f"{path} is (nearly) one flat colour"
        if path.endswith(".gif"):
            assert getattr(img, "n_frames", 1) > 1, f"{path} is not animated"


# ------------------------------------------------------------------------ survival curves

def brute_force_mi_bits(marginal, Q_bar):
    """I(x_0; x_t) = Σ_ij p(i, j) log2 p(i, j) / (p(i) p(j)) on the explicit joint."""
    joint = marginal[:, None] * Q_bar
    p_t = joint.sum(0)
    ratio = joint / (marginal[:, None] * p_t[None, :])
    keep = joint > 0
    return float((joint[keep] * torch.log2(ratio[keep])).sum())


@pytest.mark.parametrize("transition", figures.TRANSITIONS)
def test_survival_matches_brute_force(transition):
    K, T = 8, 10
    marginal = torch.tensor([0.4, 0.1, 0.05, 0.05, 0.1, 0.1, 0.05, 0.15], dtype=F64)
    curves = figures.survival_curves(marginal, T, num_points=T + 1, transitions=(transition,))
    c = curves[transition]
    H = float(-(marginal * marginal.log2()).sum())
    assert c["t"].tolist() == list(range(T + 1))
    assert float(curves["entropy_bits"]) == pytest.approx(H, abs=1e-12)
    # t = 0: nothing is lost
    assert float(c["p_same"][0]) == pytest.approx(1.0, abs=1e-12)
    assert float(c["mi_bits"][0]) == pytest.approx(H, abs=1e-10)
    # both fall (weakly) with t
    assert bool((c["p_same"].diff() <= 1e-12).all())
    assert bool((c["mi_bits"].diff() <= 1e-10).all())
    # every t against an explicit product of Q_t and a brute-force mutual information
    process = d3.D3PM(None, T, K, transition)
    Q_bar = torch.eye(K, dtype=F64)
    for t in range(1, T + 1):
        Q_bar = Q_bar @ process.Q_matrix(t)
        assert float(c["p_same"][t]) == pytest.approx(float((marginal * Q_bar.diagonal()).sum()), abs=1e-10)
        assert float(c["mi_bits"][t]) == pytest.approx(brute_force_mi_bits(marginal, Q_bar), abs=1e-9)


def test_absorbing_ends_at_the_absorbing_value_and_loses_information_linearly():
    K, T = 8, 10
    m = K // 2                          # the grey absorbing state
    marginal = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.2, 0.1, 0.05, 0.05], dtype=F64)
    c = figures.survival_curves(marginal, T, num_points=T + 1, transitions=("absorbing",))["absorbing"]
    assert float(c["p_same"][-1]) == pytest.approx(float(marginal[m]), abs=1e-12)
    assert float(c["mi_bits"][-1]) == pytest.approx(0.0, abs=1e-12)
    # With no mass on m, x_t reveals x_0 exactly when x_t != m: I = ᾱ_t H(x_0) = (1 - t/T) H(x_0)
    # under β_t = 1/(T-t+1)   [D3PM §3.2]
    marginal[m] = 0.0
    marginal /= marginal.sum()
    H = float(-(marginal[marginal > 0] * marginal[marginal > 0].log2()).sum())
    c = figures.survival_curves(marginal, T, num_points=T + 1, transitions=("absorbing",))["absorbing"]
    expected = (1 - torch.arange(T + 1, dtype=F64) / T) * H
    assert torch.allclose(c["mi_bits"], expected, atol=1e-10)
    assert torch.allclose(c["p_same"], 1 - torch.arange(T + 1, dtype=F64) / T, atol=1e-12)


def test_uniform_ends_near_chance():
    """Q̄_T ≈ 1 1ᵀ / K, so P(x_T = x_0) ≈ 1/K and I(x_T; x_0) ≈ 0. (The gaussian's linear
    schedule mixes only at T in the hundreds, so it is not tested here.)"""
    K, T = 8, 50
    marginal = torch.tensor([0.4, 0.1, 0.05, 0.05, 0.1, 0.1, 0.05, 0.15], dtype=F64)
    c = figures.survival_curves(marginal, T, num_points=6, transitions=("uniform",))["uniform"]
    assert float(c["p_same"][-1]) == pytest.approx(1.0 / K, abs=1e-3)
    assert float(c["mi_bits"][-1]) == pytest.approx(0.0, abs=1e-3)


def test_gaussian_Q_bar_matches_the_d3pm_stack():
    K, T = 8, 10
    process = d3.D3PM(None, T, K, "gaussian")   # builds the float32 stack of Q̄_t
    Q_bars = figures.Q_bar_matrices("gaussian", K, T, [0, 1, 4, T])
    for t, Q_bar in Q_bars.items():
        assert torch.allclose(Q_bar.float(), process.Q_bar[t], atol=1e-6), t


def test_sample_from_rows_draws_from_the_rows_of_Q_bar():
    K = 8
    Q_bar = figures.Q_bar_matrices("gaussian", K, 20, [7])[7]
    x_0 = torch.tensor([0, 3, 7]).repeat_interleave(20000)
    u = torch.rand(x_0.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    x_t = figures.sample_from_rows(x_0, Q_bar, u)
    for i in (0, 3, 7):
        counts = torch.bincount(x_t[x_0 == i], minlength=K).double()
        expected = 20000 * Q_bar[i]
        keep = expected > 5
        chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        assert chi2 < 30, (i, chi2)          # K-1 = 7 degrees of freedom: p < 1e-4
        assert counts[~keep].sum() <= 20


# ------------------------------------------------------------------------ make_figures

def test_make_figures_tiny(tmp_path):
    root = write_fake_mnist(str(tmp_path / "data"))
    out = str(tmp_path / "figs")
    paths = figures.make_figures(d3.Config(data_root=root, out=out), out_dir=out, num_classes=8,
                                 num_timesteps=10, log=lambda *a: None)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["forward_process.gif", "forward_process.png", "survival.png",
                     "transition_matrices.png"]
    for p in paths:
        assert os.path.dirname(p) == out
        check_image(p)


def test_make_figures_with_checkpoint(tmp_path):
    root = write_fake_mnist(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    d3.train(d3.Config(dataset="mnist", data_root=root, num_classes=4, num_timesteps=5,
                       model_channels=8, train_steps=2, batch_size=8, eval_images=2,
                       num_samples=10, out=run), log=lambda *a: None)
    cfg = d3.Config(data_root=root, resume=os.path.join(run, "checkpoint.pt"), out=run,
                    device="cpu")
    paths = figures.make_figures(cfg, num_classes=8, num_timesteps=10, log=lambda *a: None)
    names = {os.path.basename(p) for p in paths}
    assert {"bound_terms.png", "x0_prediction.png", "x0_prediction.gif"} <= names
    for p in paths:
        assert os.path.dirname(p) == run   # out_dir defaults to cfg.out when it is not the default
        check_image(p)


def test_make_figures_with_a_heart_checkpoint(tmp_path):
    """A heart.py checkpoint (dataset "heart", its own network) loads with heart's data and
    network, and gets the plot of its bound's terms (no x̂_0 pictures: its data are not images)."""
    import heart
    run = str(tmp_path / "run")
    heart.run(heart.HeartConfig(num_timesteps=4, train_steps=2, batch_size=16, eval_images=0,
                                num_samples=4, out=run, device="cpu"), log=lambda *a: None)
    root = write_fake_mnist(str(tmp_path / "data"))   # for the forward-process figures
    cfg = d3.Config(data_root=root, resume=os.path.join(run, "checkpoint.pt"), out=run, device="cpu")
    d3pm, data, step, _ = figures.load_trained(cfg)
    assert type(d3pm.x0_model).__name__ == "PointMLP" and step == 2 and data.test_x.shape[1] == 2
    paths = figures.make_figures(cfg, num_classes=8, num_timesteps=10, log=lambda *a: None)
    names = {os.path.basename(p) for p in paths}
    assert "bound_terms.png" in names and "x0_prediction.png" not in names
