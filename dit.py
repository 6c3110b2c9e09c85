"""A class-conditioned Diffusion Transformer (DiT, adaLN-Zero) as the x_0-network of D3PM.

D3PM (Austin et al. 2021, arXiv:2107.03006) needs a network that reads a corrupted
categorical image x_t and predicts the logits of p̃_θ(x̃_0 | x_t), which D3PM turns into
p_θ(x_{t-1} | x_t) through q(x_{t-1} | x_t, x̃_0) (D3PM §3.3). This file gives one: the
DiT of Peebles & Xie (2023, arXiv:2212.09748, "models.py"), changed only where categorical
pixels force it (the input embedding and the output head). Nothing else in this network is
specific to D3PM; a reader of the diffusion math may skip this file.

    model = dit_from_name("DiT-S/2", in_channels=3, num_states=256, num_classes=256,
                          num_labels=10, num_timesteps=1000)
    logits = model(x_t, t, cond)          # (B, C, H, W, K), float32

Sections:  helpers (sin-cos embeddings, patchify) | conditioning embedders |
           the adaLN-Zero block and final layer | the DiT | named sizes.

Shape legend:  B batch, C image channels, H, W image height/width, p patch size,
h = H/p, w = W/p, L = h*w tokens, D hidden width, K = num_classes (pixel values),
S = num_states (K, or K+1 with an absorbing [MASK] state).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------
#                    Helpers: sin-cos embeddings, patchify / unpatchify
# --------------------------------------------------------------------------------------

def sincos_1d(pos, dim, max_period=10000.0):
    """Sinusoidal features [cos(pos·ω_i), sin(pos·ω_i)], ω_i = max_period^(-i/(dim/2)).
    pos: float (N,) -> (N, dim). As DiT's timestep_embedding / get_1d_sincos_pos_embed."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, device=pos.device) / half)
    angles = pos.float()[:, None] * omega[None]                       # (N, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, dim)


