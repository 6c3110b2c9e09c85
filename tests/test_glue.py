"""Behaviour tests of the glue around the D3PM math in d3pm_runner.py: the loss, the sampler and
the training loop (issue 11, point 6).

Run:  python -m pytest tests/test_glue.py -q      (CPU, one thread, well under a minute)

The math itself has its own tests (official parity, brute-force Bayes); here each test checks
what one piece of glue does, through the public API only, so that it fails when that piece is
wrong whatever the line that breaks it:
  1. the training loss: which t it trains on (uniform over 1..T, both ends), the x_t it feeds
     the network (q(x_t | x_0) for that t), the labels, L_0 at t = 1, the KL at t > 1, the
     hybrid weight, the batch mean, the prior term L_T, the full bound (every t exactly once)
  2. the sampler: x_T from the stationary law, the grid of timesteps and the t and labels each
     network call gets, one step of p_sample and of sample against p_θ, the last step's argmax,
     and the direction and exact law of classifier-free guidance
  3. the training loop, run through train() on a 16-image toy with a tiny recording network:
     label dropout, gradient clipping, the gradient Adam receives, warm-up, weight decay, the
     EMA recursion, which weights sample and evaluate, the data order, augmentation, the
     evaluation images, and the logged means.
One test fails on the main before the guidance fix of issue 11, point 1 (guidance must tilt the
eps-free p_θ): test_guidance_never_changes_a_decoded_absorbing_pixel. Every other test passes
before and after it.
"""
import json
import math
import os
import signal
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_runner as R  # noqa: E402

F64 = torch.float64
LN2 = math.log(2.0)


def chisquare_pvalue(samples, probs):
    """Pearson goodness of fit of integer `samples` to `probs` [n] (float64). A sample in a cell
    of probability 0 gives p = 0."""
    probs = probs.to(F64) / probs.sum()
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).to(F64)
    assert counts.numel() == probs.numel(), "samples outside the cells"
    zero = probs <= 1e-12
    if counts[zero].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[~zero]
    stat = ((counts[~zero] - expected) ** 2 / expected).sum()
    df = int((~zero).sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=F64), stat / 2))


def test_chisquare_helper_has_power():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    x = torch.multinomial(p, 20000, replacement=True, generator=g)
    assert chisquare_pvalue(x, p) > 1e-3
    assert chisquare_pvalue(x, torch.tensor([0.22, 0.3, 0.48], dtype=F64)) < 1e-3


