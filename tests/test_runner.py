"""Tests for the training loop and command line of d3pm_runner.py (section 4).

Run:  python -m pytest tests/test_runner.py -q      (CPU, about half a minute)

Sections: a fake MNIST on disk | training lowers the loss, writes config, samples, checkpoint |
resume (continues, and is exact) | --sample-only / --eval-only | bad input -> one "error:" line,
exit status 2 | the two process classes | the runner copied alone. (The heart toy: test_heart.py.)

Nothing here reads /work/shared or the network: MNIST is a 64 + 32 image fake written in
torchvision's raw IDX layout, read by the real `torchvision.datasets.MNIST` loader.
"""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_runner as R  # noqa: E402

K, T = 2, 10


@pytest.fixture(scope="module")
def mnist_root(fake_mnist):
    return fake_mnist


def test_fake_mnist_reads_through_the_real_loader(mnist_root):
    data = R.load_mnist(mnist_root, K)
    assert data.train_x.shape == (64, 1, 28, 28) and data.test_x.shape == (32, 1, 28, 28)
    assert data.train_x.dtype == torch.long and set(data.train_x.unique().tolist()) == {0, 1}
    assert data.train_y.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def tiny_config(mnist_root, out, **overrides):
    values = dict(dataset="mnist", data_root=mnist_root, num_classes=K, num_timesteps=T,
                  model_channels=8, batch_size=16, train_steps=40, lr=3e-3, warmup_steps=1,
                  log_every=10, eval_images=8, num_samples=10, out=str(out), device="cpu")
    values.update(overrides)
    return R.Config(**values)


def tiny_flags(mnist_root, out, **overrides):
    """The same tiny settings as command-line flags, for main()."""
    cfg = dataclasses.asdict(tiny_config(mnist_root, out, **overrides))
    default = dataclasses.asdict(R.Config())
    return [a for name, v in cfg.items() if v != default[name]
            for a in ("--" + name.replace("_", "-"), str(v))]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "nll_bpd" in r]


@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory):
    """One 40-step run shared by the tests that need a checkpoint: (config, result)."""
    cfg = tiny_config(mnist_root, tmp_path_factory.mktemp("run"))
    return cfg, R.train(cfg, log=lambda *a: None)


# ------------------------------------------------------------------------------ training

