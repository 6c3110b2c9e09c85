"""The GPU path run on the CPU: bf16 autocast, torch.compile, fused AdamW, logs without a
terminal, and scripts/gpu_check.sh (D3PM, Austin et al. 2021, arXiv:2107.03006).

    python -m pytest tests/test_gpu_path.py -q            # all (CPU, about a minute)
    python -m pytest -k "compile or bf16" -q              # the bf16 and compile tests alone
    D3PM_TEST_DEVICE=cuda python -m pytest tests/test_gpu_path.py   # the same on a GPU

Sections: bf16 autocast | torch.compile | fused AdamW | logs without a terminal | the GPU check.
Tests that take the `device` fixture (tests/conftest.py) run on $D3PM_TEST_DEVICE, the CPU when
it is unset; scripts/gpu_check.sh runs them on CUDA.
"""

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_runner as R  # noqa: E402
from dit import dit_from_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, T = 4, 10
TRANSITIONS = ("uniform", "absorbing", "gaussian")


def tiny_process(network, transition, output, device):
    """(d3pm, net) seeded: a tiny ConvNet on (B, 1, 8, 8) or DiT-T/2 on (B, 3, 8, 8) images."""
    torch.manual_seed(0)
    mask = transition == "absorbing"
    S = K + mask
    if network == "ConvNet":
        net = R.ConvNet(S, K, 1, 10, ch=8, num_timesteps=T, output=output)
    else:
        net = dit_from_name(network, in_channels=3, num_states=S, num_classes=K, num_labels=10,
                            num_timesteps=T, output=output)
    d3pm = R.D3PM(net, T, K, transition, model_output=output,
                  absorbing_state="mask" if mask else None)
    return d3pm.to(device), net


def tiny_batch(network, device, B=4):
    """(x_0, y): images in 0..K-1 and labels, seeded."""
    g = torch.Generator().manual_seed(1)
    C = 1 if network == "ConvNet" else 3
    x_0 = torch.randint(0, K, (B, C, 8, 8), generator=g)
    return x_0.to(device), torch.randint(0, 10, (B,), generator=g).to(device)


def tiny_run(data_root, out, **overrides):
    """A tiny MNIST training run's config: 6 steps of batch 16 on the fake MNIST."""
    return R.Config(**{**dict(data_root=data_root, num_timesteps=T, model_channels=8, batch_size=16,
                              train_steps=6, log_every=3, warmup_steps=1, eval_images=4,
                              num_samples=10, sample_steps=3, out=str(out), device="cpu"),
                       **overrides})


# ------------------------------------------------------------------------------ bf16 autocast

def test_bf16_precision_flag_chooses_the_autocast():
    """--precision: auto is bf16 on CUDA and float32 on the CPU (the default); bf16 is honoured
    on the CPU too."""
    cpu = torch.device("cpu")
    assert R.Config().precision == "auto"
    assert isinstance(R.autocast_for(cpu, "auto"), nullcontext)
    assert isinstance(R.autocast_for(cpu, "fp32"), nullcontext)
    bf16 = R.autocast_for(cpu, "bf16")
    assert (bf16.device, bf16.fast_dtype) == ("cpu", torch.bfloat16)
    with warnings.catch_warnings():  # without CUDA, torch warns that it disables the context
        warnings.simplefilter("ignore")
        cuda = R.autocast_for(torch.device("cuda"), "auto")
    assert (cuda.device, cuda.fast_dtype) == ("cuda", torch.bfloat16)
    assert isinstance(R.autocast_for(torch.device("cuda"), "fp32"), nullcontext)
    for ok in ("auto", "bf16", "fp32"):
        R.validate_config(R.Config(precision=ok))
    with pytest.raises(R.UsageError, match="--precision"):
        R.validate_config(R.Config(precision="fp16"))


