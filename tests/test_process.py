"""Property tests of the D3PM processes in d3pm_runner.py (Austin et al. 2021, arXiv:2107.03006).

Run:  python -m pytest tests/test_process.py -q      (CPU only, well under a minute)

Every test checks a mathematical fact against an independent float64 computation of our own
(explicit matrices built from the paper's formulas, brute-force enumeration on tiny K, T, D):
  1. Q_t and Q̄_t are row-stochastic and non-negative                         [§3.1, eq. 3]
  2. Q_t equals the paper's formulas; Q̄_t and q(x_t|x_0) equal the explicit matrix product
                                                                     [App. A.2, eq. 8, eq. 3]
  3. Q̄_T is the stationary distribution (uniform 1/K, or e_m for absorbing + jsd)
  4. q(x_{t-1}|x_t,x_0) is Bayes' rule on explicit matrices; the x̃0-logits variant is eq. 4
  5. the KL terms vanish when the network predicts x_0 exactly                          [eq. 1]
  6. the bound is above the exact -log p(x_0) (all trajectories enumerated) and equals the exact
     ELBO; nll_bpd estimates it without bias
  7. ancestral sampling (full and strided) reproduces exactly computed distributions (chi-square)
  8. eps = 0 and the default eps give no NaN / inf at t = 1 and t = T, K = 2 and K = 256
  9. one AdamW training step on a tiny conv net, for every transition and the logistic output
Conventions as in d3pm_runner: t in 1..T, Q̄_0 = I, Q[i, j] = q(x_t = j | x_{t-1} = i), class
axis last. Toy data are laid out as images (B, 1, 1, D) so that "pixels" are the last axis.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d3pm_runner import LOG_ZERO, D3PM, get_betas, guide  # noqa: E402

pytestmark = pytest.mark.usefixtures("both_classes")  # every test: D3PM and FastD3PM

F64 = torch.float64
LN2 = math.log(2.0)
DEFAULT_SCHEDULE = {"uniform": "cosine", "absorbing": "jsd", "gaussian": "linear"}
# (transition, absorbing_state): the grey value K//2, state 0, and a dedicated [MASK] state K.
CONFIGS = [("uniform", None), ("absorbing", None), ("absorbing", 0), ("absorbing", "mask"),
           ("gaussian", None)]
CONFIG_IDS = ["uniform", "absorbing", "absorbing0", "absorbing_mask", "gaussian"]
FEW = settings(max_examples=10, deadline=None)


# ================================================================================================
# Independent float64 reference: schedules, Q_t, Q̄_t, stationary distributions
# ================================================================================================

def ref_betas(name, T):
    """β_1..β_T in float64 from the formulas (official get_diffusion_betas, 1-based)."""
    if name == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=F64)
    if name == "jsd":
        return torch.tensor([1.0 / (T - t + 1) for t in range(1, T + 1)], dtype=F64)
    s = torch.arange(T + 1, dtype=F64) / T  # cosine, unsquared as the official code
    alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2)
    return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)


def absorbing_index(K, absorbing_state):
    return K if absorbing_state == "mask" else (K // 2 if absorbing_state is None else absorbing_state)


def num_states(transition, K, absorbing_state=None):
    return K + 1 if transition == "absorbing" and absorbing_state == "mask" else K


def ref_Q(transition, beta, K, absorbing_state=None):
    """Q_t from the paper, float64 [S, S], row = from.
    uniform: (1-β) I + β/K 11ᵀ; absorbing: (1-β) I + β 1 e_mᵀ; gaussian: eq. 8."""
    beta = float(beta)
    if transition == "uniform":
        return (1 - beta) * torch.eye(K, dtype=F64) + beta / K * torch.ones(K, K, dtype=F64)
    if transition == "absorbing":
        S, m = num_states(transition, K, absorbing_state), absorbing_index(K, absorbing_state)
        return (1 - beta) * torch.eye(S, dtype=F64) + beta * F.one_hot(torch.tensor(m), S).to(F64)[None, :]
    n = torch.arange(-(K - 1), K, dtype=F64)
    Z = torch.exp(-4.0 * n**2 / ((K - 1) ** 2 * beta)).sum()
    i = torch.arange(K, dtype=F64)
    Q = torch.exp(-4.0 * (i[:, None] - i[None, :]) ** 2 / ((K - 1) ** 2 * beta)) / Z
    Q.fill_diagonal_(0.0)
    return Q + torch.diag(1.0 - Q.sum(1))


def ref_Qs(transition, betas, K, absorbing_state=None):
    """(Q [T+1, S, S] with Q[t] = Q_t (Q[0] unused = I), Q_bar [T+1, S, S] with Q_bar[0] = I)."""
    S = num_states(transition, K, absorbing_state)
    Q, Q_bar = [torch.eye(S, dtype=F64)], [torch.eye(S, dtype=F64)]
    for beta in betas:
        Q.append(ref_Q(transition, beta, K, absorbing_state))
        Q_bar.append(Q_bar[-1] @ Q[-1])
    return torch.stack(Q), torch.stack(Q_bar)


def ref_stationary(transition, K, absorbing_state=None):
    S = num_states(transition, K, absorbing_state)
    if transition == "absorbing":
        return F.one_hot(torch.tensor(absorbing_index(K, absorbing_state)), S).to(F64)
    return torch.full((S,), 1.0 / K, dtype=F64)


def random_betas(T, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.05 + 0.9 * torch.rand(T, generator=g, dtype=F64)


def zero_model(K):
    return lambda x_t, t, cond=None: torch.zeros(x_t.shape + (K,))


def make(transition, K, T, model=None, absorbing_state=None, schedule=None, eps=1e-6, **kw):
    if transition != "absorbing":
        absorbing_state = None
    return D3PM(model or zero_model(K), T, K, transition=transition, schedule=schedule,
                absorbing_state=absorbing_state, eps=eps, **kw)


def img(x):
    """[B] or [B, D] -> image layout [B, 1, 1, D]."""
    return x.reshape(x.shape[0], 1, 1, -1)


def full_t(B, t):
    return torch.full((B,), int(t), dtype=torch.long)


def chisquare_pvalue(idx, probs):
    """Pearson chi-square goodness of fit of samples `idx` (cell indices) to `probs` (float64).
    Cells of probability 0 must be empty (else p = 0). p = Q(df/2, χ²/2), the upper regularised
    incomplete gamma function."""
    counts = torch.bincount(idx.flatten(), minlength=probs.numel()).to(F64)
    assert counts.numel() == probs.numel(), "samples outside the cells"
    zero = probs <= 1e-15
    if counts[zero].sum() > 0:
        return 0.0
    n, p = counts.sum(), probs[~zero] / probs[~zero].sum()
    expected = n * p
    stat = ((counts[~zero] - expected) ** 2 / expected).sum()
    df = int((~zero).sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=F64), stat / 2))


def test_chisquare_helper_is_calibrated():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=F64)
    good = torch.multinomial(probs, 20000, replacement=True, generator=g)
    assert chisquare_pvalue(good, probs) > 1e-3
    assert chisquare_pvalue(good, torch.tensor([0.48, 0.32, 0.2, 0.0], dtype=F64)) < 1e-3
    assert chisquare_pvalue(torch.cat([good, torch.tensor([3])]), probs) == 0.0
    # df = 2 closed form: p = exp(-χ²/2)
    counts = torch.tensor([0] * 40 + [1] * 30 + [2] * 30)
    stat = (40 - 100 / 3) ** 2 / (100 / 3) + 2 * (30 - 100 / 3) ** 2 / (100 / 3)
    assert abs(chisquare_pvalue(counts, torch.full((3,), 1 / 3, dtype=F64)) - math.exp(-stat / 2)) < 1e-12


# ================================================================================================
# 0. Schedules
# ================================================================================================

@pytest.mark.parametrize("name", ["linear", "cosine", "jsd"])
@pytest.mark.parametrize("T", [1, 4, 10, 1000])
def test_get_betas_matches_formulas(name, T):
    betas = get_betas(name, T)
    assert betas.dtype == F64 and betas.shape == (T,)
    torch.testing.assert_close(betas, ref_betas(name, T), atol=1e-15, rtol=0)
    assert bool(((betas > 0) & (betas <= 1)).all())
    if name == "jsd":
        assert betas[-1] == 1.0  # the last step absorbs everything


# ================================================================================================
# 1. Row-stochastic, non-negative Q_t and Q̄_t
# ================================================================================================

@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("K,T,ts", [(5, 10, range(0, 11)), (2, 6, range(0, 7)),
                                    (256, 20, [0, 1, 2, 10, 20])])
def test_rows_sum_to_one_and_nonnegative(transition, absorbing_state, K, T, ts):
    d3pm = make(transition, K, T, absorbing_state=absorbing_state)
    S = num_states(transition, K, absorbing_state)
    for t in ts:
        mats = [("Q_bar", d3pm.Q_bar_matrix(t))] + ([("Q", d3pm.Q_matrix(t))] if t >= 1 else [])
        for name, M in mats:
            assert M.dtype == F64 and M.shape == (S, S), (name, t)
            assert bool((M >= 0).all()), f"{name}_{t} has negative entries"
            torch.testing.assert_close(M.sum(1), torch.ones(S, dtype=F64), atol=1e-12, rtol=0,
                                       msg=f"rows of {name}_{t} do not sum to one")
            if transition != "absorbing":  # doubly stochastic -> the uniform distribution is stationary
                torch.testing.assert_close(M.sum(0), torch.ones(S, dtype=F64), atol=1e-12, rtol=0,
                                           msg=f"columns of {name}_{t} do not sum to one")
                if name == "Q":  # eq. 8 and the uniform Q_t are symmetric (Q̄_t need not be)
                    torch.testing.assert_close(M, M.T, atol=1e-15, rtol=0)


# ================================================================================================
# 2. Closed forms == explicit matrix products; Q_t == the paper's formulas
# ================================================================================================

def check_against_products(transition, absorbing_state, K, T, betas, schedule):
    d3pm = make(transition, K, T, absorbing_state=absorbing_state, schedule=schedule)
    S = num_states(transition, K, absorbing_state)
    assert d3pm.num_states == S and d3pm.num_classes == K and d3pm.num_timesteps == T
    torch.testing.assert_close(d3pm.betas.double(), betas, atol=1e-7, rtol=1e-6)
    ref_Q_t, ref_Q_bar = ref_Qs(transition, betas, K, absorbing_state)
    torch.testing.assert_close(d3pm.Q_bar_matrix(0), torch.eye(S, dtype=F64), atol=0, rtol=0)
    product = torch.eye(S, dtype=F64)
    x_0 = img(torch.arange(K))                                   # every data value once
    for t in range(1, T + 1):
        Q_t = d3pm.Q_matrix(t)
        torch.testing.assert_close(Q_t, ref_Q_t[t], atol=1e-12, rtol=0,
                                   msg=f"Q_{t} differs from the paper's formula")
        product = product @ Q_t                                  # our own float64 product
        torch.testing.assert_close(d3pm.Q_bar_matrix(t), product, atol=1e-12, rtol=0,
                                   msg=f"Q_bar_{t} != Q_1 ... Q_{t}")
        torch.testing.assert_close(product, ref_Q_bar[t], atol=1e-12, rtol=0)
        q = d3pm.q_probs(x_0, full_t(K, t))
        assert q.shape == (K, 1, 1, 1, S) and q.dtype == torch.float32
        torch.testing.assert_close(q.reshape(K, S).double(), product[:K], atol=2e-6, rtol=0,
                                   msg=f"q_probs(x_0, {t}) != rows of Q_1...Q_{t}")


# hypothesis strategies for a tiny process: transition (and absorbing state), K, T, schedule
TINY_PROCESSES = dict(config=st.sampled_from(CONFIGS), K=st.integers(3, 5), T=st.integers(4, 6),
                      seed=st.integers(0, 2**16), default_schedule=st.booleans())


def pick_schedule(transition, T, seed, default_schedule):
    """(schedule argument for D3PM, float64 betas): the transition's default, or random betas."""
    if default_schedule:
        return None, ref_betas(DEFAULT_SCHEDULE[transition], T)
    betas = random_betas(T, seed)
    return betas.clone(), betas


