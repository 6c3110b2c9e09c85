"""d3pm_fast.FastD3PM's overrides against the methods of d3pm_runner.D3PM they replace.

Run:  python -m pytest tests/test_fast_paths.py -q      (CPU, a few seconds)

  1. kl_and_ce: the closed form of uniform/absorbing (`_kl_closed_form`) and the fused Gaussian
     loss (`_kl_gaussian`) equal the parent's explicit KL and decoder NLL, values and
     gradients; the Gaussian one stays float32 under bf16 autocast and under
     torch.set_float32_matmul_precision("medium"); Q_t from its (T, K) tables
  2. q_sample without noise (exact draws: O(1) per pixel, or a binary search) follows q_probs
  3. reverse_step: the mixture sampler (`_step_mixture`), the Gaussian inverse-CDF step
     (`_step_gaussian`) and the parent's Gumbel-max step sample the same exact p_θ(x_s | x_t),
     one step and a strided jump (chi-square, per pixel, against the exact probabilities)

The parity, brute-force and goodness-of-fit tests of the other files run against both classes.
"""
import contextlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_fast  # noqa: E402
from d3pm_fast import FastD3PM, _draw_categorical  # noqa: E402
from d3pm_runner import D3PM  # noqa: E402

F64 = torch.float64
CONFIGS = [("uniform", None), ("absorbing", None), ("absorbing", "mask"), ("absorbing", 0)]
CONFIG_IDS = ["uniform", "absorbing", "absorbing_mask", "absorbing0"]


def chisquare_pvalue(samples, probs):
    """Pearson chi-square p-value of integer samples [N, P] against per-column probabilities
    probs [P, S] (float64), the P columns independent (statistics and dof add up). Cells of
    probability 0 must stay empty (else p = 0)."""
    samples, probs = samples.reshape(samples.shape[0], -1), probs.reshape(-1, probs.shape[-1])
    stat, df = torch.zeros((), dtype=F64), 0
    for col, p in zip(samples.T, probs):
        counts = torch.bincount(col, minlength=p.numel()).to(F64)
        zero = p <= 1e-15
        if counts[zero].sum() > 0:
            return 0.0
        expected = counts.sum() * p[~zero] / p[~zero].sum()
        stat = stat + ((counts[~zero] - expected) ** 2 / expected).sum()
        df += int((~zero).sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=F64), stat / 2))


