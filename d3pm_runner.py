"""D3PM in one file: discrete denoising diffusion on MNIST.

Implements "Structured Denoising Diffusion Models in Discrete State-Spaces"
(Austin, Johnson, Ho, Tarlow, van den Berg, NeurIPS 2021, arXiv:2107.03006), checked term by
term against the official JAX code (google-research/d3pm, `images/diffusion_categorical.py`).

    python d3pm_runner.py --preset cpu --data-root ../shared/data    # train on MNIST, CPU
    python d3pm_runner.py --help                                       # every option

Sections, in paper order:
  0. configuration: one dataclass of named defaults, presets, input validation
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

import ctypes
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# log(0) as a finite number: exp(LOG_ZERO) == 0 in float32, and unlike -inf it never turns a
# product 0 * log(0) or a gradient into NaN. Used only where a probability is exactly zero.
LOG_ZERO = -1e30


# ================================================================================================
# 0. Configuration: every option of a run, with its default and unit (the command line is
#    generated from it; tests build Config(...) directly)
# ================================================================================================

@dataclass
class Config:
    # ---- data
    dataset: str = "mnist"            # mnist | heart (the CIFAR runner adds cifar10 | fake)
    data_root: str = "./data"         # folder holding MNIST/raw (torchvision layout)
    num_classes: int = 2              # K: states per pixel (mnist: quantisation levels; heart: bins)
    # ---- process
    num_timesteps: int = 1000         # T: diffusion steps
    transition: str = "absorbing"     # uniform | absorbing | gaussian
    schedule: str = "default"         # default (per transition) | cosine | linear | jsd
    absorbing_state: str = "mask"     # absorbing only: mask (extra [MASK] state) | grey (K//2)
    model_output: str = "logits"      # logits | logistic (truncated discretized logistic)
    loss_type: str = "hybrid"         # hybrid | vb | ce
    hybrid_coeff: float = 0.001       # λ: weight of the x_0 cross-entropy in L_λ (eq. 5)
    eps: float = 1e-6                 # added to probabilities inside logs; 0 = exact
    # ---- network
    model_channels: int = 64          # base width of the conv net (channels)
    label_dropout: float = 0.1        # probability a training label is replaced by the null class
    # ---- optimisation
    train_steps: int = 20000          # total optimizer steps (a resumed run continues up to it)
    batch_size: int = 128             # images per step
    lr: float = 2e-4                  # AdamW peak learning rate
    weight_decay: float = 0.0         # AdamW weight decay
    warmup_steps: int = 500           # linear learning-rate warm-up (steps)
    grad_clip: float = 1.0            # max global gradient norm
    ema_decay: float = 0.9995         # EMA decay per step for the sampling weights
    seed: int = 0                     # seeds data order, noise and initialisation
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "bf16"           # bf16 | fp32: the network's arithmetic on CUDA
    # ---- logging, evaluation, checkpoints
    out: str = "runs/mnist"           # run directory
    log_every: int = 100              # steps between metrics.jsonl lines
    eval_every: int = 5000            # steps between sample grids/GIFs (0 = only at the end)
    checkpoint_every: int = 1000      # steps between checkpoints
    num_samples: int = 100            # samples per grid (a row per class)
    sample_steps: int = 0             # reverse steps at sampling (0 = all T; fewer = strided)
    guidance: float = 0.0             # classifier-free guidance weight w (0 = conditional)
    eval_images: int = 1000           # test images for the final NLL (full bound)
    # ---- modes
    resume: str = ""                  # checkpoint to continue from (or to sample/evaluate)
    sample_only: bool = False         # with --resume: write samples.pt, a grid and a GIF
    eval_only: bool = False           # with --resume: print the test NLL (bits/dim) as JSON
    preset: str = ""                  # cpu | heart: named settings, overridden by flags
    figures: bool = False             # write the teaching figures (into --out, default contents/)


PRESETS = {
    # A 2-core CPU trains class-conditional binarised MNIST in about 7 minutes (README).
    "cpu": dict(dataset="mnist", num_classes=2, num_timesteps=100, transition="absorbing",
                model_channels=48, train_steps=3000, batch_size=64, lr=1e-3, warmup_steps=100,
                ema_decay=0.999, eval_every=0, checkpoint_every=500, log_every=50,
                sample_steps=50, guidance=1.0, eval_images=200, out="runs/cpu"),
    # The 2-D heart toy: about a minute on a CPU. Its error was under-training, not T (README):
    # 1.5 M points seen (3,000 steps of 512) bring the TV distance to ~2x the data floor.
    "heart": dict(dataset="heart", num_classes=64, num_timesteps=50, transition="uniform",
                  train_steps=3000, batch_size=512, lr=2e-3, warmup_steps=100, ema_decay=0.99,
                  eval_every=0, checkpoint_every=500, log_every=100, num_samples=2000,
                  eval_images=500, label_dropout=0.0, out="runs/heart"),
}

# Fields that define the process and the network: a checkpoint must agree on all of them.
MODEL_FIELDS = ("dataset", "num_classes", "num_timesteps", "transition", "schedule",
                "absorbing_state", "model_output", "model_channels")


class UsageError(Exception):
    """Bad input from the command line: reported as one line on stderr, exit status 2."""


def validate_config(cfg):
    choices = {"transition": ("uniform", "absorbing", "gaussian"), "loss_type": ("hybrid", "vb", "ce"),
               "model_output": ("logits", "logistic"), "device": ("auto", "cpu", "cuda"),
               "absorbing_state": ("mask", "grey"), "precision": ("bf16", "fp32"),
               "schedule": ("default", "cosine", "linear", "jsd")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    checks = [(2 <= cfg.num_classes <= 256, "--num-classes (K) must be in 2..256"),
              (cfg.num_timesteps >= 1, "--num-timesteps (T) must be >= 1"),
              (cfg.batch_size >= 1, "--batch-size must be >= 1"),
              (cfg.train_steps >= 0, "--train-steps must be >= 0"),
              (cfg.guidance >= 0, "--guidance must be >= 0"),
              (cfg.sample_steps == 0 or 1 <= cfg.sample_steps <= cfg.num_timesteps,
               f"--sample-steps must be in 1..T={cfg.num_timesteps} (or 0 for all)"),
              (cfg.lr > 0, "--lr must be > 0"), (cfg.eps >= 0, "--eps must be >= 0"),
              (0 <= cfg.label_dropout < 1, "--label-dropout must be in [0, 1)"),
              (cfg.num_samples >= 1, "--num-samples must be >= 1"),
              (cfg.eval_images >= 0, "--eval-images must be >= 0"),
              (cfg.log_every >= 1, "--log-every must be >= 1"),
              (cfg.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
              (cfg.eval_every >= 0, "--eval-every must be >= 0 (0 = only at the end)")]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{message}, got {_offending(message, cfg)}")
    if cfg.model_output == "logistic" and cfg.dataset == "heart":
        raise UsageError("--model-output logistic is for images, not the heart toy")
    if (cfg.sample_only or cfg.eval_only) and not cfg.resume:
        raise UsageError("--sample-only and --eval-only need --resume CHECKPOINT")


def _offending(message, cfg):
    name = message.split()[0].lstrip("-").replace("-", "_")
    return repr(getattr(cfg, name, "?"))


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


def gaussian_Q(beta, num_classes, device=None):
    """Discretized-Gaussian Q_t, float64 (K, K)   [D3PM eq. 8, §3.1].

    Q[i, j] = exp(-4|i-j|² / ((K-1)² β)) / Σ_{n=-(K-1)}^{K-1} exp(-4n² / ((K-1)² β)) for i ≠ j,
    and the diagonal takes the rest of each row. The official code spaces the values as
    linspace(0, 255, K) whatever K is, which equals this only at K = 256 (for smaller K its
    matrix is the identity); we follow the paper for every K.
    """
    K = num_classes
    n = torch.arange(-(K - 1), K, dtype=torch.float64, device=device)
    p = torch.softmax(-4.0 * n**2 / ((K - 1) ** 2 * float(beta)), dim=0)[K - 1:]  # p_|i-j|
    idx = torch.arange(K, device=device)
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
    ᾱ_t = Π_{r≤t}(1-β_r)   [§3.1, App. A]. We use these closed forms and store only
    β, ᾱ and s (O(T + K) numbers). The discretized Gaussian has no such form: its Q̄_t are built
    in float64 and stored as a float32 stack (T+1 x K x K); each Q_t (a Toeplitz band plus its
    diagonal) as two T x K tables.

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
        # (an ordinary pixel value), or "mask": a dedicated extra state m = K.
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
            Q_band, Q_diag = torch.empty(T, S), torch.empty(T, S)
            Q_bar = torch.empty(T + 1, S, S)
            Q_bar[0] = acc = torch.eye(S, dtype=torch.float64)
            for t in range(1, T + 1):       # float64 products, stored as float32
                Q_t = gaussian_Q(betas[t - 1], K)
                acc = acc @ Q_t
                Q_band[t - 1], Q_diag[t - 1], Q_bar[t] = Q_t[0], Q_t.diagonal(), acc.float()
            # Q_t[i, j] depends only on |i - j| off the diagonal: two [T, K] tables (see `_Q_t`)
            buf("Q_band", Q_band)            # [T, K]; Q_band[t-1, n] = Q_t[i, j] for |i-j| = n > 0
            buf("Q_diag", Q_diag)            # [T, K]; Q_diag[t-1, i] = Q_t[i, i]
            buf("Q_bar", Q_bar)              # [T+1, K, K]; Q_bar[t] = Q̄_t
            stationary = torch.full((S,), 1.0 / S, dtype=torch.float64)  # Q_t is doubly stochastic
        else:
            alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
            buf("alpha_bar64", alpha_bar)    # float64 [T+1]; alpha_bar[t] = ᾱ_t, ᾱ_0 = 1
            buf("alpha_bar", alpha_bar.float())
            buf("one_minus_alpha_bar", (1 - alpha_bar).float())  # exact near ᾱ ≈ 1
            stationary = (torch.full((S,), 1.0 / S, dtype=torch.float64) if transition == "uniform"
                          else F.one_hot(torch.tensor(self.absorbing_state), S).double())
        buf("stationary64", stationary)      # the stationary distribution s, float64 [S]
        buf("stationary", stationary.float())

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
            return gaussian_Q(self.betas64[t - 1], self.num_classes, self.betas64.device)
        beta, s = self.betas64[t - 1], self.stationary64
        return (1 - beta) * torch.eye(self.num_states, dtype=torch.float64, device=s.device) + beta * s
    
    def _Q_t(self, t):
        """The Gaussian's Q_t for each t in a long [B], float32 (B, K, K), from its two tables:
        the same float32 numbers as Q_matrix(t).float()."""
        K = self.num_classes
        idx = torch.arange(K, device=t.device)
        Q = self.Q_band[t - 1].index_select(1, (idx[:, None] - idx).abs().view(-1)).view(-1, K, K)
        Q.diagonal(dim1=-2, dim2=-1).copy_(self.Q_diag[t - 1])
        return Q

    def _rows(self, mats, x):
        """mats[b, x[b, ...]]: one row per pixel, mats (B, R, K), x long (B, ...) -> (B, ..., K)."""
        B, R, K = mats.shape
        flat = (torch.arange(B, device=x.device).view(B, 1) * R + x.reshape(B, -1)).view(-1)
        return mats.reshape(-1, K).index_select(0, flat).view(x.shape + (K,))

    def Q_bar_matrix(self, t):
        """Q̄_t = Q_1 ... Q_t as an explicit float64 [S, S] matrix; Q̄_0 = I."""
        S = self.num_states
        if self.transition == "gaussian":
            acc = torch.eye(S, dtype=torch.float64, device=self.betas64.device)
            for r in range(1, t + 1):
                acc = acc @ self.Q_matrix(r)
            return acc
        a, s = self.alpha_bar64[t], self.stationary64
        return a * torch.eye(S, dtype=torch.float64, device=s.device) + (1 - a) * s

    # ---------------------------------------------------------------- forward process q
    def _probs_from(self, x, t):
        """Row x of Q̄_t: q(x_t | x_0 = x), or x Q̄_t for x a distribution [..., S].   [eq. 3]

        x: long (B, ...) or float (B, ..., S); t: long [B] in 0..T -> float32 (B, ..., S).
        """
        if self.transition == "gaussian":
            if x.dtype.is_floating_point:  # (B, N, S) @ (B, S, S), one matrix per example,
                # in float32 even inside the training loop's bf16 autocast and TF32
                with _exact_float32(x.device):
                    return torch.bmm(x.float().reshape(x.shape[0], -1, x.shape[-1]),
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
            return self._rows(self._Q_t(t), x_t)
        # 1 - ᾱ_t/ᾱ_s in float64 (in float32 it loses digits when the ratio is near one);
        # for s = t-1 it is β_t itself.
        ratio = self.alpha_bar64[t] / self.alpha_bar64[s].clamp_min(torch.finfo(torch.float64).tiny)
        one_minus = torch.where(s == t - 1, self.betas[(t - 1).clamp_min(0)], (1 - ratio).float())
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
        """x_t ~ q(x_t | x_0) = Cat(x_0 Q̄_t)   [eq. 3]. Long x_0.shape.

        Without `noise` this draws q exactly with one uniform per pixel: uniform/absorbing keep
        x_0 with probability ᾱ_t and otherwise draw from s (Q̄_t = ᾱ_t I + (1-ᾱ_t) 1 sᵀ);
        gaussian inverts the CDF of the row Q̄_t[x_0]. `noise` (uniforms of shape
        x_0.shape + (S,)) replays the official code instead: Gumbel-max argmax(log(q + eps) + g),
        which puts the eps floor's ~eps mass on impossible values; the exact draw does not.
        """
        if noise is not None:
            logits = self._log(self.q_probs(x_0, t))
            return (logits + self._gumbel(logits.shape, noise, generator, logits.device)).argmax(-1)
        self._check(x_0, t)
        if self.transition == "gaussian":
            ts, which = t, torch.arange(t.numel(), device=t.device)
            if t.device.type == "cpu":  # one CDF per distinct t (a host sync on a GPU)
                ts, which = t.unique(return_inverse=True)
            return self._inverse_cdf(self.Q_bar[ts].double().cumsum(-1), which, x_0, generator)
        u = torch.rand(x_0.shape, dtype=torch.float64, generator=generator, device=x_0.device)
        replace = u < 1 - self._per_example(self.alpha_bar64[t], x_0[..., 0])
        if self.transition == "absorbing":
            return torch.where(replace, self.absorbing_state, x_0)
        draw = torch.randint(0, self.num_classes, x_0.shape, generator=generator, device=x_0.device)
        return torch.where(replace, draw, x_0)

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
        """Logits of the truncated discretized logistic over K values (the paper's best CIFAR-10
        parameterisation; `_get_logits_from_logistic_pars` in the official code).

        loc, log_scale: x.shape, loc in [-1, 1]. The K values sit at linspace(-1, 1, K); bin k
        gets σ((c_k - loc + w/2)/s) - σ((c_k - loc - w/2)/s) with w = 2/(K-1) and
        1/s = exp(2 - log_scale) as in the official code. The edge bins are not extended to
        ±∞: the softmax over the K logits renormalises (the official code's "truncated" form).
        """
        K = self.num_classes
        # The clamp keeps 1/s finite (exp(2 + 1e4) = inf turns the bins into inf * 0 = NaN);
        # e^{±20} is far beyond any useful scale (a bin is 2/(K-1) wide). Not in the official code.
        log_scale = log_scale.float().clamp(-20.0, 20.0).unsqueeze(-1)
        loc = loc.float().unsqueeze(-1)
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
        logits = self._x0_logits(x_t, t, cond)
        if self.mask_state:  # x_0 is never [MASK]
            logits = F.pad(logits, (0, 1), value=LOG_ZERO)
        return logits

    def _x0_logits(self, x_t, t, cond=None):
        """`model_logits` over the K data values only, without the [MASK] column. (B, ..., K)"""
        out = self.x0_model(x_t, t, cond)
        if self.model_output == "logistic":
            loc, log_scale = out
            logits = self.logistic_logits(loc, log_scale)
        else:
            logits = out.float()
        if logits.shape != x_t.shape + (self.num_classes,):
            raise ValueError(f"x0_model returned shape {tuple(logits.shape)}, expected "
                             f"{tuple(x_t.shape) + (self.num_classes,)}")
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

    def _vb_general(self, x_0, x_t, t, x0_logits):
        """Per pixel (nats): KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) and ce = -log p̃_θ(x_0|x_t),
        with explicit (B, ..., S) distributions (any transition)   [eq. 1, 3, 4].
        At t = 1 the KL is not L_0; the caller takes ce there (see `loss_terms`)."""
        log_p0 = F.log_softmax(x0_logits, -1)                   # log p̃_θ(x̃_0 | x_t), (B, ..., S)
        ce = -log_p0.gather(-1, x_0.unsqueeze(-1)).squeeze(-1)
        log_fact1 = self._log(self._probs_to(x_t, t, t - 1))   # shared by q and p_θ
        log_q = F.log_softmax(log_fact1 + self._log(self._probs_from(x_0, t - 1)), -1)
        log_p = F.log_softmax(log_fact1 + self._log(self._probs_from(log_p0.exp(), t - 1)), -1)
        return (log_q.exp() * (log_q - log_p)).sum(-1), ce

    def _vb_closed_form(self, x_0, x_t, t, x0_logits):
        """`_vb_general` for Q_t = (1-β_t) I + β_t 1 sᵀ (uniform, absorbing) in two passes over
        the K logits; x0_logits (B, ..., K) without a [MASK] column   [eq. 1, 3, 4].

        Write fact1_j = q(x_t | x_{t-1} = j) (one value at j = x_t, one elsewhere) and
        fact2 = ᾱ_{t-1} e_{x_0} + (1-ᾱ_{t-1}) s for q, ᾱ_{t-1} p̃_θ + (1-ᾱ_{t-1}) s for p_θ, so
        q_j ∝ fact1_j fact2q_j and p_j ∝ fact1_j fact2p_j. fact1 cancels in log q - log p:
            KL = Σ_j q_j (log fact2q_j - log fact2p_j) + log Z_p - log Z_q,
        q is constant over the classes outside {x_0, x_t, m} ("other", m the absorbing state),
        so Σ_j q_j log fact2p_j = q_other Σ_j log fact2p_j + Σ_{c ∈ slots} (q_c - q_other)
        log fact2p_c; and fact2p sums to one, so Z_p = fact1_other + (1-β_t) fact2p_{x_t}.
        Only log Σ_j exp(logits_j) and Σ_j log fact2p_j read all K logits (`_SoftmaxMixSums`).
        Every log is `_log` (floored at eps), as in the explicit form.
        """
        K, S, eps = self.num_classes, self.num_states, self.eps
        absorbing = self.transition == "absorbing"
        px = lambda v: v[t - 1].view(-1, *([1] * (x_t.dim() - 1)))  # noqa: E731  [B] -> (B, 1, ...)
        beta, ab, omb = px(self.betas), px(self.alpha_bar), px(self.one_minus_alpha_bar)
        s_0, s_t = self.stationary[x_0], self.stationary[x_t]
        off = beta * s_t                                  # fact1_j, j ≠ x_t
        diag = 1 - beta + off                             # fact1_{x_t}
        # slots (B, ..., n): x_0; x_t if ≠ x_0; absorbing: m if ∉ {x_0, x_t}
        idx, valid = [x_0, x_t], [torch.ones_like(x_0, dtype=torch.bool), x_t != x_0]
        fact1, fact2q, s_slot = [torch.where(x_t == x_0, diag, off), diag], [ab + omb * s_0, omb * s_t], [s_0, s_t]
        if absorbing:
            m = self.absorbing_state
            idx.append(torch.full_like(x_0, m))
            valid.append((x_0 != m) & (x_t != m))
            fact1.append(off)
            fact2q.append(omb.expand_as(off))
            s_slot.append(torch.ones_like(off))
        idx, valid, s_slot = torch.stack(idx, -1), torch.stack(valid, -1), torch.stack(s_slot, -1)
        s_other = 0.0 if absorbing else 1.0 / K
        n_other = S - valid.sum(-1)
        log_fact2q, log_fact2q_other = self._log(torch.stack(fact2q, -1)), self._log(omb * s_other)

        # q(x_{t-1} | x_t, x_0) at the slots and at each "other" class
        v = self._log(torch.stack(fact1, -1)) + log_fact2q
        v_other = self._log(off) + log_fact2q_other
        log_zq = torch.logsumexp(torch.cat([v.masked_fill(~valid, -math.inf),
                                            (v_other + n_other.float().log()).unsqueeze(-1)], -1), -1)
        q = torch.where(valid, (v - log_zq.unsqueeze(-1)).exp(), 0.0)
        q_other = torch.where(n_other > 0, (v_other - log_zq).exp(), 0.0)

        # p_θ: fact2p at the slots, Σ_j log fact2p_j and Z_p
        with_sum = not (absorbing and eps == 0)  # else q_other = 0: the sum is not needed
        lse, sum_log, logits_slot = _SoftmaxMixSums.apply(
            x0_logits, idx.clamp_max(K - 1), ab.unsqueeze(-1), (omb * s_other + eps).unsqueeze(-1),
            with_sum)
        p0_slot = torch.where(idx < K, (logits_slot - lse.unsqueeze(-1)).exp(), 0.0)  # p̃_θ
        log_fact2p = self._log(ab.unsqueeze(-1) * p0_slot + omb.unsqueeze(-1) * s_slot)
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

    def _vb_gaussian(self, x_0, x_t, t, x0_logits):
        """`_vb_general` for the discretized Gaussian with eps > 0, in one custom autograd
        Function (`_GaussianKL`) that reads and writes each (B, ..., K) buffer a few times only.

        With fact1 = Q_t[:, x_t] (= row x_t: Q_t is symmetric), g = Q̄_{t-1}[x_0] and
        m = p̃_θ Q̄_{t-1} [eq. 4], both posteriors share log(fact1 + eps), which cancels:
            KL = Σ_j q_j log((g_j + eps) / (m_j + eps)) + log Z_p - log Z_q,
        Z_q = Σ_j (fact1_j + eps)(g_j + eps), Z_p = Σ_j (fact1_j + eps)(m_j + eps). The eps is
        added to the B per-example matrices, not to the (B, ..., K) rows: m + eps = p̃_θ (Q̄ + eps)
        as p̃_θ sums to one. Same logs and floors as `_vb_general` (tests/test_fast_paths.py).
        """
        B, K = x_0.shape[0], self.num_classes
        Q_bar = self.Q_bar[t - 1].add_(self.eps)                # (B, K, K): Q̄_{t-1} + eps
        fact1 = self._rows(self._Q_t(t).add_(self.eps), x_t).view(B, -1, K)
        g = self._rows(Q_bar, x_0).view(B, -1, K)
        kl, ce = _GaussianKL.apply(x0_logits.reshape(B, -1, K), Q_bar, fact1, g, x_0.reshape(B, -1, 1))
        return kl.view(x_0.shape), ce.view(x_0.shape)

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
        if self.transition == "gaussian":
            vb = self._vb_gaussian if self.eps > 0 else self._vb_general
            kl, ce = vb(x_0, x_t, t, self.model_logits(x_t, t, cond))
        else:
            kl, ce = self._vb_closed_form(x_0, x_t, t, self._x0_logits(x_t, t, cond))
        # L_{t-1} = KL for t > 1; L_0 = -log p_θ(x_0 | x_1) = -log p̃_θ(x_0 | x_1) = ce at t = 1
        ce = self._meanflat_bits(ce)
        vb = torch.where(t == 1, ce, self._meanflat_bits(kl))
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
        rest = 2 + torch.randperm(T - 1, generator=generator,
                                  device=generator.device if generator is not None else "cpu")[:m]
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
        """Q_{s→t}ᵀ for Q_{s→t} = Q_{s+1} ... Q_t: row x_t holds q(x_t | x_s = i) for every i.
        Each Q_r is symmetric but their product need not be, hence the transpose. float64
        product, stored as float32 (S, S)."""
        acc = torch.eye(self.num_states, dtype=torch.float64, device=self.betas.device)
        with torch.autocast(acc.device.type, enabled=False):
            for r in range(s + 1, t + 1):
                acc = acc @ self.Q_matrix(r)
        return acc.T.contiguous().float()

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
        Steps without guidance or given noise go to `_step_mixture` (uniform, absorbing) or
        `_step_gaussian` (eps > 0); the rest draw x_s by Gumbel-max over all S values, noise in
        float64 as the official code.
        """
        if s > 0 and guidance == 0 and noise is None:
            if self.transition != "gaussian":
                return self._step_mixture(x_t, t, s, cond, generator)
            if self.eps > 0:
                return self._step_gaussian(x_t, t, s, cond, generator, skip)
        B = x_t.shape[0]
        tt = torch.full((B,), t, dtype=torch.long, device=x_t.device)
        ss = torch.full((B,), s, dtype=torch.long, device=x_t.device)
        x0_c, x0_u = self._guided_x0_logits(x_t, tt, cond, guidance)

        def p_of(x0_logits):
            if s == 0:
                return x0_logits
            if skip is not None:  # gaussian: row x_t of Q_{s→t}ᵀ (Q_t itself for one step)
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

    def _step_mixture(self, x_t, t, s, cond=None, generator=None):
        """`_step` for Q_t = (1-β_t) I + β_t 1 sᵀ (uniform, absorbing), 0 < s < t, drawn exactly
        from p_θ with eps = 0 and with float64 Gumbel noise only where it is needed   [eq. 4].

        With r = ᾱ_t / ᾱ_s (1 - β_t for s = t-1), q(x_t | x_s = j) = (1-r) s_{x_t} + r [j = x_t]
        and fact2 = ᾱ_s p̃_θ + (1-ᾱ_s) s sums to one, so
            p_θ(x_s = j | x_t) ∝ (1-r) s_{x_t} fact2_j + r fact2_{x_t} [j = x_t]:
        keep x_t with probability P = r fact2_{x_t} / (r fact2_{x_t} + (1-r) s_{x_t}), else draw
        j ~ fact2: from p̃_θ with probability ᾱ_s (Gumbel-max over its K logits), else from s.
        P grows with p̃_θ(x_t) ∈ [0, 1], so a uniform u below P(p̃ = 0) keeps x_t and one above
        P(p̃ = 1) leaves it without computing P; softmax and Gumbel noise run only on the pixels
        that need them. Returns (x_s, x̃_0 logits without a [MASK] column).
        """
        K, device = self.num_classes, x_t.device
        logits = self._x0_logits(x_t, torch.full((x_t.shape[0],), t, device=device), cond)
        a = self.alpha_bar64
        jump = self.betas64[t - 1] if s == t - 1 else 1 - a[t] / a[s]       # 1 - r
        s_t = self.stationary64[x_t]

        def keep_prob(p0, s_t):  # P at p̃_θ(x_t) = p0; 1 where x_t cannot be left (s_{x_t} = 0)
            stay, leave = (1 - jump) * (a[s] * p0 + (1 - a[s]) * s_t), jump * s_t
            return torch.where(leave > 0, stay / (stay + leave), 1.0)

        u = torch.rand(x_t.shape, dtype=torch.float64, generator=generator, device=device)
        keep = u < keep_prob(0.0, s_t)
        open_ = ~keep & (u < keep_prob(1.0, s_t))          # P depends on p̃_θ(x_t) here
        x_open, logits_open = x_t[open_], logits[open_]    # (n,), (n, K)
        p0 = (logits_open.gather(-1, x_open.clamp_max(K - 1).unsqueeze(-1)).squeeze(-1)
              - torch.logsumexp(logits_open, -1)).exp().double() * (x_open < K)  # p̃_m = 0
        keep[open_] = u[open_] < keep_prob(p0, s_t[open_])
        from_p0 = ~keep & (torch.rand(x_t.shape, dtype=torch.float64, generator=generator,
                                      device=device) < a[s])
        x_s = x_t.clone()
        chosen = logits[from_p0].double()                  # (n, K): Gumbel-max in float64
        x_s[from_p0] = (chosen + self._gumbel(chosen.shape, None, generator, device)).argmax(-1)
        from_s = ~keep & ~from_p0
        if self.transition == "absorbing":
            return x_s.masked_fill_(from_s, self.absorbing_state), logits
        draw = torch.randint(0, K, x_t.shape, generator=generator, device=device)
        return torch.where(from_s, draw, x_s), logits

    def _step_gaussian(self, x_t, t, s, cond, generator, skip):
        """`_step` for the discretized Gaussian, 0 < s < t, eps > 0, without logs or Gumbel
        noise: the probabilities p_θ(x_s = j | x_t) ∝ (fact1_j + eps)(fact2_j + eps), fact1 = row
        x_t of `skip` = Q_{s→t}ᵀ and fact2 = p̃_θ Q̄_s [eq. 4], are drawn by `_draw_categorical`
        (Gumbel-max over their logs samples the same law). Each product is at least eps², so
        nothing underflows (with eps = 0 it could, and `_step` keeps the logs and Gumbel-max).
        Returns (x_s, x̃_0 logits)."""
        K, eps = self.num_classes, self.eps
        logits = self.model_logits(x_t, torch.full((x_t.shape[0],), t, device=x_t.device), cond)
        with _exact_float32(x_t.device):
            p = torch.softmax(logits, -1).view(-1, K) @ (self.Q_bar[s] + eps)  # fact2 + eps
            p.mul_((skip + eps).index_select(0, x_t.reshape(-1)))               # × (fact1 + eps)
        return _draw_categorical(p, generator)[0].view(x_t.shape), logits

    @torch.no_grad()
    def p_sample(self, x_t, t, cond=None, noise=None, generator=None):
        """One ancestral step x_{t-1} ~ p_θ(x_{t-1} | x_t) for an int t (argmax at t = 1).
        With `noise` (uniforms, x_t.shape + (S,)) it replays the official Gumbel-max step."""
        self._check(x_t, None, "x_t", self.num_states)
        skip = None
        if self.transition == "gaussian" and t > 1:
            skip = self._Q_t(torch.tensor([t], device=x_t.device))[0]
        return self._step(x_t, t, t - 1, cond, noise=noise, generator=generator, skip=skip)[0]

    @torch.no_grad()
    def sample(self, shape, cond=None, steps=None, generator=None, return_trajectory=False,
               guidance=0.0, progress=False, x_init=None):
        """Ancestral sampling from x_T ~ stationary down to x_0   [§3.3].

        steps < T visits a grid of `steps` timesteps from T down to 1 and jumps between them with
        the exact q(x_s | x_t, x̃_0). Noise is drawn in float64 from `generator`.
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
        states, x0_preds = [x.cpu()], []
        for i in _progress(range(len(grid)), progress, desc="sampling", unit="step"):
            t = grid[i]
            s = grid[i + 1] if i + 1 < len(grid) else 0
            skip = None
            if self.transition == "gaussian" and s > 0:
                skip = (self._Q_t(torch.tensor([t], device=device))[0] if s == t - 1
                        else self._gaussian_skip(t, s))
            x, x0 = self._step(x, t, s, cond, guidance, generator=generator, skip=skip)
            if return_trajectory:  # kept on the CPU: T states of a large batch do not fit a GPU
                states.append(x.cpu())
                x0_preds.append(x0.argmax(-1).cpu())
        if not return_trajectory:
            return x
        return x, {"t": torch.tensor(grid), "x_t": torch.stack(states), "x0_pred": torch.stack(x0_preds)}


class _SoftmaxMixSums(torch.autograd.Function):
    """The two sums over all K logits that `D3PM._vb_closed_form` needs, with a hand-written
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
def _exact_float32(device):
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
    an explicit Q̄_{t-1} (see `D3PM._vb_gaussian`), with a hand-written backward. Every step
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
        with _exact_float32(L.device):
            P = torch.log_softmax(L, -1)
            ce = -P.gather(-1, idx0).squeeze(-1)
            P = P.exp_()                                         # p̃_θ
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
        with _exact_float32(P.device):
            g_kl, g_ce = g_kl.unsqueeze(-1), g_ce.unsqueeze(-1)
            d_m = q_hat.div_(m).mul_(-g_kl / z_q.unsqueeze(-1)).addcmul_(f1, g_kl / z_p.unsqueeze(-1))
            d_p = torch.bmm(d_m, Qb.transpose(1, 2))
            dot = torch.mul(P, d_p, out=m).sum(-1, keepdim=True)  # m is free again
            grad = d_p.sub_(dot - g_ce).mul_(P)                  # + g_ce (p̃ - onehot(x_0))
            grad.scatter_add_(-1, idx0, -g_ce)
        return grad, None, None, None, None


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