@FEW
@given(**TINY_PROCESSES)
def test_closed_forms_equal_matrix_products(config, K, T, seed, default_schedule):
    transition, absorbing_state = config
    schedule, betas = pick_schedule(transition, T, seed, default_schedule)
    check_against_products(transition, absorbing_state, K, T, betas, schedule)


@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
def test_closed_forms_default_schedules(transition, absorbing_state):
    for K, T in [(3, 4), (4, 6), (5, 5)]:
        check_against_products(transition, absorbing_state, K, T,
                               ref_betas(DEFAULT_SCHEDULE[transition], T), None)


def test_gaussian_Q_at_K256_is_eq8():
    T = 10
    d3pm = make("gaussian", 256, T)
    betas = ref_betas("linear", T)
    for t in [1, 5, 10]:
        torch.testing.assert_close(d3pm.Q_matrix(t), ref_Q("gaussian", betas[t - 1], 256),
                                   atol=1e-12, rtol=0)


# ================================================================================================
# 3. Q̄_T reaches the stationary distribution
# ================================================================================================

def test_uniform_Q_bar_T_is_uniform():
    for K, T, tol in [(5, 1000, 1e-5), (5, 10, 1e-3), (256, 1000, 1e-5)]:
        Q_bar = make("uniform", K, T).Q_bar_matrix(T)
        torch.testing.assert_close(Q_bar, torch.full((K, K), 1.0 / K, dtype=F64), atol=tol, rtol=0)