class FixedLogits(torch.nn.Module):
    """x0_model whose logits depend only on the pixel position: logits (D, K) -> (B, 1, 1, D, K)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x_t, t, cond=None):
        return self.logits.expand(x_t.shape + (self.logits.shape[-1],))


# ======================================================================= 1. closed-form loss


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("K", [2, 5, 256])
@pytest.mark.parametrize("transition,absorbing_state", CONFIGS + [("gaussian", None)],
                         ids=CONFIG_IDS + ["gaussian"])
def test_closed_form_loss_equals_explicit_kl(transition, absorbing_state, K, eps):
    T, B, D = 20, 6, 12
    g = torch.Generator().manual_seed(K)
    model = FixedLogits(3 * torch.randn(B, 1, 1, D, K, generator=g))
    model.forward = lambda x_t, t, cond=None: model.logits      # one logit table per example
    d = FastD3PM(model, T, K, transition, absorbing_state=absorbing_state, eps=eps)
    ref = D3PM(model, T, K, transition, absorbing_state=absorbing_state, eps=eps)
    x_0 = torch.randint(0, K, (B, 1, 1, D), generator=g)
    t = torch.tensor([1, 2, 5, 10, 19, 20])
    x_t = d.q_sample(x_0, t, generator=g)
    if eps > 0:  # also x_t outside the support of q(x_t | x_0) (with eps = 0 the KL is +inf)
        x_t[-1, ..., :3] = torch.tensor([0, K - 1, d.num_states - 1])

    terms = d.loss_terms(x_0, x_t, t)
    grad = torch.autograd.grad(terms["loss"].sum(), model.logits)[0]

    # the parent's explicit KL of the (B, ..., S) distributions, -log p_θ(x_0 | x_1) at t = 1
    want = ref.loss_terms(x_0, x_t, t)
    want_grad = torch.autograd.grad(want["loss"].sum(), model.logits)[0]
    for name in ("vb", "ce", "loss"):
        torch.testing.assert_close(terms[name], want[name], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-4)
    assert bool(torch.isfinite(terms["loss"]).all())


def gaussian_case(seed, K=256, T=50, D=64):
    """A Gaussian D3PM whose 4 examples (t = 2, 10, 30, 50) have fixed random x̃_0 logits."""
    g = torch.Generator().manual_seed(seed)
    model = FixedLogits(2 * torch.randn(4, 1, 1, D, K, generator=g))
    model.forward = lambda x_t, t, cond=None: model.logits     # one logit table per example
    d = FastD3PM(model, T, K, "gaussian")
    x_0 = torch.randint(0, K, (4, 1, 1, D), generator=g)
    t = torch.tensor([2, 10, 30, 50])
    return d, model, x_0, d.q_sample(x_0, t, generator=g), t


def test_gaussian_loss_stays_float32_under_bf16_autocast(monkeypatch):
    """The fused Gaussian KL runs its p̃_θ Q̄ product in float32 even inside the training loop's
    bf16 autocast; without the guard (`exact_float32`) the bf16 product moves the KL."""
    d, model, x_0, x_t, t = gaussian_case(seed=0)
    kl = lambda: d._kl_gaussian(x_0, x_t, t, model.logits)[0]  # noqa: E731  per pixel, nats
    want = kl()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kl()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(d3pm_fast, "exact_float32", lambda device: contextlib.nullcontext())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unguarded = kl()
    assert (unguarded - want).abs().max() > 1e-3                 # the test can tell


# ==================================================================== 2. exact q_sample


@pytest.mark.parametrize("transition,absorbing_state", CONFIGS + [("gaussian", None)],
                         ids=CONFIG_IDS + ["gaussian"])
def test_q_sample_without_noise_follows_q_probs(transition, absorbing_state):
    K, T, N = 6, 10, 20000
    d = FastD3PM(None, T, K, transition, schedule=torch.linspace(0.1, 0.9, T, dtype=F64),
                 absorbing_state=absorbing_state)
    g = torch.Generator().manual_seed(3)
    for t in (1, 4, T):
        x_0 = torch.tensor([0, 2, K - 1]).repeat(N, 1).view(N, 1, 1, 3)
        tt = torch.full((N,), t)
        x_t = d.q_sample(x_0, tt, generator=g)
        p = chisquare_pvalue(x_t.view(N, 3), d.Q_bar_matrix(t)[[0, 2, K - 1]])
        assert p > 1e-3, (transition, t, p)
        # power: the same samples against q(x_t | x_0) at another t are rejected
        if t == 4:
            assert chisquare_pvalue(x_t.view(N, 3), d.Q_bar_matrix(2)[[0, 2, K - 1]]) < 1e-6


# ================================================================ 3. the mixture sampler


STEP_CASES = [(10, 9), (5, 4), (2, 1), (9, 3)]  # (t, s): single steps and a strided jump


@pytest.mark.parametrize("t,s", STEP_CASES, ids=[f"t{t}_s{s}" for t, s in STEP_CASES])
@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
def test_mixture_step_and_gumbel_step_sample_the_same_distribution(transition, absorbing_state, t, s):
    """The fast step and the parent's Gumbel-max step against the exact p_θ(x_s | x_t) ∝
    Σ_x̃0 q(x_s, x_t | x̃_0) p̃_θ(x̃_0 | x_t) (no eps floor, although the process has eps = 1e-6
    for its loss), per pixel, for pixels whose x_t is each possible state."""
    K, T, N = 4, 10, 20000
    g = torch.Generator().manual_seed(t * 10 + s)
    d = FastD3PM(None, T, K, transition, absorbing_state=absorbing_state,
                 schedule=torch.linspace(0.05, 0.5, T, dtype=F64))
    S = d.num_states
    D = S                                                     # pixel d has x_t = d
    d.x0_model = FixedLogits(torch.randn(D, K, generator=g) * 1.5)
    x_t = torch.arange(S).repeat(N, 1).view(N, 1, 1, D)
    tt, ss = torch.full((1,), t), torch.full((1,), s)
    with torch.no_grad():
        x0 = d.model_logits(x_t[:1], tt)
        exact = torch.softmax(d.q_posterior_logits(x0, x_t[:1], tt, ss, eps=0.0).double(), -1).view(D, S)
        fast, _ = d.reverse_step(x_t, t, s, generator=g)
        gumbel, _ = D3PM.reverse_step(d, x_t, t, s, generator=g)
        # power check below: the exact distribution of another step must be rejected
        other = torch.full((1,), 1 if s > 1 else 2)
        wrong = torch.softmax(d.q_posterior_logits(x0, x_t[:1], tt, other, eps=0.0).double(), -1).view(D, S)
    for name, x_s in (("mixture", fast), ("gumbel", gumbel)):
        p = chisquare_pvalue(x_s.view(N, D), exact)
        assert p > 1e-4, (name, p)  # 32 such checks in this file: 1e-4 keeps false alarms rare
    if (wrong - exact).abs().max() > 0.02:
        assert chisquare_pvalue(fast.view(N, D), wrong) < 1e-6


def test_sample_uses_the_mixture_step_and_p_sample_with_noise_does_not(monkeypatch):
    d = FastD3PM(FixedLogits(torch.zeros(3, 4)), 5, 4, "uniform")
    calls = []
    real = d._step_mixture
    monkeypatch.setattr(d, "_step_mixture", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    d.sample((2, 1, 1, 3), generator=torch.Generator().manual_seed(0))
    assert calls == [5, 4, 3, 2]                              # t = 1 is the argmax step
    calls.clear()
    d.p_sample(torch.zeros(2, 1, 1, 3, dtype=torch.long), 3, noise=torch.rand(2, 1, 1, 3, 4))
    d.sample((2, 1, 1, 3), guidance=1.0)
    assert calls == []


# ======================================================== 4. the Gaussian inverse-CDF step


@pytest.mark.parametrize("K", [3, 32, 256])
def test_draw_categorical_follows_its_probabilities(K):
    """The two-level inverse CDF (blocks of 16 classes, or one level when 16 does not divide K)
    against its own probabilities: tiny and zero ones included, rows not normalised."""
    N, R = 20000, 4
    g = torch.Generator().manual_seed(K)
    p = torch.softmax(3 * torch.randn(R, K, generator=g), -1) * torch.tensor([[1.0], [7.0], [1e-3], [1.0]])
    p[0, 1] = 0.0
    p[1, : min(16, K - 1)] = 0.0             # a whole block without mass
    p[2, -1] = 1e-9 * p[2].sum()             # tiny, after all the mass
    p[2, -2] = 0.3 * p[2].sum()
    x, total = _draw_categorical(p.repeat(N, 1), g)
    torch.testing.assert_close(total.view(N, R)[0], p.double().sum(-1))
    probs = p.double() / p.double().sum(-1, keepdim=True)
    assert chisquare_pvalue(x.view(N, R), probs) > 1e-4
    wrong = probs.roll(1, dims=-1)           # power: the same law shifted by one class
    assert chisquare_pvalue(x.view(N, R), wrong) < 1e-6


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("t,s", [(6, 5), (9, 3)], ids=["step", "jump"])
def test_gaussian_step_samples_p_theta(t, s, eps):
    """`_step_gaussian` and the parent's Gumbel-max step against the exact p_θ(x_s | x_t) ∝
    q(x_t | x_s) p̃_θ Q̄_s from explicit float64 matrices, whatever the loss's eps, K = 32 (two
    blocks of the two-level draw)."""
    K, T, N, D = 32, 10, 20000, 4
    g = torch.Generator().manual_seed(t * 10 + s)
    d = FastD3PM(None, T, K, "gaussian", eps=eps, schedule=torch.linspace(0.01, 0.1, T, dtype=F64))
    d.x0_model = FixedLogits(1.5 * torch.randn(D, K, generator=g))
    x_t = torch.tensor([0, 5, 16, K - 1]).repeat(N, 1).view(N, 1, 1, D)
    jump = torch.linalg.multi_dot([d.Q_matrix(r) for r in range(s + 1, t + 1)]) if t - s > 1 \
        else d.Q_matrix(t)                                                 # Q_{s→t}
    p0 = torch.softmax(d.x0_model.logits.detach().double(), -1)            # (D, K)
    fact2 = p0 @ d.Q_bar_matrix(s)
    want = jump[:, x_t[0, 0, 0]].T * fact2
    for step in (d.reverse_step, lambda *a, **k: D3PM.reverse_step(d, *a, **k)):
        x_s, _ = step(x_t, t, s, generator=g)
        assert chisquare_pvalue(x_s.view(N, D), want / want.sum(-1, keepdim=True)) > 1e-4
    # power: forgetting the factor q(x_t | x_s) is rejected (column vs row of the jump is
    # checked in test_process.py, where the schedule makes them differ enough to see)
    assert chisquare_pvalue(x_s.view(N, D), fact2 / fact2.sum(-1, keepdim=True)) < 1e-6


def test_draw_categorical_keeps_tiny_probabilities():
    """A class of relative mass 1e-9 after half of the mass is still reachable: a uniform inside
    its CDF interval returns it (a float32 running sum over all K would give it width 0)."""
    K = 64
    p = torch.zeros(3, K)
    p[:, 3], p[:, 40], p[:, 50] = 0.5, 1e-9, 0.5           # class 40 sits between the halves
    width = 1e-9 / (1.0 + 1e-9)
    u = torch.tensor([0.5 / (1 + 1e-9) + 0.5 * width, 0.25, 0.75], dtype=F64)
    x, _ = _draw_categorical(p, u=u)
    assert x.tolist() == [40, 3, 50]


def test_gaussian_Q_t_tables_rebuild_the_matrices_exactly():
    for K in (2, 3, 16, 255, 256):
        d = FastD3PM(None, 20, K, "gaussian", schedule=torch.linspace(1e-4, 1.0, 20, dtype=F64))
        t = torch.tensor([1, 2, 11, 20])
        for Q, tt in zip(d._Q_t(t), t.tolist()):
            assert torch.equal(Q, d.Q_matrix(tt).float()), (K, tt)


def test_gaussian_q_sample_with_different_t_in_one_batch():
    """The binary search reads each example's own Q̄_t (K = 17: not a power of two)."""
    K, T, N = 17, 10, 20000
    d = FastD3PM(None, T, K, "gaussian", schedule=torch.linspace(0.05, 0.9, T, dtype=F64))
    g = torch.Generator().manual_seed(5)
    ts = torch.tensor([1, 3, 10]).repeat(N)                  # examples alternate between 3 t
    x_0 = torch.tensor([0, 8, K - 1]).repeat(3 * N, 1).view(3 * N, 1, 1, 3)
    x_t = d.q_sample(x_0, ts, generator=g).view(N, 3, 3)       # [sample, t, pixel]
    for i, t in enumerate((1, 3, 10)):
        want = d.Q_bar_matrix(t)[[0, 8, K - 1]]
        assert chisquare_pvalue(x_t[:, i], want) > 1e-4, t
    assert chisquare_pvalue(x_t[:, 1], d.Q_bar_matrix(10)[[0, 8, K - 1]]) < 1e-6  # power