# ================================================================================================
# 3. The network: a small class- and time-conditioned conv net (nothing here is D3PM-specific)
# ================================================================================================

def timestep_embedding(t, dim, num_timesteps):
    """Sinusoidal embedding of t in 1..T, rescaled to 0..1000 so any T spans the same range."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = (t.float() * (1000.0 / num_timesteps))[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector as a FiLM scale and shift.
    GroupNorm normalises each image on its own: nothing mixes images across the batch."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h, emb):
        y = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        y = self.conv2(F.silu(self.norm2(y) * (1 + scale) + shift))
        return y + self.skip(h)


class ConvNet(nn.Module):
    """x_0-predictor for images: a two-level U-Net on embedded pixel values.

    x_t (B, C, H, W) long -> logits (B, C, H, W, K), or (loc, log_scale) each (B, C, H, W).
    Each pixel value gets a learned vector; 2x2 blocks of them are folded into channels
    (space-to-depth, like a DiT patch of 2), so the U-Net runs at H/2 and H/4: four times
    cheaper than full resolution, which is what makes a CPU run practical. Labels are
    0..num_labels-1; label num_labels (or cond=None) is the null class for classifier-free
    guidance. H and W need not be equal; both must be divisible by 4.
    """

    def __init__(self, num_states, num_classes, in_channels=1, num_labels=10, ch=64,
                 num_timesteps=1000, output="logits", pixel_emb=8):
        super().__init__()
        self.num_classes, self.in_channels, self.num_labels = num_classes, in_channels, num_labels
        self.num_timesteps, self.output, self.ch = num_timesteps, output, ch
        emb = 4 * ch
        self.pixel_emb = nn.Embedding(num_states, pixel_emb)   # one vector per pixel value
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_labels + 1, emb)     # + the null class
        self.conv_in = nn.Conv2d(4 * in_channels * pixel_emb, ch, 3, padding=1)
        self.down1, self.down2 = ResBlock(ch, ch, emb), ResBlock(ch, 2 * ch, emb)
        self.mid = ResBlock(2 * ch, 2 * ch, emb)
        self.up2, self.up1 = ResBlock(4 * ch, 2 * ch, emb), ResBlock(3 * ch, ch, emb)
        self.out_per_channel = 2 if output == "logistic" else num_classes
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 4 * in_channels * self.out_per_channel, 3, padding=1)

    def forward(self, x_t, t, cond=None):
        B, C, H, W = x_t.shape
        if H % 4 or W % 4:
            raise ValueError(f"ConvNet needs H and W divisible by 4, got {H}x{W}")
        if cond is None:
            cond = torch.full((B,), self.num_labels, dtype=torch.long, device=x_t.device)
        emb = self.time_mlp(timestep_embedding(t, self.ch, self.num_timesteps)) + self.label_emb(cond)
        h = self.pixel_emb(x_t).permute(0, 1, 4, 2, 3).reshape(B, -1, H, W)  # (B, C*E, H, W)
        h = self.conv_in(F.pixel_unshuffle(h, 2))                 # (B, ch, H/2, W/2)
        s1 = self.down1(h, emb)                                   # (B, ch, H/2, W/2)
        s2 = self.down2(F.avg_pool2d(s1, 2), emb)                 # (B, 2ch, H/4, W/4)
        h = self.mid(s2, emb)
        h = self.up2(torch.cat([h, s2], 1), emb)                  # (B, 2ch, H/4, W/4)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), s1], 1), emb)
        out = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)  # (B, C*out, H, W)
        if self.output == "logistic":
            loc, log_scale = out.float().chunk(2, dim=1)
            # loc is a residual around the input value scaled to [-1, 1], as the official UNet.
            x_scaled = 2.0 * x_t.float() / (self.num_classes - 1) - 1.0
            return torch.tanh(loc + x_scaled), log_scale
        return out.view(B, C, self.num_classes, H, W).permute(0, 1, 3, 4, 2)  # (B, C, H, W, K)


class PointMLP(nn.Module):
    """x_0-predictor for the 2-D toy: sinusoidal embeddings of both coordinates and t, an MLP,
    logits (B, 2, K)."""

    def __init__(self, num_states, num_classes, num_labels=1, hidden=256, num_timesteps=1000):
        super().__init__()
        self.num_classes, self.num_labels, self.num_timesteps = num_classes, num_labels, num_timesteps
        self.dim = 64
        self.label_emb = nn.Embedding(num_labels + 1, hidden)
        self.net_in = nn.Linear(3 * self.dim, hidden)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * num_classes))
        self.num_states = num_states

    def forward(self, x_t, t, cond=None):
        B = x_t.shape[0]
        if cond is None:
            cond = torch.full((B,), self.num_labels, dtype=torch.long, device=x_t.device)
        # coordinates are embedded like timesteps, scaled to the same 0..1000 range
        coords = [timestep_embedding(x_t[:, i], self.dim, self.num_states) for i in range(2)]
        h = torch.cat(coords + [timestep_embedding(t, self.dim, self.num_timesteps)], dim=-1)
        h = self.net_in(h) + self.label_emb(cond)
        return self.net(h).view(B, 2, self.num_classes)


# ================================================================================================
# 4. Data, training loop, command line
# ================================================================================================

# ---------------------------------------------------------------------------------- data

@dataclass
class Data:
    """Whole datasets as tensors: x long (N, ...) in 0..K-1, y long (N,) in 0..num_labels-1."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_labels: int