def test_gaussian_Q_bar_T_is_uniform_with_enough_steps():
    # Eq. 8 is doubly stochastic, so Q̄_t -> uniform once Σβ is large enough. (The official
    # K = 256, linear, T = 1000 setting gets within 0.5% of 1/K but takes ~10 s to build on CPU.)
    for K, T, beta, tol in [(256, 30, 1.0, 1e-4), (5, 50, 1.0, 1e-6)]:
        d3pm = make("gaussian", K, T, schedule=torch.full((T,), beta, dtype=F64))
        Q_bar = d3pm.Q_bar_matrix(T)
        assert float((Q_bar * K - 1).abs().max()) < tol
        assert float((d3pm.Q_bar_matrix(1) * K - 1).abs().max()) > 0.5   # not after one step


@pytest.mark.parametrize("absorbing_state", [None, 0, "mask"])
@pytest.mark.parametrize("K,T", [(5, 10), (4, 1000)])
def test_absorbing_jsd_is_exactly_absorbed_at_T(absorbing_state, K, T):
    d3pm = make("absorbing", K, T, absorbing_state=absorbing_state)
    S, m = num_states("absorbing", K, absorbing_state), absorbing_index(K, absorbing_state)
    e_m = ref_stationary("absorbing", K, absorbing_state)
    torch.testing.assert_close(d3pm.Q_bar_matrix(T), e_m.expand(S, S), atol=1e-12, rtol=0)
    x_0 = img(torch.arange(K))
    torch.testing.assert_close(d3pm.q_probs(x_0, full_t(K, T)).reshape(K, S).double(),
                               e_m.expand(K, S), atol=0, rtol=0)
    # jsd: q(x_t = x_0 | x_0) = 1 - t/T for x_0 != m, so nothing is absorbed before t = T
    for t in [1, T // 2, T - 1]:
        diag = d3pm.Q_bar_matrix(t).diagonal()
        keep = torch.arange(S) != m
        torch.testing.assert_close(diag[keep], torch.full_like(diag[keep], 1 - t / T),
                                   atol=1e-12, rtol=0)


# ================================================================================================
# 4. Posterior q(x_{t-1} | x_t, x_0) == Bayes' rule on explicit matrices
# ================================================================================================

def bayes_posterior(Q, Q_bar, x0_probs, x_t, t):
    """q(x_{t-1} = i | x_t, x_0) ∝ Σ_x0 p(x_0) Q̄_{t-1}[x_0, i] Q_t[i, x_t]; rows of x0_probs are
    distributions over x_0 ([B, S] float64). Returns ([B, S] normalised, [B] normaliser)."""
    joint = (x0_probs @ Q_bar[t - 1]) * Q[t][:, int(x_t)]
    z = joint.sum(1, keepdim=True)
    return joint / z, z.squeeze(1)


def all_valid_triples(Q_bar, K, S, T, t_min=2):
    """Every (x_0, x_t, t) with t in t_min..T and q(x_t | x_0) > 0. "> 0" means above 1e-30:
    a float64 probability like exp(-1/β) = 1e-65 (Gaussian, small β) is 0 in float32."""
    rows = [(x0, xt, t) for t in range(t_min, T + 1) for x0 in range(K) for xt in range(S)
            if Q_bar[t][x0, xt] > 1e-30]
    x_0, x_t, t = (torch.tensor(c) for c in zip(*rows))
    return x_0, x_t, t


@FEW
@given(**TINY_PROCESSES)
def test_posterior_is_bayes_rule(config, K, T, seed, default_schedule):
    transition, absorbing_state = config
    schedule, betas = pick_schedule(transition, T, seed, default_schedule)
    S = num_states(transition, K, absorbing_state)
    Q, Q_bar = ref_Qs(transition, betas, K, absorbing_state)
    exact = make(transition, K, T, absorbing_state=absorbing_state, schedule=schedule, eps=0.0)
    floored = make(transition, K, T, absorbing_state=absorbing_state, schedule=schedule)

    x_0, x_t, t = all_valid_triples(Q_bar, K, S, T)
    B = x_0.numel()
    want = torch.stack([bayes_posterior(Q, Q_bar, F.one_hot(x_0[b:b + 1], S).to(F64), x_t[b], int(t[b]))[0][0]
                        for b in range(B)])
    z = Q_bar[t, x_0, x_t]                                       # q(x_t | x_0)

    logits = exact.q_posterior_logits(img(x_0), img(x_t), t)
    assert logits.shape == (B, 1, 1, 1, S)
    assert not torch.isnan(logits).any()
    got = torch.softmax(logits.double(), -1).reshape(B, S)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert bool((got[want == 0] == 0).all()), "impossible x_{t-1} must get probability exactly 0"

    # default eps = 1e-6: a small floor; close wherever q(x_t | x_0) is not tiny
    got_eps = torch.softmax(floored.q_posterior_logits(img(x_0), img(x_t), t).double(), -1).reshape(B, S)
    ok = z > 1e-2
    torch.testing.assert_close(got_eps[ok], want[ok], atol=1e-3, rtol=0)

    # x_0 given as logits: the joint-sum form Σ_x0 p(x_0) q(x_{t-1}, x_t | x_0), normalised [eq. 4]
    g = torch.Generator().manual_seed(seed)
    all_xt = torch.arange(S).repeat(T - 1)
    all_t = torch.arange(2, T + 1).repeat_interleave(S)
    L = 2 * torch.randn(all_xt.numel(), S, generator=g)
    probs = torch.softmax(L.double(), -1)
    want_L, z_L = [], []
    for b in range(all_xt.numel()):
        w, zz = bayes_posterior(Q, Q_bar, probs[b:b + 1], all_xt[b], int(all_t[b]))
        want_L.append(w[0])
        z_L.append(zz[0])
    want_L, ok = torch.stack(want_L), torch.stack(z_L) > 0       # x_t must be reachable at all
    got_L = torch.softmax(exact.q_posterior_logits(L.reshape(-1, 1, 1, 1, S), img(all_xt), all_t)
                          .double(), -1).reshape(-1, S)
    assert not torch.isnan(got_L[ok]).any()
    torch.testing.assert_close(got_L[ok], want_L[ok], atol=1e-6, rtol=0)

    # t = 1: the distribution of x_0 itself (delta for data, softmax of the logits)
    x0_1, xt_1 = torch.arange(K).repeat_interleave(S), torch.arange(S).repeat(K)
    keep = Q_bar[1][x0_1, xt_1] > 0
    x0_1, xt_1 = x0_1[keep], xt_1[keep]
    got_1 = torch.softmax(exact.q_posterior_logits(img(x0_1), img(xt_1), full_t(len(x0_1), 1)).double(), -1)
    torch.testing.assert_close(got_1.reshape(-1, S), F.one_hot(x0_1, S).to(F64), atol=1e-7, rtol=0)
    L1 = L[:S].reshape(S, 1, 1, 1, S)
    got_1L = torch.log_softmax(exact.q_posterior_logits(L1, img(torch.arange(S)), full_t(S, 1)), -1)
    torch.testing.assert_close(got_1L, torch.log_softmax(L1, -1), atol=1e-5, rtol=0)


# ================================================================================================
# 5. A perfect x_0 predictor makes every KL term (and the decoder NLL) vanish
# ================================================================================================

class Oracle:
    """x0_model that knows x_0 for the batch it is given: a huge logit at the true value."""

    def __init__(self, K, x_0=None):
        self.K, self.x_0 = K, x_0

    def __call__(self, x_t, t, cond=None):
        assert x_t.shape == self.x_0.shape
        return 1e4 * F.one_hot(self.x_0, self.K).float()


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
def test_kl_vanishes_for_perfect_prediction(transition, absorbing_state, eps):
    K, T = 4, 6
    betas = ref_betas(DEFAULT_SCHEDULE[transition], T)
    schedule = None
    if transition == "gaussian":  # the linear schedule is nearly the identity at K = 4
        betas = torch.linspace(0.1, 0.9, T, dtype=F64)
        schedule = betas.clone()
    S = num_states(transition, K, absorbing_state)
    _, Q_bar = ref_Qs(transition, betas, K, absorbing_state)
    oracle = Oracle(K)
    d3pm = make(transition, K, T, model=oracle, absorbing_state=absorbing_state, schedule=schedule, eps=eps)
    x_0, x_t, t = all_valid_triples(Q_bar, K, S, T, t_min=1)
    oracle.x_0 = img(x_0)
    vb = d3pm.vb_terms_bpd(img(x_0), img(x_t), t)
    assert vb.shape == (x_0.numel(),)
    assert torch.isfinite(vb).all()
    assert float(vb[t >= 2].abs().max()) < 1e-5, "KL(q || p_θ) must be 0 for a perfect x̃0"
    assert float(vb[t == 1].abs().max()) < 1e-5, "decoder NLL must be 0 for a perfect x̃0"
    terms = d3pm.loss_terms(img(x_0), img(x_t), t)
    assert float(terms["ce"].abs().max()) < 1e-5
    # power: predicting the wrong x_0 must give a clearly positive KL somewhere
    oracle.x_0 = img((x_0 + 1) % K)
    vb_wrong = d3pm.vb_terms_bpd(img(x_0), img(x_t), t)
    assert float(vb_wrong[t >= 2].max()) > 0.01 and float(vb_wrong[t == 1].min()) > 1


# ================================================================================================
# 6. The bound is an upper bound on the exact -log p(x_0) and equals the exact ELBO
# ================================================================================================

class TableModel:
    """Fixed random x0-predictor for D = 2 pixels: logits[t, x_t pixel 0, x_t pixel 1, pixel, x̃0]
    depend on the whole x_t and on t."""

    def __init__(self, S, K, T, seed):
        g = torch.Generator().manual_seed(seed)
        self.table = 2.0 * torch.randn(T + 1, S, S, 2, K, generator=g)

    def __call__(self, x_t, t, cond=None):
        x = x_t.reshape(x_t.shape[0], 2)
        return self.table[t, x[:, 0], x[:, 1]].reshape(x_t.shape + (self.table.shape[-1],))


BOUND_CASES = [  # (transition, absorbing_state, schedule); absorbing needs jsd for a finite prior
    ("uniform", None, None),
    ("uniform", None, torch.tensor([0.1, 0.3, 0.5], dtype=F64)),
    ("absorbing", None, None),
    ("absorbing", "mask", None),
    ("gaussian", None, torch.tensor([0.3, 0.6, 0.9], dtype=F64)),
    ("gaussian", None, None),
]


@pytest.mark.parametrize("transition,absorbing_state,schedule", BOUND_CASES,
                         ids=["uniform", "uniform_custom", "absorbing", "absorbing_mask",
                              "gaussian_custom", "gaussian_linear"])
def test_bound_is_above_exact_nll(transition, absorbing_state, schedule):
    D, K, T = 2, 3, 3
    S = num_states(transition, K, absorbing_state)
    betas = ref_betas(DEFAULT_SCHEDULE[transition], T) if schedule is None else schedule
    Q, Q_bar = ref_Qs(transition, betas, K, absorbing_state)
    model = TableModel(S, K, T, seed=1)
    d3pm = make(transition, K, T, model=model, absorbing_state=absorbing_state,
                schedule=None if schedule is None else schedule.clone(), eps=0.0)

    xt_states = torch.cartesian_prod(torch.arange(S), torch.arange(S))   # joint index a*S + b
    x0_states = torch.cartesian_prod(torch.arange(K), torch.arange(K))   # joint index a*K + b
    NS, NK = S * S, K * K

    # --- our reverse process, float64, checked against the runner's p_logits -------------------
    P = {}  # P[t]: [NS (x_t), NS (x_{t-1})] for t >= 2; P[1]: [NS (x_1), NK (x_0)]
    for t in range(1, T + 1):
        x0_probs = torch.softmax(model.table[t].double(), -1)          # [S, S, 2, K]
        got = torch.softmax(d3pm.p_logits(img(xt_states), full_t(NS, t)).double(), -1).reshape(NS, 2, -1)
        if t == 1:  # p_θ(x_0 | x_1) = p̃_θ(x̃0 | x_1) itself (as the official code)
            per_pixel = x0_probs.reshape(NS, 2, K)
            torch.testing.assert_close(got[..., :K], per_pixel, atol=1e-6, rtol=0)
            assert float(got[..., K:].sum(-1).max()) < 1e-12
            P[1] = (per_pixel[:, 0, :, None] * per_pixel[:, 1, None, :]).reshape(NS, NK)
            continue
        kernels, reachable = [], torch.ones(NS, dtype=torch.bool)
        for d in range(2):
            probs = x0_probs.reshape(NS, 2, K)[:, d]                     # p̃ for pixel d, each x_t
            joint = (probs @ Q_bar[t - 1][:K]) * Q[t][:, xt_states[:, d]].T   # [NS, S]
            z = joint.sum(1, keepdim=True)
            reachable &= z.squeeze(1) > 0
            kernels.append(torch.where(z > 0, joint / z.clamp_min(1e-300), torch.zeros_like(joint)))
            torch.testing.assert_close(got[reachable, d], kernels[d][reachable], atol=1e-6, rtol=0,
                                       msg=f"p_logits differs from eq. 4 at t={t}, pixel {d}")
        P[t] = (kernels[0][:, :, None] * kernels[1][:, None, :]).reshape(NS, NS)
    p_T = torch.kron(ref_stationary(transition, K, absorbing_state), ref_stationary(transition, K, absorbing_state))

    # --- exact model likelihood p(x_0) = Σ_{x_1..x_T} p(x_T) Π p_θ(x_{t-1}|x_t) -------------------
    trajectories = torch.cartesian_prod(*[torch.arange(NS)] * T)          # columns x_1 .. x_T
    log_p_traj = torch.log(p_T[trajectories[:, -1]])                       # [N_traj]
    for t in range(2, T + 1):
        log_p_traj = log_p_traj + torch.log(P[t][trajectories[:, t - 1], trajectories[:, t - 2]])
    log_p_joint = log_p_traj[:, None] + torch.log(P[1][trajectories[:, 0]])   # [N_traj, NK]
    p_x0 = torch.exp(log_p_joint).sum(0)                                   # enumerate every path
    nll = -torch.log(p_x0) / (D * LN2)                                     # bits/dim
    assert torch.isfinite(nll).all()
    assert abs(float(p_x0.sum()) - 1.0) < 1e-9                             # a proper distribution

    # --- exact ELBO by enumeration: E_q(x_{1:T}|x_0)[log p(x_{0:T}) - log q(x_{1:T}|x_0)] ----------
    Qj = {t: torch.kron(Q[t], Q[t]) for t in range(1, T + 1)}              # joint over 2 pixels
    Q1_x0 = torch.kron(Q[1][:K], Q[1][:K])                                 # [NK, NS]
    log_q = torch.log(Q1_x0[:, trajectories[:, 0]]).T                      # [N_traj, NK]
    for t in range(2, T + 1):
        log_q = log_q + torch.log(Qj[t][trajectories[:, t - 2], trajectories[:, t - 1]])[:, None]
    q = torch.exp(log_q)
    integrand = torch.where(q > 0, q * (log_p_joint - log_q), torch.zeros_like(q))
    elbo_bound = -integrand.sum(0) / (D * LN2)                              # bits/dim, [NK]

    # --- the runner's bound, computed exactly: Σ_t E_{x_t~q(x_t|x_0)} vb_terms_bpd + prior_bpd ----
    x0_b = x0_states.repeat_interleave(NS, 0)                              # all (x_0, x_t) pairs
    xt_b = xt_states.repeat(NK, 1)
    bound = torch.zeros(NK, dtype=F64)
    for t in range(1, T + 1):
        w = Q_bar[t][x0_b[:, 0], xt_b[:, 0]] * Q_bar[t][x0_b[:, 1], xt_b[:, 1]]
        vb = d3pm.vb_terms_bpd(img(x0_b), img(xt_b), full_t(len(w), t)).double()
        assert torch.isfinite(vb[w > 0]).all(), f"non-finite vb term at t={t}"
        assert float(vb[w > 0].min()) > -1e-6, "a KL / NLL term is negative"
        bound += torch.where(w > 0, w * vb, torch.zeros_like(vb)).reshape(NK, NS).sum(1)
    prior = d3pm.prior_bpd(img(x0_states)).double()
    q_T = Q_bar[T][x0_states[:, 0]][:, :, None] * Q_bar[T][x0_states[:, 1]][:, None, :]
    q_T = q_T.reshape(NK, NS)
    want_prior = torch.where(q_T > 0, q_T * (torch.log(q_T) - torch.log(p_T)), torch.zeros_like(q_T)).sum(1)
    torch.testing.assert_close(prior, want_prior / (D * LN2), atol=2e-6, rtol=1e-5)
    bound += prior

    assert torch.isfinite(bound).all()
    assert bool((bound >= nll - 1e-5).all()), f"bound {bound} below the exact NLL {nll}"
    gap = bound - nll
    assert float(gap.min()) > 1e-3 and float(gap.max()) < 100, f"implausible gap {gap}"
    torch.testing.assert_close(bound, elbo_bound, atol=2e-5, rtol=1e-5,
                               msg="Σ_t E[vb_terms_bpd] + prior_bpd != the exact ELBO")

    # --- nll_bpd: a sampled version of the same bound, unbiased -------------------------------------
    n = 1500
    g = torch.Generator().manual_seed(3)
    est = d3pm.nll_bpd(img(x0_states.repeat(n, 1)), generator=g).double().reshape(n, NK)
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(n)
    assert bool(((mean - bound).abs() <= 5 * stderr + 1e-4).all()), (mean, bound, stderr)


# ================================================================================================
# 7. The sampler reproduces exactly known distributions (chi-square goodness of fit)
# ================================================================================================
#
# Data: D = 2 independent pixels, K = 3, pixel d ~ π_d. Then q(x_t) = π_d Q̄_t per pixel and the
# true reverse process q(x_{t-1} | x_t) factorises over pixels. The runner's p_θ is eq. 4 in its
# joint-sum form, p_θ(x_{t-1}|x_t) ∝ Σ_x̃0 q(x_{t-1}, x_t | x̃0) p̃(x̃0|x_t). The true reverse
# process is q(x_{t-1}|x_t) ∝ Σ_x0 π(x_0) q(x_{t-1}, x_t | x_0) = Σ_x0 q(x_t) p(x_0|x_t)/q(x_t|x_0)
# q(x_{t-1}, x_t | x_0), so the x̃0 predictor that makes p_θ exact is NOT the Bayes posterior
# p(x_0|x_t) but the posterior divided by the likelihood, p̃(x̃0|x_t) ∝ p(x̃0|x_t)/q(x_t|x̃0) ∝ π(x̃0)
# (the same for any stride s < t, since q(x_s, x_t | x_0) is then a two-factor product as well).
# At t = 1 p_θ(x_0|x_1) is the x̃0 distribution itself and the sampler takes its ARGMAX, so there
# we return the Bayes posterior p(x_0|x_1) ∝ π(x_0) Q_1[x_0, x_1] and the output is a known
# deterministic function of x_1.

PI = torch.tensor([[0.6, 0.3, 0.1], [0.15, 0.25, 0.6]], dtype=F64)   # π_d, one row per pixel


class ExactReverseModel:
    def __init__(self, pi, Q_1):
        self.log_pi = torch.log(pi).float()                                  # [D, K]
        K = pi.shape[1]
        self.log_Q1 = torch.log(Q_1[:K]).clamp_min(-1e4).float()           # [K (x_0), S (x_1)]

    def __call__(self, x_t, t, cond=None):
        B = x_t.shape[0]
        x = x_t.reshape(B, -1)                                               # [B, D]
        prior = self.log_pi.expand(B, -1, -1)                                # [B, D, K]
        posterior_at_1 = prior + self.log_Q1.T[x]                            # log π + log Q_1[:, x_1]
        out = torch.where((t == 1)[:, None, None], posterior_at_1, prior)
        return out.reshape(x_t.shape + (prior.shape[-1],))


SAMPLER_CASES = [  # (transition, absorbing_state, schedule, start from our exact q(x_T)?)
    ("uniform", None, None, False),
    ("absorbing", None, None, False),
    ("absorbing", "mask", None, False),
    ("gaussian", None, torch.linspace(0.3, 1.0, 10, dtype=F64), True),
]


def outer_joint(p0, p1):
    return (p0[:, None] * p1[None, :]).flatten()


@pytest.mark.parametrize("steps", [None, 4])
@pytest.mark.parametrize("transition,absorbing_state,schedule,exact_start", SAMPLER_CASES,
                         ids=["uniform", "absorbing", "absorbing_mask", "gaussian"])
def test_sampler_reproduces_known_distribution(transition, absorbing_state, schedule, exact_start, steps):
    K, T, N = 3, 10, 20000
    S = num_states(transition, K, absorbing_state)
    betas = ref_betas(DEFAULT_SCHEDULE[transition], T) if schedule is None else schedule
    Q, Q_bar = ref_Qs(transition, betas, K, absorbing_state)
    d3pm = make(transition, K, T, model=ExactReverseModel(PI, Q[1]), absorbing_state=absorbing_state,
                schedule=None if schedule is None else schedule.clone(), eps=0.0)
    g = torch.Generator().manual_seed(1234)
    x_init = None
    if exact_start:  # x_T ~ q(x_T) = π Q̄_T exactly, so the test does not depend on mixing
        q_T = PI @ Q_bar[T][:K]
        x_init = img(torch.stack([torch.multinomial(q_T[d], N, replacement=True, generator=g)
                                  for d in range(2)], 1))
    shape = (N, 1, 1, 2)
    out, traj = d3pm.sample(shape, steps=steps, generator=g, return_trajectory=True, x_init=x_init)
    n_steps = T if steps is None else steps
    grid = traj["t"].tolist()
    assert len(grid) == n_steps and grid[0] == T and grid[-1] == 1
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert traj["x_t"].shape == (n_steps + 1,) + shape
    assert out.shape == shape and torch.equal(traj["x_t"][-1], out)
    assert int(out.min()) >= 0 and int(out.max()) < K

    # (a) x_1, the state before the last step, follows q(x_1) = π Q̄_1 (joint over S^2 cells)
    x_1 = traj["x_t"][-2].reshape(N, 2)
    q_1 = PI @ Q_bar[1][:K]                                                   # [D, S]
    p_value = chisquare_pvalue(x_1[:, 0] * S + x_1[:, 1], outer_joint(q_1[0], q_1[1]))
    assert p_value > 1e-3, f"x_1 does not follow q(x_1): p = {p_value:.2e}"
    # power: the same samples against a wrong distribution (pixel distributions swapped)
    wrong = outer_joint(q_1[1], q_1[0])
    assert chisquare_pvalue(x_1[:, 0] * S + x_1[:, 1], wrong) < 1e-6

    # (b) the output: P(out = a) = Σ_{x_1} q(x_1) [argmax_x0 π(x_0) Q_1[x_0, x_1] = a], per pixel
    posterior = PI[:, :, None] * Q[1][:K][None]                              # [D, K (x_0), S (x_1)]
    top2 = posterior.topk(2, dim=1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-3 * top2[:, 0]).all()), "argmax ties in the test data"
    decode = posterior.argmax(1)                                              # [D, S]
    p_out = torch.zeros(2, K, dtype=F64)
    for d in range(2):
        p_out[d].index_add_(0, decode[d], q_1[d])
    out = out.reshape(N, 2)
    p_value = chisquare_pvalue(out[:, 0] * K + out[:, 1], outer_joint(p_out[0], p_out[1]))
    assert p_value > 1e-3, f"output does not follow the push-forward of q(x_1): p = {p_value:.2e}"