def test_gaussian_loss_gradient_and_matmul_precision_stay_float32(monkeypatch):
    """Gradients under bf16 autocast equal the float32 ones, and a process-wide
    torch.set_float32_matmul_precision("medium") (oneDNN then multiplies float32 in bf16 on
    CPUs that have it) does not reach the Gaussian product; the setting is restored after."""
    d, model, x_0, x_t, t = gaussian_case(seed=1)

    def grad():
        return torch.autograd.grad(d.loss_terms(x_0, x_t, t)["loss"].sum(), model.logits)[0]

    want = grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(grad(), want, atol=1e-7, rtol=1e-5)
    before = torch.get_float32_matmul_precision()
    try:
        a, b = torch.rand(64, 256), torch.rand(256, 256)
        exact = a @ b
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(grad(), want)                        # the guard restores "ieee"
        assert torch.get_float32_matmul_precision() == "medium"
        if not torch.equal(a @ b, exact):  # this CPU lowers float32 matmuls: the test can tell
            monkeypatch.setattr(d3pm_fast, "exact_float32", lambda device: contextlib.nullcontext())
            assert not torch.equal(grad(), want)
    finally:
        torch.set_float32_matmul_precision(before)


def test_gaussian_step_where_every_product_is_tiny():
    """x_t far from a confident x̃_0 prediction at small t: every product q(x_t | x_s) (p̃_θ Q̄_s)
    is below 1e-25 (down to ~1e-40: float32 products underflow, or flush to zero once
    tune_cpu() ran). The fast step redoes those pixels in float64 and samples the parent's law,
    its softmax of summed logs of the same float32 factors (without the redo, x_t = 23 fails)."""
    K, T, N = 32, 10, 20000
    d = FastD3PM(None, T, K, "gaussian", schedule=torch.linspace(0.002, 0.01, T, dtype=F64))
    logits = torch.full((3, K), -200.0)
    logits[:, 0] = 0.0                                          # p̃_θ = δ_0 in float32
    d.x0_model = FixedLogits(logits)
    x_t = torch.tensor([19, 22, 23]).repeat(N, 1).view(N, 1, 1, 3)
    t, s, tt, ss = 6, 5, torch.tensor([6]), torch.tensor([5])
    with torch.no_grad():
        totals = d.Q_matrix(t)[:, x_t[0, 0, 0]].T * (torch.softmax(logits.double(), -1) @ d.Q_bar_matrix(s))
        want = torch.softmax(d.q_posterior_logits(logits.view(1, 1, 1, 3, K), x_t[:1], tt, ss, eps=0.0)
                             .double(), -1).view(3, K)
    assert (totals.sum(-1) < 1e-25).all() and (totals.sum(-1) > 0).all()  # the case under test
    g = torch.Generator().manual_seed(4)
    for step in (d.reverse_step, lambda *a, **k: D3PM.reverse_step(d, *a, **k)):
        x_s, _ = step(x_t, t, s, generator=g)
        assert chisquare_pvalue(x_s.view(N, 3), want) > 1e-4
    assert chisquare_pvalue(x_s.view(N, 3), want.roll(1, -1)) < 1e-6     # power