def quantize(images_uint8, num_classes):
    """uint8 0..255 -> long 0..K-1 with K equal-width bins (K = 2: threshold at 128)."""
    return (images_uint8.long() * num_classes) // 256


def load_mnist(root, num_classes):
    from torchvision.datasets import MNIST
    split = {}
    for train in (True, False):
        try:
            ds = MNIST(root, train=train, download=False)
        except RuntimeError:
            try:
                ds = MNIST(root, train=train, download=True)
            except Exception as e:  # offline, or the mirror is down
                raise UsageError(
                    f"MNIST not found under {os.path.join(root, 'MNIST', 'raw')} and could not be "
                    f"downloaded ({type(e).__name__}); put train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
                    "there or pass --data-root") from None
        split[train] = (quantize(ds.data.unsqueeze(1), num_classes), ds.targets.long())
    return Data(*split[True], *split[False], num_labels=10)


def heart_points(n, num_classes, generator=None):
    """n points of the 2-D heart toy, each coordinate quantised to K bins: long [n, 2].

    The heart curve (16 sin³u, 13 cos u - 5 cos 2u - 2 cos 3u - cos 4u) / 17 plus Gaussian
    noise of std 0.03, clipped to [-1, 1] and cut into K equal bins per coordinate.
    """
    u = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    x = 16 * torch.sin(u) ** 3
    y = 13 * torch.cos(u) - 5 * torch.cos(2 * u) - 2 * torch.cos(3 * u) - torch.cos(4 * u) + 2.5
    pts = torch.stack([x, y], 1) / 17 + 0.03 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return ((pts.clamp(-1, 1) + 1) / 2 * num_classes).long().clamp(0, num_classes - 1)