JUMP_CASES = [  # (transition, absorbing_state, schedule, x_T per pixel); K = 8, T = 5
    ("uniform", None, torch.tensor([0.1, 0.3, 0.2, 0.4, 0.3], dtype=F64), (0, 5)),
    ("absorbing", None, None, (4, 4)),                  # jsd: x_T = m = K//2 with certainty
    # β alternating 1.0 / 0.2: eq. 8 matrices with different β do not commute at K >= 4, so the
    # jump matrix Q_{s→t} = Q_{s+1}...Q_t is NOT symmetric; its column x_t differs from its row.
    ("gaussian", None, torch.tensor([0.5, 1.0, 0.2, 1.0, 0.2], dtype=F64), (0, 6)),
]


@pytest.mark.parametrize("transition,absorbing_state,schedule,x_T", JUMP_CASES,
                         ids=["uniform", "absorbing", "gaussian"])
def test_strided_jumps_sample_the_exact_reverse_conditional(transition, absorbing_state, schedule, x_T):
    """steps=3 of T=5 visits t = 5, 3, 1. With the exact predictor p̃ ∝ π (see above) and a fixed
    x_5 = c, the state after the first jump must follow q(x_3 | x_5 = c) ∝ q(x_3) Q_4Q_5[x_3, c]
    and the state after the second jump q(x_1 | x_5 = c) ∝ q(x_1) Q_2Q_3Q_4Q_5[x_1, c]."""
    K, T, N = 8, 5, 20000
    betas = ref_betas(DEFAULT_SCHEDULE[transition], T) if schedule is None else schedule
    Q, Q_bar = ref_Qs(transition, betas, K, absorbing_state)
    pi = torch.softmax(torch.tensor([[0.0, 0.5, 1.5, 0.2, 2.0, 0.1, 1.0, 0.3],
                                     [1.0, 0.0, 0.3, 2.0, 0.4, 1.5, 0.0, 0.8]], dtype=F64), -1)
    d3pm = make(transition, K, T, model=ExactReverseModel(pi, Q[1]), absorbing_state=absorbing_state,
                schedule=None if schedule is None else schedule.clone(), eps=0.0)
    x_init = img(torch.tensor(x_T).expand(N, 2).contiguous())
    g = torch.Generator().manual_seed(99)
    _, traj = d3pm.sample((N, 1, 1, 2), steps=3, generator=g, return_trajectory=True, x_init=x_init)
    assert traj["t"].tolist() == [5, 3, 1]
    for row, s in [(1, 3), (2, 1)]:
        jump = torch.linalg.multi_dot([Q[r] for r in range(s + 1, T + 1)])     # Q_{s→T}
        x_s = traj["x_t"][row].reshape(N, 2)
        for d in range(2):
            want = (pi[d] @ Q_bar[s][:K]) * jump[:, x_T[d]]                     # q(x_s) q(x_T | x_s)
            p_value = chisquare_pvalue(x_s[:, d], want / want.sum())
            assert p_value > 1e-3, f"x_{s} | x_{T} = {x_T[d]} (pixel {d}): p = {p_value:.2e}"
            if transition == "gaussian" and s == 3:  # power: reading the jump's row is rejected
                wrong = (pi[d] @ Q_bar[s][:K]) * jump[x_T[d], :]
                assert chisquare_pvalue(x_s[:, d], wrong / wrong.sum()) < 1e-6