@pytest.mark.parametrize("cls", [D3PM, FastD3PM], ids=["reference", "fast"])
@pytest.mark.parametrize("transition,absorbing_state", CONFIGS[:3] + [("gaussian", None)],
                         ids=CONFIG_IDS[:3] + ["gaussian"])
def test_every_uniform_that_q_sample_and_the_sampler_draw_is_float64(cls, transition, absorbing_state):
    """q_sample and every reverse step (one step and strided jumps) draw their uniforms in
    float64: a float32 uniform is a multiple of 2^-24, so its Gumbel noise never exceeds 16.6
    (classes 21 nats below the top are never drawn) and u < 1 - ᾱ_t fires with probability
    2^-24 however small 1 - ᾱ_t is. Too rare to see by sampling; here each call is recorded."""
    K, T = 5, 6
    d = cls(FixedLogits(torch.randn(3, K)), T, K, transition, absorbing_state=absorbing_state)
    dtypes, rand = [], torch.rand

    def recording_rand(*args, **kwargs):
        out = rand(*args, **kwargs)
        dtypes.append(out.dtype)
        return out

    g = torch.Generator().manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", recording_rand)
        x_0 = torch.randint(0, K, (4, 1, 1, 3), generator=g)
        d.q_sample(x_0, torch.tensor([1, 2, 4, 6]), generator=g)
        d.sample((4, 1, 1, 3), generator=g)
        d.sample((4, 1, 1, 3), steps=3, generator=g)
    assert len(dtypes) >= 2 and set(dtypes) == {torch.float64}, dtypes