def heart_tv(points, num_classes, cells=16, reference=1_000_000):
    """Total-variation distance between the heart toy's distribution and the points [n, 2]
    (bins 0..K-1), both pooled into cells x cells equal squares; the distribution is estimated
    from `reference` fresh points (seeded, so every call compares with the same one). A data
    sample of n points scores the floor for that n (0.025 at n = 20,000, K = 64, 16 x 16)."""
    def histogram(pts):
        c = pts.long() * cells // num_classes
        return torch.bincount(c[:, 0] * cells + c[:, 1], minlength=cells * cells).double() / len(pts)
    truth = heart_points(reference, num_classes, torch.Generator().manual_seed(12345))
    return 0.5 * float((histogram(points) - histogram(truth)).abs().sum())


def build_data(cfg):
    if cfg.dataset == "mnist":
        return load_mnist(cfg.data_root, cfg.num_classes)
    if cfg.dataset == "heart":
        g = torch.Generator().manual_seed(cfg.seed)
        n_train, n_test = 20000, 2000
        pts = heart_points(n_train + n_test, cfg.num_classes, g)
        labels = torch.zeros(n_train + n_test, dtype=torch.long)  # one class
        return Data(pts[:n_train], labels[:n_train], pts[n_train:], labels[n_train:], num_labels=1)
    raise UsageError(f"--dataset must be mnist or heart, got {cfg.dataset!r}")