def test_q_sample_matches_q_probs():
    K, T, N = 4, 10, 20000
    for transition, absorbing_state in CONFIGS:
        d3pm = make(transition, K, T, absorbing_state=absorbing_state,
                    schedule=torch.linspace(0.1, 0.6, T, dtype=F64))
        g = torch.Generator().manual_seed(5)
        for t in [1, 5, T]:
            x_0 = torch.full((N, 1, 1, 1), 1, dtype=torch.long)
            x_t = d3pm.q_sample(x_0, full_t(N, t), generator=g)
            want = d3pm.Q_bar_matrix(t)[1]
            assert chisquare_pvalue(x_t.flatten(), want) > 1e-3, (transition, absorbing_state, t)


# ================================================================================================
# 8. eps = 0 (and the default eps): no NaN / inf at t = 1 and t = T
# ================================================================================================

class RandomTableModel:
    def __init__(self, S, K, T, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(T + 1, S, K, generator=g)

    def __call__(self, x_t, t, cond=None):
        return self.table[t.view(-1, *([1] * (x_t.dim() - 1))), x_t]


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("K", [2, 256])
@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
def test_no_nan_or_inf(transition, absorbing_state, K, eps):
    T, B = 10, 4
    S = num_states(transition, K, absorbing_state)
    g = torch.Generator().manual_seed(K)
    d3pm = make(transition, K, T, model=RandomTableModel(S, K, T), absorbing_state=absorbing_state,
                eps=eps)  # hybrid: its loss is finite iff "vb" and "ce" are
    x_0 = torch.randint(0, K, (B, 1, 4, 4), generator=g)
    x0_logits = torch.randn(B, 1, 4, 4, S, generator=g)

    def check_logits(logits, name):
        assert not torch.isnan(logits).any(), f"NaN in {name}"
        assert not (logits == math.inf).any(), f"+inf in {name}"
        if eps > 0:
            assert torch.isfinite(logits).all(), f"-inf in {name} with eps > 0"
        log_p = torch.log_softmax(logits, -1)
        assert not torch.isnan(log_p).any() and bool((log_p.exp().sum(-1) - 1).abs().max() < 1e-4)

    for t_val in [1, 2, T]:
        t = full_t(B, t_val)
        x_t = d3pm.q_sample(x_0, t, generator=g)
        assert int(x_t.min()) >= 0 and int(x_t.max()) < S
        check_logits(d3pm.q_posterior_logits(x_0, x_t, t), f"q_posterior_logits(int) t={t_val}")
        check_logits(d3pm.q_posterior_logits(x0_logits, x_t, t), f"q_posterior_logits(logits) t={t_val}")
        check_logits(d3pm.p_logits(x_t, t), f"p_logits t={t_val}")
        vb = d3pm.vb_terms_bpd(x_0, x_t, t)
        assert torch.isfinite(vb).all() and float(vb.min()) > -1e-5, (t_val, vb)
        for key, value in d3pm.loss_terms(x_0, x_t, t).items():
            assert torch.isfinite(value).all(), f"loss_terms[{key}] at t={t_val}"
    prior = d3pm.prior_bpd(x_0)
    assert torch.isfinite(prior).all() and float(prior.min()) > -1e-6
    loss, _ = d3pm.forward(x_0)
    assert torch.isfinite(loss)


# ================================================================================================
# 9. Loss bookkeeping and one training step
# ================================================================================================

@pytest.mark.parametrize("transition,absorbing_state", CONFIGS, ids=CONFIG_IDS)
def test_loss_terms_weights(transition, absorbing_state):
    K, T, B = 4, 10, 6
    S = num_states(transition, K, absorbing_state)
    model = RandomTableModel(S, K, T, seed=2)
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, K, (B, 1, 3, 3), generator=g)
    t = torch.tensor([1, 2, 3, 5, 9, 10])
    per_type = {}
    for loss_type in ["hybrid", "vb", "ce"]:
        d3pm = make(transition, K, T, model=model, absorbing_state=absorbing_state,
                    loss_type=loss_type, hybrid_coeff=0.25)
        x_t = d3pm.q_sample(x_0, t, generator=torch.Generator().manual_seed(1))
        per_type[loss_type] = terms = d3pm.loss_terms(x_0, x_t, t)
        torch.testing.assert_close(terms["vb"], d3pm.vb_terms_bpd(x_0, x_t, t))
        # ce = -log p̃(x_0 | x_t), mean over pixels, in bits, at every t
        ce = -torch.log_softmax(model(x_t, t), -1).gather(-1, x_0.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(terms["ce"], ce.reshape(B, -1).mean(1) / LN2, atol=1e-5, rtol=1e-5)
    h = per_type["hybrid"]
    torch.testing.assert_close(h["loss"], h["vb"] + 0.25 * h["ce"])
    torch.testing.assert_close(per_type["vb"]["loss"], per_type["vb"]["vb"])
    torch.testing.assert_close(per_type["ce"]["loss"], per_type["ce"]["ce"])


class TinyConvNet(nn.Module):
    def __init__(self, S, K, T, output="logits"):
        super().__init__()
        self.K, self.T, self.output = K, T, output
        self.embed = nn.Embedding(S, 8)
        self.conv = nn.Conv2d(9, 2 if output == "logistic" else K, 3, padding=1)

    def forward(self, x_t, t, cond=None):
        B, _, H, W = x_t.shape
        h = self.embed(x_t[:, 0]).permute(0, 3, 1, 2)                        # (B, 8, H, W)
        time = (t.float() / self.T)[:, None, None, None].expand(B, 1, H, W)
        out = self.conv(torch.cat([h, time], 1))
        if self.output == "logistic":
            return torch.tanh(out[:, :1]), out[:, 1:]                       # loc, log_scale (B,1,H,W)
        return out.permute(0, 2, 3, 1).unsqueeze(1)                          # (B, 1, H, W, K)


@pytest.mark.parametrize("transition,absorbing_state,output", [
    ("uniform", None, "logits"), ("absorbing", None, "logits"), ("absorbing", "mask", "logits"),
    ("gaussian", None, "logits"), ("gaussian", None, "logistic"), ("uniform", None, "logistic")])
def test_one_training_step(transition, absorbing_state, output):
    K, T = 4, 10
    torch.manual_seed(0)
    net = TinyConvNet(num_states(transition, K, absorbing_state), K, T, output)
    d3pm = make(transition, K, T, model=net, absorbing_state=absorbing_state, model_output=output)
    x_0 = torch.randint(0, K, (4, 1, 8, 8))
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)  # only gradients move them
    loss, info = d3pm.forward(x_0)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(float(gr.abs().max()) > 0 for gr in grads)
    opt.step()
    for b, p in zip(before, net.parameters()):
        assert torch.equal(b != p.detach(), p.grad != 0), "exactly the entries with a gradient move"
    assert float(net.conv.weight.grad.abs().min()) > 0
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------- 10. classifier-free guidance

