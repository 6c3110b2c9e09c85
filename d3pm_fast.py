"""FastD3PM: the same D3PM as `d3pm_runner.D3PM`, faster. Nothing here is needed to read the method.

`FastD3PM(D3PM)` overrides five methods with the same signatures and the same results (values,
gradients, sampled laws; tests/test_fast_paths.py compares each with the parent's method, and
the parity, brute-force and goodness-of-fit tests run against both classes):

  __init__        adds float32 copies of β, ᾱ, π and the Gaussian's Q_t as two (T, K) tables;
  q_sample        draws q(x_t | x_0) with one float64 uniform per pixel (uniform/absorbing: keep
                  x_0 with probability ᾱ_t, else draw from π), or for the Gaussian by a binary
                  search over the float64 CDF of the row Q̄_t[x_0]: no (N, S) Gumbel buffer;
  logistic_logits the truncated discretized logistic from its K + 1 shared bin edges, with a
                  hand-written backward to (loc, log_scale) (`_LogisticLogits`);
  kl_and_ce       the loss without explicit (N, S) posteriors (derivations below);
  reverse_step    the exact p_θ drawn without Gumbel noise over (N, S) (derivations below);
                  the Gaussian's guided steps tilt its two laws in log space; the other
                  transitions' guided steps, the last step and noise replays go to the parent.

Process-wide settings, made by this class alone: on the CPU its first loss or sampling step
runs `tune_cpu()` once (float32 denormals flush to zero in every thread; glibc keeps freed
buffers), and the Gaussian's p̃_θ Q̄ products run in exact float32 (`exact_float32`) whatever
precision the process allows elsewhere. Its exponentials go through `_exp_`, which gives 0 for
arguments below -87 (torch's CPU exp is 30-100x slower where its result is not a normal float).

    from d3pm_fast import FastD3PM      # a drop-in for d3pm_runner.D3PM; checkpoints load in both

Derivations
-----------
Uniform and absorbing, Q_t = (1-β_t) I + β_t 1 πᵀ. Write fact1_j = q(x_t | x_{t-1} = j) (one
value at j = x_t, one elsewhere), fact2 = ᾱ_{t-1} e_{x_0} + (1-ᾱ_{t-1}) π for q and
ᾱ_{t-1} p̃_θ + (1-ᾱ_{t-1}) π for p_θ, so q_j ∝ fact1_j fact2q_j and p_j ∝ fact1_j fact2p_j.
fact1 cancels in log q - log p:
    KL = Σ_j q_j (log fact2q_j - log fact2p_j) + log Z_p - log Z_q.
q is constant over the classes outside {x_0, x_t, m} ("other", m the absorbing state), so
Σ_j q_j log fact2p_j = q_other Σ_j log fact2p_j + Σ_{c ∈ slots} (q_c - q_other) log fact2p_c;
and fact2p sums to one, so Z_p = fact1_other + (1-β_t) fact2p_{x_t}. Only log Σ_j exp(logits_j)
and Σ_j log fact2p_j read all K logits (`_SoftmaxMixSums`, with an in-place backward). Every log
is floored at eps, as in the explicit form.

Discretized Gaussian, eps > 0. With fact1 = Q_t[:, x_t] (= row x_t: Q_t is symmetric),
g = Q̄_{t-1}[x_0] and m = p̃_θ Q̄_{t-1} [eq. 4], both posteriors share log(fact1 + eps), which
cancels: KL = Σ_j q_j log((g_j + eps) / (m_j + eps)) + log Z_p - log Z_q, with
Z_q = Σ_j (fact1_j + eps)(g_j + eps), Z_p = Σ_j (fact1_j + eps)(m_j + eps). The eps goes into
the B per-example matrices, not the (N, K) rows: m + eps = p̃_θ (Q̄ + eps) as p̃_θ sums to one.
One autograd Function (`_GaussianKL`) with a hand-written in-place backward.

Sampling, uniform and absorbing, 0 < s < t. With r = ᾱ_t / ᾱ_s, q(x_t | x_s = j) =
(1-r) π_{x_t} + r [j = x_t], and fact2 = ᾱ_s p̃_θ + (1-ᾱ_s) π sums to one, so
    p_θ(x_s = j | x_t) ∝ (1-r) π_{x_t} fact2_j + r fact2_{x_t} [j = x_t]:
keep x_t with probability P = r fact2_{x_t} / (r fact2_{x_t} + (1-r) π_{x_t}), else draw
j ~ fact2: from p̃_θ with probability ᾱ_s (Gumbel-max over its K logits), else from π. P grows
with p̃_θ(x_t) ∈ [0, 1], so a uniform below P(p̃ = 0) keeps x_t and one above P(p̃ = 1) leaves
it without computing P; softmax and Gumbel noise run only on the pixels that need them.

Sampling, Gaussian, 0 < s < t: p_θ(x_s = j | x_t) ∝ fact1_j fact2_j with fact1 = column x_t of
Q_{s→t} and fact2 = p̃_θ Q̄_s, multiplied in float32 and drawn by inverting the CDF in two
levels with float64 running sums (`_draw_categorical`). Where every product of a pixel is tiny
(row total < 1e-25, so that float32 could have lost some of it to underflow), the product is
redone in float64 from the same float32 factors, as the parent's sum of logs does.
"""

