"""D3PM in one file: discrete denoising diffusion on MNIST.

Implements "Structured Denoising Diffusion Models in Discrete State-Spaces"
(Austin, Johnson, Ho, Tarlow, van den Berg, NeurIPS 2021, arXiv:2107.03006), checked term by
term against the official JAX code (google-research/d3pm, `images/diffusion_categorical.py`).

    python d3pm_runner.py --preset cpu --data-root ../shared/data    # train on MNIST, CPU
    python d3pm_runner.py --help                                       # every option

Sections, in paper order:
  0. configuration: one dataclass of named defaults, presets, input validation
  1. schedules and transition matrices Q_t          (paper §3.1, §3.2, App. A)
  2. the D3PM class, one method per equation: forward process q (eq. 2, 3), posterior
     q(x_{t-1}|x_t,x_0) and p_θ (eq. 3, 4), the bound L_{t-1}, L_0, L_T and the hybrid loss
     L_λ (eq. 1, 5), the full bound in bits/dim, the sampler with guidance (§3.3)
  3. the network (a small class-conditioned conv net; nothing in it is specific to D3PM)
  4. data, training loop and command line           (the last two may be skipped on first read)

`d3pm_fast.py` (if present beside this file) holds FastD3PM, the same numbers faster, which
the runner uses by default; `--no-fast`, or this file alone, runs the D3PM class below.
`heart.py` (a 2-D toy) and `d3pm_runner_cifar.py` (CIFAR-10, DiT) reuse this runner with their
own data and network; `d3pm_dist.py` adds several processes under torchrun.

Shape legend: B batch, C channels, H/W height/width, K = num_classes (values a pixel can take),
S = num_states (K, or K+1 when the absorbing process has its own [MASK] state), T = num_timesteps.
Every per-pixel distribution keeps its class axis last: (B, C, H, W, S).
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

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
    dataset: str = "mnist"            # mnist (heart.py: heart; the CIFAR runner: cifar10 | fake)
    data_root: str = "./data"         # folder holding MNIST/raw (torchvision layout)
    num_classes: int = 2              # K: states per pixel (quantisation levels)
    # ---- process
    num_timesteps: int = 1000         # T: diffusion steps
    transition: str = "uniform"       # uniform | absorbing | gaussian (presets choose their own)
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
    lr_decay: str = "none"            # after the warm-up: none (constant) | cosine (to 10 % at train_steps)
    grad_clip: float = 1.0            # max global gradient norm
    ema_decay: float = 0.9995         # EMA decay per step for the sampling weights
    seed: int = 0                     # seeds data order, noise and initialisation
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # the network's arithmetic: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False             # torch.compile the training network; D3PM's math stays eager
    # ---- logging, evaluation, checkpoints
    out: str = "runs/mnist"           # run directory
    log_every: int = 100              # steps between metrics.jsonl lines
    eval_every: int = 5000            # steps between sample grids/GIFs (0 = only at the end)
    checkpoint_every: int = 1000      # steps between checkpoints
    num_samples: int = 100            # samples per grid (a row per class)
    sample_steps: int = 0             # reverse steps at sampling (0 = all T; fewer = strided)
    guidance: float = 0.0             # classifier-free guidance weight w (0 = conditional)
    eval_images: int = 1000           # test images for the final bounds on -log p(x), -log p(x|y)
    # ---- modes
    resume: str = ""                  # checkpoint to continue from (or to sample/evaluate)
    sample_only: bool = False         # with --resume: write samples.pt, a grid and a GIF
    eval_only: bool = False           # with --resume: print both test bounds (bits/dim) as JSON
    preset: str = ""                  # cpu | cpu-grey: named settings, overridden by flags
    no_fast: bool = False             # use the reference D3PM class, not d3pm_fast.FastD3PM


PRESETS = {
    # Class-conditional binarised MNIST within 15 minutes on a slow 2-core CPU (README). w = 0.25:
    # 96 % recognised at nearly w = 0's Fréchet distance (w = 1: 99 % with look-alike digits).
    "cpu": dict(dataset="mnist", num_classes=2, num_timesteps=100, transition="absorbing",
                model_channels=48, train_steps=2000, batch_size=64, lr=1.5e-3, warmup_steps=100,
                ema_decay=0.999, eval_every=0, checkpoint_every=500, log_every=50,
                sample_steps=50, guidance=0.25, eval_images=200, out="runs/cpu"),
    # 8-bit MNIST (K = 256) with the paper's best CIFAR-10 setting: discretized Gaussian, logistic
    # output, hybrid loss. Cosine schedule: the linear one (1e-4..0.02) does not mix at T = 20.
    # T = 20 halves the bounds' time against 40 at the same accuracy (T = 10 lost a third); the
    # 15-minute budget leaves 1,250 steps, too few for 90 % recognised unguided: w = 4, with the
    # learning rate decayed to a tenth (93 % recognised, against 89 % at w = 3; README).
    "cpu-grey": dict(dataset="mnist", num_classes=256, num_timesteps=20, transition="gaussian",
                     schedule="cosine", model_output="logistic", loss_type="hybrid",
                     model_channels=32, train_steps=1250, batch_size=32, lr=2e-3, warmup_steps=100,
                     lr_decay="cosine", ema_decay=0.995, eval_every=0, checkpoint_every=500,
                     log_every=50, sample_steps=0, guidance=4.0, eval_images=1000, out="runs/cpu-grey"),
}

# Fields that define the process and the network: a checkpoint must agree on all of them.
MODEL_FIELDS = ("dataset", "num_classes", "num_timesteps", "transition", "schedule",
                "absorbing_state", "model_output", "model_channels")


class UsageError(Exception):
    """Bad input from the command line: reported as one line on stderr, exit status 2."""


def validate_config(cfg):
    """Bad input -> UsageError: one line naming the flag and the value given."""
    choices = {"transition": ("uniform", "absorbing", "gaussian"), "loss_type": ("hybrid", "vb", "ce"),
               "model_output": ("logits", "logistic"), "device": ("auto", "cpu", "cuda"),
               "absorbing_state": ("mask", "grey"), "precision": ("auto", "bf16", "fp32"),
               "schedule": ("default", "cosine", "linear", "jsd"), "lr_decay": ("none", "cosine")}
    checks = [(getattr(cfg, name) in allowed, f"--{name.replace('_', '-')} must be one of "
               f"{', '.join(allowed)}") for name, allowed in choices.items()]
    checks += [(2 <= cfg.num_classes <= 256, "--num-classes (K) must be in 2..256"),
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
    if cfg.guidance > 0 and cfg.label_dropout == 0:
        raise UsageError(f"--guidance {cfg.guidance} needs a model trained with --label-dropout > 0: "
                         "with 0 the null class that guidance subtracts was never trained")
    if (cfg.sample_only or cfg.eval_only) and not cfg.resume:
        raise UsageError("--sample-only and --eval-only need --resume CHECKPOINT")


def _offending(message, cfg):
    name = message.split()[0].lstrip("-").replace("-", "_")
    return repr(getattr(cfg, name, "?"))


# ================================================================================================
# 1. Schedules and one-step transition matrices Q_t   [§3.1, §3.2, App. A]
# ================================================================================================

def get_betas(name, num_timesteps):
    """β_1..β_T in float64 (index t-1 holds β_t), as the official `get_diffusion_betas`."""
    T = num_timesteps
    if name == "linear":  # DDPM's schedule; the paper's choice for the discretized Gaussian
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if name == "cosine":
        # Nichol & Dhariwal's schedule, but the official code leaves the cosine UNSQUARED
        # (ᾱ(u) = cos(...), not cos²(...)); we follow the code, see README "Differences".
        u = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((u + 0.008) / 1.008 * math.pi / 2)
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


def log_or_zero(p, eps=0.0):
    """log(p + eps) as the official code does; with eps = 0, log(p) with log(0) = LOG_ZERO."""
    if eps > 0:
        return torch.log(p + eps)
    return torch.where(p > 0, torch.log(torch.where(p > 0, p, 1.0)), LOG_ZERO)


def gumbel_argmax(logits, noise=None, generator=None):
    """One draw per row of Cat(softmax(logits)) by Gumbel-max, the noise in float64 from
    uniforms clipped at the smallest positive float (`noise`, if given, holds the uniforms)."""
    if noise is None:
        noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator,
                           device=logits.device)
    u = noise.clamp(min=torch.finfo(noise.dtype).tiny, max=1.0).double()
    return (logits.double() - torch.log(-torch.log(u))).argmax(-1)


def guide(log_c, log_u, w):
    """Classifier-free guidance on normalised log-probabilities: (1+w) log p_c - w log p_u,
    the "D-CFG" of Schiff et al. 2024 (arXiv:2412.10193) with γ = 1 + w. A state that p_c rules
    out stays at LOG_ZERO; one that only p_u rules out (by float underflow alone: both share
    their support) keeps log p_c. Identical inputs return them unchanged for every w."""
    zero_c, zero_u = log_c <= LOG_ZERO / 2, log_u <= LOG_ZERO / 2
    return torch.where(zero_c, LOG_ZERO, torch.where(zero_u, log_c, (1 + w) * log_c - w * log_u))


def _process_args(T, K, transition, schedule, loss_type, model_output, absorbing_state, eps):
    """Checks D3PM's arguments; returns (betas float64 [T], schedule name, absorbing state m or
    None, whether m is an extra [MASK] state). m is the grey value K//2 by default, as the paper
    does for images (an ordinary pixel value), an int, or "mask": a dedicated extra state K."""
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {T}")
    if not 2 <= K <= 256:
        raise ValueError(f"num_classes must be in 2..256, got {K}")
    if transition not in DEFAULT_SCHEDULE:
        raise ValueError(f"unknown transition {transition!r}; expected one of {sorted(DEFAULT_SCHEDULE)}")
    if loss_type not in ("hybrid", "vb", "ce"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'hybrid', 'vb' or 'ce'")
    if model_output not in ("logits", "logistic"):
        raise ValueError(f"unknown model_output {model_output!r}; expected 'logits' or 'logistic'")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mask, m = transition == "absorbing" and absorbing_state == "mask", None
    if transition == "absorbing":
        m = K if mask else (K // 2 if absorbing_state is None else absorbing_state)
        if not isinstance(m, int) or not 0 <= m < K + mask:
            raise ValueError(f"absorbing_state must be None, 'mask' or an int in 0..{K - 1}, "
                             f"got {absorbing_state!r}")
    elif absorbing_state is not None:
        raise ValueError("absorbing_state only applies to transition='absorbing'")
    schedule = DEFAULT_SCHEDULE[transition] if schedule is None else schedule
    betas = (get_betas(schedule, T) if isinstance(schedule, str)
             else torch.as_tensor(schedule, dtype=torch.float64).flatten())
    if betas.numel() != T or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(f"schedule must hold {T} betas in (0, 1], got {betas.tolist()[:8]}...")
    return betas, schedule if isinstance(schedule, str) else "custom", m, mask


# ================================================================================================
# 2. The D3PM process: q, the posterior, p_θ, the bound, the sampler   [§3, eq. 1-5]
# ================================================================================================

class D3PM(nn.Module):
    """Discrete diffusion with an x_0-parameterized reverse process: the paper, one method per
    equation. `d3pm_fast.FastD3PM` overrides a few of them with faster forms of the same numbers.

    Time as in the paper (the official code is 0-based; its t is our t-1): x_0 is data,
    t ∈ {1..T}, Q̄_t = Q_1 Q_2 ⋯ Q_t, Q̄_0 = I. Q[i, j] = q(x_t = j | x_{t-1} = i): rows are
    "from" and sum to one. Uniform and absorbing are Q_t = (1-β_t) I + β_t 1 πᵀ with π their
    stationary distribution (uniform: 1/K; absorbing: e_m), so Q̄_t = ᾱ_t I + (1-ᾱ_t) 1 πᵀ with
    ᾱ_t = Π_{r≤t} (1-β_r) [App. A]; the process keeps β, ᾱ and π. The discretized Gaussian keeps
    its Q̄_t as an explicit float32 stack built in float64, and makes each Q_t from β_t (eq. 8).

    `x0_model(x_t, t, cond)` returns logits over x_0 of shape x_t.shape + (K,) (or, with
    model_output="logistic", a (loc, log_scale) pair of x_t's shape); t is the 1-based step.
    eps is added to probabilities inside each log of the loss and the bound, exactly where the
    official code adds it; sampling uses the exact p_θ (eps = 0 there).
    """

    def __init__(self, x0_model, num_timesteps, num_classes, transition="uniform",
                 schedule=None, hybrid_coeff=0.001, loss_type="hybrid", model_output="logits",
                 absorbing_state=None, eps=1e-6, check_inputs=True):
        super().__init__()
        T, K = int(num_timesteps), int(num_classes)
        betas, self.schedule_name, self.absorbing_state, self.mask_state = _process_args(
            T, K, transition, schedule, loss_type, model_output, absorbing_state, eps)
        self.x0_model, self.num_timesteps, self.num_classes, self.transition = x0_model, T, K, transition
        self.hybrid_coeff, self.loss_type, self.model_output = hybrid_coeff, loss_type, model_output
        self.eps, self.check_inputs = float(eps), check_inputs  # range checks: a host sync each
        self.num_states = S = K + 1 if self.mask_state else K     # S: K, or K + 1 with [MASK]
        # Buffers follow from the arguments, so they are not saved in state_dict.
        buf = lambda name, value: self.register_buffer(name, value, persistent=False)  # noqa: E731
        buf("betas", betas)                                            # float64 [T]: β_t at t-1
        if transition == "gaussian":
            buf("stationary", torch.full((S,), 1.0 / S, dtype=torch.float64))  # Q_t doubly stochastic
            buf("Q_bar", torch.empty(T + 1, S, S))                     # float32 [T+1, S, S]: Q̄_t at t
            self.Q_bar[0] = acc = torch.eye(S, dtype=torch.float64)
            for t in range(1, T + 1):                                  # float64 products
                self.Q_bar[t] = (acc := acc @ gaussian_Q(betas[t - 1], K)).float()
        else:
            buf("alpha_bar", torch.cat([torch.ones(1, dtype=torch.float64), (1 - betas).cumprod(0)]))
            buf("stationary", torch.full((S,), 1.0 / S, dtype=torch.float64) if transition == "uniform"
                else F.one_hot(torch.tensor(self.absorbing_state), S).double())

    # ------------------------------------------------------------ the matrices, explicitly
    def Q_matrix(self, t, s=None):
        """Q_{s→t} = Q_{s+1} ⋯ Q_t as an explicit float64 (S, S) matrix; the default s = t-1
        gives Q_t itself   [eq. 2; App. A: Q_{s→t} = (ᾱ_t/ᾱ_s) I + (1 - ᾱ_t/ᾱ_s) 1 πᵀ]."""
        s = t - 1 if s is None else s
        I = torch.eye(self.num_states, dtype=torch.float64, device=self.betas.device)  # noqa: E741
        if self.transition == "gaussian":        # the product, one matrix of eq. 8 at a time
            Q = I
            for r in range(s + 1, t + 1):
                Q = Q @ gaussian_Q(self.betas[r - 1], self.num_classes, I.device)
            return Q
        keep = self.alpha_bar[t] / self.alpha_bar[s]
        return keep * I + (1 - keep) * self.stationary

    def Q_bar_matrix(self, t):
        """Q̄_t = Q_1 ⋯ Q_t = Q_{0→t} as an explicit float64 (S, S) matrix; Q̄_0 = I."""
        return self.Q_matrix(t, 0)

    # ------------------------------------------------------------ forward process q
    def q_probs(self, x_0, t):
        """q(x_t | x_0) = Cat(x_t; x_0 Q̄_t)   [D3PM eq. 3].

        x_0 long (B, ...) or a distribution over it (B, ..., S); t long [B] in 0..T.
        Returns float32 (B, ..., S), computed in float32 whatever autocast is active.
        """
        if not x_0.is_floating_point():
            self._check(x_0, t, low_t=0)
            x_0 = F.one_hot(x_0, self.num_states).float()
        elif x_0.dim() < 2 or x_0.shape[-1] != self.num_states:
            raise ValueError(f"x_0 must be an integer tensor [B, ...] or a distribution [B, ..., "
                             f"{self.num_states}], got {x_0.dtype} {tuple(x_0.shape)}")
        with torch.autocast(x_0.device.type, enabled=False):
            if self.transition == "gaussian":                   # one Q̄_t per example
                B, S = x_0.shape[0], self.num_states
                return torch.bmm(x_0.float().reshape(B, -1, S), self.Q_bar[t]).view(x_0.shape)
            keep = self._per_example(self.alpha_bar[t], x_0[..., 0])  # x_0 Q̄_t = ᾱ_t x_0 + (1-ᾱ_t) π
            return (keep * x_0 + (1 - keep) * self.stationary).float()

    def q_sample(self, x_0, t, noise=None, generator=None):
        """x_t ~ q(x_t | x_0) = Cat(x_0 Q̄_t)   [eq. 3], by Gumbel-max in float64. `noise`
        (uniforms of shape x_0.shape + (S,)) replays the official draw, whose log(q + eps) puts
        about eps of mass on impossible values; without it the draw is exact. Long x_0.shape."""
        eps = self.eps if noise is not None else 0.0
        return gumbel_argmax(log_or_zero(self.q_probs(x_0, t), eps), noise, generator)

    # ------------------------------------------------------------ posterior and p_θ
    def q_posterior_logits(self, x_0, x_t, t, s=None, eps=None):
        """Logits of q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0), 0 <= s < t (default t-1)
        [D3PM eq. 3]: fact1 = column x_t of Q_{s→t}, fact2 = x_0 Q̄_s, as the official code.

        x_0: long data (B, ...), or logits over x̃_0 (B, ..., K or S), which makes fact2 =
        Σ_x̃0 p̃_θ(x̃_0) Q̄_s[x̃_0] and the result p_θ(x_s | x_t)   [eq. 4]. At s = 0 it is the
        distribution of x_0 itself, as in the official code. eps defaults to self.eps.
        Returns (B, ..., S) float32.
        """
        s = t - 1 if s is None else s
        eps = self.eps if eps is None else eps
        if x_0.is_floating_point():
            if self.mask_state and x_0.shape[-1] == self.num_classes:   # x̃_0 is never [MASK]
                x_0 = F.pad(x_0, (0, 1), value=LOG_ZERO)
            x0_dist, at_zero = torch.softmax(x_0.float(), -1), x_0.float()
        else:
            x0_dist = x_0
            at_zero = log_or_zero(F.one_hot(x_0, self.num_states).float(), eps)
        fact1 = self._Q_column(x_t, t, s)
        logits = log_or_zero(fact1, eps) + log_or_zero(self.q_probs(x0_dist, s), eps)
        return torch.where(self._per_example(s == 0, x_t), at_zero, logits)

    def _Q_column(self, x_t, t, s):
        """q(x_t | x_s = j) for every j: column x_t of Q_{s→t}. (B, ..., S) float32."""
        self._check(x_t, t, "x_t", self.num_states)
        if self.transition == "gaussian":  # explicit matrices, one per distinct (t, s)
            pairs = list(zip(t.tolist(), s.tolist()))
            Q_T = {p: self.Q_matrix(*p).T.float() for p in set(pairs)}   # row x_t = column x_t
            rows = torch.stack([Q_T[p] for p in pairs])                   # (B, S, S)
            return rows[torch.arange(len(pairs), device=x_t.device).view(-1, *([1] * (x_t.dim() - 1))), x_t]
        keep = self._per_example(self.alpha_bar[t] / self.alpha_bar[s], x_t)
        off = ((1 - keep) * self.stationary[x_t].unsqueeze(-1)).float()  # (1 - ᾱ_t/ᾱ_s) π_{x_t}
        return torch.where(self._one_hot(x_t), keep.float() + off, off)

    def model_logits(self, x_t, t, cond=None):
        """The network's p̃_θ(x̃_0 | x_t) as float32 logits over the K data values (B, ..., K)."""
        out = self.x0_model(x_t, t, cond)
        logits = self.logistic_logits(*out) if self.model_output == "logistic" else out.float()
        if logits.shape != x_t.shape + (self.num_classes,):
            raise ValueError(f"x0_model returned shape {tuple(logits.shape)}, expected "
                             f"{tuple(x_t.shape) + (self.num_classes,)}")
        return logits

    def logistic_logits(self, loc, log_scale):
        """Logits of the truncated discretized logistic over K values, the paper's best CIFAR-10
        output (`_get_logits_from_logistic_pars` in the official code). loc, log_scale: x.shape,
        loc in [-1, 1]. Bin k, centred at c_k = linspace(-1, 1, K)[k], gets σ((c_k - loc + w/2)/s)
        - σ((c_k - loc - w/2)/s), w = 2/(K-1), 1/s = exp(2 - log_scale) as in the official code;
        the edge bins are not extended to ±∞: the softmax renormalises ("truncated")."""
        K = self.num_classes
        # The clamp keeps 1/s finite (exp(2 + 1e4) = inf makes inf * 0 = NaN); e^{±20} is far
        # beyond any useful scale. Not in the official code.
        log_scale = log_scale.float().clamp(-20.0, 20.0).unsqueeze(-1)
        centers = torch.linspace(-1.0, 1.0, K, device=loc.device) - loc.float().unsqueeze(-1)
        inv_scale, half_width = torch.exp(2.0 - log_scale), 1.0 / (K - 1)
        upper = F.logsigmoid(inv_scale * (centers + half_width))   # log CDF at the upper edge
        lower = F.logsigmoid(inv_scale * (centers - half_width))   # log CDF at the lower edge
        if self.eps > 0:  # official: log(σ_u - σ_l) = upper + log1p(-exp(lower - upper) + eps)
            return upper + torch.log1p(-torch.exp(lower - upper) + self.eps)
        return upper + log_or_zero(-torch.expm1(lower - upper))

    def p_logits(self, x_t, t, cond=None):
        """Logits of p_θ(x_{t-1} | x_t) ∝ Σ_x̃0 q(x_{t-1}, x_t | x̃_0) p̃_θ(x̃_0 | x_t), shape
        x_t.shape + (S,)   [D3PM eq. 4]. At t = 1, p_θ(x_0 | x_1) = p̃_θ(x_0 | x_1) as in the
        official code (eq. 4 would also weight it by Q_1[x_0, x_1]; see README "Differences")."""
        self._check(x_t, t, "x_t", self.num_states)
        return self.q_posterior_logits(self.model_logits(x_t, t, cond), x_t, t)

    # ------------------------------------------------------------ the bound and the loss
    def kl_and_ce(self, x_0, x_t, t, x0_logits):
        """Per pixel, in nats: KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)), the term L_{t-1}
        of the bound [eq. 1], and ce = -log p̃_θ(x_0 | x_t), the auxiliary loss [eq. 5].
        x0_logits (B, ..., K) from `model_logits`. At t = 1 the KL is not used (see `loss_terms`)."""
        log_q = F.log_softmax(self.q_posterior_logits(x_0, x_t, t), -1)
        log_p = F.log_softmax(self.q_posterior_logits(x0_logits, x_t, t), -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        ce = -F.log_softmax(x0_logits, -1).gather(-1, x_0.unsqueeze(-1)).squeeze(-1)
        return kl, ce

    def loss_terms(self, x_0, x_t, t, cond=None):
        """Per-example [B] terms at (t, x_t), bits/dim: "vb" (L_{t-1}; at t = 1, L_0 =
        -log p_θ(x_0 | x_1) = ce), "ce" (-log p̃_θ(x_0 | x_t)) and the training "loss":
        L_λ = vb + λ ce for "hybrid" [eq. 5, λ = hybrid_coeff], vb or ce alone otherwise."""
        self._check(x_0, t)
        self._check(x_t, t, "x_t", self.num_states)
        if x_0.shape != x_t.shape:
            raise ValueError(f"x_0 and x_t shapes differ: {tuple(x_0.shape)} vs {tuple(x_t.shape)}")
        kl, ce = self.kl_and_ce(x_0, x_t, t, self.model_logits(x_t, t, cond))
        ce = _meanflat_bits(ce)
        vb = torch.where(t == 1, ce, _meanflat_bits(kl))
        loss = {"hybrid": vb + self.hybrid_coeff * ce, "vb": vb, "ce": ce}[self.loss_type]
        return {"loss": loss, "vb": vb, "ce": ce}

    def vb_terms_bpd(self, x_0, x_t, t, cond=None):
        """The bound's term at t in bits/dim [B]: L_{t-1} for t > 1, L_0 at t = 1   [eq. 1]."""
        return self.loss_terms(x_0, x_t, t, cond)["vb"]

    def prior_bpd(self, x_0):
        """L_T = KL(q(x_T | x_0) ‖ p(x_T)) in bits/dim [B], p(x_T) = π   [eq. 1]."""
        q = self.q_probs(x_0, torch.full((x_0.shape[0],), self.num_timesteps, device=x_0.device))
        pi = self.stationary.float()
        return _meanflat_bits((q * (log_or_zero(q, self.eps) - log_or_zero(pi, self.eps))).sum(-1))

    def forward(self, x_0, cond=None):
        """The training loss as the official code: one t ~ U{1..T} per example, x_t ~ q(x_t|x_0),
        the batch mean of `loss_terms` (no prior, no factor T). Returns (loss, info)."""
        t = torch.randint(1, self.num_timesteps + 1, (x_0.shape[0],), device=x_0.device)
        terms = self.loss_terms(x_0, self.q_sample(x_0, t), t, cond)
        return terms["loss"].mean(), {"vb": terms["vb"].detach().mean(), "ce": terms["ce"].detach().mean()}

    @torch.no_grad()
    def nll_bpd_terms(self, x_0, cond=None, timesteps=None, batch_size=None, progress=False,
                      generator=None, x_t_per_t=None):
        """L_{t-1} in bits/dim for each t in `timesteps` (default 1..T), a fresh x_t per t:
        [B, len(timesteps)]. Up to `batch_size` (default max(B, 256)) images share one network
        call. `x_t_per_t` [T, B, ...] replays given x_t (row t-1 holds x_t)."""
        B = x_0.shape[0]
        ts = list(range(1, self.num_timesteps + 1)) if timesteps is None else [int(t) for t in timesteps]
        per_call, out = max(1, (batch_size or max(B, 256)) // B), []
        bar = _progress(None, progress, desc="bound (timesteps)", total=len(ts), unit="t")
        for i in range(0, len(ts), per_call):
            chunk = ts[i:i + per_call]
            t = torch.tensor(chunk, device=x_0.device).repeat_interleave(B)
            x0 = x_0.repeat(len(chunk), *([1] * (x_0.dim() - 1)))
            x_t = (self.q_sample(x0, t, generator=generator) if x_t_per_t is None
                   else torch.cat([x_t_per_t[u - 1] for u in chunk]).to(x_0.device))
            out.append(self.vb_terms_bpd(x0, x_t, t, None if cond is None else cond.repeat(len(chunk))))
            bar.update(len(chunk))
        bar.close()
        return torch.cat(out).view(-1, B).T

    @torch.no_grad()
    def nll_bpd(self, x_0, cond=None, **kwargs):
        """The full variational bound -log p(x_0) <= Σ_{t=1}^{T} L_{t-1} + L_T in bits/dim per
        example [B], with one draw of x_t per t per image, as the official code computes it
        (a random number, not the exact NLL). Keyword arguments go to `nll_bpd_terms`."""
        return self.nll_bpd_terms(x_0, cond, **kwargs).sum(1) + self.prior_bpd(x_0)

    @torch.no_grad()
    def nll_bpd_estimate(self, x_0, cond=None, num_t=100, generator=None, **kwargs):
        """An unbiased estimate of `nll_bpd` from num_t of its T terms, with its standard error.

        L_0 (t = 1) and m = num_t - 1 timesteps drawn without replacement from 2..T, each term
        the mean A_t of two independent draws a_t, b_t of x_t; est = A_1 + (T-1) mean_t A_t + L_T.
        Its variance, from which timesteps were drawn (s² the sample variance of the A_t, with the
        finite-population factor) and from the x_t draws (v_t = (a_t - b_t)²/4 estimates Var A_t):
            Var ≈ (T-1)² (1 - m/(T-1)) s²/m + (T-1) mean_t v_t + v_1;
        the middle term restores the x_t noise that the finite-population factor removes from s².
        Returns (estimate [B], standard error [B]) in bits/dim; num_t = T leaves the x_t noise.
        """
        T = self.num_timesteps
        m = min(num_t, T) - 1
        if m < 2 and m != T - 1:
            raise ValueError(f"num_t must be >= 3 (or T) for a standard error, got {num_t}")
        device = generator.device if generator is not None else "cpu"
        ts = [1] + (2 + torch.randperm(T - 1, generator=generator, device=device)[:m]).tolist()
        a, b = self.nll_bpd_terms(x_0, cond, ts + ts, generator=generator, **kwargs).chunk(2, 1)
        terms, noise_var = (a + b) / 2, (a - b).pow(2) / 4          # [B, 1 + m] each
        est = terms[:, 0] + (T - 1) * terms[:, 1:].mean(1) + self.prior_bpd(x_0)
        var = noise_var[:, 0] + ((T - 1) * noise_var[:, 1:].mean(1) if m > 0 else 0)
        if m < T - 1:
            var = var + (T - 1) ** 2 * (1 - m / (T - 1)) * terms[:, 1:].var(1) / m
        return est, var.sqrt()

    # ------------------------------------------------------------ sampler   [§3.3]
    def reverse_step(self, x_t, t, s, cond=None, guidance=0.0, generator=None, noise=None):
        """x_s ~ p_θ(x_s | x_t) for ints 0 <= s < t, and the x̃_0 logits it used   [eq. 4].

        p_θ(x_s | x_t) ∝ Σ_x̃0 q(x_s, x_t | x̃_0) p̃_θ(x̃_0 | x_t): one step for s = t-1, a
        strided jump with the exact q(x_s | x_t, x̃_0) for s < t-1; computed without the eps
        floor (log 0 = LOG_ZERO) and drawn by Gumbel-max in float64. Guidance w > 0 tilts it per
        pixel, p_w ∝ p_θ(x_s | x_t, c)^{1+w} p_θ(x_s | x_t, ∅)^{-w} (`guide`). At s = 0 it returns
        the argmax of p_θ(x_0 | x_1) ∝ Q_1[x_0, x_1] p̃_θ(x_0 | x_1) (eq. 4; the official code
        drops the factor Q_1, which lets the last step overwrite decoded absorbing pixels).
        `noise` (uniforms, x_t.shape + (S,)) replays the official step instead: Gumbel-max over
        the eps-floored logits of `p_logits`, argmax p̃_θ at s = 0.
        """
        tt, ss = (torch.full((x_t.shape[0],), v, device=x_t.device) for v in (t, s))
        official = noise is not None

        def log_p(x0):  # log p_θ(x_s | x_t), unnormalised
            logits = self.q_posterior_logits(x0, x_t, tt, ss, self.eps if official else 0.0)
            if s == 0 and not official:     # q_posterior_logits gives p̃_θ alone at s = 0
                fact1 = self._Q_column(x_t, tt, ss)   # (an x_1 that q cannot reach: p̃_θ alone)
                logits = logits + torch.where(fact1.amax(-1, keepdim=True) > 0, log_or_zero(fact1), 0.0)
            return logits

        x0 = self.model_logits(x_t, tt, cond)
        logits = log_p(x0)
        if guidance > 0:
            x0_u = self.model_logits(x_t, tt, None)
            logits = guide(F.log_softmax(logits, -1), F.log_softmax(log_p(x0_u), -1), guidance)
            x0 = guide(F.log_softmax(x0, -1), F.log_softmax(x0_u, -1), guidance)
        x_s = logits.argmax(-1) if s == 0 else gumbel_argmax(logits, noise, generator)
        return x_s, x0

    @torch.no_grad()
    def p_sample(self, x_t, t, cond=None, noise=None, generator=None):
        """One ancestral step x_{t-1} ~ p_θ(x_{t-1} | x_t) for an int t (argmax at t = 1).
        With `noise` (uniforms, x_t.shape + (S,)) it replays the official Gumbel-max step."""
        self._check(x_t, None, "x_t", self.num_states)
        return self.reverse_step(x_t, t, t - 1, cond, generator=generator, noise=noise)[0]

    @torch.no_grad()
    def sample(self, shape, cond=None, steps=None, generator=None, return_trajectory=False,
               guidance=0.0, progress=False, x_init=None):
        """Ancestral sampling from x_T ~ π (or `x_init`) down to x_0   [§3.3].

        `steps` < T visits that many timesteps from T down to 1 and jumps between them with
        the exact q(x_s | x_t, x̃_0). Returns x_0 (long, `shape`), or (x_0, trajectory) with
        trajectory = {"t": [steps] the grid, "x_t": [steps + 1, *shape] the states before each
        step and the output, "x0_pred": [steps, *shape] argmax p̃_θ}, kept on the CPU.
        """
        T = self.num_timesteps
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        device = self.betas.device
        grid = torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()
        if x_init is not None:
            x = x_init.to(device)
        elif self.transition == "absorbing":   # π = e_m
            x = torch.full(tuple(shape), self.absorbing_state, dtype=torch.long, device=device)
        else:                                  # π uniform
            x = torch.randint(0, self.num_classes, tuple(shape), generator=generator, device=device)
        states, x0_preds = [x.cpu()], []
        for t, s in _progress(list(zip(grid, grid[1:] + [0])), progress, desc="sampling", unit="step"):
            x, x0 = self.reverse_step(x, t, s, cond, guidance, generator)
            if return_trajectory:  # on the CPU: T states of a large batch do not fit a GPU
                states.append(x.cpu())
                x0_preds.append(x0.argmax(-1).cpu())
        if not return_trajectory:
            return x
        return x, {"t": torch.tensor(grid), "x_t": torch.stack(states), "x0_pred": torch.stack(x0_preds)}

    # ------------------------------------------------------------ small helpers
    def _one_hot(self, x):
        """x: long (...) -> bool (..., S)."""
        return x.unsqueeze(-1) == torch.arange(self.num_states, device=x.device)

    @staticmethod
    def _per_example(v, x):
        """v: [B] -> [B, 1, ..., 1] broadcasting against x.shape + (S,)."""
        return v.view(-1, *([1] * x.dim()))

    def _check(self, x, t=None, name="x_0", high=None, low_t=1):
        """ValueErrors for data outside 0..high-1, t outside low_t..T and mismatched shapes."""
        high = self.num_classes if high is None else high
        if x.is_floating_point() or x.dim() < 1:
            raise ValueError(f"{name} must be an integer tensor [B, ...], got {x.dtype} {tuple(x.shape)}")
        if self.check_inputs and x.numel() and (int(x.min()) < 0 or int(x.max()) >= high):
            raise ValueError(f"{name} must lie in 0..{high - 1}, got values in "
                             f"{int(x.min())}..{int(x.max())}")
        if t is not None:
            if t.shape != (x.shape[0],):
                raise ValueError(f"t must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
            if self.check_inputs and (int(t.min()) < low_t or int(t.max()) > self.num_timesteps):
                raise ValueError(f"t must lie in {low_t}..{self.num_timesteps}, got values in "
                                 f"{int(t.min())}..{int(t.max())}")


def _meanflat_bits(x):
    """Mean over all but the batch axis, in bits: (B, ...) -> [B]."""
    return x.reshape(x.shape[0], -1).mean(1) / math.log(2)


class _LineBar(tqdm):
    """tqdm for logs: each refresh is one plain line, and the final state once more at close;
    no carriage return, and no cursor movement for nested bars (sampling inside training)."""

    def display(self, msg=None, pos=None):
        if msg is None:  # tqdm passes msg="" only to erase a bar
            self.fp.write(f"{self}\n")
            self.fp.flush()
            self.shown_n = self.n
        return False     # nothing on screen for close() to erase

    def clear(self, nolock=False):
        pass

    def close(self):
        if not self.disable and self.n != getattr(self, "shown_n", None):
            self.display()
        self.leave = False  # that line ends the bar: tqdm would add a "\n" or a "\r"
        super().close()


def _progress(iterable=None, enabled=True, **kwargs):
    """A tqdm bar over `iterable` (or a manual one with total=...), silent when not enabled.
    On a terminal it redraws in place. In a log (stderr not a terminal: nohup, CI, a pipe) it
    writes a plain line at most every 30 s, on each set_postfix and at the end."""
    if not enabled or sys.stderr.isatty():
        return tqdm(iterable, disable=not enabled, **kwargs)
    return _LineBar(iterable, mininterval=30, maxinterval=30, **kwargs)


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
        if output == "logistic":
            self._init_logistic_head(num_states, pixel_emb)

    @torch.no_grad()
    def _init_logistic_head(self, num_states, pixel_emb):
        """Start p̃_θ(x̃_0 | x_t) as a narrow logistic at x_t's own value (README, "cpu-grey").
        Pixel values are ordinal here: each gets sin/cos features of its scaled value, so that
        grey levels 200 and 201 start as neighbours (random vectors left a K = 256 net unable to
        tell near values apart: speckled samples). The last conv starts at zero, as the official
        UNet's, so loc = x_t exactly; log_scale starts at -2 (scale e^-4 ≈ 2.3 grey levels)."""
        v = torch.linspace(-1.0, 1.0, num_states)[:, None]
        freq = torch.arange(1, pixel_emb // 2 + 1)[None] * math.pi / 2
        self.pixel_emb.weight.copy_(torch.cat([torch.sin(freq * v), torch.cos(freq * v)], 1))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.conv_out.bias[4 * self.in_channels:] = -2.0   # log_scale's channels, after loc's

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
            # loc is a residual around the input value scaled to [-1, 1], inside the tanh: a zero
            # output gives loc = x_t. The official UNet's tanh(loc + x) maps black (-1) to -0.76,
            # grey level 30, until the net learns to undo it. The clamp keeps atanh finite at ±1
            # and at an absorbing [MASK] state K (scaled above 1).
            x_scaled = 2.0 * x_t.float() / (self.num_classes - 1) - 1.0
            return torch.tanh(loc + torch.atanh((0.999 * x_scaled).clamp(-0.999, 0.999))), log_scale
        return out.view(B, C, self.num_classes, H, W).permute(0, 1, 3, 4, 2)  # (B, C, H, W, K)


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

    def save_pictures(self, cfg, tag, labels, x, preview, trajectory):
        """The preview samples as a grid, a row per class (samples_{tag}.png), and the GIF of
        their reverse process (reverse_{tag}.gif), in cfg.out; returns the grid's path. Data
        that are not images draw their own (heart.py)."""
        png = os.path.join(cfg.out, f"samples_{tag}.png")
        nrow = max(1, int((labels[preview] == labels[preview][0]).sum()))
        grid_image(x[preview], cfg.num_classes, nrow).save(png)
        save_gif(trajectory["x_t"], cfg.num_classes, os.path.join(cfg.out, f"reverse_{tag}.gif"), nrow)
        return png


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


def build_data(cfg):
    if cfg.dataset == "mnist":
        return load_mnist(cfg.data_root, cfg.num_classes)
    raise UsageError(f"--dataset must be mnist, got {cfg.dataset!r} (heart.py runs the heart toy)")


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

def num_states(cfg):
    """S: the values x_t takes, K plus the [MASK] state of an absorbing process with one."""
    return cfg.num_classes + (cfg.transition == "absorbing" and cfg.absorbing_state == "mask")


def build_model(cfg, data):
    """The x_0-predicting network for cfg.dataset."""
    return ConvNet(num_states(cfg), cfg.num_classes, data.train_x.shape[1], data.num_labels,
                   ch=cfg.model_channels, num_timesteps=cfg.num_timesteps, output=cfg.model_output)


def process_class(no_fast=False):
    """(class, note): d3pm_fast.FastD3PM, the same numbers faster, unless --no-fast is given or
    d3pm_fast.py is not beside this file; then the reference D3PM and a note saying why."""
    if no_fast:
        return D3PM, "--no-fast: the reference D3PM class (the paper's form, slower)"
    try:
        from d3pm_fast import FastD3PM
    except ImportError:
        return D3PM, "d3pm_fast.py not found: the reference D3PM class (the paper's form, slower)"
    return FastD3PM, None


def build_d3pm(cfg, net, check_inputs=True):
    cls, _ = process_class(cfg.no_fast)
    return cls(net, cfg.num_timesteps, cfg.num_classes, cfg.transition,
               schedule=None if cfg.schedule == "default" else cfg.schedule,
               hybrid_coeff=cfg.hybrid_coeff, loss_type=cfg.loss_type,
               model_output=cfg.model_output, eps=cfg.eps, check_inputs=check_inputs,
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


def grid_image(x, num_classes, nrow):
    """Long images (N, C, H, W) -> a PIL image of their grid, `nrow` to a row; small images are
    upscaled so a reader can see them."""
    from PIL import Image
    from torchvision.utils import make_grid
    grid = make_grid(to_rgb(x.cpu(), num_classes), nrow=nrow, padding=1, pad_value=0.5)
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    scale = max(1, 256 // img.width)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_gif(frames, num_classes, path, nrow, max_frames=60):
    """frames: (F, N, C, H, W) states of the reverse process -> an animated GIF."""
    idx = torch.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().long().tolist()
    images = [grid_image(frames[i], num_classes, nrow) for i in idx]
    durations = [80] * (len(images) - 1) + [1500]  # hold the final samples
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


# ------------------------------------------------------------------------ sampling and eval

def draw_samples(cfg, d3pm, net, num_labels, n, shape, device, generator, trajectory=False):
    """Exactly n class-conditional samples, labels 0,0,..,1,1,.. spread over the classes as
    evenly as possible (each gets n // num_labels or one more), drawn in batches of
    cfg.batch_size. The first batches hold the preview: up to 10 samples per class, whose
    reverse process is kept (on the CPU) when `trajectory` is set, for the grid and the GIF.
    Returns (labels [n], x [n, ...] long on the CPU, preview indices, trajectory or None)."""
    labels = torch.arange(n) * num_labels // n
    preview = torch.cat([(labels == c).nonzero().flatten()[:10] for c in range(num_labels)])
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[preview] = False
    # the preview in batches of cfg.batch_size too: at K = 256 one batch of 100 runs 1.7 times
    # slower per image than batches of 32 (its (N, K) buffers leave the cache)
    batches = list(preview.split(cfg.batch_size))
    n_preview = len(batches)
    batches += list(rest.nonzero().flatten().split(cfg.batch_size))
    x, trajs = torch.empty((len(labels),) + tuple(shape), dtype=torch.long), []
    with using_model(d3pm, net), autocast_for(device, cfg.precision):
        for i, idx in enumerate(_progress(batches, len(batches) > 1, desc="sampling batches")):
            if len(idx) == 0:
                continue
            out = d3pm.sample((len(idx),) + tuple(shape), labels[idx].to(device),
                              steps=cfg.sample_steps or None, generator=generator,
                              return_trajectory=trajectory and i < n_preview, guidance=cfg.guidance,
                              progress=i == 0)
            if trajectory and i < n_preview:
                out, traj = out
                trajs.append(traj)
            x[idx] = out.cpu()
    traj = None
    if trajs:   # the preview's batches side by side: (steps + 1, n_preview_images, ...)
        traj = {k: v if k == "t" else torch.cat([tr[k] for tr in trajs], 1)
                for k, v in trajs[0].items()}
    return labels, x, preview, traj


def write_samples(cfg, d3pm, net, data, device, tag):
    """cfg.num_samples samples, drawn into cfg.out by data.save_pictures (for images: a grid and
    a GIF of the reverse process). Returns (labels, x, the picture's path)."""
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    labels, x, preview, traj = draw_samples(cfg, d3pm, net, data.num_labels, cfg.num_samples,
                                            data.train_x.shape[1:], device, g, trajectory=True)
    return labels, x, data.save_pictures(cfg, tag, labels, x, preview, traj)


def test_bounds(cfg, d3pm, net, data, device):
    """The full bound (`nll_bpd`) on the first cfg.eval_images test images, in bits/dim, twice:
    with the null label, a bound on -log p(x) (the number comparable with the literature), and
    with each image's label, a bound on -log p(x | y). Each is the mean over the images with its
    standard error (which includes the x_t draws: every image has its own). Both passes use the
    same x_t draws. A model trained without label dropout never saw the null label: with one
    class p(x) = p(x | y) and nll_bpd takes the conditional figure; with more, it is None."""
    n = min(cfg.eval_images, len(data.test_x))
    result = {"nll_bpd": None, "nll_bpd_stderr": None, "nll_bpd_given_label": None,
              "nll_bpd_given_label_stderr": None, "eval_images": n}
    if n == 0:
        return result
    null_trained = cfg.label_dropout > 0
    # Images per network call: many on a GPU; on a CPU few enough that the (images, pixels, S)
    # posteriors stay in cache (K = 256: 2.0 ms per image and t in calls of 16, 2.2 in calls of
    # 32, 6.9 in calls of 256).
    per_call = 256 if device.type == "cuda" else min(
        256, 1 + (3 << 20) // (data.test_x[0].numel() * d3pm.num_states))
    chunk = min(cfg.batch_size, per_call)
    for name, use_label in (("nll_bpd_given_label", True), ("nll_bpd", False)):
        if not use_label and not null_trained:
            break
        bpd, g = [], torch.Generator(device=device).manual_seed(cfg.seed + 2)
        with using_model(d3pm, net), autocast_for(device, cfg.precision):
            for i in _progress(range(0, n, chunk), True, desc=f"{name} (batches)"):
                x = data.test_x[i:i + min(chunk, n - i)].to(device)
                y = data.test_y[i:i + len(x)].to(device) if use_label else None
                bpd.append(d3pm.nll_bpd(x, y, generator=g, batch_size=max(per_call, len(x))).cpu())
        bpd = torch.cat(bpd).double()
        result[name] = float(bpd.mean())
        result[name + "_stderr"] = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    if not null_trained and data.num_labels == 1:
        result["nll_bpd"], result["nll_bpd_stderr"] = (result["nll_bpd_given_label"],
                                                       result["nll_bpd_given_label_stderr"])
    return result


def describe_bounds(r):
    """One line for the log: both bounds with their standard errors."""
    fmt = lambda v, e: "n/a (no null label trained)" if v is None else f"{v:.4f} ± {e:.4f}"  # noqa: E731
    return (f"bound on -log p(x): {fmt(r['nll_bpd'], r['nll_bpd_stderr'])} bits/dim, on "
            f"-log p(x|y): {fmt(r['nll_bpd_given_label'], r['nll_bpd_given_label_stderr'])} "
            f"bits/dim ({r['eval_images']} test images)")


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
        # a field newer than the checkpoint keeps the behaviour it was trained with: the default
        values.update({k: f.default for k, f in config_cls.__dataclass_fields__.items()
                       if k not in ckpt_config})
        for mode in ("resume", "sample_only", "eval_only"):
            values.pop(mode, None)
        if "compile" not in ckpt_config and values.get("precision") == "bf16":
            values["precision"] = "auto"   # older checkpoints: "bf16" then meant bf16 on CUDA only
    values.update(given)
    return config_cls(**values)


# ---------------------------------------------------------------------------- training

class StopRequested:
    """Ctrl-C / SIGTERM set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name


def autocast_for(device, precision="auto"):
    """bf16 autocast for the network with precision bf16 (CUDA or CPU), or auto on CUDA; a null
    context with fp32, or auto on the CPU. The diffusion log-probabilities are computed in float32
    either way (D3PM casts the network's output to float32)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class OneProcess:
    """What train() asks of its processes, answered for one. Under torchrun (WORLD_SIZE > 1)
    d3pm_dist.Processes answers the same for several: DDP, reductions over ranks."""
    rank, world = 0, 1

    def __init__(self, cfg):
        self.device = pick_device(cfg.device)

    def wrap(self, net):
        return net

    def all_min(self, x):
        return x

    def all_mean(self, x):
        return x

    def close(self, net, log, finished):
        pass


def start_processes(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return OneProcess(cfg)
    from d3pm_dist import Processes  # imported only here: the runner alone runs one process
    return Processes(cfg)


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
    procs = start_processes(cfg)
    rank, world, device = procs.rank, procs.world, procs.device
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
    # fused: one kernel for the whole update, on CUDA and (since torch 2.4) on the CPU alike
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    def lr_factor(s):  # of the step after s: linear warm-up, then constant or a cosine to 10 %
        warm = min(1.0, (s + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_decay == "none":
            return warm
        done = min(1.0, max(0, s + 1 - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps))
        return warm * (0.55 + 0.45 * math.cos(math.pi * done))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    step, skipped_total = 0, 0
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        # --lr, --weight-decay and --warmup-steps given now win over the checkpoint's values
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for group in opt.param_groups:
            group.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(sched.last_epoch),
                         weight_decay=cfg.weight_decay)
        step, skipped_total = ckpt["step"], ckpt.get("skipped_steps", 0)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if world > 1:  # each rank draws its own t and noise
        torch.manual_seed(cfg.seed + 1000 * rank + step)
    model = procs.wrap(net)
    if cfg.compile:
        model = torch.compile(model)
    # Range checks cost a host sync per call on a GPU. TF32 matmuls stay off (PyTorch's
    # default): they would also reach the diffusion math's float32 products.
    d3pm = build_d3pm(cfg, model, check_inputs=device.type != "cuda").to(device)
    note = process_class(cfg.no_fast)[1]
    if note:
        log(note)
    log(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters; "
        f"{cfg.transition} transition, K={cfg.num_classes}, T={cfg.num_timesteps}, device {device}"
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
            "betas": d3pm.betas.cpu(), "config": dataclasses.asdict(cfg),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}})

    if cfg.sample_only or cfg.eval_only:
        return evaluate_only(cfg, d3pm, ema.module, data, device, log)

    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    stop = StopRequested()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = _progress(None, rank == 0, total=cfg.train_steps, initial=step, desc="training",
                    dynamic_ncols=True)
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
            flags = procs.all_min(torch.stack([
                (torch.isfinite(loss) & torch.isfinite(grad_norm)).float(),
                torch.tensor(float(stop.signal is None), device=device)]))
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
                loss_m, vb_m, ce_m = (procs.all_mean(sums) / max(1, n_logged)).tolist()
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
        procs.close(net, log, finished=step >= cfg.train_steps)
    if rank != 0:
        return {"step": step}
    if not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        checkpoint()  # --train-steps 0, or a resume that had nothing left to do

    # 6. at the end: samples from the EMA weights and the test NLL (full bound)
    _, _, grid = write_samples(cfg, d3pm, ema.module, data, device, "final")
    result = {"step": step, **test_bounds(cfg, d3pm, ema.module, data, device),
              "train_seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    log(f"{describe_bounds(result)}; samples in {grid}")
    return result


def evaluate_only(cfg, d3pm, net, data, device, log):
    """--sample-only: samples.pt + grid + GIF. --eval-only: both test bounds as one JSON line."""
    if cfg.sample_only:
        labels, x, _ = write_samples(cfg, d3pm, net, data, device, "only")
        torch.save({"images": x, "labels": labels}, os.path.join(cfg.out, "samples.pt"))
        log(f"wrote {len(x)} samples to {os.path.join(cfg.out, 'samples.pt')}")
    result = {}
    if cfg.eval_only:
        result = test_bounds(cfg, d3pm, net, data, device)
        log(describe_bounds(result))
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
        run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # too many non-finite steps: already checkpointed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