class TwoHeads:
    """x0_model with fixed logits per pixel: `cond` (B, D, K) for a label, `uncond` for the
    null label (cond=None, as `sample` and `reverse_step` ask for the unconditional model)."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def __call__(self, x_t, t, cond=None):
        logits = self.uncond if cond is None else self.cond
        return logits.expand(x_t.shape + (logits.shape[-1],))


def exact_step_law(d, logits, x_t, t, s):
    """p_θ(x_s | x_t) from explicit float64 matrices, no eps: ∝ Q_{s→t}[j, x_t] (p̃ Q̄_s)_j.
    logits (D, K) over x̃_0, x_t (D,) -> (D, S)."""
    p0 = torch.softmax(logits.double(), -1)
    if d.num_states > d.num_classes:                        # x̃_0 is never [MASK]
        p0 = F.pad(p0, (0, 1))
    law = d.Q_matrix(t, s)[:, x_t].T * (p0 @ d.Q_bar_matrix(s))
    return law / law.sum(-1, keepdim=True)


def tilted(p_c, p_u, w):
    law = torch.where(p_c > 0, p_c ** (1 + w) * p_u.clamp_min(1e-300) ** (-w), 0.0)
    return law / law.sum(-1, keepdim=True)


@pytest.mark.parametrize("w", [0.5, 2.0])
@pytest.mark.parametrize("transition,absorbing_state", [("uniform", None), ("absorbing", "mask"),
                                                        ("gaussian", None)])
def test_guided_step_samples_the_tilted_law(transition, absorbing_state, w):
    """One guided step (and a strided jump) samples p_c^{1+w} p_u^{-w}, renormalised per pixel,
    with p_c, p_u the exact reverse distributions under the conditional and the null label
    [D-CFG, Schiff et al. 2024]. The unguided law, the untilted conditional one and the law with
    guidance's sign flipped are rejected by the same samples."""
    K, T, N = 5, 10, 20000
    g = torch.Generator().manual_seed(int(10 * w))
    cond_logits, uncond_logits = 1.5 * torch.randn(2, 1, 1, 4, K, generator=g)
    d = make(transition, K, T, TwoHeads(cond_logits, uncond_logits), absorbing_state,
             schedule=torch.linspace(0.1, 0.6, T, dtype=F64))
    x_t = torch.tensor([0, 2, K - 1, d.num_states - 1]).repeat(N, 1).view(N, 1, 1, 4)
    labels = torch.zeros(N, dtype=torch.long)
    for t, s in ((6, 5), (9, 3)):
        p_c = exact_step_law(d, cond_logits.view(4, K), x_t[0].flatten(), t, s)
        p_u = exact_step_law(d, uncond_logits.view(4, K), x_t[0].flatten(), t, s)
        x_s, _ = d.reverse_step(x_t, t, s, labels, guidance=w, generator=g)
        x_s = x_s.view(N, 4)
        cells = lambda law: x_s + d.num_states * torch.arange(4)  # noqa: E731  one cell per (pixel, state)
        fits = lambda law: chisquare_pvalue(cells(law), law.flatten())  # noqa: E731
        assert fits(tilted(p_c, p_u, w)) > 1e-4, (t, s)
        for wrong in (p_c, tilted(p_u, p_c, w), tilted(p_c, p_u, w / 2)):
            assert fits(wrong) < 1e-6, (t, s)


