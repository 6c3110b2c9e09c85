"""The CIFAR-10 runner on tiny generated CIFAR-shaped data (CIFAR-10 is never downloaded here):
a training step and samples for both network outputs, --save-npz, and a two-process gloo
torchrun that must end with identical weights on both ranks."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import d3pm_runner_cifar as cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(tmp_path, **overrides):
    return cifar.CifarConfig(**{**cifar.PRESETS["fake"], "num_timesteps": 5, "eval_images": 2,
                                "num_samples": 4, "out": str(tmp_path / "run"), **overrides})


@pytest.mark.parametrize("model_output", ["logits", "logistic"])
def test_train_step_and_samples(tmp_path, model_output):
    cfg = tiny(tmp_path, model_output=model_output)
    result = cifar.run(cfg)
    assert result["step"] == cfg.train_steps and np.isfinite(result["nll_bpd"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model"] == "DiT-T/2" and ckpt["config"]["model_output"] == model_output
    sample_cfg = tiny(tmp_path, model_output=model_output, resume=str(tmp_path / "run" / "checkpoint.pt"),
                      sample_only=True, save_npz=str(tmp_path / "s.npz"), sample_steps=2)
    cifar.run(sample_cfg)
    s = torch.load(tmp_path / "run" / "samples.pt", weights_only=True)
    assert s["images"].shape == (4, 3, 32, 32) and s["images"].dtype == torch.long
    assert 0 <= int(s["images"].min()) and int(s["images"].max()) <= 255
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, s["images"].permute(0, 2, 3, 1).numpy())  # K = 256


def test_flips_are_seeded_by_the_step(tmp_path):
    data = cifar.build_data(tiny(tmp_path))
    x = data.train_x[:16]
    a, b = data.augment(x, 7), data.augment(x, 7)
    assert torch.equal(a, b)
    flipped = (a != x).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 16
    assert torch.equal(a[flipped], x[flipped].flip(-1))


def test_bad_model_name_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "d3pm_runner_cifar.py"), "--model", "DiT-Q/2",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: --model") and "Traceback" not in r.stderr


def test_torchrun_two_gloo_processes_end_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", os.path.join(ROOT, "d3pm_runner_cifar.py"),
                        "--preset", "fake", "--num-timesteps", "5", "--train-steps", "3",
                        "--eval-images", "2", "--num-samples", "4", "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stdout
    assert "weights identical across 2 ranks: True" in r.stdout
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    logged = [l for l in open(tmp_path / "ddp" / "metrics.jsonl") if '"loss"' in l]
    assert len(logged) == 2  # rank 0 alone writes (steps 2 and 3)