def test_training_lowers_the_loss_and_writes_its_outputs(trained):
    from PIL import Image
    cfg, result = trained
    train_rows, final_rows = metrics(cfg.out)
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    losses = [r["loss"] for r in train_rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result["step"] == 40 and len(final_rows) == 1
    final = final_rows[0]
    assert final["eval_images"] == 8
    for name in ("nll_bpd", "nll_bpd_given_label"):
        assert 0 < final[name] < 10 and 0 < final[name + "_stderr"] < final[name], (name, final)
    with open(os.path.join(cfg.out, "config.json")) as f:
        assert json.load(f) == dataclasses.asdict(cfg)
    with Image.open(os.path.join(cfg.out, "samples_final.png")) as png:
        png.load()
        assert png.width > 28 and png.height > 28
    with Image.open(os.path.join(cfg.out, "reverse_final.gif")) as gif:
        assert gif.n_frames > 1


def test_checkpoint_loads_with_weights_only(trained):
    cfg, _ = trained
    ckpt = torch.load(os.path.join(cfg.out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "step", "config", "rng"} <= set(ckpt)
    assert ckpt["step"] == 40 and ckpt["config"] == dataclasses.asdict(cfg)
    net = R.build_model(cfg, R.load_mnist(cfg.data_root, K))
    net.load_state_dict(ckpt["model"])                       # the weights fit the network


# ------------------------------------------------------------------------------ resume

def test_resume_continues_from_the_saved_step(mnist_root, tmp_path):
    out = tmp_path / "run"
    R.main(tiny_flags(mnist_root, out, train_steps=10, log_every=5))
    ckpt = str(out / "checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 10
    R.main(["--resume", ckpt, "--train-steps", "20"])
    assert torch.load(ckpt, weights_only=True)["step"] == 20
    train_rows, final_rows = metrics(out)
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]     # no restart from step 0
    assert [r["step"] for r in final_rows] == [10, 20]


def test_resume_is_exact(mnist_root, tmp_path):
    """8 steps in one go == 4 steps, then --resume to 8: same weights, EMA and optimizer state
    (data order, label dropout, t and x_t noise all continue where they stopped)."""
    flags = dict(train_steps=8, eval_images=0, num_samples=2, ema_decay=0.9)
    R.main(tiny_flags(mnist_root, tmp_path / "once", **flags))
    R.main(tiny_flags(mnist_root, tmp_path / "split", **{**flags, "train_steps": 4}))
    half = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    R.main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), "--train-steps", "8"])
    once = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert once["step"] == split["step"] == 8
    for part in ("model", "ema"):
        assert once[part].keys() == split[part].keys()
        for name in once[part]:
            assert torch.equal(once[part][name], split[part][name]), f"{part}.{name}"
    for a, b in zip(once["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # and the second half did train: the weights moved after the resume
    assert not all(torch.equal(half["model"][n], split["model"][n]) for n in half["model"])


# --------------------------------------------------------------- --sample-only, --eval-only

@pytest.fixture
def network_calls(monkeypatch):
    """Records the timestep of every ConvNet call."""
    calls = []
    forward = R.ConvNet.forward

    def recording(self, x_t, t, cond=None):
        calls.append(int(t[0]))
        return forward(self, x_t, t, cond)

    monkeypatch.setattr(R.ConvNet, "forward", recording)
    return calls


@pytest.mark.parametrize("steps", [None, 3])
def test_sample_only(trained, tmp_path, network_calls, steps):
    from PIL import Image
    cfg, _ = trained
    argv = ["--sample-only", "--resume", os.path.join(cfg.out, "checkpoint.pt"),
            "--num-samples", "20", "--out", str(tmp_path)]
    R.main(argv + ([] if steps is None else ["--sample-steps", str(steps)]))
    samples = torch.load(tmp_path / "samples.pt", weights_only=True)
    images, labels = samples["images"], samples["labels"]
    assert images.dtype == labels.dtype == torch.long
    assert images.shape == (20, 1, 28, 28) and labels.shape == (20,)
    assert images.min() >= 0 and images.max() <= K - 1             # never the [MASK] state K
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    with Image.open(tmp_path / "samples_only.png") as png:
        png.load()
    with Image.open(tmp_path / "reverse_only.gif") as gif:
        assert gif.n_frames > 1
    # per batch of cfg.batch_size, one network call per reverse step, from t = T down to t = 1
    # (guidance is 0: no second call)
    n_steps, n_batches = (T if steps is None else steps), -(-20 // cfg.batch_size)
    assert len(network_calls) == n_batches * n_steps
    for b in range(n_batches):
        calls = network_calls[b * n_steps:(b + 1) * n_steps]
        assert calls[0] == T and calls[-1] == 1
        assert all(a > b for a, b in zip(calls, calls[1:]))


def test_eval_only_prints_one_json_line(trained, tmp_path, capsys):
    cfg, _ = trained
    capsys.readouterr()
    R.main(["--eval-only", "--resume", os.path.join(cfg.out, "checkpoint.pt"),
            "--eval-images", "8", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, f"stdout should be one JSON line, got {lines}"
    result = json.loads(lines[0])
    assert set(result) == {"nll_bpd", "nll_bpd_stderr", "nll_bpd_given_label",
                           "nll_bpd_given_label_stderr", "eval_images"}
    assert result["eval_images"] == 8
    for name in ("nll_bpd", "nll_bpd_given_label"):
        assert np.isfinite(result[name]) and result[name] > 0 and result[name + "_stderr"] > 0


def test_the_two_bounds_pass_the_null_label_and_the_true_labels(trained, monkeypatch):
    """nll_bpd conditions on the null label (a bound on -log p(x)), nll_bpd_given_label on
    each test image's own label (-log p(x | y)); each is the mean over the test images."""
    cfg, _ = trained
    data = R.load_mnist(cfg.data_root, K)
    net = R.build_model(cfg, data)
    net.load_state_dict(torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True)["model"])
    d3pm = R.build_d3pm(cfg, net)
    seen = []
    nll_bpd = R.D3PM.nll_bpd
    monkeypatch.setattr(R.D3PM, "nll_bpd", lambda self, x, cond=None, **kw:
                        seen.append((x.clone(), cond)) or nll_bpd(self, x, cond, **kw))
    cfg = dataclasses.replace(cfg, eval_images=6, batch_size=4)
    result = R.test_bounds(cfg, d3pm, net, data, torch.device("cpu"))
    labelled = [(x, c) for x, c in seen if c is not None]
    null = [(x, c) for x, c in seen if c is None]
    for part in (labelled, null):     # batches of 4 and 2 covering the first 6 test images
        assert torch.equal(torch.cat([x for x, _ in part]), data.test_x[:6])
    assert torch.equal(torch.cat([c for _, c in labelled]), data.test_y[:6])
    g = torch.Generator().manual_seed(cfg.seed + 2)
    by_hand = torch.cat([nll_bpd(d3pm, data.test_x[i:j], None, generator=g) for i, j in ((0, 4), (4, 6))])
    assert result["nll_bpd"] == pytest.approx(float(by_hand.double().mean()), rel=1e-6)
    assert result["nll_bpd_stderr"] == pytest.approx(float(by_hand.double().std() / 6 ** 0.5), rel=1e-5)
    assert result["nll_bpd"] != result["nll_bpd_given_label"]


def test_without_label_dropout_there_is_no_null_label_bound(trained):
    cfg, _ = trained
    data = R.load_mnist(cfg.data_root, K)
    net = R.build_model(cfg, data)
    cfg = dataclasses.replace(cfg, eval_images=2, label_dropout=0.0)
    result = R.test_bounds(cfg, R.build_d3pm(cfg, net), net, data, torch.device("cpu"))
    assert result["nll_bpd"] is None and result["nll_bpd_given_label"] > 0


def test_sample_only_writes_exactly_num_samples(trained, tmp_path):
    cfg, _ = trained
    R.main(["--sample-only", "--resume", os.path.join(cfg.out, "checkpoint.pt"),
            "--num-samples", "13", "--out", str(tmp_path), "--sample-steps", "2"])
    labels = torch.load(tmp_path / "samples.pt", weights_only=True)["labels"]
    assert len(labels) == 13
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 13 and counts.max() - counts.min() <= 1, counts
    assert labels.tolist() == sorted(labels.tolist())


def test_lr_and_weight_decay_given_with_resume_are_applied(mnist_root, tmp_path):
    """--lr / --weight-decay given with --resume take effect (optimizer, schedule and the
    logged lr), rather than the checkpoint's values."""
    out = tmp_path / "run"
    R.main(tiny_flags(mnist_root, out, train_steps=4, log_every=2, eval_images=0, num_samples=2,
                      warmup_steps=1))
    ckpt = str(out / "checkpoint.pt")
    R.main(["--resume", ckpt, "--train-steps", "8", "--lr", "1e-4", "--weight-decay", "0.05"])
    state = torch.load(ckpt, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        assert group["lr"] == pytest.approx(1e-4) and group["weight_decay"] == pytest.approx(0.05)
    assert state["scheduler"]["base_lrs"] == [pytest.approx(1e-4)]
    train_rows, _ = metrics(out)
    assert [r["lr"] for r in train_rows] == pytest.approx([3e-3, 3e-3, 1e-4, 1e-4])
    with open(out / "config.json") as f:
        assert json.load(f)["lr"] == pytest.approx(1e-4)


def test_default_transition_is_uniform_and_presets_keep_theirs():
    cfg = R.resolve_config({})
    assert cfg.transition == "uniform"
    assert R.resolve_config({"preset": "cpu"}).transition == "absorbing"
    assert R.resolve_config({"preset": "cpu-grey"}).transition == "gaussian"


# ------------------------------------------------------------------------------ bad input

def _not_a_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    return str(path)


BAD_INPUT = {
    # name: (flags, a word the message must contain); {data}, {tmp}, {ckpt} are filled in
    "one class": (["--num-classes", "1"], "--num-classes"),
    "no timesteps": (["--num-timesteps", "0"], "--num-timesteps"),
    "unknown transition": (["--transition", "foo"], "--transition"),
    "negative guidance": (["--guidance", "-1"], "--guidance"),
    "sample steps > T": (["--num-timesteps", "10", "--sample-steps", "11"], "--sample-steps"),
    "empty batch": (["--batch-size", "0"], "--batch-size"),
    "missing checkpoint": (["--resume", "/nonexistent/checkpoint.pt"], "no such file"),
    "text as checkpoint": (["--resume", "{text}"], "not a d3pm checkpoint"),
    "dict as checkpoint": (["--resume", "{dict}"], "not a d3pm checkpoint"),
    "no MNIST": (["--data-root", "{tmp}/empty"], "MNIST"),
    "unwritable out": (["--data-root", "{data}", "--out", "{tmp}/file/run"], "--out"),
    "config mismatch": (["--resume", "{ckpt}", "--num-classes", "4"], "num_classes"),
    "guidance, no null class": (["--guidance", "1", "--label-dropout", "0"], "--label-dropout"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line(case, trained, mnist_root, tmp_path, capsys, monkeypatch):
    import torchvision
    # offline for certain: every MNIST download goes to a closed local port and fails at once
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("a regular file, so nothing can be created under it")
    flags, word = BAD_INPUT[case]
    fill = {"data": mnist_root, "tmp": str(tmp_path), "ckpt": os.path.join(trained[0].out, "checkpoint.pt"),
            "text": _not_a_checkpoint(tmp_path, "text"), "dict": _not_a_checkpoint(tmp_path, "dict")}
    argv = [f.format(**fill) for f in flags]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        R.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and word in lines[0], lines[0]


# ---------------------------------------------------------------- the two process classes

def test_runner_uses_the_fast_class_unless_no_fast(mnist_root, tmp_path):
    from d3pm_fast import FastD3PM
    cfg = tiny_config(mnist_root, tmp_path)
    assert type(R.build_d3pm(cfg, None)) is FastD3PM
    assert type(R.build_d3pm(dataclasses.replace(cfg, no_fast=True), None)) is R.D3PM
    lines = []
    R.train(tiny_config(mnist_root, tmp_path / "ref", train_steps=2, no_fast=True, eval_images=2,
                        num_samples=2), log=lines.append)
    assert any("--no-fast" in line and "reference" in line for line in lines), lines


def test_checkpoints_load_into_either_class(trained):
    """A checkpoint holds the network only (the process's buffers follow from the config):
    the reference and the fast class built from it give the same loss on the same inputs."""
    cfg, _ = trained
    data = R.load_mnist(cfg.data_root, K)
    net = R.build_model(cfg, data)
    net.load_state_dict(torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True)["model"])
    x_0, t = data.test_x[:4], torch.tensor([1, 3, 7, 10])
    x_t = R.D3PM(None, T, K, cfg.transition).q_sample(x_0, t, generator=torch.Generator().manual_seed(0))
    losses = [R.build_d3pm(dataclasses.replace(cfg, no_fast=flag), net).loss_terms(x_0, x_t, t)["loss"]
              for flag in (False, True)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)


def test_runner_copied_alone_trains_and_samples(tmp_path):
    """d3pm_runner.py alone in an empty folder (beside a tiny MNIST in torchvision's raw layout):
    it says it uses the reference class, trains and writes its samples."""
    import shutil
    import subprocess
    from fake_mnist import write_fake_mnist
    shutil.copy(os.path.join(os.path.dirname(R.__file__), "d3pm_runner.py"), tmp_path)
    write_fake_mnist(str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "d3pm_runner.py", "--data-root", "data", "--train-steps", "3",
                          "--num-timesteps", "10", "--model-channels", "8", "--batch-size", "16",
                          "--num-samples", "10", "--eval-images", "4", "--out", "run", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "d3pm_fast.py not found" in out.stdout + out.stderr
    for name in ("checkpoint.pt", "samples_final.png", "reverse_final.gif"):
        assert (tmp_path / "run" / name).exists(), name


def test_old_checkpoints_read_bf16_as_auto(trained, tmp_path):
    """Before --precision auto, "bf16" meant bf16 on CUDA and fp32 on the CPU: a checkpoint
    whose config has no `compile` field keeps that meaning; newer ones keep what they say."""
    cfg, _ = trained
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "compile"} | {"precision": "bf16"}
    assert R.resolve_config({}, old).precision == "auto"
    assert R.resolve_config({"precision": "bf16"}, old).precision == "bf16"
    assert R.resolve_config({}, old | {"compile": False}).precision == "bf16"


def test_a_checkpoint_older_than_a_preset_field_keeps_that_fields_default(trained):
    """A cpu-grey checkpoint written before --lr-decay existed trained with a constant learning
    rate: resumed, it keeps "none" although the preset now says "cosine", unless asked."""
    cfg, _ = trained
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "lr_decay"} | {"preset": "cpu-grey"}
    assert R.PRESETS["cpu-grey"]["lr_decay"] == "cosine"
    assert R.resolve_config({}, old).lr_decay == "none"
    assert R.resolve_config({"lr_decay": "cosine"}, old).lr_decay == "cosine"
    assert R.resolve_config({}, old | {"lr_decay": "cosine"}).lr_decay == "cosine"