def test_guide_on_states_that_one_of_the_two_laws_rules_out():
    """guide((log p_c, log p_u), w) per state: (1+w) log p_c - w log p_u where both are > 0;
    exactly LOG_ZERO where p_c = 0 (whatever p_u); log p_c where only p_u = 0 (its float
    underflow), so such a state keeps its conditional probability rather than vanishing."""
    w = 2.0
    log_c = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0])).clamp_min(LOG_ZERO)
    log_u = torch.log(torch.tensor([0.6, 0.0, 0.4, 0.0])).clamp_min(LOG_ZERO)
    log_c[3], log_u[1], log_u[3] = LOG_ZERO, LOG_ZERO, LOG_ZERO
    out = guide(log_c, log_u, w)
    want = torch.stack([3 * log_c[0] - 2 * log_u[0], log_c[1], 3 * log_c[2] - 2 * log_u[2],
                        torch.tensor(LOG_ZERO)])
    assert torch.equal(out, want), out
    assert torch.equal(guide(log_c, log_c, w), log_c)        # identical laws: unchanged
    assert torch.equal(guide(log_u[[3, 0]], log_c[[3, 0]], w)[0], torch.tensor(LOG_ZERO))


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_a_decoded_absorbing_pixel_never_changes_under_guidance(w):
    """Absorbing with a [MASK] state: once a pixel leaves [MASK] it is final, since
    q(x_t = v | x_{t-1} = j) = 0 for j ≠ v. Guidance tilts p_θ, which gives every other value
    probability exactly 0 under both labels, so no w may move it (tilting the eps floor did:
    0.6 % a step at w = 1, 99.7 % at w = 2)."""
    K, T, N = 4, 20, 500
    cond = torch.log(torch.tensor([0.001, 0.9, 0.1, 0.001]))          # (·, 0.9, 0.1, ·)
    uncond = torch.tensor([-30.0, 0.0, -30.0, -30.0])                 # ≈ δ_1
    d = make("absorbing", K, T, TwoHeads(cond.view(1, 1, 1, K), uncond.view(1, 1, 1, K)), "mask",
             schedule=torch.linspace(0.02, 0.3, T, dtype=F64))    # x_T = 1 possible: ᾱ_T > 0
    g = torch.Generator().manual_seed(int(w))
    labels = torch.zeros(N, dtype=torch.long)
    for x_init in (None, torch.ones(N, 1, 1, 8, dtype=torch.long)):   # from [MASK], or decoded as 1
        _, traj = d.sample((N, 1, 1, 8), labels, guidance=w, generator=g, x_init=x_init,
                           return_trajectory=True)
        states = traj["x_t"]                                           # [T + 1, N, 1, 1, 8]
        decoded = states[:-1] != K
        assert decoded.any() and (states[1:][decoded] == states[:-1][decoded]).all()
        assert (states[-1] < K).all()