@pytest.mark.parametrize("output", ["logits", "logistic"])
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_bf16_loss_terms_stay_float32(transition, output, device):
    """Under the training loop's bf16 autocast the network computes in bf16, while every loss
    term (loss, vb, ce) and the gradient reaching the float32 weights stay float32, finite, and
    within bf16 rounding of the float32 run."""
    d3pm, net = tiny_process("ConvNet", transition, output, device)
    x_0, y = tiny_batch("ConvNet", device)
    t = torch.tensor([1, 3, 6, T], device=device)
    x_t = d3pm.q_sample(x_0, t)
    plain = d3pm.loss_terms(x_0, x_t, t, y)
    seen = []
    hook = net.conv_out.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with R.autocast_for(device, "bf16"):
        auto = d3pm.loss_terms(x_0, x_t, t, y)
    hook.remove()
    assert seen == [torch.bfloat16]                        # the network did run in bf16
    for name in ("loss", "vb", "ce"):
        assert auto[name].dtype == torch.float32, name
        assert torch.isfinite(auto[name]).all(), name
        torch.testing.assert_close(auto[name], plain[name], rtol=0.05, atol=0.01, msg=name)
    auto["loss"].mean().backward()
    for p in net.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_bf16_training_run_is_finite(fake_mnist, tmp_path, device, monkeypatch):
    """`--precision bf16`: every network call of a short run (training, sampling, NLL) is under
    bf16 autocast, on the CPU too, and the losses, the test NLL and the weights are finite."""
    autocast = []
    forward = R.ConvNet.forward

    def recording(self, x_t, t, cond=None):
        autocast.append((torch.is_autocast_enabled(device.type),
                         torch.get_autocast_dtype(device.type)))
        return forward(self, x_t, t, cond)

    monkeypatch.setattr(R.ConvNet, "forward", recording)
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):  # train() turns TF32 on
        monkeypatch.setattr(backend, "allow_tf32", backend.allow_tf32)   # for this test only
    cfg = tiny_run(fake_mnist, tmp_path, precision="bf16", device=device.type)
    result = R.train(cfg, log=lambda *a: None)
    assert len(autocast) > cfg.train_steps
    assert set(autocast) == {(True, torch.bfloat16)}
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [3, 6]
    assert all(math.isfinite(r[k]) for r in rows if "loss" in r for k in ("loss", "vb_bpd", "ce_bpd"))
    assert math.isfinite(result["nll_bpd"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["config"]["precision"] == "bf16"


# ------------------------------------------------------------------------------ torch.compile

@pytest.fixture
def fresh_dynamo():
    """Compiled graphs and counters from other tests neither help nor hide a recompilation."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_backend(network, step, device):
    """Inductor (train()'s backend) on CUDA, and on the CPU for DiT-T/2's training step. On the
    2-core CPU inductor's C++ build of one graph takes 20-60 s from a cold cache (seconds from a
    warm one), so the CPU runs the other graphs aot_eager: the same Dynamo graph and AOTAutograd
    forward and backward, with eager kernels."""
    inductor = device.type == "cuda" or (network == "DiT-T/2" and step == "training")
    return "inductor" if inductor else "aot_eager"


@pytest.mark.parametrize("network, transition, output", [("ConvNet", "absorbing", "logits"),
                                                         ("DiT-T/2", "gaussian", "logistic")])
def test_compile_training_and_sampling_steps_match_eager(network, transition, output, device,
                                                         fresh_dynamo):
    """Two training steps (loss, backward, fused AdamW) and one sampling step of the compiled
    network give the eager numbers; the network compiles once for training, not again at the
    second step, and once for sampling (no_grad)."""
    eager, eager_net = tiny_process(network, transition, output, device)
    compiled, net = tiny_process(network, transition, output, device)
    counters = {step: torch._dynamo.testing.CompileCounterWithBackend(
        compile_backend(network, step, device)) for step in ("training", "sampling")}
    x_0, y = tiny_batch(network, device)
    results = []
    for d3pm, weights in ((eager, eager_net), (compiled, net)):
        if d3pm is compiled:
            d3pm.x0_model = torch.compile(net, backend=counters["training"])
        opt = torch.optim.AdamW(weights.parameters(), lr=1e-4, fused=True)
        losses = []
        for step in range(2):
            torch.manual_seed(10 + step)               # the same t and x_t in both runs
            loss, _ = d3pm(x_0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        grads = [p.grad for p in weights.parameters()]
        if d3pm is compiled:
            d3pm.x0_model = torch.compile(net, backend=counters["sampling"])
        with torch.no_grad():
            t = torch.full_like(y, T // 2)
            x_t = d3pm.q_sample(x_0, t, generator=torch.Generator(device).manual_seed(3))
            p_logits = d3pm.p_logits(x_t, t, y)
            x_prev = d3pm.p_sample(x_t, T // 2, y, generator=torch.Generator(device).manual_seed(4))
        results.append((torch.stack(losses), grads, p_logits, x_prev))
    (loss_a, grads_a, logits_a, x_a), (loss_b, grads_b, logits_b, x_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-4)
    # A draw flips only where a uniform falls within float rounding of a boundary.
    assert (x_a == x_b).float().mean() > 0.99
    assert counters["training"].frame_count == counters["sampling"].frame_count == 1


def test_compile_flag_trains_without_recompiling(fake_mnist, tmp_path, monkeypatch, fresh_dynamo):
    """`--compile` in train(): the training network is compiled, once, at the first of 6 steps
    (labels, t and x_t change every step, shapes do not), and the run trains and samples."""
    counter = torch._dynamo.testing.CompileCounter()   # counts compiled frames; runs them eagerly
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    result = R.train(tiny_run(fake_mnist, tmp_path, compile=True), log=lambda *a: None)
    assert result["step"] == 6 and math.isfinite(result["nll_bpd"])
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------ fused AdamW

def test_fused_adamw_step_equals_the_plain_one(device):
    """train() uses AdamW(fused=True) on the CPU as on CUDA: one step equals the for-loop one."""
    nets = [tiny_process("ConvNet", "uniform", "logits", device)[1] for _ in range(2)]
    before = [p.detach().clone() for p in nets[0].parameters()]
    x_0, y = tiny_batch("ConvNet", device)
    t = torch.full_like(y, T // 2)
    for net, fused in zip(nets, (True, False)):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, fused=fused,
                                foreach=None if fused else False)
        net(x_0, t, y).square().mean().backward()
        opt.step()
    for a, b, old in zip(nets[0].parameters(), nets[1].parameters(), before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, old)                       # every weight took a step


# ------------------------------------------------------------------------------ logs

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_redraws_only_on_a_terminal(terminal, monkeypatch):
    """A training bar with a sampling bar nested inside: on a terminal tqdm redraws in place;
    in a log every update is a plain line, with no carriage return or cursor movement."""
    stream = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = R._progress(None, True, total=4, desc="training")
    for step in range(4):
        bar.update(1)
        if step == 1:
            bar.set_postfix(loss="0.5")
            for _ in R._progress(range(3), True, desc="sampling"):
                pass
    bar.close()
    text = stream.getvalue()
    if terminal:
        assert "\r" in text
        return
    assert "\r" not in text and "\x1b[" not in text
    lines = text.splitlines()
    assert lines[0].startswith("training:   0%") and lines[-1].startswith("training: 100%")
    assert any(line.startswith("sampling: 100%") for line in lines)
    assert "2/4" in lines[1] and "loss=0.5" in lines[1]        # set_postfix writes a line


def test_training_log_without_a_terminal_has_plain_lines(fake_mnist, tmp_path):
    """`python d3pm_runner.py ... 2> log`: the training bar, the sample grids drawn during
    training (nested bars) and the test bounds write plain lines: no "\\r", no escape codes."""
    cfg = tiny_run(fake_mnist, tmp_path, eval_every=3)
    defaults = dataclasses.asdict(R.Config())
    flags = [a for name, v in dataclasses.asdict(cfg).items() if v != defaults[name]
             for a in ("--" + name.replace("_", "-"), str(v))]
    with open(tmp_path / "stderr.log", "w+") as err:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "d3pm_runner.py"), *flags],
                           stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        err.seek(0)
        log = err.read()
    assert r.returncode == 0, log[-2000:]
    assert "\r" not in log and "\x1b[" not in log
    lines = log.splitlines()
    assert any(line.startswith("training: 100%") for line in lines)
    assert any(line.startswith("sampling: 100%") for line in lines)         # at step 3 and at the end
    assert any(line.startswith("nll_bpd (batches): 100%") for line in lines)


# ------------------------------------------------------------------------------ the GPU check

def run_gpu_check(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU, ever
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    r = run_gpu_check()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "no GPU is visible" in lines[0], r.stdout


def test_gpu_check_dry_run_lists_its_stages():
    r = run_gpu_check("--dry-run")
    assert r.returncode == 0, r.stderr
    for stage in ("install", "tests on CUDA", "bench.py --device cuda", "CIFAR-10 shape",
                  "python d3pm_runner.py", "torchrun"):
        assert stage in r.stdout, (stage, r.stdout)
