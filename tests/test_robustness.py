"""Nothing lost, nothing NaN, no traceback for bad input.

Numerics over the whole range of t, library ValueErrors, property-based invariants, and the
runner's crash behaviour (atomic checkpoints, SIGTERM, exact resume after SIGKILL, skipped
non-finite steps) exercised with real subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings, strategies as st

import d3pm_runner as d3
from d3pm_runner import D3PM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSITIONS = ["uniform", "absorbing", "gaussian"]


# ------------------------------------------------------------------------------ numerics

def extreme_model(K, output, shape, seed, dtype=torch.float32):
    """A 'network' whose outputs are as extreme as ±1e4, as a leaf we can take gradients of."""
    g = torch.Generator().manual_seed(seed)
    if output == "logits":
        raw = ((torch.randint(0, 2, shape + (K,), generator=g) * 2 - 1) * 1e4).to(dtype)
        raw.requires_grad_(True)
        return raw, lambda x, t, c: raw
    loc = torch.rand(shape, generator=g) * 2 - 1
    log_scale = (torch.randint(0, 2, shape, generator=g) * 2 - 1) * 1e4
    raw = torch.stack([loc, log_scale.float()]).to(dtype).requires_grad_(True)
    return raw, lambda x, t, c: (raw[0], raw[1])


@pytest.mark.usefixtures("both_classes")
@pytest.mark.parametrize("K", [2, 256])
@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("output", ["logits", "logistic"])
@pytest.mark.parametrize("autocast", [False, True])
def test_loss_and_gradients_finite_for_every_t(K, transition, output, autocast):
    T = 25
    t = torch.arange(1, T + 1)            # every t in 1..T, one example each
    shape = (T, 1, 3, 3)
    x_0 = torch.randint(0, K, shape, generator=torch.Generator().manual_seed(1))
    dtype = torch.bfloat16 if autocast else torch.float32
    for seed in range(2):
        raw, model = extreme_model(K, output, shape, seed, dtype)
        d = D3PM(model, T, K, transition, model_output=output)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            terms = d.loss_terms(x_0, d.q_sample(x_0, t), t)
        terms["loss"].sum().backward()
        for name, v in terms.items():
            assert torch.isfinite(v).all(), f"{name} not finite at t={t[~torch.isfinite(v)].tolist()}"
        assert torch.isfinite(raw.grad).all(), "gradient not finite"
        assert raw.grad.abs().sum() > 0, "no gradient reached the network output"


@pytest.mark.usefixtures("both_classes")
@pytest.mark.parametrize("K", [2, 256])
@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_no_nan_at_first_and_last_step(K, transition, eps):
    T = 30
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, K, generator=g) * 3
    d = D3PM(lambda x, t, c: logits, T, K, transition, eps=eps)
    x_0 = torch.randint(0, K, (2, 1, 4, 4), generator=g)
    for t_val in (1, T):
        t = torch.full((2,), t_val)
        x_t = d.q_sample(x_0, t, generator=g)
        outs = [d.q_posterior_logits(x_0, x_t, t), d.p_logits(x_t, t), d.vb_terms_bpd(x_0, x_t, t),
                d.prior_bpd(x_0), d.loss_terms(x_0, x_t, t)["loss"]]
        for o in outs:
            assert not torch.isnan(o).any() and not torch.isinf(o).any()


# ------------------------------------------------------------------------ library errors

@pytest.mark.usefixtures("both_classes")
def test_value_errors_name_the_offending_value():
    K, T = 4, 10
    d = D3PM(lambda x, t, c: torch.zeros(x.shape + (K,)), T, K, "uniform")
    x = torch.zeros(2, 3, dtype=torch.long)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="0..3, got values in 7..7"):
        d.q_probs(x + 7, t)
    with pytest.raises(ValueError, match="-1"):
        d.q_probs(x - 1, t)
    with pytest.raises(ValueError, match="0..10.*11"):            # q(x_0 | x_0) at t = 0 is fine
        d.q_probs(x, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="0..10, got values in -1..0"):
        d.q_probs(x, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="1..10, got values in 0..0"):
        d.loss_terms(x, x, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"shape \[B\] = \[2\]"):
        d.q_probs(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="shapes differ"):
        d.loss_terms(x, torch.zeros(2, 4, dtype=torch.long), t)
    with pytest.raises(ValueError, match="integer"):
        d.q_probs(x.float(), t)
    with pytest.raises(ValueError, match="steps must be in 1..10, got 11"):
        d.sample((1, 3), steps=11)
    with pytest.raises(ValueError, match="guidance"):
        d.sample((1, 3), guidance=-1)
    for kwargs, pattern in [(dict(num_classes=1), "2..256, got 1"), (dict(num_classes=300), "300"),
                            (dict(num_timesteps=0), "got 0"), (dict(transition="foo"), "foo"),
                            (dict(loss_type="bar"), "bar"), (dict(eps=-1), "-1")]:
        args = dict(x0_model=None, num_timesteps=T, num_classes=K, transition="uniform") | kwargs
        with pytest.raises(ValueError, match=pattern):
            D3PM(**args)


# ------------------------------------------------------------------- property-based tests

@pytest.mark.usefixtures("both_classes")
@settings(max_examples=25, deadline=None)
@given(K=st.integers(2, 12), T=st.integers(1, 12), transition=st.sampled_from(TRANSITIONS),
       shape=st.lists(st.integers(1, 3), min_size=0, max_size=3), seed=st.integers(0, 2**16),
       eps=st.sampled_from([0.0, 1e-6]), mask=st.booleans())
def test_invariants_over_random_configurations(K, T, transition, shape, seed, eps, mask):
    absorbing_state = "mask" if (mask and transition == "absorbing") else None
    g = torch.Generator().manual_seed(seed)
    B = 3
    d = D3PM(None, T, K, transition, eps=eps, absorbing_state=absorbing_state)
    S = d.num_states
    d.x0_model = lambda x, t, c: torch.randn(x.shape + (K,), generator=g)
    x_0 = torch.randint(0, K, (B, *shape), generator=g)
    t = torch.randint(1, T + 1, (B,), generator=g)
    q = d.q_probs(x_0, t)
    assert q.shape == x_0.shape + (S,)
    torch.testing.assert_close(q.sum(-1), torch.ones(x_0.shape), atol=1e-5, rtol=0)
    assert (q >= 0).all()
    x_t = d.q_sample(x_0, t, generator=g)
    assert x_t.shape == x_0.shape and 0 <= int(x_t.min()) and int(x_t.max()) < S
    # x_t is reachable from x_0: q(x_t | x_0) > 0
    assert (q.gather(-1, x_t.unsqueeze(-1)) > 0).all()
    post = torch.softmax(d.q_posterior_logits(x_0, x_t, t), -1)
    assert torch.isfinite(post).all()
    torch.testing.assert_close(post.sum(-1), torch.ones(x_0.shape), atol=1e-5, rtol=0)
    terms = d.loss_terms(x_0, x_t, t)
    for v in terms.values():
        assert v.shape == (B,) and torch.isfinite(v).all() and (v > -1e-5).all()
    assert torch.isfinite(d.prior_bpd(x_0)).all()
    s = d.sample((B, *shape), steps=max(1, T // 2), generator=g)
    assert s.shape == (B, *shape) and int(s.min()) >= 0 and int(s.max()) < K


# ------------------------------------------------------------------------ the runner

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small nets run faster, and reproducibly, on one thread


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "d3pm_runner.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, **kwargs)


def tiny_args(data_root, out, steps):
    return ["--data-root", str(data_root), "--out", str(out), "--num-classes", "2",
            "--num-timesteps", "10", "--model-channels", "8", "--batch-size", "8",
            "--train-steps", str(steps), "--checkpoint-every", "25", "--log-every", "25",
            "--eval-images", "2", "--num-samples", "10", "--sample-steps", "2", "--seed", "3",
            "--device", "cpu"]


def load_weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["step"], ckpt["model"], ckpt["ema"]


def test_resume_after_sigkill_is_bit_identical(fake_mnist, tmp_path):
    steps = 150
    ref = run_cli(tiny_args(fake_mnist, tmp_path / "ref", steps))
    assert ref.returncode == 0, ref.stderr[-2000:]
    # The same run, killed hard once a checkpoint past step 50 exists, then resumed.
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "d3pm_runner.py"),
                             *tiny_args(fake_mnist, out, steps)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, killed_at = out / "checkpoint.pt", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = torch.load(ckpt, weights_only=True)["step"]
            if step >= 50:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None and killed_at < steps, "the run was not killed mid-training"
    resumed = run_cli(tiny_args(fake_mnist, out, steps) + ["--resume", str(ckpt)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step_a, model_a, ema_a = load_weights(tmp_path / "ref" / "checkpoint.pt")
    step_b, model_b, ema_b = load_weights(ckpt)
    assert step_a == step_b == steps
    for a, b in ((model_a, model_b), (ema_a, ema_b)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs after kill + resume (killed at {killed_at})"


def test_sigterm_checkpoints_and_exits_with_one_line(fake_mnist, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "d3pm_runner.py"),
                             *tiny_args(fake_mnist, out, 100000)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    lines = [l for l in stdout.splitlines() if "SIGTERM" in l]
    assert len(lines) == 1 and "checkpoint saved at step" in lines[0]
    step = int(lines[0].split("at step ")[1].split()[0])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    assert "Traceback" not in stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    d3.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk died mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        d3.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(fake_mnist, tmp_path, monkeypatch,
                                                                capsys):
    """A network that returns NaN on chosen calls: isolated NaNs are skipped and counted; a long
    streak stops the run with a clear message and a checkpoint of the last good state."""
    calls = {"n": 0}
    nan_calls = set(range(5, 8)) | set(range(40, 200))
    original = d3.ConvNet.forward

    def flaky(self, x_t, t, cond=None):
        out = original(self, x_t, t, cond)
        calls["n"] += 1
        return out * float("nan") if calls["n"] in nan_calls and self.training else out

    monkeypatch.setattr(d3.ConvNet, "forward", flaky)
    cfg = d3.Config(data_root=str(fake_mnist), out=str(tmp_path / "run"), num_classes=2,
                    num_timesteps=10, model_channels=8, batch_size=8, train_steps=100,
                    checkpoint_every=10, log_every=10, eval_images=2, num_samples=10, device="cpu")
    with pytest.raises(FloatingPointError, match="20 non-finite steps in a row"):
        d3.train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["skipped_steps"] == 3 and all(r["loss"] == r["loss"] for r in rows)  # no NaN
    assert "warning: non-finite loss or gradient at step 5;" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 39 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.usefixtures("both_classes")
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_diffusion_math_stays_float32_under_bf16_autocast(transition):
    """The training loop runs the loss under bf16 autocast; only the network may drop to bf16.
    (The Gaussian's p̃ Q̄ product is a bmm, which autocast would otherwise run in bf16.)"""
    K, T = 256, 10
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 4, 4, K, generator=g)
    d = D3PM(lambda x, t, c: logits, T, K, transition)
    x_0 = torch.randint(0, K, (4, 1, 4, 4), generator=g)
    t = torch.tensor([1, 2, 5, 10])
    x_t = d.q_sample(x_0, t, generator=g)
    plain = d.loss_terms(x_0, x_t, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = d.loss_terms(x_0, x_t, t)
    for k in plain:
        assert auto[k].dtype == torch.float32
        torch.testing.assert_close(auto[k], plain[k], rtol=1e-6, atol=1e-6)