def batch_indices(step, n, batch_size, seed):
    """Indices of the batch at `step`: epoch e is a permutation seeded by (seed, e), so the data
    order depends on the step alone and a resumed run sees exactly the batches it would have."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if batch_size > n:  # tiny datasets: cycle
        return perm.repeat(batch_size // n + 1)[:batch_size]
    return perm[i * batch_size:(i + 1) * batch_size]


# ---------------------------------------------------------------------------- model set-up

def build_model(cfg, data):
    """The x_0-predicting network for cfg.dataset."""
    num_states = cfg.num_classes + (1 if cfg.transition == "absorbing" and cfg.absorbing_state == "mask" else 0)
    if cfg.dataset == "heart":
        return PointMLP(num_states, cfg.num_classes, data.num_labels, num_timesteps=cfg.num_timesteps)
    return ConvNet(num_states, cfg.num_classes, data.train_x.shape[1], data.num_labels,
                   ch=cfg.model_channels, num_timesteps=cfg.num_timesteps, output=cfg.model_output)


def build_d3pm(cfg, net):
    return D3PM(net, cfg.num_timesteps, cfg.num_classes, cfg.transition,
                schedule=None if cfg.schedule == "default" else cfg.schedule,
                hybrid_coeff=cfg.hybrid_coeff, loss_type=cfg.loss_type,
                model_output=cfg.model_output, eps=cfg.eps,
                absorbing_state=("mask" if cfg.absorbing_state == "mask" else None)
                if cfg.transition == "absorbing" else None)


@contextmanager
def using_model(d3pm, net):
    """Temporarily run the process with another network (the EMA weights, for sampling)."""
    original = d3pm.x0_model
    d3pm.x0_model = net
    try:
        yield d3pm
    finally:
        d3pm.x0_model = original


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- pictures

def to_rgb(x, num_classes):
    """Long images (N, C, H, W) in 0..S-1 -> float RGB (N, 3, H, W) in [0, 1]; the [MASK]
    state (value K) is drawn red."""
    img = x.float().clamp(max=num_classes - 1) / (num_classes - 1)
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    mask = (x == num_classes).any(1, keepdim=True)
    red = torch.tensor([1.0, 0.15, 0.15], device=x.device).view(1, 3, 1, 1)
    return torch.where(mask, red, img)


def save_grid(x, num_classes, path, nrow):
    from PIL import Image
    from torchvision.utils import make_grid
    grid = make_grid(to_rgb(x.cpu(), num_classes), nrow=nrow, padding=1, pad_value=0.5)
    scale = max(1, 256 // grid.shape[-1])  # small images are upscaled so a reader can see them
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def save_gif(frames, num_classes, path, nrow, max_frames=60):
    """frames: (F, N, C, H, W) states of the reverse process -> an animated GIF."""
    from PIL import Image
    from torchvision.utils import make_grid
    idx = torch.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().long().tolist()
    images = []
    for i in idx:
        grid = make_grid(to_rgb(frames[i].cpu(), num_classes), nrow=nrow, padding=1, pad_value=0.5)
        img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
        scale = max(1, 256 // img.width)
        images.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    durations = [80] * (len(images) - 1) + [1500]  # hold the final samples
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def save_points(data_pts, model_pts, num_classes, path):
    """The heart toy: 2-D histograms of data (left) and model samples (right)."""
    from PIL import Image
    panels = []
    for pts in (data_pts, model_pts):
        hist = torch.zeros(num_classes, num_classes)
        hist.index_put_((num_classes - 1 - pts[:, 1], pts[:, 0]), torch.ones(len(pts)), accumulate=True)
        hist = (hist / hist.max().clamp_min(1)) ** 0.5
        panels.append(torch.cat([1 - hist, torch.full((num_classes, 2), 1.0)], 1))
    img = (torch.cat(panels, 1) * 255).round().byte().numpy()
    scale = max(1, 512 // img.shape[1])
    img = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    from PIL import ImageDraw
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(("data", "model samples")):
        draw.text((i * img.width // 2 + 6, 4), f"{name} ({len(data_pts if i == 0 else model_pts)})", fill=0)
    img.save(path)


# ------------------------------------------------------------------------ sampling and eval

def draw_samples(cfg, d3pm, net, num_labels, n, shape, device, generator, trajectory=False):
    """n class-conditional samples, labels 0,0,..,1,1,.. (n // num_labels per class), drawn in
    batches of cfg.batch_size. The first batch is the preview: up to 10 samples per class, whose
    reverse process is kept (on the CPU) when `trajectory` is set, for the grid and the GIF.
    Returns (labels [n], x [n, ...] long on the CPU, preview indices, trajectory or None)."""
    labels = torch.arange(num_labels).repeat_interleave(max(1, n // num_labels))[:n]
    preview = torch.cat([(labels == c).nonzero().flatten()[:10] for c in range(num_labels)])
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[preview] = False
    batches = [preview] + list(rest.nonzero().flatten().split(cfg.batch_size))
    x, traj = torch.empty((len(labels),) + tuple(shape), dtype=torch.long), None
    with using_model(d3pm, net), autocast_for(device, cfg.precision):
        for i, idx in enumerate(_progress(batches, len(batches) > 1, desc="sampling batches")):
            if len(idx) == 0:
                continue
            out = d3pm.sample((len(idx),) + tuple(shape), labels[idx].to(device),
                              steps=cfg.sample_steps or None, generator=generator,
                              return_trajectory=trajectory and i == 0, guidance=cfg.guidance,
                              progress=i == 0)
            if trajectory and i == 0:
                out, traj = out
            x[idx] = out.cpu()
    return labels, x, preview, traj


def save_previews(cfg, x, labels, preview, traj, png, gif):
    """The grid (a row per class) and the reverse-process GIF of the preview samples."""
    nrow = max(1, int((labels[preview] == labels[preview][0]).sum()))
    save_grid(x[preview], cfg.num_classes, png, nrow)
    save_gif(traj["x_t"], cfg.num_classes, gif, nrow)


def write_samples(cfg, d3pm, net, data, device, tag):
    """A PNG grid (a row per class) and a GIF of the reverse process into cfg.out."""
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    shape = data.train_x.shape[1:]
    heart = cfg.dataset == "heart"
    labels, x, preview, traj = draw_samples(cfg, d3pm, net, data.num_labels, cfg.num_samples,
                                            shape, device, g, trajectory=not heart)
    if heart:
        path = os.path.join(cfg.out, f"heart_{tag}.png")
        save_points(data.test_x[:cfg.num_samples], x, cfg.num_classes, path)
        return x, path
    path = os.path.join(cfg.out, f"samples_{tag}.png")
    save_previews(cfg, x, labels, preview, traj, path, os.path.join(cfg.out, f"reverse_{tag}.gif"))
    return x, path


def test_nll(cfg, d3pm, net, data, device):
    """The full bound on the first cfg.eval_images test images, bits/dim (mean over images)."""
    n = min(cfg.eval_images, len(data.test_x))
    if n == 0:
        return float("nan")
    total, g = 0.0, torch.Generator(device=device).manual_seed(cfg.seed + 2)
    with using_model(d3pm, net), autocast_for(device, cfg.precision):
        for i in _progress(range(0, n, cfg.batch_size), True, desc="test NLL (batches)"):
            x = data.test_x[i:i + min(cfg.batch_size, n - i)].to(device)
            y = data.test_y[i:i + len(x)].to(device)
            total += float(d3pm.nll_bpd(x, y, generator=g, batch_size=max(256, len(x))).sum())
    return total / n


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Atomic: write a temporary file, flush it to disk, then rename over the old one, so a
    crash while saving leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume {path}: not a d3pm checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "step"} <= set(ckpt):
        raise UsageError(f"--resume {path}: not a d3pm checkpoint (missing model/config/step)")
    return ckpt


def resolve_config(given, ckpt_config=None, config_cls=Config, presets=PRESETS,
                   model_fields=MODEL_FIELDS):
    """Defaults < preset < checkpoint config < flags given on the command line. A flag that
    contradicts the checkpoint's process or network is refused, naming the field."""
    preset = given.get("preset") or (ckpt_config or {}).get("preset") or ""
    if preset and preset not in presets:
        raise UsageError(f"--preset must be one of {', '.join(presets)}, got {preset!r}")
    values = {**presets.get(preset, {})}
    if ckpt_config is not None:
        for name in model_fields:
            if name in given and given[name] != ckpt_config[name]:
                raise UsageError(f"checkpoint was trained with {name}={ckpt_config[name]!r}, "
                                 f"but --{name.replace('_', '-')} {given[name]!r} was asked for")
        values.update({k: v for k, v in ckpt_config.items() if k in config_cls.__dataclass_fields__})
        for mode in ("resume", "sample_only", "eval_only", "figures"):
            values.pop(mode, None)
    values.update(given)
    return config_cls(**values)


# ---------------------------------------------------------------------------- training

class StopRequested:
    """Ctrl-C / SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name


def autocast_for(device, precision="bf16"):
    """bf16 autocast for the network on CUDA; a null context on CPU or with precision fp32. The
    diffusion log-probabilities are computed in float32 either way (the networks return float32)."""
    use = device.type == "cuda" and precision == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16) if use else nullcontext()


def tune_cpu():
    """Two process-wide CPU settings that train() (and bench.py) use; README "Speed" has their
    effect. (1) float32 denormals (< 1.2e-38) flush to zero: x86 multiplies them ~100x slower,
    and the Gaussian's p̃_θ Q̄ products are full of them (its bmm runs 1.8x faster); they lie far
    below the eps = 1e-6 floor of every log. (2) glibc keeps freed blocks up to 32 MB for reuse
    instead of returning them to the OS: each fresh (B, ..., K) buffer otherwise costs ~1.5 ns per
    element in page faults, a few percent of every step. No-op where glibc is absent."""
    torch.set_flush_denormal(True)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3              # from <malloc.h>
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)                 # glibc's default ceiling
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def setup_distributed(cfg):
    """(rank, world_size, device). Under torchrun: one process per GPU with NCCL, or gloo on
    CPU (how the tests run it); otherwise a single process on cfg.device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(cfg.device)
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def _check_in_outdir(cfg):
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out {cfg.out}: cannot write there ({e.strerror})") from None


def train(cfg, build_data=build_data, build_model=build_model, log=print):
    """Train a class-conditional D3PM; build_data/build_model are swapped by the CIFAR runner.
    Returns a dict of final metrics."""
    # 1. set up: device(s), data, network, process, optimiser, EMA, run directory
    rank, world, device = setup_distributed(cfg)
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731  (rank 0 alone logs, samples and saves)
    elif cfg.eval_only and log is print:  # stdout carries the one JSON line alone
        log = lambda *a, **k: print(*a, file=sys.stderr, **k)  # noqa: E731
    torch.manual_seed(cfg.seed)   # identical initial weights on every rank
    _check_in_outdir(cfg)
    data = build_data(cfg)
    net = build_model(cfg, data).to(device)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    step, skipped_total = 0, 0
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, skipped_total = ckpt["step"], ckpt.get("skipped_steps", 0)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if world > 1:  # each rank draws its own t and noise
        torch.manual_seed(cfg.seed + 1000 * rank + step)
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if getattr(cfg, "compile", False):
        model = torch.compile(model)
    d3pm = build_d3pm(cfg, model).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        d3pm.validate = False  # range checks cost a host sync per call
    else:
        tune_cpu()
    log(f"{type(net).__name__}: {count_parameters(net):,} parameters; {cfg.transition} "
        f"transition, K={cfg.num_classes}, T={cfg.num_timesteps}, device {device}"
        + (f" x {world} processes" if world > 1 else ""))
    if rank == 0 and not (cfg.sample_only or cfg.eval_only):
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    def checkpoint():
        if rank != 0:
            return
        save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), {
            "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "step": step, "skipped_steps": skipped_total,
            "betas": d3pm.betas64.cpu(), "config": dataclasses.asdict(cfg),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}})

    if cfg.sample_only or cfg.eval_only:
        if world > 1:
            raise UsageError("--sample-only and --eval-only run in one process; start them "
                             "without torchrun")
        return evaluate_only(cfg, d3pm, ema.module, data, device, log)

    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    stop = StopRequested()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.train_steps, initial=step, desc="training", dynamic_ncols=True,
               disable=rank != 0)
    sums, bad_in_a_row, t_start, n_logged = torch.zeros(3, device=device), 0, time.time(), 0
    n_train = len(data.train_x)
    try:
        while step < cfg.train_steps:
            # 2. this rank's share of the batch; labels dropped to the null class for
            #    classifier-free guidance
            idx = batch_indices(step, n_train, cfg.batch_size, cfg.seed)[rank::world]
            x_0, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            if hasattr(data, "augment"):
                x_0 = data.augment(x_0, step)
            drop = torch.rand(y.shape, device=device) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, data.num_labels), y)
            # 3. corrupt x_0 and compute the loss (t ~ U{1..T}, x_t ~ q(x_t|x_0); eq. 5)
            with autocast_for(device, cfg.precision):
                loss, info = d3pm(x_0, y)
            # 4. step, unless the loss or gradient is not finite
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            # [finite, not stopping]: any rank's NaN skips the step everywhere, and any rank's
            # Ctrl-C/SIGTERM stops every rank at the same step (else the others hang in DDP).
            flags = torch.stack([(torch.isfinite(loss) & torch.isfinite(grad_norm)).float(),
                                 torch.tensor(float(stop.signal is None), device=device)])
            if world > 1:
                torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MIN)
            finite, stop_now = flags[0], not bool(flags[1])
            step += 1
            if bool(finite):
                opt.step()
                sched.step()
                ema.update_parameters(net)
                bad_in_a_row = 0
                sums += torch.stack([loss.detach(), info["vb"], info["ce"]])
                n_logged += 1
            else:
                skipped_total += 1
                bad_in_a_row += 1
                log(f"warning: non-finite loss or gradient at step {step}; update skipped")
                if bad_in_a_row >= 20:
                    step -= bad_in_a_row
                    raise FloatingPointError(
                        f"{bad_in_a_row} non-finite steps in a row; stopped (the checkpoint "
                        "holds the last good state)")
            bar.update(1)
            # 5. log (losses averaged over ranks), sample, checkpoint: rank 0 only
            if step % cfg.log_every == 0 or step == cfg.train_steps:
                if world > 1:
                    torch.distributed.all_reduce(sums)
                    sums /= world
                loss_m, vb_m, ce_m = (sums / max(1, n_logged)).tolist()
                sums.zero_()
                n_logged = 0
                row = {"step": step, "loss": loss_m, "vb_bpd": vb_m, "ce_bpd": ce_m,
                       "lr": sched.get_last_lr()[0], "skipped_steps": skipped_total,
                       "elapsed_s": round(time.time() - t_start, 1)}
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{loss_m:.4f}", vb=f"{vb_m:.4f}", ce=f"{ce_m:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.train_steps and rank == 0:
                write_samples(cfg, d3pm, ema.module, data, device, f"step{step}")
            if step % cfg.checkpoint_every == 0 or step == cfg.train_steps:
                checkpoint()
            if stop_now:
                checkpoint()
                log(f"{stop.signal or 'a stop signal on another rank'} received: checkpoint saved "
                    f"at step {step} in "
                    f"{os.path.join(cfg.out, 'checkpoint.pt')}; continue with --resume")
                return {"step": step, "interrupted": True}
    except FloatingPointError:
        checkpoint()
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1 and step >= cfg.train_steps:
            _check_ranks_agree(net, log)
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return {"step": step}
    if not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        checkpoint()  # --train-steps 0, or a resume that had nothing left to do

    # 6. at the end: samples from the EMA weights and the test NLL (full bound)
    _, grid = write_samples(cfg, d3pm, ema.module, data, device, "final")
    nll = test_nll(cfg, d3pm, ema.module, data, device)
    result = {"step": step, "test_nll_bpd": nll, "eval_images": min(cfg.eval_images, len(data.test_x)),
              "train_seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    log(f"test NLL {nll:.4f} bits/dim on {result['eval_images']} test images; samples in {grid}")
    return result


def _check_ranks_agree(net, log):
    """DDP keeps replicas identical; verify it at the end (a desync would be a silent bug)."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    weights = 1 + torch.arange(len(flat), device=flat.device) % 9973
    mine = torch.stack([flat.sum(), (flat * weights).sum()])
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    log(f"weights identical across {len(gathered)} ranks: {same}")
    if not same:
        raise RuntimeError("DDP replicas diverged: weights differ across ranks")


def evaluate_only(cfg, d3pm, net, data, device, log):
    """--sample-only: samples.pt + grid + GIF. --eval-only: the test NLL as one JSON line."""
    if cfg.sample_only:
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        heart = cfg.dataset == "heart"
        labels, x, preview, traj = draw_samples(cfg, d3pm, net, data.num_labels, cfg.num_samples,
                                                data.train_x.shape[1:], device, g, trajectory=not heart)
        if heart:
            save_points(data.test_x[:cfg.num_samples], x, cfg.num_classes,
                        os.path.join(cfg.out, "heart_samples.png"))
        else:
            save_previews(cfg, x, labels, preview, traj, os.path.join(cfg.out, "samples.png"),
                          os.path.join(cfg.out, "reverse.gif"))
        torch.save({"images": x, "labels": labels}, os.path.join(cfg.out, "samples.pt"))
        log(f"wrote {len(x)} samples to {os.path.join(cfg.out, 'samples.pt')}")
    result = {}
    if cfg.eval_only:
        result = {"test_nll_bpd": test_nll(cfg, d3pm, net, data, device),
                  "eval_images": min(cfg.eval_images, len(data.test_x))}
        print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------- command line

def _field_comments(config_cls):
    """The comment after each config field, used as its --help text."""
    import inspect
    import re
    comments = {}
    for cls in reversed(config_cls.__mro__[:-1]):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): \w+ = .*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def make_parser(description=__doc__, config_cls=Config):
    import argparse
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    comments = _field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, "")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                                help=help_text + " (default: off)")
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}.get(
                f.type if isinstance(f.type, str) else f.type.__name__, str),
                default=argparse.SUPPRESS, metavar=f.name.upper(),
                help=f"{help_text} (default: {f.default})")
    return parser


def main(argv=None, run=None, description=__doc__, config_cls=Config, presets=PRESETS,
         model_fields=MODEL_FIELDS, validate=None):
    """Parse flags, run, and turn bad input into one line on stderr with exit status 2."""
    run = run or train
    given = vars(make_parser(description, config_cls).parse_args(argv))
    try:
        ckpt = load_checkpoint(given["resume"]) if given.get("resume") else None
        cfg = resolve_config(given, ckpt["config"] if ckpt else None, config_cls, presets,
                             model_fields)
        validate_config(cfg)
        if validate is not None:
            validate(cfg)
        if cfg.figures:
            import figures
            figures.make_figures(cfg, out_dir=given.get("out", "contents"))
        else:
            run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # too many non-finite steps: already checkpointed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