import ctypes
import math
import os
import platform
from contextlib import contextmanager

import torch

from d3pm_runner import LOG_ZERO, D3PM, guide, gumbel_argmax, log_or_zero


class FastD3PM(D3PM):
    """`d3pm_runner.D3PM` with faster forms of q_sample, logistic_logits, kl_and_ce and
    reverse_step (module docstring). Same constructor, same results, same state_dict."""

    tune_cpu_on_first_use = True   # False: leave the process's settings alone (bench.py)
    _cpu_tuned = False             # tune_cpu() runs once per process, on the first CPU call

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        buf = lambda name, value: self.register_buffer(name, value, persistent=False)  # noqa: E731
        buf("beta32", self.betas.float())
        buf("stationary32", self.stationary.float())
        if self.transition == "gaussian":   # Q_t[i, j] depends only on |i - j| off the diagonal
            Q = [self.Q_matrix(t) for t in range(1, self.num_timesteps + 1)]
            buf("Q_band", torch.stack([Q_t[0] for Q_t in Q]).float())             # [T, K]
            buf("Q_diag", torch.stack([Q_t.diagonal() for Q_t in Q]).float())     # [T, K]
        else:
            buf("alpha_bar32", self.alpha_bar.float())
            buf("one_minus_alpha_bar32", (1 - self.alpha_bar).float())   # exact near ᾱ ≈ 1

    # ------------------------------------------------------------------ overrides
    def q_sample(self, x_0, t, noise=None, generator=None):
        if noise is not None:
            return super().q_sample(x_0, t, noise, generator)
        self._check(x_0, t)
        if self.transition == "gaussian":
            ts, which = t, torch.arange(t.numel(), device=t.device)
            if t.device.type == "cpu":  # one CDF per distinct t (a host sync on a GPU)
                ts, which = t.unique(return_inverse=True)
            return self._inverse_cdf(self.Q_bar[ts].double().cumsum(-1), which, x_0, generator)
        u = torch.rand(x_0.shape, dtype=torch.float64, generator=generator, device=x_0.device)
        replace = u < 1 - self._per_example(self.alpha_bar[t], x_0[..., 0])
        if self.transition == "absorbing":
            return torch.where(replace, self.absorbing_state, x_0)
        draw = torch.randint(0, self.num_classes, x_0.shape, generator=generator, device=x_0.device)
        return torch.where(replace, draw, x_0)

    def kl_and_ce(self, x_0, x_t, t, x0_logits):
        self._tune(x_0.device)
        if self.transition != "gaussian":
            return self._kl_closed_form(x_0, x_t, t, x0_logits)
        if self.eps > 0:
            return self._kl_gaussian(x_0, x_t, t, x0_logits)
        return super().kl_and_ce(x_0, x_t, t, x0_logits)

    def reverse_step(self, x_t, t, s, cond=None, guidance=0.0, generator=None, noise=None):
        gaussian = self.transition == "gaussian"
        if s == 0 or noise is not None or (guidance > 0 and not gaussian):
            return super().reverse_step(x_t, t, s, cond, guidance, generator, noise)
        self._tune(x_t.device)
        if gaussian:
            return self._step_gaussian(x_t, t, s, cond, generator, guidance)
        return self._step_mixture(x_t, t, s, cond, generator)

    def logistic_logits(self, loc, log_scale):
        if self.eps == 0:
            return super().logistic_logits(loc, log_scale)
        K = self.num_classes
        lin = torch.linspace(-1.0, 1.0, K, device=loc.device)
        edges = torch.cat([lin - 1.0 / (K - 1), lin[-1:] + 1.0 / (K - 1)])      # K + 1 bin edges
        out = _LogisticLogits.apply(loc.float().reshape(-1, 1), log_scale.float().reshape(-1, 1),
                                    edges, self.eps)
        return out.view(loc.shape + (K,))

    # ------------------------------------------------------------------ the loss
    def _kl_closed_form(self, x_0, x_t, t, x0_logits):
        """`kl_and_ce` for uniform and absorbing in two passes over the K logits (module
        docstring); x0_logits (B, ..., K) without a [MASK] column."""
        K, S, eps = self.num_classes, self.num_states, self.eps
        absorbing = self.transition == "absorbing"
        px = lambda v: v[t - 1].view(-1, *([1] * (x_t.dim() - 1)))  # noqa: E731  [B] -> (B, 1, ...)
        beta, ab, omb = px(self.beta32), px(self.alpha_bar32), px(self.one_minus_alpha_bar32)
        pi_0, pi_t = self.stationary32[x_0], self.stationary32[x_t]
        off = beta * pi_t                                  # fact1_j, j ≠ x_t
        diag = 1 - beta + off                             # fact1_{x_t}
        # slots (B, ..., n): x_0; x_t if ≠ x_0; absorbing: m if ∉ {x_0, x_t}
        idx, valid = [x_0, x_t], [torch.ones_like(x_0, dtype=torch.bool), x_t != x_0]
        fact1, fact2q, pi_slot = [torch.where(x_t == x_0, diag, off), diag], [ab + omb * pi_0, omb * pi_t], [pi_0, pi_t]
        if absorbing:
            m = self.absorbing_state
            idx.append(torch.full_like(x_0, m))
            valid.append((x_0 != m) & (x_t != m))
            fact1.append(off)
            fact2q.append(omb.expand_as(off))
            pi_slot.append(torch.ones_like(off))
        idx, valid, pi_slot = torch.stack(idx, -1), torch.stack(valid, -1), torch.stack(pi_slot, -1)
        pi_other = 0.0 if absorbing else 1.0 / K
        n_other = S - valid.sum(-1)
        log_fact2q, log_fact2q_other = self._flog(torch.stack(fact2q, -1)), self._flog(omb * pi_other)

        # q(x_{t-1} | x_t, x_0) at the slots and at each "other" class
        v = self._flog(torch.stack(fact1, -1)) + log_fact2q
        v_other = self._flog(off) + log_fact2q_other
        log_zq = torch.logsumexp(torch.cat([v.masked_fill(~valid, -math.inf),
                                            (v_other + n_other.float().log()).unsqueeze(-1)], -1), -1)
        q = torch.where(valid, (v - log_zq.unsqueeze(-1)).exp(), 0.0)
        q_other = torch.where(n_other > 0, (v_other - log_zq).exp(), 0.0)

        # p_θ: fact2p at the slots, Σ_j log fact2p_j and Z_p
        with_sum = not (absorbing and eps == 0)  # else q_other = 0: the sum is not needed
        lse, sum_log, logits_slot = _SoftmaxMixSums.apply(
            x0_logits, idx.clamp_max(K - 1), ab.unsqueeze(-1), (omb * pi_other + eps).unsqueeze(-1),
            with_sum)
        p0_slot = torch.where(idx < K, (logits_slot - lse.unsqueeze(-1)).exp(), 0.0)  # p̃_θ
        log_fact2p = self._flog(ab.unsqueeze(-1) * p0_slot + omb.unsqueeze(-1) * pi_slot)
        if absorbing and with_sum:  # the sum took fact2p_m = ᾱ p̃_m (+ eps) for m < K; fix it
            sum_log = sum_log + log_fact2p[..., 2]
            if m < K:
                sum_log = sum_log - torch.log(ab * p0_slot[..., 2] + eps)
        log_zp = ((off + eps) * (1 + S * eps) + (1 - beta) * log_fact2p[..., 1].exp()).clamp_min(
            torch.finfo(torch.float32).tiny).log()
        q_log_fact2q = (q * log_fact2q).sum(-1) + n_other * q_other * log_fact2q_other
        q_log_fact2p = q_other * sum_log + (torch.where(valid, q - q_other.unsqueeze(-1), 0.0)
                                            * log_fact2p).sum(-1)
        kl = q_log_fact2q - q_log_fact2p + log_zp - log_zq
        return kl, lse - logits_slot[..., 0]

    def _kl_gaussian(self, x_0, x_t, t, x0_logits):
        """`kl_and_ce` for the discretized Gaussian with eps > 0, in one autograd Function that
        reads and writes each (B, ..., K) buffer a few times only (module docstring)."""
        B, K = x_0.shape[0], self.num_classes
        Q_bar = self.Q_bar[t - 1].add_(self.eps)                # (B, K, K): Q̄_{t-1} + eps
        fact1 = self._rows(self._Q_t(t).add_(self.eps), x_t).view(B, -1, K)
        g = self._rows(Q_bar, x_0).view(B, -1, K)
        kl, ce = _GaussianKL.apply(x0_logits.reshape(B, -1, K), Q_bar, fact1, g, x_0.reshape(B, -1, 1))
        return kl.view(x_0.shape), ce.view(x_0.shape)

    # ------------------------------------------------------------------ sampling
    def _step_mixture(self, x_t, t, s, cond=None, generator=None):
        """`reverse_step` for uniform and absorbing, 0 < s < t: the exact p_θ as a three-way
        mixture, float64 Gumbel-max only where needed (module docstring)."""
        K, device = self.num_classes, x_t.device
        logits = self.model_logits(x_t, torch.full((x_t.shape[0],), t, device=device), cond)
        a = self.alpha_bar
        jump = self.betas[t - 1] if s == t - 1 else 1 - a[t] / a[s]         # 1 - r
        pi_t = self.stationary[x_t]

        def keep_prob(p0, pi_t):  # P at p̃_θ(x_t) = p0; 1 where x_t cannot be left (π_{x_t} = 0)
            stay, leave = (1 - jump) * (a[s] * p0 + (1 - a[s]) * pi_t), jump * pi_t
            return torch.where(leave > 0, stay / (stay + leave), 1.0)

        u = torch.rand(x_t.shape, dtype=torch.float64, generator=generator, device=device)
        keep = u < keep_prob(0.0, pi_t)
        open_ = ~keep & (u < keep_prob(1.0, pi_t))          # P depends on p̃_θ(x_t) here
        x_open, logits_open = x_t[open_], logits[open_]    # (n,), (n, K)
        p0 = (logits_open.gather(-1, x_open.clamp_max(K - 1).unsqueeze(-1)).squeeze(-1)
              - torch.logsumexp(logits_open, -1)).exp().double() * (x_open < K)  # p̃_m = 0
        keep[open_] = u[open_] < keep_prob(p0, pi_t[open_])
        from_p0 = ~keep & (torch.rand(x_t.shape, dtype=torch.float64, generator=generator,
                                      device=device) < a[s])
        x_s = x_t.clone()
        chosen = logits[from_p0].double()                  # (n, K): Gumbel-max in float64
        x_s[from_p0] = gumbel_argmax(chosen, generator=generator)
        from_s = ~keep & ~from_p0
        if self.transition == "absorbing":
            return x_s.masked_fill_(from_s, self.absorbing_state), logits
        draw = torch.randint(0, K, x_t.shape, generator=generator, device=device)
        return torch.where(from_s, draw, x_s), logits

    def _step_gaussian(self, x_t, t, s, cond, generator, guidance=0.0):
        """`reverse_step` for the discretized Gaussian, 0 < s < t: the exact p_θ by inverse
        CDF, no Gumbel noise over (N, K) (module docstring); unguided, no logs either."""
        K, tt = self.num_classes, torch.full((x_t.shape[0],), t, device=x_t.device)
        logits = self.model_logits(x_t, tt, cond)
        fact1 = (self._Q_t(torch.tensor([t], device=x_t.device))[0] if s == t - 1
                 else self.Q_matrix(t, s).T.float())         # row x_t = column x_t of Q_{s→t}
        if guidance > 0:
            logits_u = self.model_logits(x_t, tt, None)
            x0 = _guide_logits(logits, logits_u, guidance)
            x_s = self._draw_guided(fact1, x_t.reshape(-1), self._fact2(logits, s),
                                    self._fact2(logits_u, s), guidance, generator)
            return x_s.view(x_t.shape), x0
        fact1 = fact1.index_select(0, x_t.reshape(-1))
        p = self._fact2(logits, s).mul_(fact1)
        x_s, total = _draw_categorical(p, generator)
        low = (total < 1e-25).nonzero().flatten()              # float32 may have underflowed
        if len(low):                                           # redo those rows in float64
            redo = self._fact2(logits.reshape(-1, K)[low], s).double() * fact1[low].double()
            top = redo.amax(-1, keepdim=True)  # 0 only if the prediction excludes x_t outright
            redo = torch.where(top > 0, redo / top.clamp_min(1e-300), fact1[low].double())
            x_s[low] = _draw_categorical(redo.float(), generator)[0]
        return x_s.view(x_t.shape), logits

    @staticmethod
    def _draw_guided(fact1, x_t, fact2_c, fact2_u, w, generator):
        """x_s ~ p_w ∝ p_c^{1+w} p_u^{-w} per pixel, the parent's `guide` of the two normalised
        laws p ∝ fact1 fact2 (fact1 (S, S) with row x_t = column x_t of Q_{s→t}; fact2 (N, S)).
        The laws' normalisers are per-pixel constants, so log p_w = log fact1 + (1+w) log fact2_c
        - w log fact2_u up to one: five passes over (N, S) in place of the parent's ~25. A zero
        factor gives log 0 = -inf, which is guide's answer (probability 0) except where fact2_u
        alone is 0 (+inf) or both are (NaN), or a whole row is 0: such rows take guide itself."""
        log_c = fact2_c.log()
        log_w = fact2_u.log().sub_(log_c).mul_(-w).add_(log_c)
        log_w += fact1.log().index_select(0, x_t)
        top = log_w.amax(-1, keepdim=True)                       # NaN or ±inf: a row for guide
        x_s = _draw_categorical(_exp_(log_w.sub_(top)), generator)[0]
        redo = (~torch.isfinite(top.squeeze(-1))).nonzero().flatten()
        if len(redo):
            log_f1 = log_or_zero(fact1.index_select(0, x_t[redo]))
            log_c, log_u = (torch.log_softmax(log_or_zero(f2[redo]) + log_f1, -1) for f2 in (fact2_c, fact2_u))
            x_s[redo] = _draw_categorical(torch.softmax(guide(log_c, log_u, w), -1), generator)[0]
        return x_s

    # ------------------------------------------------------------------ helpers
    def _fact2(self, logits, s):
        """p̃_θ Q̄_s for logits (..., K): float32 (N, K)   [eq. 4]."""
        with exact_float32(logits.device):
            return torch.softmax(logits, -1).view(-1, self.num_classes) @ self.Q_bar[s]

    def _tune(self, device):
        if device.type == "cpu" and self.tune_cpu_on_first_use and not FastD3PM._cpu_tuned:
            tune_cpu()
            FastD3PM._cpu_tuned = True

    def _flog(self, p):
        return log_or_zero(p, self.eps)

    def _Q_t(self, t):
        """The Gaussian's Q_t for each t in a long [B], float32 (B, K, K), from its two tables:
        the same float32 numbers as Q_matrix(t).float()."""
        K = self.num_classes
        idx = torch.arange(K, device=t.device)
        Q = self.Q_band[t - 1].index_select(1, (idx[:, None] - idx).abs().view(-1)).view(-1, K, K)
        Q.diagonal(dim1=-2, dim2=-1).copy_(self.Q_diag[t - 1])
        return Q

    @staticmethod
    def _rows(mats, x):
        """mats[b, x[b, ...]]: one row per pixel, mats (B, R, K), x long (B, ...) -> (B, ..., K)."""
        B, R, K = mats.shape
        flat = (torch.arange(B, device=x.device).view(B, 1) * R + x.reshape(B, -1)).view(-1)
        return mats.reshape(-1, K).index_select(0, flat).view(x.shape + (K,))

    def _inverse_cdf(self, cdf, which, row, generator=None):
        """x ~ Cat(cdf[which_b, row] as a CDF) per pixel, by inversion: one float64 uniform per
        pixel and a binary search over K (log2 K gathers of one value per pixel, no (B, ..., K)
        buffer). cdf (U, R, K) float64, nondecreasing along K; which long [B]; row long (B, ...)."""
        K = cdf.shape[-1]
        base = (which * cdf.shape[1]).view(-1, *([1] * (row.dim() - 1)))
        base = (base + row) * K                                    # flat offset of each row
        flat = cdf.reshape(-1)
        u = torch.rand(row.shape, dtype=torch.float64, generator=generator, device=row.device)
        u = u * flat[base + K - 1]                                 # the row's total (≈ 1)
        below = torch.zeros_like(row)                              # #{j : cdf_j <= u} so far
        step = 1 << (K.bit_length() - 1)
        while step:
            probe = below + step                                   # is cdf[probe - 1] <= u?
            ok = (probe <= K) & (flat[base + probe.clamp_max(K) - 1] <= u)
            below = torch.where(ok, probe, below)
            step >>= 1
        return below.clamp_max(K - 1)                              # u = total by rounding