class TableModel:
    """A fixed x̃_0 predictor: logits from a random table indexed by (t, x_t, label), where
    label num_labels (or cond=None) is the null class. Records every call."""

    def __init__(self, S, K, T, num_labels=3, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.table = scale * torch.randn(T + 1, S, num_labels + 1, K, generator=g)
        self.num_labels, self.calls = num_labels, []

    def __call__(self, x_t, t, cond=None):
        self.calls.append({"x_t": x_t.clone(), "t": t.clone(),
                           "cond": None if cond is None else cond.clone()})
        c = torch.full_like(t, self.num_labels) if cond is None else cond
        view = (-1,) + (1,) * (x_t.dim() - 1)
        return self.table[t.view(view), x_t, c.view(view)]


def process(transition="uniform", K=4, T=5, model=None, eps=1e-6, schedule=None, **kw):
    S = K + 1 if kw.get("absorbing_state") == "mask" else K
    return R.D3PM(model or TableModel(S, K, T), T, K, transition, schedule=schedule, eps=eps, **kw)


def img(x):
    return x.reshape(x.shape[0], 1, 1, -1)


# ================================================================================================
# 1. The training loss
# ================================================================================================

def test_forward_trains_on_every_t_from_1_to_T_uniformly():
    """forward() draws one t per example, uniform on 1..T: both ends included."""
    K, T, B = 3, 6, 6000
    model = TableModel(K, K, T)
    d3pm = process(K=K, T=T, model=model)
    torch.manual_seed(0)
    d3pm.forward(torch.randint(0, K, (B, 1, 1, 2)))
    t = torch.cat([c["t"] for c in model.calls])
    assert t.shape == (B,)
    assert int(t.min()) == 1 and int(t.max()) == T, (int(t.min()), int(t.max()))
    assert chisquare_pvalue(t - 1, torch.ones(T, dtype=F64)) > 1e-4


@pytest.mark.parametrize("transition,absorbing_state", [("uniform", None), ("absorbing", "mask")])
def test_forward_feeds_x_t_from_q_of_the_same_t(transition, absorbing_state):
    """The x_t the network sees with step t follows q(x_t | x_0) = row x_0 of Q̄_t (not Q̄_{t-1}),
    and forward passes the labels through unchanged."""
    K, T, B = 4, 4, 8000
    schedule = torch.tensor([0.15, 0.3, 0.45, 0.6], dtype=F64)
    S = K + 1 if absorbing_state == "mask" else K
    model = TableModel(S, K, T)
    d3pm = process(transition, K=K, T=T, model=model, schedule=schedule,
                   absorbing_state=absorbing_state)
    x_0 = torch.full((B, 1, 1, 3), 2, dtype=torch.long)
    labels = torch.arange(B) % 3
    torch.manual_seed(1)
    d3pm.forward(x_0, labels)
    (call,) = model.calls
    assert torch.equal(call["cond"], labels)
    for t in range(1, T + 1):
        x_t = call["x_t"][call["t"] == t]
        assert len(x_t) > 1000
        assert chisquare_pvalue(x_t, d3pm.Q_bar_matrix(t)[2]) > 1e-4, t


@pytest.mark.parametrize("loss_type", ["hybrid", "vb", "ce"])
def test_forward_is_the_batch_mean_of_loss_terms_at_the_drawn_t(loss_type):
    """forward() = mean over the batch of loss_terms at the (t, x_t) it drew; info holds the
    batch means of vb and ce; the loss is differentiable."""
    K, T, B = 4, 5, 7
    model = TableModel(K, K, T)
    model.table.requires_grad_(True)
    d3pm = process(K=K, T=T, model=model, loss_type=loss_type, hybrid_coeff=0.3)
    x_0 = torch.randint(0, K, (B, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    labels = torch.arange(B) % 3
    torch.manual_seed(2)
    loss, info = d3pm.forward(x_0, labels)
    call = model.calls[0]
    terms = d3pm.loss_terms(x_0, call["x_t"], call["t"], labels)
    assert loss.dim() == 0 and loss.requires_grad
    torch.testing.assert_close(loss, terms["loss"].mean())
    torch.testing.assert_close(info["vb"], terms["vb"].mean())
    torch.testing.assert_close(info["ce"], terms["ce"].mean())


def _kl_by_hand(d3pm, x_0, x_t, t, cond=None):
    """KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) per example, bits/dim, from the public
    posterior and p_θ logits."""
    log_q = F.log_softmax(d3pm.q_posterior_logits(x_0, x_t, t).double(), -1)
    log_p = F.log_softmax(d3pm.p_logits(x_t, t, cond).double(), -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.reshape(len(x_0), -1).mean(1) / LN2


@pytest.mark.parametrize("transition,absorbing_state", [("uniform", None), ("absorbing", None),
                                                        ("gaussian", None)])
def test_loss_terms_are_L0_at_t1_and_the_kl_elsewhere_with_the_hybrid_weight(transition,
                                                                             absorbing_state):
    """vb at t = 1 is L_0 = -log p̃_θ(x_0 | x_1) (mean over pixels, bits); at t > 1 the KL
    between the posterior and p_θ; ce is -log p̃_θ(x_0 | x_t) at every t; the hybrid loss is
    vb + λ ce (eq. 5)."""
    K, T, B = 4, 5, 10
    model = TableModel(K, K, T, scale=2.0)
    d3pm = process(transition, K=K, T=T, model=model, eps=0.0, hybrid_coeff=0.3,
                   schedule=torch.linspace(0.2, 0.5, T, dtype=F64), absorbing_state=absorbing_state)
    g = torch.Generator().manual_seed(4)
    x_0 = torch.randint(0, K, (B, 1, 2, 3), generator=g)
    t = torch.tensor([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    labels = torch.arange(B) % 4          # 3 is the null label
    x_t = d3pm.q_sample(x_0, t, generator=g)
    terms = d3pm.loss_terms(x_0, x_t, t, labels)
    logits = model(x_t, t, labels)
    ce = -F.log_softmax(logits.double(), -1).gather(-1, x_0.unsqueeze(-1)).squeeze(-1)
    ce = ce.reshape(B, -1).mean(1) / LN2
    kl = _kl_by_hand(d3pm, x_0, x_t, t, labels)
    want_vb = torch.where(t == 1, ce, kl)
    torch.testing.assert_close(terms["ce"].double(), ce, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(terms["vb"].double(), want_vb, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(terms["loss"].double(), want_vb + 0.3 * ce, atol=2e-5, rtol=2e-5)
    for loss_type, want in (("vb", want_vb), ("ce", ce)):   # L_vb alone, the x_0 CE alone
        alone = process(transition, K=K, T=T, model=model, eps=0.0, loss_type=loss_type,
                        schedule=torch.linspace(0.2, 0.5, T, dtype=F64),
                        absorbing_state=absorbing_state)
        torch.testing.assert_close(alone.loss_terms(x_0, x_t, t, labels)["loss"].double(), want,
                                   atol=2e-5, rtol=2e-5)
    assert bool((kl[t > 1] > 1e-3).all()) and bool((want_vb - ce).abs()[t > 1].min() > 1e-3)


@pytest.mark.parametrize("transition,absorbing_state", [("uniform", None), ("absorbing", 1),
                                                        ("absorbing", "mask"), ("gaussian", None)])
def test_prior_bpd_is_the_kl_from_q_x_T_to_the_stationary_law(transition, absorbing_state):
    """L_T = KL(q(x_T | x_0) ‖ p(x_T)) per example in bits/dim, q(x_T|x_0) = row x_0 of Q̄_T and
    p(x_T) the stationary law (uniform, or the absorbing state), each log floored at eps as
    everywhere in the code (with p(x_T) = δ_m the exact KL is infinite)."""
    K, T, B, eps = 4, 3, 5, 1e-6
    schedule = torch.tensor([0.2, 0.3, 0.4], dtype=F64)   # far from mixed: L_T is large
    d3pm = process(transition, K=K, T=T, schedule=schedule, eps=eps,
                   absorbing_state=absorbing_state)
    S = d3pm.Q_bar_matrix(T).shape[0]
    if transition == "absorbing":
        stationary = F.one_hot(torch.tensor(K if absorbing_state == "mask" else absorbing_state),
                               S).to(F64)
    else:
        stationary = torch.full((S,), 1.0 / S, dtype=F64)
    x_0 = torch.randint(0, K, (B, 1, 2, 2), generator=torch.Generator().manual_seed(5))
    q = d3pm.Q_bar_matrix(T)[x_0]                                        # (B, 1, 2, 2, S)
    kl = (q * ((q + eps).log() - (stationary + eps).log())).sum(-1)
    want = kl.reshape(B, -1).mean(1) / LN2
    got = d3pm.prior_bpd(x_0).double()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(want.min()) > 0.05


def test_full_bound_uses_every_t_once_and_adds_the_prior():
    """nll_bpd = Σ_{t=1..T} L_{t-1} + L_T: every t exactly once per image, the term at t taken
    at x_t (row t-1 of x_t_per_t), plus prior_bpd."""
    K, T, B = 4, 6, 3
    model = TableModel(K, K, T)
    d3pm = process(K=K, T=T, model=model, schedule=torch.linspace(0.1, 0.4, T, dtype=F64))
    g = torch.Generator().manual_seed(6)
    x_0 = torch.randint(0, K, (B, 1, 2, 2), generator=g)
    labels = torch.tensor([0, 2, 1])
    x_t_per_t = torch.stack([d3pm.q_sample(x_0, torch.full((B,), t), generator=g)
                             for t in range(1, T + 1)])
    nll = d3pm.nll_bpd(x_0, labels, x_t_per_t=x_t_per_t, batch_size=2 * B)
    t_seen = torch.cat([c["t"] for c in model.calls])
    assert sorted(t_seen.tolist()) == sorted(list(range(1, T + 1)) * B)
    assert all(torch.equal(c["cond"], labels.repeat(len(c["t"]) // B)) for c in model.calls)
    want = sum(d3pm.vb_terms_bpd(x_0, x_t_per_t[t - 1], torch.full((B,), t), labels)
               for t in range(1, T + 1)) + d3pm.prior_bpd(x_0)
    torch.testing.assert_close(nll, want, atol=1e-5, rtol=1e-5)
    terms = d3pm.nll_bpd_terms(x_0, labels, x_t_per_t=x_t_per_t)
    assert terms.shape == (B, T)
    torch.testing.assert_close(nll, terms.sum(1) + d3pm.prior_bpd(x_0), atol=1e-5, rtol=1e-5)
    assert float(d3pm.prior_bpd(x_0).min()) > 0.01   # the prior is not negligible here


def test_nll_estimate_is_unbiased_over_its_random_timesteps():
    """With every x_t fixed (x_t_per_t), the only randomness of nll_bpd_estimate is which
    timesteps it evaluates; its mean over many draws is the full bound, and over those draws it
    evaluates every t in 1..T, num_t distinct ones per call."""
    K, T, B, num_t, draws = 4, 8, 2, 4, 300
    model = TableModel(K, K, T, scale=2.0)
    d3pm = process(K=K, T=T, model=model, schedule=torch.linspace(0.1, 0.5, T, dtype=F64))
    g = torch.Generator().manual_seed(18)
    x_0 = torch.randint(0, K, (B, 1, 2, 2), generator=g)
    x_t_per_t = torch.stack([d3pm.q_sample(x_0, torch.full((B,), t), generator=g)
                             for t in range(1, T + 1)])
    full = d3pm.nll_bpd(x_0, x_t_per_t=x_t_per_t).double()
    estimates, seen = [], set()
    for seed in range(draws):
        model.calls.clear()
        est, _ = d3pm.nll_bpd_estimate(x_0, num_t=num_t, x_t_per_t=x_t_per_t,
                                       generator=torch.Generator().manual_seed(seed))
        ts = torch.cat([c["t"].view(-1, B)[:, 0] for c in model.calls]).tolist()
        assert len(set(ts)) == num_t and set(ts) <= set(range(1, T + 1)), ts
        seen.update(ts)
        estimates.append(est.double())
    assert seen == set(range(1, T + 1))
    estimates = torch.stack(estimates)
    stderr = estimates.std(0) / math.sqrt(draws)
    assert bool((stderr > 0).all())
    assert bool(((estimates.mean(0) - full).abs() < 4 * stderr + 1e-6).all()), (estimates.mean(0), full, stderr)
    est, _ = d3pm.nll_bpd_estimate(x_0, num_t=T, x_t_per_t=x_t_per_t)
    torch.testing.assert_close(est.double(), full, atol=1e-5, rtol=1e-5)


# ================================================================================================
# 2. The sampler
# ================================================================================================

@pytest.mark.parametrize("transition,absorbing_state", [("uniform", None), ("absorbing", "mask"),
                                                        ("absorbing", None), ("gaussian", None)])
def test_sampler_starts_from_the_stationary_law(transition, absorbing_state):
    K, T, N = 4, 3, 4000
    d3pm = process(transition, K=K, T=T, absorbing_state=absorbing_state)
    _, traj = d3pm.sample((N, 1, 1, 1), generator=torch.Generator().manual_seed(7),
                          return_trajectory=True)
    x_T = traj["x_t"][0].flatten()
    S = K + 1 if absorbing_state == "mask" else K
    if transition == "absorbing":
        m = K if absorbing_state == "mask" else K // 2
        assert bool((x_T == m).all())
    else:
        assert chisquare_pvalue(x_T, torch.ones(S, dtype=F64)) > 1e-4


@pytest.mark.parametrize("steps", [None, 1, 3, 4, 7])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_sampler_visits_its_grid_and_calls_the_network_with_each_t_and_label(steps, guidance):
    """t runs T..1 strictly decreasing in `steps` steps (T if None); each step calls the network
    once with that t and the requested labels, and with guidance once more without them; the
    trajectory holds the states before each step and the output, and the x̃_0 argmax."""
    K, T, B = 4, 7, 6
    model = TableModel(K, K, T)
    d3pm = process(K=K, T=T, model=model)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out, traj = d3pm.sample((B, 1, 2, 2), labels, steps=steps, guidance=guidance,
                            generator=torch.Generator().manual_seed(8), return_trajectory=True)
    n = T if steps is None else steps
    grid = traj["t"].tolist()
    assert len(grid) == n and grid[0] == T and (grid[-1] == 1 or n == 1)
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert traj["x_t"].shape == (n + 1, B, 1, 2, 2) and traj["x0_pred"].shape == (n, B, 1, 2, 2)
    assert torch.equal(traj["x_t"][-1], out)
    # Group the network's calls by their t (one t per call); a step may batch its conditional
    # and unconditional halves into one call or make two.
    assert all(bool((c["t"] == c["t"][0]).all()) for c in model.calls)
    assert sorted({int(c["t"][0]) for c in model.calls}, reverse=True) == grid
    for i, t in enumerate(grid):
        calls = [c for c in model.calls if int(c["t"][0]) == t]
        x_rows = torch.cat([c["x_t"] for c in calls])
        cond = torch.cat([torch.full((len(c["t"]),), 3) if c["cond"] is None else c["cond"]
                          for c in calls])
        real = cond < 3
        assert torch.equal(cond[real], labels) and torch.equal(x_rows[real], traj["x_t"][i])
        # with guidance the unconditional prediction: cond None or the null label 3
        assert int((~real).sum()) == (B if guidance > 0 else 0)
        assert torch.equal(x_rows[~real], traj["x_t"][i][:int((~real).sum())])
        # x̃_0 prediction: argmax of the network's logits at this step; with guidance, of the
        # tilted (1+w) log p̃(·|c) - w log p̃(·|∅)
        logits = F.log_softmax(model.table[t, traj["x_t"][i], labels.view(-1, 1, 1, 1)], -1)
        if guidance > 0:
            uncond = F.log_softmax(model.table[t, traj["x_t"][i], 3], -1)
            logits = (1 + guidance) * logits - guidance * uncond
        assert torch.equal(traj["x0_pred"][i], logits.argmax(-1))


@pytest.mark.parametrize("transition", ["uniform", "absorbing", "gaussian"])
def test_last_step_returns_the_argmax_of_the_x0_prediction(transition):
    """At t = 1 the sampler outputs an argmax, with no noise: of p̃_θ(x_0 | x_1) (the official
    code's p_θ(x_0 | x_1)) or of eq. 4's p̃_θ(x_0 | x_1) Q_1[x_0, x_1]; either is accepted."""
    K, T, B = 5, 2, 300
    model = TableModel(K, K, T, scale=0.3)   # small logits: sampling would rarely hit argmax
    d3pm = process(transition, K=K, T=T, model=model)
    x_1 = torch.randint(0, K, (B, 1, 1, 4), generator=torch.Generator().manual_seed(9))
    labels = torch.arange(B) % 3

    def argmaxes(d):
        logits = d.x0_model.table[1, x_1, labels.view(-1, 1, 1, 1)]
        log_Q1 = d.Q_matrix(1).clamp_min(1e-30).log().float()          # [x_0, x_1]
        return logits.argmax(-1), (logits + log_Q1.T[x_1]).argmax(-1)

    for seed in (0, 1):
        got = d3pm.p_sample(x_1, 1, labels, generator=torch.Generator().manual_seed(seed))
        assert any(torch.equal(got, want) for want in argmaxes(d3pm)), seed
    d3pm_T1 = process(transition, K=K, T=1, model=TableModel(K, K, 1, scale=0.3))
    out = d3pm_T1.sample((B, 1, 1, 4), labels, generator=torch.Generator().manual_seed(2),
                         x_init=x_1)
    assert any(torch.equal(out, want) for want in argmaxes(d3pm_T1))


@pytest.mark.parametrize("transition,absorbing_state", [("uniform", None), ("absorbing", "mask"),
                                                        ("gaussian", None)])
@pytest.mark.parametrize("t", [2, 4])
def test_one_reverse_step_follows_p_theta_of_its_t(transition, absorbing_state, t):
    """p_sample(x_t, t) and the first step of sample() both draw x_{t-1} ~ p_θ(· | x_t) at that t
    (eq. 4; eps = 0, where the sampler is exact)."""
    K, T, N = 4, 4, 12000
    S = K + 1 if absorbing_state == "mask" else K
    model = TableModel(S, K, T, scale=1.5)
    d3pm = process(transition, K=K, T=T, model=model, eps=0.0, absorbing_state=absorbing_state,
                   schedule=torch.linspace(0.3, 0.6, T, dtype=F64))
    x_t = torch.full((N, 1, 1, 1), K if absorbing_state == "mask" else 1, dtype=torch.long)
    for lab in (0, 2):
        cond = torch.full((N,), lab)
        p = torch.softmax(d3pm.p_logits(x_t[:1], torch.tensor([t]), cond[:1]).double(), -1)
        x_s = d3pm.p_sample(x_t, t, cond, generator=torch.Generator().manual_seed(10 + lab))
        assert chisquare_pvalue(x_s, p.flatten()) > 1e-4, (lab, "p_sample")
    if t == T:
        _, traj = d3pm.sample(x_t.shape, cond, generator=torch.Generator().manual_seed(11),
                              return_trajectory=True, x_init=x_t)
        assert chisquare_pvalue(traj["x_t"][1], p.flatten()) > 1e-4, "sample"


# ----------------------------------------------------------------------- classifier-free guidance

class TwoPredictions:
    """p̃(x̃_0 | x_t, c) for any real label, another p̃(x̃_0 | x_t, ∅) for cond=None or the null
    label (index num_labels), the same at every t and pixel."""

    def __init__(self, p_cond, p_uncond, num_labels=3):
        self.log_c = torch.tensor(p_cond, dtype=F64).log().float()
        self.log_u = torch.tensor(p_uncond, dtype=F64).log().float()
        self.num_labels, self.calls = num_labels, []

    def __call__(self, x_t, t, cond=None):
        self.calls.append(cond)
        uncond = torch.ones(x_t.shape[0], dtype=torch.bool) if cond is None else cond == self.num_labels
        logits = torch.where(uncond.view(-1, *[1] * x_t.dim()), self.log_u, self.log_c)
        return logits.expand(x_t.shape + (len(self.log_c),)).clone()


def _guided_first_step(p_cond, p_uncond, w, N=20000, K=3, T=3, x_T=1, seed=12):
    """x_{T-1} after the first guided step of sample() from x_T, and the eps-free conditional and
    unconditional laws p_θ(x_{T-1} | x_T) of that step."""
    model = TwoPredictions(p_cond, p_uncond)
    kw = dict(K=K, T=T, model=model, schedule=torch.tensor([0.3, 0.4, 0.5], dtype=F64))
    d3pm, exact = process(**kw), process(**kw, eps=0.0)
    x_init = torch.full((N, 1, 1, 1), x_T, dtype=torch.long)
    cond = torch.zeros(N, dtype=torch.long)
    _, traj = d3pm.sample(x_init.shape, cond, guidance=w, return_trajectory=True, x_init=x_init,
                          generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([T])
    p_c = torch.softmax(exact.p_logits(x_init[:1], t, cond[:1]).double(), -1).flatten()
    p_u = torch.softmax(exact.p_logits(x_init[:1], t, None).double(), -1).flatten()
    return traj["x_t"][1].flatten(), p_c, p_u


P_COND, P_UNCOND = [0.7, 0.2, 0.1], [0.15, 0.25, 0.6]


def test_guidance_moves_samples_towards_the_conditional_and_away_from_the_unconditional():
    """The class the conditional prediction favours (0) gains probability as w grows, the one
    the unconditional favours (2) loses it. All probabilities here are > 0.01, so the eps floor
    plays no part: this holds before and after the guidance fix of issue 11."""
    freq = []
    for w in (0.0, 1.0, 3.0):
        x, p_c, p_u = _guided_first_step(P_COND, P_UNCOND, w)
        freq.append(torch.bincount(x, minlength=3).double() / len(x))
    assert float(p_c[0]) > float(p_u[0]) and float(p_c[2]) < float(p_u[2])
    assert float(freq[0][0]) + 0.03 < float(freq[1][0]) and float(freq[1][0]) + 0.03 < float(freq[2][0])
    assert float(freq[0][2]) > float(freq[1][2]) + 0.01 > float(freq[2][2]) + 0.01


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("same", [False, True], ids=["differ", "identical"])
def test_guided_step_samples_the_tilted_law(w, same):
    """One guided step samples ∝ p_c^{1+w} p_u^{-w}, with p_c, p_u the step's eps-free p_θ given
    the label and without it; identical predictions give the unguided law at every w. All
    probabilities are > 0.01 (the eps floor is invisible), so this passes before and after the
    guidance fix of issue 11."""
    x, p_c, p_u = _guided_first_step(P_COND, P_COND if same else P_UNCOND, w, seed=13)
    assert float(torch.cat([p_c, p_u]).min()) > 0.01
    want = p_c ** (1 + w) * p_u ** (-w)
    assert chisquare_pvalue(x, want) > 1e-4, (w, torch.bincount(x, minlength=3) / len(x), want / want.sum())
    if not same and w > 0:   # power: the unguided law and the w-only tilt are rejected
        assert chisquare_pvalue(x, p_c) < 1e-6
        assert chisquare_pvalue(x, p_c ** w * p_u ** (-w)) < 1e-6


def test_guided_last_step_is_the_argmax_of_the_tilted_x0_prediction():
    """At t = 1 the output is argmax of (1+w) log p̃_c - w log p̃_u: for these predictions 0 at
    w = 0 and 1 at w = 2 (the flipped sign would give 2)."""
    K, B = 3, 8
    model = TwoPredictions([0.5, 0.4, 0.1], [0.6, 0.1, 0.3])
    d3pm = process(K=K, T=1, model=model)
    x_1 = torch.randint(0, K, (B, 1, 1, 2), generator=torch.Generator().manual_seed(14))
    cond = torch.ones(B, dtype=torch.long)
    for w, want in [(0.0, 0), (2.0, 1)]:
        out = d3pm.sample(x_1.shape, cond, guidance=w, x_init=x_1,
                          generator=torch.Generator().manual_seed(15))
        assert bool((out == want).all()), (w, out.flatten().tolist())


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_guidance_never_changes_a_decoded_absorbing_pixel(w):
    """Fails on the pre-fix main (issue 11, point 1): guidance must tilt the eps-free p_θ, under
    which a decoded pixel of the absorbing process stays as it is with probability one. Here
    p̃(·|c) = (·, 0.9, 0.1, ·) and p̃(·|∅) ≈ δ_1 at a decoded pixel x_t = 1 (K = 4, [MASK] = 4),
    checked on every step x_t -> x_{t-1} with t > 1."""
    K, T, N = 4, 10, 3000
    model = TwoPredictions([1e-4, 0.9, 0.1, 1e-4], [1e-4, 1 - 3e-4, 1e-4, 1e-4])
    d3pm = process("absorbing", K=K, T=T, model=model, absorbing_state="mask",
                   schedule=torch.linspace(0.1, 0.5, T, dtype=F64))   # β_T < 1: x_T may be decoded
    x_init = torch.where(torch.arange(N) % 2 == 0, 1, K).view(N, 1, 1, 1)
    _, traj = d3pm.sample(x_init.shape, torch.zeros(N, dtype=torch.long), guidance=w,
                          return_trajectory=True, x_init=x_init,
                          generator=torch.Generator().manual_seed(16))
    states = traj["x_t"][:-1].flatten(1)     # (T, N): x_T .. x_1 (the step to x_0 takes the
    decoded = states[:-1] != K               # argmax of the tilted p̃, which may differ)
    changed = decoded & (states[1:] != states[:-1])
    assert int(changed.sum()) == 0, f"{int(changed.sum())} decoded pixels changed value"


# ================================================================================================
# 3. The training loop, through train() on a toy: 16 training and 12 test "images" of 2 x 2
#    pixels, K = 4, whose pixels spell the image's id in base 4 (train ids 0..15, test ids
#    100..111; label = id % 3), and a tiny network that records every call it gets.
# ================================================================================================

K_TOY, NUM_LABELS = 4, 3
TRAIN_IDS, TEST_IDS = torch.arange(16), torch.arange(100, 112)
DIGITS = torch.tensor([64, 16, 4, 1])


def encode(ids):
    return torch.stack([(ids // d) % K_TOY for d in DIGITS], 1).view(-1, 1, 2, 2)


def decode(x):
    return (x.reshape(len(x), 4) * DIGITS).sum(1)


def toy_data(cfg):
    return R.Data(encode(TRAIN_IDS), TRAIN_IDS % NUM_LABELS, encode(TEST_IDS), TEST_IDS % NUM_LABELS,
                  num_labels=NUM_LABELS)


class Recorder(list):
    """A list shared by a network and its deep copies (the EMA)."""

    def __deepcopy__(self, memo):
        return self


class TinyNet(nn.Module):
    """logits = scale (W_pix[x_t] + W_lab[label] + t/T w_t): label num_labels (or None) is the
    null class. `idle` gets an exactly zero gradient, so only weight decay moves it. Each call is
    recorded with the weights it ran with and whether gradients were on (training)."""

    def __init__(self, cfg, data, recorder, scale=1.0):
        super().__init__()
        K, S = cfg.num_classes, cfg.num_classes + (cfg.transition == "absorbing"
                                                   and cfg.absorbing_state == "mask")
        self.T, self.K, self.num_labels, self.scale = cfg.num_timesteps, K, data.num_labels, scale
        self.pixel = nn.Parameter(0.5 * torch.randn(S, K))
        self.label = nn.Parameter(0.5 * torch.randn(data.num_labels + 1, K))
        self.time = nn.Parameter(0.5 * torch.randn(K))
        self.idle = nn.Parameter(torch.ones(3))
        self.recorder = recorder

    def forward(self, x_t, t, cond=None):
        B = x_t.shape[0]
        if cond is None:
            cond = torch.full((B,), self.num_labels, dtype=torch.long)
        self.recorder.append({"net": self, "train": torch.is_grad_enabled(), "x_t": x_t.clone(),
                              "t": t.clone(), "cond": cond.clone(),
                              "params": {n: p.detach().clone() for n, p in self.named_parameters()}})
        view = (B,) + (1,) * (x_t.dim() - 1) + (self.K,)
        logits = (self.pixel[x_t] + self.label[cond].view(view)
                  + (t.float() / self.T).view(view[:-1] + (1,)) * self.time + 0.0 * self.idle.sum())
        return self.scale * logits


class ToyRun:
    """What one train() run did: the network calls, the d3pm calls (forward, sample,
    nll_bpd_terms, nll_bpd), the initial weights, the checkpoint and the metrics."""

    def __init__(self, cfg, result, calls, d3pm_calls, nets):
        self.cfg, self.result, self.calls, self.d3pm = cfg, result, calls, d3pm_calls
        self.net = nets[0]
        self.train_calls = [c for c in calls if c["train"]]
        self.ckpt = torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True)
        with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
            self.rows = [json.loads(line) for line in f]

    def ema_params(self):
        ema = self.ckpt["ema"]
        return {n: ema[k] for n in self.ckpt["model"] for k in ema if k.endswith("module." + n)}


def toy_config(out, **overrides):
    values = dict(dataset="mnist", num_classes=K_TOY, num_timesteps=4, transition="uniform",
                  batch_size=4, train_steps=4, lr=0.05, warmup_steps=1, grad_clip=1e6,
                  weight_decay=0.0, ema_decay=0.7, label_dropout=0.0, log_every=1, eval_every=0,
                  checkpoint_every=1000, num_samples=3, sample_steps=0, guidance=0.0,
                  eval_images=5, out=str(out), device="cpu", seed=0)
    values.update(overrides)
    return R.Config(**values)


def run_toy(monkeypatch, out, data=toy_data, scale=1.0, **overrides):
    """train() on the toy with a recording network and a d3pm whose public methods record their
    calls. Returns a ToyRun."""
    cfg = toy_config(out, **overrides)
    calls, nets, d3pm_calls = Recorder(), [], {"forward": [], "sample": [], "terms": [], "nll": []}
    real_build_d3pm = R.build_d3pm

    def build_model(cfg, data):
        nets.append(TinyNet(cfg, data, calls, scale))
        return nets[-1]

    def build_d3pm(cfg, net, *args, **kwargs):
        d3pm = real_build_d3pm(cfg, net, *args, **kwargs)
        forward, sample = d3pm.forward, d3pm.sample
        terms, nll = d3pm.nll_bpd_terms, d3pm.nll_bpd

        def forward_spy(x_0, cond=None):
            loss, info = forward(x_0, cond)
            d3pm_calls["forward"].append({"x_0": x_0.clone(), "cond": None if cond is None else cond.clone(),
                                          "loss": float(loss.detach()), "vb": float(info["vb"]),
                                          "ce": float(info["ce"])})
            return loss, info

        def sample_spy(shape, cond=None, steps=None, *args, **kwargs):
            d3pm_calls["sample"].append({"net": d3pm.x0_model, "shape": tuple(shape), "cond": cond,
                                         "steps": steps, "guidance": kwargs.get("guidance", 0.0)})
            return sample(shape, cond, steps, *args, **kwargs)

        def terms_spy(x_0, cond=None, *args, **kwargs):
            d3pm_calls["terms"].append({"net": d3pm.x0_model, "x_0": x_0.clone(), "cond": cond})
            return terms(x_0, cond, *args, **kwargs)

        def nll_spy(x_0, cond=None, **kwargs):
            out = nll(x_0, cond, **kwargs)
            d3pm_calls["nll"].append({"x_0": x_0.clone(), "cond": cond, "out": out.clone()})
            return out

        d3pm.forward, d3pm.sample, d3pm.nll_bpd_terms, d3pm.nll_bpd = forward_spy, sample_spy, terms_spy, nll_spy
        return d3pm

    monkeypatch.setattr(R, "build_d3pm", build_d3pm)
    result = R.train(cfg, build_data=data, build_model=build_model, log=lambda *a, **k: None)
    monkeypatch.setattr(R, "build_d3pm", real_build_d3pm)
    return ToyRun(cfg, result, calls, d3pm_calls, nets)


def same(a, b):
    """Two sets of weights agree (to float32 rounding of the EMA arithmetic)."""
    return all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate(monkeypatch, tmp_path, rate):
    """Each training label becomes the null label (num_labels) with probability label_dropout,
    independently; every other label is the image's own. The network gets those labels."""
    run = run_toy(monkeypatch, tmp_path, label_dropout=rate, batch_size=16, train_steps=50,
                  log_every=50)
    fwd = run.d3pm["forward"]
    assert len(fwd) == 50 and len(run.train_calls) == 50
    x_0, cond = torch.cat([f["x_0"] for f in fwd]), torch.cat([f["cond"] for f in fwd])
    true = decode(x_0) % NUM_LABELS
    dropped = cond == NUM_LABELS
    assert torch.equal(cond[~dropped], true[~dropped])
    frac = float(dropped.double().mean())                  # 800 labels: sd 0.016 at rate 0.3
    assert abs(frac - rate) < 0.065, frac
    for f, c in zip(fwd, run.train_calls):
        assert torch.equal(c["cond"], f["cond"])


def test_each_epoch_shows_every_training_image_once_in_a_new_order(monkeypatch, tmp_path):
    run = run_toy(monkeypatch, tmp_path, train_steps=8, batch_size=4, log_every=8)
    ids = [decode(f["x_0"]) for f in run.d3pm["forward"]]
    epochs = [torch.cat(ids[:4]), torch.cat(ids[4:])]
    for e in epochs:
        assert sorted(e.tolist()) == TRAIN_IDS.tolist()
    assert not torch.equal(epochs[0], epochs[1])


def test_batch_indices_cover_each_epoch_and_change_order_across_epochs():
    n, bs = 12, 4
    for seed in (0, 3):
        epochs = [torch.cat([R.batch_indices(e * 3 + i, n, bs, seed) for i in range(3)])
                  for e in range(3)]
        for e in epochs:
            assert sorted(e.tolist()) == list(range(n))
        assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
        assert torch.equal(R.batch_indices(4, n, bs, seed), R.batch_indices(4, n, bs, seed))
    assert not torch.equal(R.batch_indices(0, n, bs, 0), R.batch_indices(0, n, bs, 3))
    # an epoch that does not divide: no index twice within it
    e = torch.cat([R.batch_indices(i, 10, 3, 0) for i in range(3)])
    assert len(set(e.tolist())) == 9
    # a batch larger than the data set holds every index
    assert set(R.batch_indices(0, 5, 12, 0).tolist()) == set(range(5))


def test_augment_is_applied_to_each_batch_with_its_step(monkeypatch, tmp_path):
    class ShiftedData(R.Data):
        def augment(self, x, step):
            return (x + step) % K_TOY

    def data(cfg):
        d = toy_data(cfg)
        return ShiftedData(d.train_x, d.train_y, d.test_x, d.test_y, d.num_labels)

    run = run_toy(monkeypatch, tmp_path, data=data, train_steps=5, log_every=5)
    for step, f in enumerate(run.d3pm["forward"]):
        idx = R.batch_indices(step, 16, 4, 0)
        assert torch.equal(f["x_0"], (encode(TRAIN_IDS[idx]) + step) % K_TOY), step


def _loss_grad(run, call, fwd):
    """The gradient of the batch-mean loss at the weights, (t, x_t) and labels of one training
    step, recomputed on a fresh copy of the network."""
    net = TinyNet(run.cfg, toy_data(run.cfg), Recorder(), run.net.scale)
    net.load_state_dict(call["params"])
    d3pm = R.build_d3pm(run.cfg, net)
    loss = d3pm.loss_terms(fwd["x_0"], call["x_t"], call["t"], fwd["cond"])["loss"].mean()
    torch.testing.assert_close(float(loss.detach()), fwd["loss"], rtol=1e-5, atol=1e-6)
    return dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))


@pytest.mark.parametrize("grad_clip", [0.01, 1e6])
def test_adam_receives_the_clipped_gradient_of_the_batch_loss(monkeypatch, tmp_path, grad_clip):
    """After two steps Adam's first moment is (1-β1)(β1 g_1 + g_2), g_k the gradient of the
    step's batch-mean loss scaled to global norm <= grad_clip (fresh at each step), and the
    optimizer has counted two steps."""
    run = run_toy(monkeypatch, tmp_path, scale=30.0, train_steps=2, grad_clip=grad_clip,
                  label_dropout=0.3)
    names = list(run.ckpt["model"])
    clipped = []
    for call, fwd in zip(run.train_calls, run.d3pm["forward"]):
        g = _loss_grad(run, call, fwd)
        norm = float(torch.sqrt(sum((v ** 2).sum() for v in g.values())))
        if grad_clip < 1:
            assert norm > 4 * grad_clip   # the clip does bite
        clipped.append({n: v * min(1.0, grad_clip / (norm + 1e-6)) for n, v in g.items()})
    state, beta1 = run.ckpt["optimizer"]["state"], run.ckpt["optimizer"]["param_groups"][0]["betas"][0]
    for i, n in enumerate(names):
        want = (1 - beta1) * (beta1 * clipped[0][n] + clipped[1][n])
        torch.testing.assert_close(state[i]["exp_avg"], want, rtol=1e-4, atol=1e-7)
        assert float(state[i]["step"]) == 2


def test_warmup_scales_the_learning_rate_of_each_step(monkeypatch, tmp_path):
    """lr at step s (0-based) is lr min(1, (s+1)/warmup): the first Adam step moves each
    weight by lr/warmup, and the logged lr after k steps is that of step k."""
    lr, W = 0.05, 4
    run = run_toy(monkeypatch, tmp_path, lr=lr, warmup_steps=W, train_steps=6)
    logged = [r["lr"] for r in run.rows if "lr" in r]
    assert logged == pytest.approx([lr * min(1.0, (k + 1) / W) for k in range(1, 7)], rel=1e-6)
    w0, w1 = run.train_calls[0]["params"], run.train_calls[1]["params"]
    moved = (w1["pixel"] - w0["pixel"]).abs()
    assert float(moved.max()) == pytest.approx(lr / W, rel=1e-3)
    assert float(moved.min()) > 0.9 * lr / W   # every entry has a gradient here


def test_resumed_run_steps_with_the_new_lr_and_weight_decay_inside_the_warmup(monkeypatch, tmp_path):
    """--lr and --weight-decay given with --resume take effect at the first resumed step, and
    the warm-up goes on where it stopped: 2 steps at lr 0.05, then a resume to 5 steps at lr
    0.02 and weight decay 0.1, warm-up 4: Adam steps with lr 0.05 (1/4, 2/4), then 0.02 (3/4,
    4/4, 1), weight decay 0, 0, then 0.1."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step_spy(self, *args, **kwargs):
        seen.append([(float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups][0])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_spy)
    run_toy(monkeypatch, tmp_path, lr=0.05, warmup_steps=4, train_steps=2, eval_images=0)
    run_toy(monkeypatch, tmp_path, lr=0.02, weight_decay=0.1, warmup_steps=4, train_steps=5,
            eval_images=0, resume=str(tmp_path / "checkpoint.pt"))
    want = [(0.05 / 4, 0.0), (0.05 * 2 / 4, 0.0), (0.02 * 3 / 4, 0.1), (0.02, 0.1), (0.02, 0.1)]
    assert [lr for lr, _ in seen] == pytest.approx([lr for lr, _ in want], rel=1e-6)
    assert [wd for _, wd in seen] == [wd for _, wd in want]


def test_cosine_lr_decay_after_the_warmup_reaches_a_tenth_at_the_last_step_and_resumes(
        monkeypatch, tmp_path):
    """--lr-decay cosine: the lr of step s (1-based) is lr (s/W) during the warm-up W, then
    lr (0.55 + 0.45 cos(π (s - W) / (train_steps - W))), which is lr/10 at the last step; a run
    resumed half-way takes the same lrs as one run straight through."""
    seen = []
    real_step = torch.optim.AdamW.step

    stop_at = [None]

    def step_spy(self, *args, **kwargs):
        seen.append(float(self.param_groups[0]["lr"]))
        if len(seen) == stop_at[0]:   # Ctrl-C: train() finishes the step, checkpoints, returns
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_spy)
    lr, W, n = 0.05, 2, 8
    want = [lr * s / W if s <= W else lr * (0.55 + 0.45 * math.cos(math.pi * (s - W) / (n - W)))
            for s in range(1, n + 1)]
    run_toy(monkeypatch, tmp_path / "straight", lr=lr, warmup_steps=W, train_steps=n,
            lr_decay="cosine", eval_images=0)
    assert seen == pytest.approx(want, rel=1e-6) and want[-1] == pytest.approx(lr / 10)
    seen.clear()
    stop_at[0] = 4
    run_toy(monkeypatch, tmp_path, lr=lr, warmup_steps=W, train_steps=n, lr_decay="cosine",
            eval_images=0)
    assert 4 <= len(seen) < n   # stopped at the next step boundary
    stop_at[0] = None
    run_toy(monkeypatch, tmp_path, lr=lr, warmup_steps=W, train_steps=n, lr_decay="cosine",
            eval_images=0, resume=str(tmp_path / "checkpoint.pt"))
    assert seen == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_shrinks_weights_that_get_no_gradient(monkeypatch, tmp_path, weight_decay):
    lr = 0.1
    run = run_toy(monkeypatch, tmp_path, lr=lr, weight_decay=weight_decay, train_steps=3)
    want = torch.full((3,), (1 - lr * weight_decay) ** 3)
    torch.testing.assert_close(run.ckpt["model"]["idle"], want)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """5 steps with EMA decay 0.7, samples after steps 2 and 4 (eval_every) and at the end, NLL
    on 5 test images in two batches, guidance 1 with 2 sampling steps, a log line every 2 steps
    and at the end."""
    with pytest.MonkeyPatch.context() as mp:
        return run_toy(mp, tmp_path_factory.mktemp("ema"), lr=0.1, train_steps=5, eval_every=2,
                       ema_decay=0.7, num_samples=6, sample_steps=2, guidance=1.0,
                       label_dropout=0.3, eval_images=5, log_every=2)


def _ema_after(run, k, decay, start=None):
    """EMA weights after k steps, w_j the weights after step j: e_1 = w_1 (torch's AveragedModel
    copies the first), then e_j = d e_{j-1} + (1-d) w_j. start="init" is the other common
    convention, e_0 = the initial weights; by default the one the run's final EMA matches."""
    if start is None:
        start = "init" if same(_ema_after(run, len(run.train_calls), decay, "init"),
                               run.ema_params()) else "copy"
    after = [c["params"] for c in run.train_calls[1:]] + [run.ckpt["model"]]
    e, todo = (dict(after[0]), after[1:k]) if start == "copy" else (run.train_calls[0]["params"], after[:k])
    for w in todo:
        e = {n: decay * e[n] + (1 - decay) * w[n] for n in e}
    return e


def test_each_step_updates_the_weights_and_the_step_count(ema_run):
    run = ema_run
    assert len(run.train_calls) == 5 and run.ckpt["step"] == 5 and run.result["step"] == 5
    seen = [c["params"] for c in run.train_calls] + [run.ckpt["model"]]
    for a, b in zip(seen, seen[1:]):
        assert all(not torch.equal(a[n], b[n]) for n in ("pixel", "label", "time"))


def test_ema_weights_follow_the_decay_recursion(ema_run):
    got = ema_run.ema_params()
    want = _ema_after(ema_run, 5, 0.7, "copy")
    if not same(got, want):   # the other convention, e_0 = initial weights, is as good
        want = _ema_after(ema_run, 5, 0.7, "init")
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    assert not same(got, ema_run.ckpt["model"])
    assert not same(got, _ema_after(ema_run, 5, 0.3, "copy"))   # the decay, not 1 - decay


def test_sampling_and_evaluation_run_on_the_ema_weights(ema_run):
    """Every network call without gradients (samples after steps 2 and 4, final samples, test
    NLL) runs on the EMA weights of that moment, never on the raw weights."""
    run = ema_run
    no_grad = [c for c in run.calls if not c["train"]]
    assert no_grad and all(c["net"] is not run.net for c in no_grad)
    snapshots = [_ema_after(run, 2, 0.7), _ema_after(run, 4, 0.7), run.ema_params()]
    raw = [run.train_calls[2]["params"], run.train_calls[4]["params"], run.ckpt["model"]]
    used = [sum(same(c["params"], e) for c in no_grad) for e in snapshots]
    assert all(n > 0 for n in used) and sum(used) == len(no_grad), used
    assert not any(same(e, w) for e, w in zip(snapshots, raw))
    assert all(s["net"] is not run.net for s in run.d3pm["sample"] + run.d3pm["terms"])


def test_samples_use_the_configured_steps_guidance_and_real_labels(ema_run):
    """draw_samples passes sample_steps, guidance and labels of every class 0..num_labels-1;
    with guidance each step also calls the network with the null label."""
    run = ema_run
    assert len(run.d3pm["sample"]) >= 3          # after steps 2 and 4, and at the end
    for s in run.d3pm["sample"]:
        assert s["steps"] == 2 and s["guidance"] == 1.0
    labels = torch.cat([s["cond"] for s in run.d3pm["sample"]])   # 3 grids of num_samples = 6
    assert len(labels) == 18 and sorted(set(labels.tolist())) == [0, 1, 2]
    sample_calls = [c for c in run.calls if not c["train"] and c["x_t"].shape[1:] == (1, 2, 2)
                    and sorted(set(c["t"].tolist())) in ([4], [1])]
    assert any(bool((c["cond"] == NUM_LABELS).any()) for c in sample_calls)


def test_logged_losses_are_means_over_the_logging_window(ema_run):
    run = ema_run
    rows = [r for r in run.rows if "vb_bpd" in r]
    assert [r["step"] for r in rows] == [2, 4, 5]
    fwd = run.d3pm["forward"]
    for r, window in zip(rows, (fwd[:2], fwd[2:4], fwd[4:])):
        for key, name in (("loss", "loss"), ("vb_bpd", "vb"), ("ce_bpd", "ce")):
            want = sum(f[name] for f in window) / len(window)
            assert r[key] == pytest.approx(want, rel=1e-5), (r["step"], key)


def test_both_test_bounds_use_the_same_x_t_draws(tmp_path):
    """test_bounds evaluates -log p(x) and -log p(x | y) on the same x_t draws: with a network
    that ignores its label, the two bounds and their standard errors are equal to the bit."""
    cfg = toy_config(tmp_path, label_dropout=0.1, eval_images=7, batch_size=4)
    data = toy_data(cfg)
    net = TinyNet(cfg, data, Recorder())
    with torch.no_grad():
        net.label.zero_()                                  # every label, null included, alike
    result = R.test_bounds(cfg, R.build_d3pm(cfg, net), net, data, torch.device("cpu"))
    assert result["nll_bpd"] is not None and result["nll_bpd_stderr"] > 0
    assert result["nll_bpd"] == result["nll_bpd_given_label"]
    assert result["nll_bpd_stderr"] == result["nll_bpd_given_label_stderr"]


class LabelEcho:
    """A stand-in for D3PM.sample whose every pixel is the label it was asked for."""
    x0_model = None

    def sample(self, shape, cond=None, steps=None, generator=None, return_trajectory=False,
               guidance=0.0, progress=False):
        x = cond.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
        return (x, {"x_t": x[None]}) if return_trajectory else x


def test_draw_samples_sorts_balances_and_pairs_labels_and_previews_ten_per_class(tmp_path):
    """draw_samples: n = 40 labels 0,0,..,1,1,..,2,2 (14, 13, 13: as even as possible), sample i
    drawn with label i, and the preview the first 10 of each class."""
    cfg = toy_config(tmp_path, batch_size=4)
    labels, x, preview, traj = R.draw_samples(cfg, LabelEcho(), None, NUM_LABELS, 40, (1, 2, 2),
                                              torch.device("cpu"), None, trajectory=True)
    assert labels.tolist() == sorted(labels.tolist())
    assert sorted(torch.bincount(labels).tolist()) == [13, 13, 14]
    assert torch.equal(x, labels.view(-1, 1, 1, 1).expand(40, 1, 2, 2))
    first = [(labels == c).nonzero().flatten()[:10] for c in range(NUM_LABELS)]
    assert torch.equal(preview, torch.cat(first))
    assert torch.equal(traj["x_t"][0], x[preview])


@pytest.mark.parametrize("eval_images", [5, 30])
def test_test_nll_is_the_bound_on_the_first_eval_images_test_images(monkeypatch, tmp_path,
                                                                     eval_images):
    """The final NLL evaluates the first min(eval_images, #test) TEST images (with their labels,
    or the null label), each once per bound, and reports the mean of their bounds."""
    run = run_toy(monkeypatch, tmp_path, eval_images=eval_images, batch_size=4, train_steps=2)
    n = min(eval_images, len(TEST_IDS))
    by_kind = {}
    for c in run.d3pm["terms"]:
        ids = decode(c["x_0"])
        conditional = c["cond"] is not None and bool((c["cond"] < NUM_LABELS).all())
        if conditional:
            assert torch.equal(c["cond"], ids % NUM_LABELS)
        else:
            assert c["cond"] is None or bool((c["cond"] == NUM_LABELS).all())
        by_kind.setdefault(conditional, []).append(ids)
    assert by_kind
    for ids in by_kind.values():
        assert sorted(torch.cat(ids).tolist()) == TEST_IDS[:n].tolist()
    reported = [v for k, v in run.result.items() if isinstance(v, float) and "nll" in k]
    for conditional in by_kind:
        outs = [c["out"] for c in run.d3pm["nll"]
                if (c["cond"] is not None and bool((c["cond"] < NUM_LABELS).all())) == conditional]
        mean = float(torch.cat(outs).double().mean())
        assert any(v == pytest.approx(mean, rel=1e-5) for v in reported), (mean, run.result)
    assert run.result["eval_images"] == n


@pytest.mark.parametrize("transition,absorbing_state,schedule", [
    ("uniform", "mask", "default"), ("absorbing", "mask", "default"),
    ("absorbing", "grey", "cosine"), ("gaussian", "mask", "default")])
@pytest.mark.parametrize("loss_type", ["hybrid", "vb", "ce"])
def test_build_d3pm_builds_the_configured_process_and_loss(transition, absorbing_state, schedule,
                                                           loss_type):
    K, T = 4, 5
    cfg = R.Config(num_classes=K, num_timesteps=T, transition=transition, schedule=schedule,
                   absorbing_state=absorbing_state, loss_type=loss_type, hybrid_coeff=0.25,
                   eps=1e-4)
    mask = transition == "absorbing" and absorbing_state == "mask"
    model = TableModel(K + mask, K, T)
    got = R.build_d3pm(cfg, model)
    want = R.D3PM(model, T, K, transition, loss_type=loss_type, hybrid_coeff=0.25, eps=1e-4,
                  schedule=None if schedule == "default" else schedule,
                  absorbing_state="mask" if mask else None)
    for t in (1, 3, T):
        torch.testing.assert_close(got.Q_bar_matrix(t), want.Q_bar_matrix(t))
    g = torch.Generator().manual_seed(17)
    x_0 = torch.randint(0, K, (6, 1, 2, 2), generator=g)
    t = torch.tensor([1, 2, 3, 4, 5, 5])
    x_t = want.q_sample(x_0, t, generator=g)
    for key, value in want.loss_terms(x_0, x_t, t).items():
        torch.testing.assert_close(got.loss_terms(x_0, x_t, t)[key], value)
    torch.testing.assert_close(got.prior_bpd(x_0), want.prior_bpd(x_0))
