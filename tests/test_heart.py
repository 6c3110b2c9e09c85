"""The 2-D heart toy of heart.py: it learns its distribution, and refuses what does not fit it.

Run:  python -m pytest tests/test_heart.py -q      (CPU, about half a minute)
"""
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_runner as R  # noqa: E402
import heart  # noqa: E402


def test_heart_toy_learns_its_distribution(tmp_path):
    """heart.py's defaults, reduced (K = 32 bins, T = 20, 1000 steps of 256: ~10 s on one busy core).

    `heart_tv` (the measure of scripts/heart_tv.py) on an 8 x 8 grid for 2,000 points: a data
    sample of that size scores ≈ 0.05 (the floor), the trained model 0.078 (seed 0), the
    untrained network (same init) ≈ 0.93. The bound 0.15 (3x the floor) is about twice the
    trained value, while a model that puts a tenth of its mass off the curve fails.
    """
    num_classes, bound = 32, 0.15
    cfg = heart.HeartConfig(num_classes=num_classes, num_timesteps=20, train_steps=1000,
                            batch_size=256, warmup_steps=50, eval_images=0, num_samples=2000,
                            out=str(tmp_path), device="cpu")
    heart.run(cfg, log=lambda *a: None)
    heart.main(["--sample-only", "--resume", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path)])
    samples = torch.load(tmp_path / "samples.pt", weights_only=True)["images"]
    assert samples.shape == (2000, 2)
    assert (tmp_path / "heart_final.png").exists() and (tmp_path / "heart_only.png").exists()
    # the measure of scripts/heart_tv.py, on an 8 x 8 grid for 2,000 points
    tv = lambda x: heart.heart_tv(x, num_classes, cells=8, reference=200_000)  # noqa: E731
    noise_floor = tv(heart.heart_points(2000, num_classes, torch.Generator().manual_seed(999)))
    trained_tv = tv(samples)

    torch.manual_seed(cfg.seed)                      # the same initial weights as train()
    data = heart.build_data(cfg)
    d3pm = R.build_d3pm(cfg, heart.build_model(cfg, data))
    untrained = d3pm.sample((2000, 2), torch.zeros(2000, dtype=torch.long),
                            generator=torch.Generator().manual_seed(1))
    untrained_tv = tv(untrained)

    assert noise_floor < 0.1
    assert trained_tv < bound, (trained_tv, noise_floor)
    assert untrained_tv > 2 * bound, untrained_tv


def test_defaults_are_the_readme_settings():
    cfg = heart.HeartConfig()
    assert (cfg.dataset, cfg.num_classes, cfg.num_timesteps, cfg.transition) == ("heart", 64, 50, "uniform")
    assert (cfg.train_steps, cfg.batch_size, cfg.lr, cfg.label_dropout) == (1500, 2048, 3e-3, 0.0)


@pytest.mark.parametrize("flags, word", [
    (["--guidance", "2"], "--label-dropout"),        # no null class was trained
    (["--model-output", "logistic"], "heart toy"),
    (["--dataset", "mnist"], "--dataset"),
])
def test_bad_input_is_one_error_line(flags, word, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        heart.main(flags + ["--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and word in lines[0], lines


def test_help_lists_the_heart_defaults():
    root = os.path.dirname(heart.__file__)
    out = subprocess.run([sys.executable, "heart.py", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "bins per coordinate (default: 64)" in out.stdout, out.stderr


def test_checkpoints_of_the_old_heart_preset_resume_here(tmp_path):
    """Runs of `d3pm_runner.py --preset heart` saved preset="heart" in their config."""
    cfg = heart.HeartConfig(num_timesteps=4, train_steps=2, batch_size=16, eval_images=0,
                            num_samples=4, out=str(tmp_path), device="cpu", preset="heart")
    heart.run(cfg, log=lambda *a: None)
    heart.main(["--sample-only", "--resume", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path)])
    assert torch.load(tmp_path / "samples.pt", weights_only=True)["images"].shape == (4, 2)