_EXP_FLOOR = -87.0   # exp(-87) = 1.6e-38, just above float32's smallest normal (1.2e-38)


def _exp_(x):
    """x.exp_() for float32, with arguments below -87 giving exactly 0 (-inf included) and the
    others exp(x) - 1.6e-38 (a shift below anything float32 resolves beside 1e-37). torch's CPU
    exp takes 30-100x longer per element on arguments whose result is not a normal float32
    (2.14, AVX-512: 110 ms instead of 1.5 for 6.4 M values at -88, still 11 ms at -inf), and the
    far tails of a narrow p̃_θ are full of them."""
    return x.clamp_min_(_EXP_FLOOR).exp_().sub_(math.exp(_EXP_FLOOR))


def _guide_logits(logits_c, logits_u, w):
    """`guide` of the two normalised x̃_0 laws: where neither holds a zero (finite logits) it is
    the plain tilt, without guide's four passes of zero tests."""
    log_c, log_u = torch.log_softmax(logits_c, -1), torch.log_softmax(logits_u, -1)
    if min(float(log_c.min()), float(log_u.min())) > LOG_ZERO / 2:
        return log_c.mul_(1 + w).sub_(log_u, alpha=w)
    return guide(log_c, log_u, w)


class _LogisticLogits(torch.autograd.Function):
    """`D3PM.logistic_logits` for eps > 0 from the K + 1 shared bin edges, with a hand-written
    backward to (loc, log_scale): two (N, K) logsigmoids and their autograd graph cost ~3x as
    much (torch's logsigmoid kernel alone is ~20x slower than a sigmoid on the CPU).

    loc, log_scale (N, 1) float32; edges (K + 1,). With z_e = (edge_e - loc) / s, 1/s =
    exp(2 - clamp(log_scale, ±20)), ℓ_e = log σ(z_e) = min(z_e, 0) - log1p(exp(-|z_e|)), bin k
    between edges k (lower, L) and k+1 (upper, U) gets the parent's logit
        logit_k = U_k + log1p(eps - exp(L_k - U_k)).
    Gradient: ∂logit_k/∂U_k = 1 + ρ_k, ∂logit_k/∂L_k = -ρ_k with ρ_k = exp(L_k - logit_k);
    ∂ℓ_e/∂z_e = σ(-z_e); ∂z_e/∂loc = -1/s, ∂z_e/∂log_scale = -z_e (inside
    the clamp; 0 outside, as torch.clamp's).
    """

    @staticmethod
    def forward(ctx, loc, log_scale, edges, eps):
        inside = (log_scale >= -20.0) & (log_scale <= 20.0)
        inv_scale = torch.exp(2.0 - log_scale.clamp(-20.0, 20.0))
        z = (edges - loc).mul_(inv_scale)                               # (N, K + 1)
        log_cdf = torch.clamp_max(z, 0.0).sub_(_exp_(z.abs().neg_()).log1p_())   # log σ(z)
        lower, upper = log_cdf[:, :-1], log_cdf[:, 1:]
        logits = _exp_(torch.sub(lower, upper)).neg_().add_(eps).log1p_().add_(upper)
        ctx.save_for_backward(z, log_cdf, logits, inv_scale, inside)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, log_cdf, logits, inv_scale, inside = ctx.saved_tensors
        g_rho = _exp_(torch.sub(log_cdf[:, :-1], logits)).mul_(g)       # g ρ   (N, K)
        g_edge = torch.zeros_like(z)                                     # ∂/∂ℓ_e   (N, K + 1)
        torch.add(g, g_rho, out=g_edge[:, 1:])
        g_edge[:, :-1] -= g_rho
        g_z = torch.sigmoid(z.neg()).mul_(g_edge)                        # ∂/∂z_e
        g_loc = -inv_scale * g_z.sum(-1, keepdim=True)
        g_log_scale = -(g_z.mul_(z)).sum(-1, keepdim=True) * inside
        return g_loc, g_log_scale, None, None