@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
def test_closed_form_loss_at_the_edges_of_its_eps_and_schedule(transition, absorbing_state):
    """The closed form against the parent's explicit KL where its shortcuts are exposed:
    (1) β_1 = β_2 = 1e-7, eps = 0, t = 2 with x_t ≠ x_0 (absorbing: x_t = m): q(x_1 | x_2, x_0) splits its mass
    between x_0 and x_t in proportion to 1 - ᾱ_1, which float32 1 - ᾱ_1 gets 19 % wrong;
    (2) a large eps = 0.05, where the terms that only eps feeds (the "other" classes of the
    absorbing process) stop being negligible."""
    K, B, D = 5, 4, 6
    g = torch.Generator().manual_seed(11)
    model = FixedLogits(torch.randn(B, 1, 1, D, K, generator=g))
    model.forward = lambda x_t, t, cond=None: model.logits      # one logit table per example
    edges = [(torch.tensor([1e-7, 1e-7, 0.5, 0.5], dtype=F64), 0.0, torch.full((B,), 2)),
             (torch.linspace(0.05, 0.5, 4, dtype=F64), 0.05, torch.tensor([2, 3, 4, 4]))]
    for schedule, eps, t in edges:
        kw = dict(schedule=schedule, absorbing_state=absorbing_state, eps=eps)
        d, ref = FastD3PM(model, 4, K, transition, **kw), D3PM(model, 4, K, transition, **kw)
        x_0 = torch.randint(0, K, (B, 1, 1, D), generator=g)
        x_t = (x_0 + 1 + torch.randint(0, K - 1, x_0.shape, generator=g)) % K  # ≠ x_0
        if transition == "absorbing":                              # q reaches only x_0 and m
            x_t.fill_(d.absorbing_state)
        with torch.no_grad():
            got, want = d.loss_terms(x_0, x_t, t), ref.loss_terms(x_0, x_t, t)
        torch.testing.assert_close(got["vb"], want["vb"], atol=1e-5, rtol=1e-4)
        assert float(want["vb"].min()) > 0.01                       # the KL is not negligible