def sincos_2d(h, w, dim, device=None):
    """Fixed 2-D positional embedding for an h x w token grid, row-major (token l = i*w + j).
    Half the channels encode the row i, half the column j. Built per call for the actual
    grid, so the network accepts any H, W (non-square included) that are multiples of p."""
    rows = sincos_1d(torch.arange(h, device=device), dim // 2)        # (h, D/2)
    cols = sincos_1d(torch.arange(w, device=device), dim // 2)        # (w, D/2)
    grid = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1)
    return grid.reshape(h * w, dim)                                   # (L, D)


def patchify(x, p):
    """(B, C, H, W) -> (B, L, p*p*C); within a token the order is (row in patch, column in
    patch, channel), the same as DiT's unpatchify, so `unpatchify` below is its inverse."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                                   # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(y, p, C, H, W):
    """(B, L, p*p*C*E) -> (B, C, H, W, E): the inverse of `patchify` with E features per pixel."""
    B = y.shape[0]
    y = y.reshape(B, H // p, W // p, p, p, C, -1)                     # (B, h, w, p, p, C, E)
    y = y.permute(0, 5, 1, 3, 2, 4, 6)                                # (B, C, h, p, w, p, E)
    return y.reshape(B, C, H, W, -1)


def modulate(x, shift, scale):
    """adaLN: x·(1 + scale) + shift, one (shift, scale) per image.  x (B, L, D), shift (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------
#                    Conditioning embedders: timestep t and class label
# --------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t ∈ {1..T} -> (B, D): sinusoidal features of t·1000/T, then an MLP.

    The rescaling to 1000 is the official D3PM code's (`timesteps *= 1000 / max_time`):
    DiT's frequencies (max_period 10^4) were chosen for t in [0, 1000], so any T keeps the
    same spread of frequencies instead of a hard-coded `t / 1000`."""

    def __init__(self, hidden_size, num_timesteps, freq_dim=256):
        super().__init__()
        self.num_timesteps, self.freq_dim = num_timesteps, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(sincos_1d(t.float() * (1000.0 / self.num_timesteps), self.freq_dim))


# --------------------------------------------------------------------------------------
#                    The adaLN-Zero block and the final layer   [DiT §3.2]
# --------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over the L tokens of each image (never across the batch)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):                                             # (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # each (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)                   # (B, heads, L, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class DiTBlock(nn.Module):
    """x += gate_1·Attn(adaLN(x)); x += gate_2·MLP(adaLN(x)), with (shift, scale, gate) x 2
    regressed from the conditioning vector c. The regressor is zero-initialised, so every
    gate is 0 and the block starts as the identity (adaLN-Zero, DiT §3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        # LayerNorms carry no affine: adaLN supplies the per-image scale and shift.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):                                          # x (B, L, D), c (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=-1)                 # each (B, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear head to `out_per_token` numbers per token (zero-initialised)."""

    def __init__(self, hidden_size, out_per_token):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_per_token)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------
#                    The DiT: x_t, t, label -> logits of p̃_θ(x_0 | x_t)
# --------------------------------------------------------------------------------------

class DiT(nn.Module):
    """model(x_t, t, cond) -> logits (B, C, H, W, K) float32, or (loc, log_scale) each (B, C, H, W).

    x_t: long (B, C, H, W) in 0..S-1; t: long (B,) in 1..T; cond: long (B,) in 0..num_labels,
    where the value num_labels (or cond=None for the whole batch) is the null label. Class
    dropout for classifier-free guidance is the caller's job: it writes num_labels into cond.
    """

    def __init__(self, *, in_channels, num_states, num_classes, num_labels, num_timesteps,
                 patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0,
                 output="logits"):
        super().__init__()
        if output not in ("logits", "logistic"):
            raise ValueError(f"output must be 'logits' or 'logistic', got {output!r}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError("hidden_size must divide by num_heads and by 4 (2-D sin-cos)")
        self.in_channels, self.num_states, self.num_classes = in_channels, num_states, num_classes
        self.num_labels, self.patch_size, self.hidden_size = num_labels, patch_size, hidden_size
        self.output = output
        p, C = patch_size, in_channels

        # Input embedding. DiT's patch embedding is a Linear over a patch's p*p*C pixel values.
        # Pixel values here are categories (and [MASK] has no intensity at all), so we feed
        # one-hot pixels instead: Linear(p*p*C*S -> D) on one-hots is a sum of p*p*C rows, one
        # per (slot in patch, value). EmbeddingBag(mode="sum") computes exactly that without
        # building the (B, L, p*p*C*S) one-hot tensor, and stays cheap for K = 256. Each slot
        # (row, column, channel) gets its own table, so the layout within a patch is kept.
        # (The official D3PM UNet instead feeds the scaled intensities 2x/(K-1) - 1.)
        self.x_embedder = nn.EmbeddingBag(p * p * C * num_states, hidden_size, mode="sum")
        self.register_buffer("slot_offset", torch.arange(p * p * C) * num_states, persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, num_timesteps)
        self.y_embedder = nn.Embedding(num_labels + 1, hidden_size)   # row num_labels: null label
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        out_per_pixel = num_classes if output == "logits" else 2   # K logits, or (loc, log_scale)
        self.final_layer = FinalLayer(hidden_size, p * p * C * out_per_pixel)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier Linears, N(0, 0.02²) embeddings, adaLN-Zero (gates and head = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # A token sums p*p*C rows; std (p*p*C)^-1/2 gives it unit variance, the scale of the
        # sin-cos positional embedding it is added to.
        nn.init.normal_(self.x_embedder.weight, std=self.slot_offset.numel() ** -0.5)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, cond=None):
        B, C, H, W = x_t.shape
        p = self.patch_size
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"x_t {tuple(x_t.shape)}: need C = {self.in_channels} "
                             f"and H, W multiples of p = {p}")
        # 1. Tokens: one-hot patch embedding plus the fixed 2-D position of each patch.
        slots = patchify(x_t, p) + self.slot_offset                   # (B, L, p*p*C) rows to sum
        x = self.x_embedder(slots.reshape(-1, slots.shape[-1])).reshape(B, -1, self.hidden_size)
        x = x + sincos_2d(H // p, W // p, self.hidden_size, x_t.device)  # (B, L, D)
        # 2. Conditioning vector c = emb(t) + emb(label); cond=None means the null label.
        if cond is None:
            cond = torch.full((B,), self.num_labels, dtype=torch.long, device=x_t.device)
        c = self.t_embedder(t) + self.y_embedder(cond)                # (B, D)
        # 3. Transformer, then head. Cast to float32 here so that under autocast the
        #    diffusion log-probabilities downstream stay in float32.
        for block in self.blocks:
            x = block(x, c)                                           # (B, L, D)
        out = self.final_layer(x, c).float()                          # (B, L, p*p*C*out_per_pixel)
        out = unpatchify(out, p, C, H, W)                             # (B, C, H, W, K) or (..., 2)
        if self.output == "logits":
            return out
        # Discretised-logistic head: loc is a residual around x_scaled = 2 x_t/(K-1) - 1 inside a
        # tanh that keeps it in the data range. The official UNet's tanh(raw_loc + x_scaled) maps
        # black (-1) to -0.76 at init (raw_loc = 0: the final layer starts at zero); with
        # atanh(0.999 x_scaled) inside, as ConvNet's head, loc = x_t at init. The clamp keeps
        # atanh finite at ±1 and at a [MASK] value K (scaled above 1).
        raw_loc, log_scale = out.unbind(-1)                           # each (B, C, H, W)
        x_scaled = 2.0 * x_t.float() / (self.num_classes - 1) - 1.0
        return torch.tanh(raw_loc + torch.atanh((0.999 * x_scaled).clamp(-0.999, 0.999))), log_scale


# --------------------------------------------------------------------------------------
#                    Named sizes   [DiT Table 1]
# --------------------------------------------------------------------------------------

# name -> (depth, hidden_size, num_heads); the patch size is the number after "/".
# "T" (tiny) is not in the paper: it exists so the tests run in seconds on a CPU.
DIT_SIZES = {
    "T": (2, 64, 2),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def dit_from_name(name, *, in_channels, num_states, num_classes, num_labels, num_timesteps,
                  output="logits"):
    """Build e.g. "DiT-S/2" (depth 12, D 384, 6 heads, p 2). Sizes: DiT-{T,S,B,L,XL}/{2,4,8}.
    No image size is needed: the positional embedding is built for each input's grid."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if not name.startswith("DiT-") or size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown DiT {name!r}; sizes {list(DIT_SIZES)}, patches 2, 4, 8")
    depth, hidden_size, num_heads = DIT_SIZES[size]
    return DiT(in_channels=in_channels, num_states=num_states, num_classes=num_classes,
               num_labels=num_labels, num_timesteps=num_timesteps, patch_size=int(patch),
               hidden_size=hidden_size, depth=depth, num_heads=num_heads, output=output)


def count_parameters(model):
    """Number of trainable parameters (the fixed positional embedding is not one)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