class _SoftmaxMixSums(torch.autograd.Function):
    """The two sums over all K logits that `FastD3PM._kl_closed_form` needs, with a hand-written
    backward that works in place (autograd's takes about three times as many passes over
    (B, ..., K), each with a fresh buffer).

    L (..., K) logits, idx (..., n) long, a and c (..., 1) broadcastable constants. Returns
      lse = log Σ_j exp(L_j),  mix = Σ_j log(a p_j + c) with p = softmax(L)  (0 unless with_mix),
      L.gather(-1, idx).
    Gradients: ∂lse/∂L_k = p_k; with r_j = a p_j / (a p_j + c), ∂mix/∂L_k = r_k - p_k Σ_j r_j.
    """

    @staticmethod
    def forward(ctx, L, idx, a, c, with_mix):
        M = L.detach().amax(-1, keepdim=True)
        E = (L - M).exp_()                                 # p = E / Z
        Z = E.sum(-1, keepdim=True)
        D = None
        mix = torch.zeros(L.shape[:-1], dtype=L.dtype, device=L.device)
        if with_mix:
            # a p + c = a D / Z with D = E + (c / a) Z; the clamps keep every log finite
            tiny = torch.finfo(L.dtype).tiny
            a = a.clamp_min(1e-20)
            ctx.shift = c.clamp_min(tiny) / a * Z
            D = (E + ctx.shift).log_()                     # a buffer the backward reuses
            mix = D.sum(-1) + L.shape[-1] * (a.log() - Z.log()).squeeze(-1)
        ctx.save_for_backward(E, Z, D, idx)
        return (M + Z.log()).squeeze(-1), mix, L.gather(-1, idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lse, g_mix, g_idx):
        E, Z, D, idx = ctx.saved_tensors                  # used up: E and D are overwritten
        coef_p = g_lse.unsqueeze(-1) / Z                   # grad = E coef_p + r g_mix
        if D is None:
            grad = E.mul_(coef_p)
        else:
            r = torch.div(E, torch.add(E, ctx.shift, out=D), out=D)  # r_j = E_j / D_j
            g_mix = g_mix.unsqueeze(-1)
            grad = E.mul_(coef_p - g_mix * r.sum(-1, keepdim=True) / Z).addcmul_(r, g_mix)
        return grad.scatter_add_(-1, idx, g_idx), None, None, None, None