def test_draw_categorical_keeps_a_tiny_probability_beside_a_large_one_in_its_block():
    """Inside one block of 16 the running sum is float64 too: class 4 (1e-9) right after class
    3 (0.5) keeps its CDF interval (a float32 sum 0.5 + 1e-9 = 0.5 would give it width 0)."""
    K = 64
    p = torch.zeros(2, K)
    p[:, 3], p[:, 4], p[:, 50] = 0.5, 1e-9, 0.5
    width = 1e-9 / (1.0 + 1e-9)
    u = torch.tensor([0.5 / (1 + 1e-9) + 0.5 * width, 0.75], dtype=F64)
    x, _ = _draw_categorical(p, u=u)
    assert x.tolist() == [4, 50]


def test_gaussian_step_where_every_float32_product_underflows():
    """K = 256, x_t = 0, p̃_θ = δ_194, β = 0.01: fact1_j = Q_2[j, 0] and fact2_j = Q_1[194, j] are
    both ~1e-26 where they overlap (j ≈ 97), so every float32 product fact1_j fact2_j is 0. The
    step still samples the exact law ∝ fact1 fact2 (float64), centred on 97, like the parent."""
    K, N = 256, 4000
    logits = torch.full((1, K), -1e4)
    logits[0, 194] = 0.0
    d = FastD3PM(FixedLogits(logits), 2, K, "gaussian", schedule=torch.tensor([0.01, 0.01], dtype=F64))
    want = d.Q_matrix(2)[:, 0] * d.Q_matrix(1)[194]
    assert float(want.max()) < 1e-45                                # underflows float32
    x_t = torch.zeros(N, 1, 1, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(4)
    for step in (d.reverse_step, lambda *a, **k: D3PM.reverse_step(d, *a, **k)):
        x_s, _ = step(x_t, 2, 1, generator=g)
        assert chisquare_pvalue(x_s.view(N, 1), (want / want.sum()).view(1, K)) > 1e-4


def test_gaussian_step_when_the_prediction_excludes_every_state_that_reaches_x_t():
    """K = 256, β = 0.005, x_t = 0, p̃_θ = δ_255: in float32, fact1 = Q_2[:, 0] > 0 only for
    j < 92 and fact2 = Q_1[255] > 0 only for j > 163, so every product is 0 even in float64.
    The step then follows fact1 (it stays where x_t can be reached from), never fact2."""
    K, N = 256, 2000
    logits = torch.full((1, K), -1e4)
    logits[0, 255] = 0.0
    d = FastD3PM(FixedLogits(logits), 2, K, "gaussian", schedule=torch.tensor([0.005, 0.005], dtype=F64))
    fact1 = d.Q_matrix(2)[:, 0].float().double()
    assert float((fact1 * d.Q_matrix(1)[255].float().double()).max()) == 0.0
    x_s, _ = d.reverse_step(torch.zeros(N, 1, 1, 1, dtype=torch.long), 2, 1,
                            generator=torch.Generator().manual_seed(8))
    assert chisquare_pvalue(x_s.view(N, 1), (fact1 / fact1.sum()).view(1, K)) > 1e-4


def test_guided_gaussian_step_is_the_fast_one_and_samples_the_parents_law(monkeypatch):
    """A guided Gaussian step at K = 32 runs `_step_gaussian` (not the parent's Gumbel-max step)
    and samples the parent's tilted law p_c^{1+w} p_u^{-w}: both laws are computed here from the
    parent's own guided logits, one step and a strided jump."""
    K, T, N, D, w = 32, 10, 20000, 4, 1.5
    g = torch.Generator().manual_seed(3)
    cond_logits, null_logits = 1.5 * torch.randn(2, D, K, generator=g)
    model = lambda x_t, t, cond=None: (null_logits if cond is None else cond_logits).expand(  # noqa: E731
        x_t.shape + (K,))
    d = FastD3PM(model, T, K, "gaussian", schedule=torch.linspace(0.01, 0.1, T, dtype=F64))
    x_t = torch.tensor([0, 5, 16, K - 1]).repeat(N, 1).view(N, 1, 1, D)
    labels = torch.zeros(N, dtype=torch.long)
    calls = []
    real = d._step_gaussian
    monkeypatch.setattr(d, "_step_gaussian", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    for t, s in ((6, 5), (9, 3)):
        x_s, x0 = d.reverse_step(x_t[:1], t, s, labels[:1], guidance=w)
        _, x0_parent = D3PM.reverse_step(d, x_t[:1], t, s, labels[:1], guidance=w)
        assert torch.allclose(x0, x0_parent)
        # the tilted law from explicit float64 matrices
        tilted = []
        for z in (cond_logits, null_logits):
            law = d.Q_matrix(t, s)[:, x_t[0, 0, 0]].T * (torch.softmax(z.double(), -1) @ d.Q_bar_matrix(s))
            tilted.append(law / law.sum(-1, keepdim=True))
        want = tilted[0] ** (1 + w) * tilted[1] ** (-w)
        x_s, _ = d.reverse_step(x_t, t, s, labels, guidance=w, generator=g)
        assert chisquare_pvalue(x_s.view(N, D), want / want.sum(-1, keepdim=True)) > 1e-4
        assert chisquare_pvalue(x_s.view(N, D), tilted[0]) < 1e-6    # power: the unguided law
    assert calls == [6, 6, 9, 9]


def exact_logistic_probs(loc, log_scale, K, eps):
    """The parent's p̃ = softmax(logistic_logits) in float64 from its definition: bin k gets
    σ(u_k) - σ(l_k) + eps σ(u_k) (the official log1p form, exponentiated), normalised."""
    c = torch.linspace(-1, 1, K, dtype=F64)
    inv = torch.exp(2 - log_scale.double().clamp(-20, 20)).unsqueeze(-1)
    u = torch.sigmoid(inv * (c - loc.double().unsqueeze(-1) + 1 / (K - 1)))
    lo = torch.sigmoid(inv * (c - loc.double().unsqueeze(-1) - 1 / (K - 1)))
    w = u - lo + eps * u
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("K", [2, 16, 256])
def test_logistic_logits_from_shared_edges_equal_the_parents(K):
    """FastD3PM.logistic_logits (K + 1 shared edges, hand-written backward) against the parent's:
    the laws within the parent's own float32 error of the exact float64 law, and the gradients
    to loc and log_scale of a loss on the log-law, inside and outside log_scale's clamp."""
    g = torch.Generator().manual_seed(K)
    loc = torch.rand(3, 1, 4, 5, generator=g) * 2 - 1
    log_scale = torch.randn(3, 1, 4, 5, generator=g) * 3
    loc[0, 0, 0, :4] = torch.tensor([-0.999, 0.999, -1.0, 1.0])
    log_scale[0, 0, 1, :4] = torch.tensor([-25.0, 25.0, -19.5, 8.0])     # beyond the clamp, near
    weight = torch.randn(3, 1, 4, 5, K, generator=g)
    out = {}
    for cls in (D3PM, FastD3PM):
        d = cls(None, 10, K, "gaussian", model_output="logistic")
        loc_, ls_ = loc.clone().requires_grad_(), log_scale.clone().requires_grad_()
        log_p = torch.log_softmax(d.logistic_logits(loc_, ls_), -1)
        (log_p.clamp_min(-50) * weight).sum().backward()
        out[cls] = log_p.detach().exp(), loc_.grad, ls_.grad
    want = exact_logistic_probs(loc, log_scale, K, 1e-6)
    parent_err = (out[D3PM][0].double() - want).abs().max()
    fast_err = (out[FastD3PM][0].double() - want).abs().max()
    assert fast_err <= max(2 * parent_err, 1e-6), (fast_err, parent_err)
    for a, b in zip(out[D3PM][1:], out[FastD3PM][1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert out[FastD3PM][2][0, 0, 1, :2].abs().max() == 0               # clamped: no gradient
    assert out[FastD3PM][1].abs().amax() > 0 and out[FastD3PM][2].abs().amax() > 0


def test_logistic_logits_with_eps_zero_are_the_parents():
    """eps = 0 (log 0 where a bin's mass underflows) is left to the parent."""
    d = FastD3PM(None, 10, 16, "gaussian", model_output="logistic", eps=0.0)
    loc, log_scale = torch.tensor([[0.3, -0.9]]), torch.tensor([[-6.0, 1.0]])
    assert torch.equal(d.logistic_logits(loc, log_scale), D3PM.logistic_logits(d, loc, log_scale))


@pytest.mark.parametrize("case", ["positive", "zeros"])
def test_draw_guided_samples_guide_of_the_two_laws(case):
    """FastD3PM._draw_guided (log fact1 + (1+w) log fact2_c - w log fact2_u, drawn) against
    softmax(guide(log p_c, log p_u, w)) of the parent, per pixel, at K = 6; with zeros: a state
    fact1 rules out, one only p_u rules out (guide keeps log p_c there: the row is redone), one
    both rule out, and a row that p_c rules out entirely where p_u does not."""
    from d3pm_runner import guide, log_or_zero
    K, N, w = 6, 40000, 1.5
    g = torch.Generator().manual_seed(5)
    fact1 = torch.rand(K, K, generator=g, dtype=F64).float() + 0.2
    f2c = torch.softmax(0.5 * torch.randn(4, K, generator=g), -1)
    f2u = torch.softmax(0.5 * torch.randn(4, K, generator=g), -1)
    x_t = torch.tensor([0, 2, 3, 5])
    if case == "zeros":
        fact1[2, 1] = 0.0                    # row of pixel 1 (x_t = 2): state 1 unreachable
        f2u[0, 4] = 0.0                      # pixel 0: only p_u excludes state 4
        f2c[2, 3], f2u[2, 3] = 0.0, 0.0      # pixel 2: both exclude state 3
        f2c[3, :3] = 0.0                     # pixel 3: p_c excludes states 0..2
    log_c = torch.log_softmax(log_or_zero(fact1[x_t]) + log_or_zero(f2c), -1)
    log_u = torch.log_softmax(log_or_zero(fact1[x_t]) + log_or_zero(f2u), -1)
    want = torch.softmax(guide(log_c, log_u, w).double(), -1)
    reps = lambda v: v.repeat(N // 4, 1)  # noqa: E731
    x_s = FastD3PM._draw_guided(fact1, x_t.repeat(N // 4), reps(f2c), reps(f2u), w, g)
    assert chisquare_pvalue(x_s.view(N // 4, 4), want) > 1e-4
    if case == "zeros":
        assert want[0, 4] > 0.01 and want[1, 1] == 0 and want[2, 3] == 0 and want[3, :3].sum() == 0


def test_tune_cpu_makes_every_worker_thread_flush_denormals():
    """After tune_cpu(), an elementwise op split over the OpenMP threads flushes denormal inputs
    to zero in every thread, also when the thread pool existed before (torch's own
    set_flush_denormal reaches only the calling thread: half of the 4 M products stay denormal
    with two threads). Run in a fresh process."""
    import subprocess
    code = (
        "import torch, sys\n"
        "if torch.get_num_threads() < 2: torch.set_num_threads(2)\n"
        "torch.ones(1 << 22).mul_(2)\n"                     # the pool exists before the setting
        "if not torch.set_flush_denormal(True): print('unsupported'); sys.exit()\n"
        "torch.set_flush_denormal(False)\n"
        "from d3pm_fast import tune_cpu\n"
        "tune_cpu()\n"
        "x = torch.full((1 << 22,), 1000, dtype=torch.int32).view(torch.float32)\n"  # 1.4e-42
        "print(int(((x * 3.0).view(torch.int32) != 0).sum()))\n")   # bits: DAZ would hide them
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "unsupported":
        pytest.skip("this CPU has no denormal flushing (torch.set_flush_denormal returns False)")
    assert out.stdout.strip() == "0", f"{out.stdout.strip()} denormals survived in some thread"