@pytest.mark.parametrize("w", [1e-9, 2.0])
def test_guidance_with_identical_predictions_is_the_unguided_law(w):
    """Uniform, K = 256, T = 1000, t = 10, x_t = 50, p̃ = δ_100 under both labels: every w gives
    the unguided exact law, P(x_9 = 100) = 0.135. Tilting log(p + eps) moved it to 0.36 at any
    w > 0 (the floor's ~1e-6 on each of 256 states outweighs the true 1e-7..1e-6 ones)."""
    K, T, N = 256, 1000, 4000
    logits = torch.full((1, 1, 1, K), -40.0)
    logits[..., 100] = 0.0
    d = make("uniform", K, T, TwoHeads(logits, logits))
    want = exact_step_law(d, logits.view(1, K), torch.tensor([50]), 10, 9)[0]
    assert abs(float(want[100]) - 0.135) < 0.001
    x_t = torch.full((N, 1, 1, 1), 50)
    x_s, _ = d.reverse_step(x_t, 10, 9, torch.zeros(N, dtype=torch.long), guidance=w,
                            generator=torch.Generator().manual_seed(7))
    x_s = x_s.flatten()
    cells = torch.where(x_s == 100, 0, torch.where(x_s == 50, 1, 2))   # 100 | 50 | the rest
    coarse = torch.stack([want[100], want[50], 1 - want[100] - want[50]])
    assert chisquare_pvalue(cells, coarse) > 1e-4, torch.bincount(cells, minlength=3)