def _draw_categorical(p, generator=None, block=16, u=None):
    """One draw per row of unnormalised probabilities p (N, K) float32 by inverting the CDF
    with a float64 uniform, in two levels so that no (N, K) float64 buffer is made: a block of
    `block` classes by the float64 running sum of the blocks' totals, then a class inside it by
    the float64 running sum of its values. Relative precision of every probability ≈ float32's,
    tiny ones included (a float32 running sum over all K would lose those). `u` (N,) float64
    in [0, 1) replaces the fresh uniforms (tests). Returns (index long [N], row total [N])."""
    N, K = p.shape
    bs = block if K % block == 0 else K
    p = p.view(N, K // bs, bs)
    blocks = p.sum(-1).double()                                  # (N, nb)
    cum = blocks.cumsum(-1)
    total = cum[:, -1:]
    if u is None:
        u = torch.rand(total.shape, dtype=torch.float64, generator=generator, device=p.device)
    u = u.view(N, 1) * total
    b = torch.searchsorted(cum, u, right=True).clamp_max_(K // bs - 1)  # the block
    inner = p.gather(1, b.unsqueeze(-1).expand(N, 1, bs)).squeeze(1).double().cumsum_(-1)
    mass = blocks.gather(-1, b)                                  # > 0 whenever total > 0
    u = (u - (cum.gather(-1, b) - mass)) * (inner[:, -1:] / mass.clamp_min(1e-300))
    j = torch.searchsorted(inner, u, right=True).clamp_max_(bs - 1)
    return (b * bs + j).squeeze(-1), total.squeeze(-1)


@contextmanager
def exact_float32(device):
    """float32 math as written: no autocast, and float32 matmuls in full precision whatever the
    process allows elsewhere (train() allows TF32 on CUDA for the network;
    torch.set_float32_matmul_precision("medium") would let oneDNN use bf16 on the CPU). The
    posterior and KL stay in float32. The backend's setting is read and restored through the
    per-backend `fp32_precision` API, and only touched when it is lowered."""
    backend = (torch.backends.cuda.matmul if device.type == "cuda"
               else getattr(torch.backends.mkldnn, "matmul", None))
    saved = getattr(backend, "fp32_precision", "none")
    lowered = saved not in ("none", "ieee")
    try:
        if lowered:
            backend.fp32_precision = "ieee"
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if lowered:
            backend.fp32_precision = saved


class _GaussianKL(torch.autograd.Function):
    """KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) and ce = -log p̃_θ(x_0 | x_t) per pixel for
    an explicit Q̄_{t-1} (see `FastD3PM._kl_gaussian`), with a hand-written backward. Every step
    works in place or into a buffer that is no longer needed: on the CPU a fresh (B, N, K)
    buffer costs about as much as three passes over one (page faults). float32 only.

    L (B, N, K) logits; Qb (B, K, K) = Q̄_{t-1} + eps per example; f1 = fact1 + eps and
    g = Q̄_{t-1}[x_0] + eps (B, N, K), both consumed; idx0 (B, N, 1) = x_0. Returns kl, ce (B, N).
    With m = p̃_θ Qb = p̃_θ Q̄_{t-1} + eps and q̂ = f1 g (q = q̂ / Z_q):
        KL = Σ_j q̂_j log(q̂_j / (f1_j m_j)) / Z_q + log Z_p - log Z_q,   Z_p = Σ_j f1_j m_j.
    Gradient: ∂KL/∂m_j = f1_j / Z_p - q_j / m_j, taken back to p̃_θ through Qbᵀ (its eps adds the
    same number to every ∂/∂p̃_k, which the softmax ignores), then through the softmax:
    ∂/∂L_k = p̃_k (∂/∂p̃_k - Σ_i p̃_i ∂/∂p̃_i); and ∂ce/∂L = p̃ - onehot(x_0).
    The backward reuses its saved buffers, so the graph can be backpropagated once (a second
    backward, e.g. with retain_graph=True, raises autograd's in-place error), as
    `_SoftmaxMixSums`.
    """

    @staticmethod
    def forward(ctx, L, Qb, f1, g, idx0):
        with exact_float32(L.device):
            P = torch.log_softmax(L, -1)
            ce = -P.gather(-1, idx0).squeeze(-1)
            P = _exp_(P)                                         # p̃_θ
            m = torch.bmm(P, Qb)                                 # p̃_θ Q̄_{t-1} + eps  [eq. 4]
            q_hat = g.mul_(f1)
            z_q = q_hat.sum(-1)
            scratch = torch.mul(f1, m)
            z_p = scratch.sum(-1)
            kl = torch.div(q_hat, scratch, out=scratch).log_().mul_(q_hat).sum(-1) / z_q
            kl += z_p.log() - z_q.log()
        ctx.save_for_backward(P, Qb, f1, q_hat, m, z_p, z_q, idx0)
        return kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kl, g_ce):
        P, Qb, f1, q_hat, m, z_p, z_q, idx0 = ctx.saved_tensors  # q_hat, m are overwritten
        with exact_float32(P.device):
            g_kl, g_ce = g_kl.unsqueeze(-1), g_ce.unsqueeze(-1)
            d_m = q_hat.div_(m).mul_(-g_kl / z_q.unsqueeze(-1)).addcmul_(f1, g_kl / z_p.unsqueeze(-1))
            d_p = torch.bmm(d_m, Qb.transpose(1, 2))
            dot = torch.mul(P, d_p, out=m).sum(-1, keepdim=True)  # m is free again
            grad = d_p.sub_(dot - g_ce).mul_(P)                  # + g_ce (p̃ - onehot(x_0))
            grad.scatter_add_(-1, idx0, -g_ce)
        return grad, None, None, None, None


def tune_cpu():
    """Process-wide CPU settings that FastD3PM's first CPU call makes (bench.py too); README
    "Speed" has their effect. (1) float32 denormals (< 1.2e-38) flush to zero in every thread:
    x86 multiplies them ~20-100x slower, and the Gaussian's p̃_θ Q̄ products are full of them;
    they lie far below the eps = 1e-6 floor of every log. `torch.set_flush_denormal` sets only
    the calling thread, and OpenMP's worker threads copy that setting when they are created, so
    the pool made before (by any earlier parallel op) is released (OpenMP 5.0's
    `omp_pause_resource_all`) and remade with it: otherwise one of two threads still takes ~35x
    longer over a denormal-heavy bmm. (2) glibc keeps freed blocks up to 32 MB for reuse instead
    of returning them to the OS: each fresh (B, ..., K) buffer otherwise costs ~1.5 ns per element
    in page faults, a few percent of every step. Each part is skipped where its library is absent."""
    torch.set_flush_denormal(True)
    if platform.system() != "Linux":
        return
    for lib in _loaded_libraries("libgomp", "libiomp"):
        try:
            pause = ctypes.CDLL(lib).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
        pause(2)   # omp_pause_hard: the next parallel region starts new threads
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3              # from <malloc.h>
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)                 # glibc's default ceiling
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _loaded_libraries(*names):
    """Paths of the shared libraries loaded in this process whose file name starts with one of
    `names` (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(names))
