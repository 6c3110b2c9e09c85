"""D3PM in one file: discrete denoising diffusion on MNIST.

Implements "Structured Denoising Diffusion Models in Discrete State-Spaces"
(Austin, Johnson, Ho, Tarlow, van den Berg, NeurIPS 2021, arXiv:2107.03006), checked term by
term against the official JAX code (google-research/d3pm, `images/diffusion_categorical.py`).

    python d3pm_runner.py --preset cpu --data-root ../shared/data    # train on MNIST, CPU
    python d3pm_runner.py --help                                       # every option

Sections, in paper order:
  1. schedules and transition matrices Q_t          (paper §3.1, §3.2, App. A.2)
  2. the D3PM class: forward process q               (eq. 1-3)
     posterior q(x_{t-1}|x_t,x_0) and p_θ            (eq. 3, 4)
     losses: L_vb, L_0, L_T, hybrid L_λ, NLL         (eq. 1, 5)
     sampler                                         (§3.3)
  3. the network (a small class-conditioned conv net; nothing in it is specific to D3PM)
  4. data, training loop and command line           (the last two may be skipped on first read)

Shape legend: B batch, C channels, H/W height/width, K = num_classes (values a pixel can take),
S = num_states (K, or K+1 when the absorbing process has its own [MASK] state), T = num_timesteps.
Every per-pixel distribution keeps its class axis last: (B, C, H, W, S).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# log(0) as a finite number: exp(LOG_ZERO) == 0 in float32, and unlike -inf it never turns a
# product 0 * log(0) or a gradient into NaN. Used only where a probability is exactly zero.
LOG_ZERO = -1e30


# ================================================================================================
# 1. Schedules and one-step transition matrices Q_t
# ================================================================================================

def get_betas(name, num_timesteps):
    """β_1..β_T in float64 (index t-1 holds β_t), as the official `get_diffusion_betas`."""
    T = num_timesteps
    if name == "linear":  # DDPM's schedule; the paper's choice for the discretized Gaussian
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if name == "cosine":
        # Nichol & Dhariwal's schedule, but the official code leaves the cosine UNSQUARED
        # (ᾱ(s) = cos(...), not cos²(...)); we follow the code, see README "Differences".
        s = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2)
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if name == "jsd":  # β_t = 1/(T-t+1): 1/T, 1/(T-1), ..., 1. The paper's absorbing schedule.
        return 1.0 / torch.linspace(T, 1, T, dtype=torch.float64)
    raise ValueError(f"unknown schedule {name!r}; expected 'linear', 'cosine' or 'jsd'")


DEFAULT_SCHEDULE = {"uniform": "cosine", "absorbing": "jsd", "gaussian": "linear"}


def gaussian_Q(beta, num_classes):
    """Discretized-Gaussian Q_t, float64 (K, K)   [D3PM eq. 8, App. A.2.2].

    Q[i, j] = exp(-4|i-j|² / ((K-1)² β)) / Σ_{n=-(K-1)}^{K-1} exp(-4n² / ((K-1)² β)) for i ≠ j,
    and the diagonal takes the rest of each row. The official code spaces the values as
    linspace(0, 255, K) whatever K is, which equals this only at K = 256 (for smaller K its
    matrix is the identity); we follow the paper for every K.
    """
    K = num_classes
    n = torch.arange(-(K - 1), K, dtype=torch.float64)
    p = torch.softmax(-4.0 * n**2 / ((K - 1) ** 2 * float(beta)), dim=0)[K - 1:]  # p_|i-j|
    idx = torch.arange(K)
    Q = p[(idx[:, None] - idx[None, :]).abs()]  # symmetric by construction
    Q.fill_diagonal_(0.0)
    Q += torch.diag(1.0 - Q.sum(1))
    return Q


# ================================================================================================
# 2. The D3PM process
# ================================================================================================

class D3PM(nn.Module):
    """Discrete diffusion with an x_0-parameterized reverse process   [D3PM §3].

    Time convention, as in the paper (the official code is 0-based; its t is our t-1):
    x_0 is data, t ∈ {1..T}, x_t ~ q(x_t | x_0) = Cat(x_0 Q̄_t) with Q̄_t = Q_1 Q_2 ... Q_t and
    Q̄_0 = I. Q[i, j] = q(x_t = j | x_{t-1} = i): rows are "from", and rows sum to one.

    Uniform and absorbing transitions have the form Q_t = (1-β_t) I + β_t 1 sᵀ with s their
    stationary distribution (uniform: 1/K; absorbing: e_m), so Q̄_t = ᾱ_t I + (1-ᾱ_t) 1 sᵀ with
    ᾱ_t = Π_{r≤t}(1-β_r)   [App. A.2.1, A.2.3]. We use these closed forms and store only
    β, ᾱ and s (O(T + K) numbers). The discretized Gaussian has no such form: its Q_t and Q̄_t
    are built in float64 and stored as float32 stacks (T x K x K each).

    `x0_model(x_t, t, cond)` returns logits over x_0 of shape x_t.shape + (K,) (or, with
    model_output="logistic", a (loc, log_scale) pair of x_t's shape); t is the 1-based step.
    """

    def __init__(self, x0_model, num_timesteps, num_classes, transition="uniform",
                 schedule=None, hybrid_coeff=0.001, loss_type="hybrid", model_output="logits",
                 absorbing_state=None, eps=1e-6):
        super().__init__()
        T, K = int(num_timesteps), int(num_classes)
        if T < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not 2 <= K <= 256:
            raise ValueError(f"num_classes must be in 2..256, got {num_classes}")
        if transition not in DEFAULT_SCHEDULE:
            raise ValueError(f"unknown transition {transition!r}; expected one of "
                             f"{sorted(DEFAULT_SCHEDULE)}")
        if loss_type not in ("hybrid", "vb", "ce"):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected 'hybrid', 'vb' or 'ce'")
        if model_output not in ("logits", "logistic"):
            raise ValueError(f"unknown model_output {model_output!r}; "
                             "expected 'logits' or 'logistic'")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.x0_model = x0_model
        self.num_timesteps, self.num_classes, self.transition = T, K, transition
        self.hybrid_coeff, self.loss_type, self.model_output = hybrid_coeff, loss_type, model_output
        self.eps = float(eps)  # added to probabilities inside log(), exactly where the official
        #                        code adds it; 0 gives the exact posterior with no floor.
        self.validate = True   # range checks on inputs (one host sync each); off for speed

        # The absorbing state m: the grey value K//2 by default, as the paper does for images
        # (App. A.2.2: an ordinary pixel value), or "mask": a dedicated extra state m = K.
        self.mask_state = transition == "absorbing" and absorbing_state == "mask"
        self.num_states = S = K + 1 if self.mask_state else K
        if transition == "absorbing":
            m = K if self.mask_state else (K // 2 if absorbing_state is None else absorbing_state)
            if not isinstance(m, int) or not 0 <= m < S:
                raise ValueError(f"absorbing_state must be None, 'mask' or an int in 0..{K - 1}, "
                                 f"got {absorbing_state!r}")
            self.absorbing_state = m
        elif absorbing_state is not None:
            raise ValueError("absorbing_state only applies to transition='absorbing'")

        schedule = DEFAULT_SCHEDULE[transition] if schedule is None else schedule
        betas = (get_betas(schedule, T) if isinstance(schedule, str)
                 else torch.as_tensor(schedule, dtype=torch.float64).flatten())
        if betas.numel() != T or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"schedule must hold {T} betas in (0, 1], got {betas.tolist()[:8]}...")
        self.schedule_name = schedule if isinstance(schedule, str) else "custom"

        # Buffers are derived from the config, so they are not saved in state_dict.
        buf = lambda name, value: self.register_buffer(name, value, persistent=False)
        buf("betas64", betas)                # float64 [T]; matrices are built from these
        buf("betas", betas.float())          # float32 [T]; betas[t-1] = β_t
        if transition == "gaussian":
            Q = torch.empty(T, S, S)
            Q_bar = torch.empty(T + 1, S, S)
            Q_bar[0] = acc = torch.eye(S, dtype=torch.float64)
            for t in range(1, T + 1):       # float64 products, stored as float32
                Q_t = gaussian_Q(betas[t - 1], K)
                acc = acc @ Q_t
                Q[t - 1], Q_bar[t] = Q_t.float(), acc.float()
            buf("Q", Q)                      # [T, K, K]; Q[t-1] = Q_t (symmetric)
            buf("Q_bar", Q_bar)              # [T+1, K, K]; Q_bar[t] = Q̄_t
            buf("stationary", torch.full((S,), 1.0 / S))  # Q_t is doubly stochastic
        else:
            alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
            buf("alpha_bar64", alpha_bar)    # float64 [T+1]; alpha_bar[t] = ᾱ_t, ᾱ_0 = 1
            buf("alpha_bar", alpha_bar.float())
            buf("one_minus_alpha_bar", (1 - alpha_bar).float())  # exact near ᾱ ≈ 1
            s = (torch.full((S,), 1.0 / S) if transition == "uniform"
                 else F.one_hot(torch.tensor(self.absorbing_state), S).double())
            buf("stationary", s.float())

    # -------------------------------------------------------------------------------- helpers
    def _log(self, p):
        """log(p + eps) as the official code does; with eps = 0, log(p) with log(0) = LOG_ZERO."""
        if self.eps > 0:
            return torch.log(p + self.eps)
        pos = p > 0
        return torch.where(pos, torch.log(torch.where(pos, p, torch.ones_like(p))), LOG_ZERO)

    def _one_hot(self, x):
        """x: long (...) -> bool (..., S)."""
        return x.unsqueeze(-1) == torch.arange(self.num_states, device=x.device)

    @staticmethod
    def _per_example(v, x):
        """v: [B] -> [B, 1, ..., 1, 1] broadcasting against x.shape + (S,)."""
        return v.view(-1, *([1] * x.dim()))

    def _check(self, x, t=None, name="x_0", high=None):
        """ValueErrors for data outside 0..high-1, t outside 1..T and mismatched shapes."""
        high = self.num_classes if high is None else high
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or x.dim() < 1:
            raise ValueError(f"{name} must be an integer tensor [B, ...], got {x.dtype} {tuple(x.shape)}")
        if self.validate and x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
            raise ValueError(f"{name} must lie in 0..{high - 1}, got values in "
                             f"{int(x.min())}..{int(x.max())}")
        if t is not None:
            if t.shape != (x.shape[0],):
                raise ValueError(f"t must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
            if self.validate and (int(t.min()) < 1 or int(t.max()) > self.num_timesteps):
                raise ValueError(f"t must lie in 1..{self.num_timesteps}, got values in "
                                 f"{int(t.min())}..{int(t.max())}")

    # ------------------------------------------------------------------- explicit matrices
    def Q_matrix(self, t):
        """Q_t as an explicit float64 [S, S] matrix (for tests and figures)."""
        if self.transition == "gaussian":
            return gaussian_Q(self.betas64[t - 1], self.num_classes)
        beta, s = self.betas64[t - 1], self.stationary.double()
        return (1 - beta) * torch.eye(self.num_states, dtype=torch.float64, device=s.device) + beta * s
    
    def Q_bar_matrix(self, t):
        """Q̄_t = Q_1 ... Q_t as an explicit float64 [S, S] matrix; Q̄_0 = I."""
        S = self.num_states
        if self.transition == "gaussian":
            acc = torch.eye(S, dtype=torch.float64, device=self.betas64.device)
            for r in range(1, t + 1):
                acc = acc @ self.Q_matrix(r)
            return acc
        a, s = self.alpha_bar64[t], self.stationary.double()
        return a * torch.eye(S, dtype=torch.float64, device=s.device) + (1 - a) * s

    # ---------------------------------------------------------------- forward process q
    def _probs_from(self, x, t):
        """Row x of Q̄_t: q(x_t | x_0 = x), or x Q̄_t for x a distribution [..., S].   [eq. 3]

        x: long (B, ...) or float (B, ..., S); t: long [B] in 0..T -> float32 (B, ..., S).
        """
        if self.transition == "gaussian":
            if x.dtype.is_floating_point:  # (B, N, S) @ (B, S, S), one matrix per example
                return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]),
                                 self.Q_bar[t]).view(x.shape)
            return self.Q_bar[t.view(-1, *([1] * (x.dim() - 1))), x]
        if x.dtype.is_floating_point:
            a = self._per_example(self.alpha_bar[t], x[..., 0])
            b = self._per_example(self.one_minus_alpha_bar[t], x[..., 0])
            return a * x + b * self.stationary
        a = self._per_example(self.alpha_bar[t], x)
        off = self._per_example(self.one_minus_alpha_bar[t], x) * self.stationary  # (B,1..,S)
        return torch.where(self._one_hot(x), a + off, off)

    def _probs_to(self, x_t, t, s):
        """Column x_t of Q_{s→t} = Q_{s+1} ... Q_t: q(x_t | x_s = i) for every i.

        For s = t-1 this is column x_t of Q_t, the first factor of the posterior. Returns
        float32 (B, ..., S). The strided sampler uses s < t-1.
        """
        if self.transition == "gaussian":
            # Only s = t-1 comes here (the sampler's jumps use `_gaussian_skip`).
            # Q_t is symmetric, so its column x_t is its row x_t.
            return self.Q[(t - 1).view(-1, *([1] * (x_t.dim() - 1))), x_t]
        ratio = self.alpha_bar[t] / self.alpha_bar[s].clamp_min(torch.finfo(torch.float32).tiny)
        # For s = t-1 the ratio is 1-β_t; take β_t itself where we can, for precision.
        one_minus = torch.where(s == t - 1, self.betas[(t - 1).clamp_min(0)], 1 - ratio)
        off = self._per_example(one_minus, x_t) * self.stationary[x_t].unsqueeze(-1)
        diag = self._per_example(1 - one_minus, x_t) + off
        return torch.where(self._one_hot(x_t), diag, off)

    def q_probs(self, x_0, t):
        """q(x_t | x_0) = Cat(x_t; x_0 Q̄_t)   [D3PM eq. 3]. Returns x_0.shape + (S,)."""
        self._check(x_0, t)
        return self._probs_from(x_0, t)

    def _gumbel(self, shape, noise=None, generator=None, device=None):
        """Gumbel noise in float64 from uniforms clipped at tiny (given `noise` or fresh)."""
        if noise is None:
            noise = torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
        u = noise.clamp(min=torch.finfo(noise.dtype).tiny, max=1.0).double()
        return -torch.log(-torch.log(u))

    def q_sample(self, x_0, t, noise=None, generator=None):
        """x_t ~ q(x_t | x_0) by Gumbel-max: argmax(log(q + eps) + g)   [eq. 3]. Long x_0.shape.

        `noise`: optional uniforms of shape x_0.shape + (S,), used as the official code does.
        """
        logits = self._log(self.q_probs(x_0, t))
        return (logits + self._gumbel(logits.shape, noise, generator, logits.device)).argmax(-1)

    # --------------------------------------------------------- posterior and p_θ
    def _posterior_logits(self, x_0, x_t, t, s):
        """log q(x_s | x_t, x_0) up to a constant, for 0 <= s < t.   [eq. 3]

        q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0) = Q_{s→t}[x_s, x_t] Q̄_s[x_0, x_s].
        With x_0 given as logits over x̃_0 the second factor is Σ_x̃0 p(x̃_0) Q̄_s[x̃_0, x_s],
        which makes this the joint-sum form of p_θ   [eq. 4].
        """
        fact1 = self._probs_to(x_t, t, s)
        if x_0.dtype.is_floating_point:
            fact2 = self._probs_from(torch.softmax(x_0, dim=-1), s)
            at_zero = x_0                                   # s = 0: the x_0 logits themselves
        else:
            fact2 = self._probs_from(x_0, s)
            at_zero = self._log(self._one_hot(x_0).float())  # s = 0: the delta at x_0
        logits = self._log(fact1) + self._log(fact2)
        return torch.where(self._per_example(s == 0, x_t), at_zero, logits)

    def q_posterior_logits(self, x_0, x_t, t):
        """Logits of q(x_{t-1} | x_t, x_0)   [D3PM eq. 3].

        x_0: long data (B, ...) or float logits over x_0 (B, ..., S); returns (B, ..., S).
        At t = 1 it is the distribution of x_0 itself, as in the official code.
        """
        self._check(x_t, t, "x_t", self.num_states)
        if x_0.dtype.is_floating_point:
            if x_0.shape != x_t.shape + (self.num_states,):
                raise ValueError(f"x_0 logits must have shape {tuple(x_t.shape) + (self.num_states,)}, "
                                 f"got {tuple(x_0.shape)}")
        else:
            self._check(x_0, None)
            if x_0.shape != x_t.shape:
                raise ValueError(f"x_0 and x_t shapes differ: {tuple(x_0.shape)} vs {tuple(x_t.shape)}")
        return self._posterior_logits(x_0, x_t, t, t - 1)

    def logistic_logits(self, loc, log_scale):
        """Logits of the truncated discretized logistic over K values   [D3PM App. A.8].

        loc, log_scale: x.shape, loc in [-1, 1]. The K values sit at linspace(-1, 1, K); bin k
        gets σ((c_k - loc + w/2)/s) - σ((c_k - loc - w/2)/s) with w = 2/(K-1) and
        1/s = exp(2 - log_scale) as in the official code. The edge bins are not extended to
        ±∞: the softmax over the K logits renormalises (the official code's "truncated" form).
        """
        K = self.num_classes
        loc, log_scale = loc.float().unsqueeze(-1), log_scale.float().unsqueeze(-1)
        inv_scale = torch.exp(2.0 - log_scale)
        centers = torch.linspace(-1.0, 1.0, K, device=loc.device) - loc
        half_width = 1.0 / (K - 1)
        upper = F.logsigmoid(inv_scale * (centers + half_width))   # log CDF at the upper edge
        lower = F.logsigmoid(inv_scale * (centers - half_width))   # log CDF at the lower edge
        if self.eps > 0:  # official: log(σ_u - σ_l) = upper + log1p(-exp(lower - upper) + eps)
            return upper + torch.log1p(-torch.exp(lower - upper) + self.eps)
        return upper + self._log(-torch.expm1(lower - upper))

    def model_logits(self, x_t, t, cond=None):
        """The network's prediction p̃_θ(x̃_0 | x_t) as float32 logits (B, ..., S)."""
        out = self.x0_model(x_t, t, cond)
        if self.model_output == "logistic":
            loc, log_scale = out
            logits = self.logistic_logits(loc, log_scale)
        else:
            logits = out.float()
        if logits.shape != x_t.shape + (self.num_classes,):
            raise ValueError(f"x0_model returned shape {tuple(logits.shape)}, expected "
                             f"{tuple(x_t.shape) + (self.num_classes,)}")
        if self.mask_state:  # x_0 is never [MASK]
            logits = F.pad(logits, (0, 1), value=LOG_ZERO)
        return logits

    def _p_from_x0_logits(self, x0_logits, x_t, t):
        """p_θ(x_{t-1} | x_t) ∝ Σ_x̃0 q(x_{t-1}, x_t | x̃_0) p̃_θ(x̃_0 | x_t)   [eq. 4].

        At t = 1, p_θ(x_0 | x_1) is p̃_θ itself, as in the official code (eq. 4 would also
        weight it by Q_1[x_0, x_1]; see README "Differences").
        """
        return self._posterior_logits(x0_logits, x_t, t, t - 1)

    def p_logits(self, x_t, t, cond=None):
        """Logits of p_θ(x_{t-1} | x_t), shape x_t.shape + (S,)   [D3PM eq. 4]."""
        self._check(x_t, t, "x_t", self.num_states)
        return self._p_from_x0_logits(self.model_logits(x_t, t, cond), x_t, t)

    # ------------------------------------------------------------------------ losses
    @staticmethod
    def _meanflat_bits(x):
        """Mean over all but the batch axis, in bits: (B, ...) -> [B]."""
        return x.reshape(x.shape[0], -1).mean(1) / math.log(2)

    @staticmethod
    def _categorical_kl(logits_q, logits_p):
        """KL(q ‖ p) over the last axis; terms with q = 0 contribute 0."""
        log_q, log_p = F.log_softmax(logits_q, -1), F.log_softmax(logits_p, -1)
        return (log_q.exp() * (log_q - log_p)).sum(-1)

    @staticmethod
    def _nll(logits, x):
        """-log softmax(logits)[x], elementwise: (B, ..., S), (B, ...) -> (B, ...)."""
        return -F.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)

    def _vb_from_logits(self, x_0, x_t, t, p_logits):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t > 1, and
        L_0 = -log p_θ(x_0 | x_1) at t = 1, both in bits per dimension   [eq. 1]. -> [B]"""
        kl = self._categorical_kl(self._posterior_logits(x_0, x_t, t, t - 1), p_logits)
        decoder_nll = self._nll(p_logits, x_0)
        return torch.where(t == 1, self._meanflat_bits(decoder_nll), self._meanflat_bits(kl))

    def vb_terms_bpd(self, x_0, x_t, t, cond=None):
        """Per-example variational-bound term at t in bits/dim: KL for t > 1, L_0 at t = 1."""
        return self.loss_terms(x_0, x_t, t, cond)["vb"]

    def loss_terms(self, x_0, x_t, t, cond=None):
        """Per-example [B] terms at a given (t, x_t): "vb", "ce" and the training "loss".

        ce = -log p̃_θ(x_0 | x_t) in bits/dim at every t; loss = vb + hybrid_coeff * ce for
        "hybrid" (L_λ, paper eq. 5 with λ = hybrid_coeff), vb or ce alone otherwise.
        """
        self._check(x_0, t)
        self._check(x_t, t, "x_t", self.num_states)
        if x_0.shape != x_t.shape:
            raise ValueError(f"x_0 and x_t shapes differ: {tuple(x_0.shape)} vs {tuple(x_t.shape)}")
        x0_logits = self.model_logits(x_t, t, cond)
        vb = self._vb_from_logits(x_0, x_t, t, self._p_from_x0_logits(x0_logits, x_t, t))
        ce = self._meanflat_bits(self._nll(x0_logits, x_0))
        if self.loss_type == "hybrid":
            loss = vb + self.hybrid_coeff * ce
        else:
            loss = vb if self.loss_type == "vb" else ce
        return {"loss": loss, "vb": vb, "ce": ce}

    def prior_bpd(self, x_0):
        """L_T = KL(q(x_T | x_0) ‖ p(x_T)) in bits/dim, p(x_T) the stationary distribution. [B]"""
        self._check(x_0)
        T = torch.full((x_0.shape[0],), self.num_timesteps, device=x_0.device)
        q = self._probs_from(x_0, T)
        kl = (q * (self._log(q) - self._log(self.stationary))).sum(-1)
        return self._meanflat_bits(kl)

    def forward(self, x_0, cond=None):
        """Training loss as the official code: one t ~ U{1..T} per example, x_t ~ q(x_t|x_0),
        loss = mean over the batch of `loss_terms` (no prior, no factor T). -> (loss, info)"""
        t = torch.randint(1, self.num_timesteps + 1, (x_0.shape[0],), device=x_0.device)
        terms = self.loss_terms(x_0, self.q_sample(x_0, t), t, cond)
        info = {"vb": terms["vb"].detach().mean(), "ce": terms["ce"].detach().mean()}
        return terms["loss"].mean(), info

    @torch.no_grad()
    def nll_bpd_terms(self, x_0, cond=None, timesteps=None, batch_size=None, progress=False,
                      generator=None, x_t_per_t=None):
        """L_{t-1} in bits/dim for each t in `timesteps` (default 1..T), a fresh x_t per t.
        Returns [B, len(timesteps)]. Several timesteps share one network call: up to
        `batch_size` (default max(B, 256)) images per call. `x_t_per_t` [T, B, ...] replays
        given x_t (row t-1 holds x_t) instead of sampling."""
        self._check(x_0)
        B = x_0.shape[0]
        device = x_0.device
        ts = (torch.arange(1, self.num_timesteps + 1) if timesteps is None
              else torch.as_tensor(timesteps)).tolist()
        per_call = max(1, (batch_size or max(B, 256)) // B)
        out = []
        chunks = range(0, len(ts), per_call)
        bar = _progress(chunks, progress, desc="NLL (timesteps)", total=len(ts), unit="t")
        for i in chunks:
            chunk = ts[i:i + per_call]
            t = torch.tensor(chunk, device=device).repeat_interleave(B)
            x0 = x_0.repeat(len(chunk), *([1] * (x_0.dim() - 1)))
            c = None if cond is None else cond.repeat(len(chunk))
            if x_t_per_t is None:
                x_t = self.q_sample(x0, t, generator=generator)
            else:
                x_t = torch.cat([x_t_per_t[s - 1] for s in chunk]).to(device)
            out.append(self.vb_terms_bpd(x0, x_t, t, c).view(len(chunk), B))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return torch.cat(out).T

    @torch.no_grad()
    def nll_bpd(self, x_0, cond=None, **kwargs):
        """The full bound -log p(x_0) <= Σ_{t=1}^{T} L_{t-1} + L_T, bits/dim per example [B].
        Keyword arguments go to `nll_bpd_terms` (batch_size, progress, generator)."""
        return self.nll_bpd_terms(x_0, cond, **kwargs).sum(1) + self.prior_bpd(x_0)

    @torch.no_grad()
    def nll_bpd_estimate(self, x_0, cond=None, num_t=100, generator=None, **kwargs):
        """Unbiased estimate of `nll_bpd` from a subset of timesteps, with its standard error.

        L_0 (t = 1, usually the largest term) and L_T are computed exactly; of the T-1 terms for
        t = 2..T, m = num_t - 1 are drawn without replacement and their sum is estimated as
        (T-1) * mean, with standard error (T-1) sqrt((1 - m/(T-1)) s² / m) (finite-population
        correction; s² the sample variance). Returns (estimate [B], standard error [B]).
        """
        T = self.num_timesteps
        m = min(num_t, T) - 1
        if m < 2 and m != T - 1:
            raise ValueError(f"num_t must be >= 3 (or T) for a standard error, got {num_t}")
        rest = 2 + torch.randperm(T - 1, generator=generator)[:m]
        terms = self.nll_bpd_terms(x_0, cond, [1] + rest.tolist(), generator=generator, **kwargs)
        sampled = terms[:, 1:]
        est = terms[:, 0] + (T - 1) * sampled.mean(1) + self.prior_bpd(x_0)
        if m == T - 1:
            return est, torch.zeros_like(est)
        stderr = (T - 1) * torch.sqrt((1 - m / (T - 1)) * sampled.var(1) / m)
        return est, stderr

    # ------------------------------------------------------------------------ sampler
    def _prior_sample(self, shape, generator=None, device=None):
        """x_T from the stationary distribution: uniform ints, or all m for absorbing."""
        if self.transition == "absorbing":
            return torch.full(shape, self.absorbing_state, dtype=torch.long, device=device)
        return torch.randint(0, self.num_classes, shape, generator=generator, device=device)

    def _gaussian_skip(self, t, s):
        """Q_{s→t} = Q_{s+1} ... Q_t, float64 product stored as float32 (S, S)."""
        acc = torch.eye(self.num_states, dtype=torch.float64, device=self.betas.device)
        for r in range(s + 1, t + 1):
            acc = acc @ self.Q_matrix(r)
        return acc.float()

    def _guided_x0_logits(self, x_t, t, cond, guidance):
        """x̃_0 logits; with guidance w, those of the conditional and unconditional model are
        combined later on p_θ (see `_step`). Returns (cond logits, uncond logits or None)."""
        x0_c = self.model_logits(x_t, t, cond)
        x0_u = self.model_logits(x_t, t, None) if guidance > 0 else None
        return x0_c, x0_u

    def _step(self, x_t, t, s, cond=None, guidance=0.0, noise=None, generator=None, skip=None):
        """One reverse step x_t -> x_s (s < t), returning (x_s, x̃_0 logits).

        p_θ(x_s | x_t) ∝ Σ_x̃0 q(x_s, x_t | x̃_0) p̃_θ(x̃_0 | x_t): eq. 4 with the exact
        q(x_s | x_t, x̃_0) of a jump over t-s steps (closed form for uniform/absorbing,
        Q_{s+1}...Q_t for gaussian). At s = 0 the step returns argmax p̃_θ(x̃_0 | x_t), no noise.
        Classifier-free guidance w mixes log-probabilities and renormalises:
        log p_w = (1+w) log p_θ(·|x_t, c) - w log p_θ(·|x_t, ∅).
        """
        B = x_t.shape[0]
        tt = torch.full((B,), t, dtype=torch.long, device=x_t.device)
        ss = torch.full((B,), s, dtype=torch.long, device=x_t.device)
        x0_c, x0_u = self._guided_x0_logits(x_t, tt, cond, guidance)

        def p_of(x0_logits):
            if s == 0:
                return x0_logits
            if skip is not None:  # gaussian jump over several steps
                fact1 = skip[x_t]
                fact2 = self._probs_from(torch.softmax(x0_logits, -1), ss)
                return self._log(fact1) + self._log(fact2)
            return self._posterior_logits(x0_logits, x_t, tt, ss)

        logits = p_of(x0_c)
        x0 = x0_c
        if x0_u is not None:
            logits = (1 + guidance) * F.log_softmax(logits, -1) - guidance * F.log_softmax(p_of(x0_u), -1)
            x0 = (1 + guidance) * F.log_softmax(x0_c, -1) - guidance * F.log_softmax(x0_u, -1)
        if s == 0:
            return logits.argmax(-1), x0
        g = self._gumbel(logits.shape, noise, generator, logits.device)
        return (logits.double() + g).argmax(-1), x0

    @torch.no_grad()
    def p_sample(self, x_t, t, cond=None, noise=None, generator=None):
        """One ancestral step x_{t-1} ~ p_θ(x_{t-1} | x_t) for an int t (argmax at t = 1)."""
        self._check(x_t, None, "x_t", self.num_states)
        skip = self.Q[t - 1] if self.transition == "gaussian" and t > 1 else None
        return self._step(x_t, t, t - 1, cond, noise=noise, generator=generator, skip=skip)[0]

    @torch.no_grad()
    def sample(self, shape, cond=None, steps=None, generator=None, return_trajectory=False,
               guidance=0.0, progress=False, x_init=None):
        """Ancestral sampling from x_T ~ stationary down to x_0   [§3.3].

        steps = S < T visits a grid of S timesteps from T down to 1 and jumps between them with
        the exact q(x_s | x_t, x̃_0). Gumbel noise is drawn in float64 from `generator`.
        Returns x_0 (long, `shape`), or (x_0, trajectory) with trajectory = {"t": [S] grid,
        "x_t": [S+1, *shape] states before each step and the output, "x0_pred": [S, *shape]}.
        """
        T = self.num_timesteps
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        device = self.betas.device
        grid = torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()
        x = self._prior_sample(tuple(shape), generator, device) if x_init is None else x_init.to(device)
        states, x0_preds = [x], []
        for i in _progress(range(len(grid)), progress, desc="sampling", unit="step"):
            t = grid[i]
            s = grid[i + 1] if i + 1 < len(grid) else 0
            skip = None
            if self.transition == "gaussian" and s > 0:
                skip = self.Q[t - 1] if s == t - 1 else self._gaussian_skip(t, s)
            x, x0 = self._step(x, t, s, cond, guidance, generator=generator, skip=skip)
            if return_trajectory:
                states.append(x)
                x0_preds.append(x0.argmax(-1))
        if not return_trajectory:
            return x
        return x, {"t": torch.tensor(grid), "x_t": torch.stack(states), "x0_pred": torch.stack(x0_preds)}


def _progress(iterable, enabled, **kwargs):
    """A tqdm bar over `iterable` when enabled; with total= given, a manual bar (or None)."""
    if "total" in kwargs:
        if not enabled:
            return None
        from tqdm.auto import tqdm
        return tqdm(**kwargs)
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)
