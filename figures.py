"""Teaching figures for D3PM: what the forward process does to MNIST, and what a trained model does.

Illustrates "Structured Denoising Diffusion Models in Discrete State-Spaces" (Austin et al. 2021,
arXiv:2107.03006) with the process of d3pm_runner.py. Drawn with Pillow (no matplotlib).

    python figures.py --data-root ../shared/data                                # into contents/
    python figures.py --data-root ../shared/data --resume runs/cpu/checkpoint.pt   # + the model

Sections:
  1. the forward process, no network: Q̄_t, samples x_t ~ q(x_t | x_0), survival curves
  2. a trained checkpoint: the terms L_{t-1} of the bound, x̂_0 during sampling
  3. drawing: fonts, colour map, tables of images, line plots (may be skipped: nothing here is
     specific to D3PM)
  4. make_figures: writes every PNG/GIF and returns their paths

Conventions as in d3pm_runner: t ∈ {0..T} with Q̄_0 = I, Q[i, j] = q(x_t = j | x_{t-1} = i).
The absorbing state is the grey value K//2, as the paper does for images, not the [MASK] state
that the runner's Config uses by default.
"""

import dataclasses
import functools
import math
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import d3pm_runner as d3

TRANSITIONS = ("uniform", "absorbing", "gaussian")
COLOURS = {"uniform": (31, 119, 180), "absorbing": (214, 39, 40), "gaussian": (44, 160, 44)}
LN2 = math.log(2.0)


# ================================================================================================
# 1. The forward process without a network
# ================================================================================================

def timestep_grid(first, last, num):
    """At most `num` distinct integers from first to last inclusive, evenly spread."""
    return torch.linspace(first, last, num, dtype=torch.float64).round().long().unique().tolist()


def _process(transition, num_classes, num_timesteps):
    """A network-less D3PM with the transition's default schedule (absorbing: grey K//2)."""
    return d3.D3PM(None, num_timesteps, num_classes, transition)


def Q_matrix(transition, num_classes, num_timesteps, t):
    """Q_t, float64 [K, K]: q(x_t = j | x_{t-1} = i)   [D3PM eq. 2, §3.1].

    The gaussian is built by d3pm_runner.gaussian_Q directly, without the D3PM class, whose
    constructor would build the whole T x K x K stack of Q̄_t."""
    if transition == "gaussian":
        beta = d3.get_betas(d3.DEFAULT_SCHEDULE["gaussian"], num_timesteps)[t - 1]
        return d3.gaussian_Q(beta, num_classes)
    return _process(transition, num_classes, num_timesteps).Q_matrix(t)


def Q_bar_matrices(transition, num_classes, num_timesteps, ts):
    """{t: Q̄_t} float64 [K, K] for each t in ts, Q̄_t = Q_1 Q_2 ... Q_t   [D3PM eq. 3].

    Uniform and absorbing use the closed form Q̄_t = ᾱ_t I + (1-ᾱ_t) 1 sᵀ. The gaussian has none:
    one pass multiplies Q_1, ..., Q_max(ts) in float64 and keeps the products asked for (T
    products in all, where T calls of Q_bar_matrix(t) would cost T²/2)."""
    ts = sorted(set(int(t) for t in ts))
    if transition != "gaussian":
        process = _process(transition, num_classes, num_timesteps)
        return {t: process.Q_bar_matrix(t) for t in ts}
    betas = d3.get_betas(d3.DEFAULT_SCHEDULE["gaussian"], num_timesteps)
    acc, r, out = torch.eye(num_classes, dtype=torch.float64), 0, {}
    for t in ts:
        while r < t:
            r += 1
            acc = acc @ d3.gaussian_Q(betas[r - 1], num_classes)
        out[t] = acc
    return out


def pixel_marginal(x, num_classes):
    """The empirical distribution of pixel values, float64 [K]."""
    return torch.bincount(x.flatten(), minlength=num_classes).double() / x.numel()


def _entropy_bits(p, dim=-1):
    return -torch.special.xlogy(p, p).sum(dim) / LN2


def survival(Q_bars, marginal):
    """How much of x_0 survives in x_t, for x_0 ~ marginal π and x_t ~ Cat(x_0 Q̄_t):
    P(x_t = x_0) = Σ_i π_i Q̄_t[i, i] and I(x_t; x_0) = H(x_t) - H(x_t | x_0) in bits, with
    H(x_t) the entropy of π Q̄_t and H(x_t | x_0) = Σ_i π_i H(Q̄_t[i, :]).
    Q_bars: {t: Q̄_t}. Returns {"t": long [P], "p_same": [P], "mi_bits": [P]} (float64)."""
    ts = sorted(Q_bars)
    p_same, mi = [], []
    for t in ts:
        Q_bar = Q_bars[t]
        p_same.append((marginal * Q_bar.diagonal()).sum())
        mi.append(_entropy_bits(marginal @ Q_bar) - (marginal * _entropy_bits(Q_bar)).sum())
    return {"t": torch.tensor(ts), "p_same": torch.stack(p_same), "mi_bits": torch.stack(mi)}


def survival_curves(marginal, num_timesteps, num_points=101, transitions=TRANSITIONS):
    """{transition: survival(...)} on num_points timesteps from 0 to T, plus "entropy_bits": H(x_0).

    The paper picks its schedules to shape these curves: for the absorbing process,
    β_t = 1/(T-t+1) makes I(x_t; x_0) fall linearly, (1 - t/T) H(x_0)   [D3PM §3.2]."""
    K, ts = len(marginal), timestep_grid(0, num_timesteps, num_points)
    curves = {name: survival(Q_bar_matrices(name, K, num_timesteps, ts), marginal)
              for name in transitions}
    curves["entropy_bits"] = _entropy_bits(marginal)
    return curves


def sample_from_rows(x_0, Q_bar, u):
    """x_t ~ Cat(x_0 Q̄_t) per pixel by inverse CDF on given uniforms u (x_0's shape)   [eq. 3].
    Sharing u across t and transitions (common random numbers) makes every difference between
    two pictures come from Q̄_t, not from the noise."""
    cdf = Q_bar.cumsum(1)[x_0.flatten()]                                  # (N, K)
    x_t = torch.searchsorted(cdf, u.reshape(-1, 1), right=True).clamp(max=Q_bar.shape[1] - 1)
    return x_t.view(x_0.shape)


# ================================================================================================
# 2. A trained checkpoint
# ================================================================================================

def load_trained(cfg):
    """(d3pm with the EMA network, data, training step, device) for the checkpoint cfg.resume.

    The checkpoint's own config defines K, T, the transition and the network; data_root and
    device come from cfg. The "ema" state_dict is torch.optim.swa_utils.AveragedModel's: the
    network's keys prefixed with "module.", plus the counter "n_averaged"."""
    ckpt = d3.load_checkpoint(cfg.resume)
    config_cls, build_data, build_model = type(cfg), d3.build_data, d3.build_model
    if ckpt["config"].get("dataset") == "heart":   # heart.py's own data, network and config
        import heart
        config_cls, build_data, build_model = heart.HeartConfig, heart.build_data, heart.build_model
    fields = {f.name for f in dataclasses.fields(config_cls)}
    run_cfg = config_cls(**{k: v for k, v in ckpt["config"].items() if k in fields})
    run_cfg = dataclasses.replace(run_cfg, data_root=cfg.data_root, device=cfg.device)
    device = d3.pick_device(cfg.device)
    data = build_data(run_cfg)
    net = build_model(run_cfg, data)
    net.load_state_dict({k[len("module."):]: v for k, v in ckpt["ema"].items()
                         if k.startswith("module.")})
    d3pm = d3.build_d3pm(run_cfg, net.to(device).eval()).to(device)
    return d3pm, data, ckpt["step"], device


def bound_terms(d3pm, x_0, cond, num_points=100, generator=None):
    """(ts, L_{t-1} averaged over the images [len(ts)], L_T averaged) in bits/dim   [D3PM eq. 1].
    ts: t = 1, 2, 3 and num_points timesteps spread over 1..T."""
    T = d3pm.num_timesteps
    ts = sorted(set(timestep_grid(1, T, num_points)) | set(range(1, min(T, 3) + 1)))
    terms = d3pm.nll_bpd_terms(x_0, cond, timesteps=ts, generator=generator)   # [B, len(ts)]
    return torch.tensor(ts), terms.mean(0).cpu().double(), float(d3pm.prior_bpd(x_0).mean())


# ================================================================================================
# 3. Drawing (nothing here is specific to D3PM)
# ================================================================================================

@functools.lru_cache(maxsize=None)
def _font(size):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)  # found in the system font folders
    except OSError:
        return ImageFont.load_default(size)


def _text_size(text, size):
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font(size))
    return box[2] - box[0], box[3] - box[1]


def _text_image(text, size, colour=(0, 0, 0), pad=3):
    w, h = _text_size(text, size)
    img = Image.new("RGB", (w + 2 * pad, int(1.4 * size) + 2 * pad), "white")
    ImageDraw.Draw(img).text((pad, pad), text, fill=colour, font=_font(size))
    return img


def _stack(images, vertical, gap=8, center=True):
    """Images side by side (or one above the other) on white."""
    if vertical:
        w, h = max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)
    else:
        w, h = sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)
    out, pos = Image.new("RGB", (w, h), "white"), 0
    for img in images:
        if vertical:
            out.paste(img, ((w - img.width) // 2 if center else 0, pos))
            pos += img.height + gap
        else:
            out.paste(img, (pos, (h - img.height) // 2 if center else 0))
            pos += img.width + gap
    return out


def _titled(img, title, size=16, subtitle=None):
    parts = [_text_image(title, size)] + ([_text_image(subtitle, 12, (80, 80, 80))] if subtitle else [])
    return _stack(parts + [img], vertical=True, gap=2)


_VIRIDIS = torch.tensor([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                         (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)],
                        dtype=torch.float64)


def _colormap(v):
    """v in [0, 1], any shape -> uint8 RGB, shape + (3,): viridis, in 256 steps."""
    return _viridis_lut()[(v.clamp(0, 1) * 255).round().long()]


@functools.lru_cache(maxsize=None)
def _viridis_lut():
    """256 colours linearly interpolated between the anchors, uint8 [256, 3]."""
    pos = torch.linspace(0, len(_VIRIDIS) - 1, 256, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (pos - lo).unsqueeze(-1)
    return ((1 - frac) * _VIRIDIS[lo] + frac * _VIRIDIS[lo + 1]).round().byte()


def _heatmap(P, log10_floor, size=256):
    """A probability matrix on a log colour scale; values below 10^floor (and 0) get the floor."""
    v = (P.clamp_min(10.0 ** log10_floor).log10() - log10_floor) / -log10_floor
    img = Image.fromarray(_colormap(v).numpy())
    scale = max(1, size // P.shape[0])
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _colour_bar(log10_floor, height):
    bar_w, img = 18, Image.new("RGB", (110, height + 20), "white")
    v = torch.linspace(1, 0, height, dtype=torch.float64)[:, None].expand(height, bar_w)
    img.paste(Image.fromarray(_colormap(v).numpy()), (4, 10))
    draw = ImageDraw.Draw(img)
    for k in range(0, log10_floor - 1, -2):
        y = 10 + round((k / log10_floor) * (height - 1))
        draw.line([(4 + bar_w, y), (8 + bar_w, y)], fill="black")
        label = "1" if k == 0 else f"1e{k}" + (" or 0" if k == log10_floor else "")
        draw.text((11 + bar_w, y - 7), label, fill="black", font=_font(12))
    return img


def _tiles(x, num_classes, scale):
    """Long images (N, C, H, W) -> list of PIL tiles, pixel values as grey (the [MASK] red)."""
    rgb = (d3.to_rgb(x.cpu(), num_classes).permute(0, 2, 3, 1) * 255).round().byte().numpy()
    return [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
            for a in rgb]


def _table(cells, row_labels, col_labels, gap=3, size=13):
    """cells[r][c]: PIL images of one size -> one image with row labels left, column labels above."""
    cw, ch = cells[0][0].size
    lw = max(_text_size(s, size)[0] for s in row_labels) + 10
    lh = int(1.6 * size)
    img = Image.new("RGB", (lw + len(col_labels) * (cw + gap), lh + len(cells) * (ch + gap)), "white")
    draw = ImageDraw.Draw(img)
    for c, label in enumerate(col_labels):
        x = lw + c * (cw + gap) + (cw - _text_size(label, size)[0]) // 2
        draw.text((x, 2), label, fill="black", font=_font(size))
    for r, (label, row) in enumerate(zip(row_labels, cells)):
        y = lh + r * (ch + gap)
        draw.text((4, y + (ch - size) // 2), label, fill="black", font=_font(size))
        for c, tile in enumerate(row):
            img.paste(tile, (lw + c * (cw + gap), y))
    return img


def _ticks(lo, hi, n=5):
    """About n round numbers (steps 1, 2, 2.5 or 5 x 10^k) between lo and hi."""
    raw = (hi - lo) / n if hi > lo else 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def line_plot(series, title, xlabel, ylabel, size=(560, 380), ylim=None, log_y=False):
    """series: [(xs, ys, rgb)] -> a PIL line plot with axes, ticks and labels (see _legend).
    With log_y the y axis is log10 and non-positive values are dropped."""
    W, H = size
    L, R, Tm, B = 74, 16, 34, 50
    pts = [([float(a) for a in xs], [float(b) for b in ys], col) for xs, ys, col in series]
    if log_y:
        pts = [([a for a, b in zip(xs, ys) if b > 0], [math.log10(b) for b in ys if b > 0], col)
               for xs, ys, col in pts]
    x_lo = min(min(xs) for xs, _, _ in pts)
    x_hi = max(max(xs) for xs, _, _ in pts)
    if ylim is not None:
        y_lo, y_hi = ylim
    else:
        y_lo = min(min(ys) for _, ys, _ in pts)
        y_hi = max(max(ys) for _, ys, _ in pts)
        if log_y:
            y_lo, y_hi = math.floor(y_lo), math.ceil(y_hi + 1e-9)
        else:
            pad = 0.05 * (y_hi - y_lo or 1.0)
            y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    y_hi = y_hi if y_hi > y_lo else y_lo + 1
    X = lambda v: L + (v - x_lo) / (x_hi - x_lo) * (W - L - R)  # noqa: E731
    Y = lambda v: H - B - (v - y_lo) / (y_hi - y_lo) * (H - Tm - B)  # noqa: E731

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    small = _font(12)
    for v in _ticks(x_lo, x_hi):
        draw.line([(X(v), Tm), (X(v), H - B)], fill=(232, 232, 232))
        draw.line([(X(v), H - B), (X(v), H - B + 4)], fill="black")
        s = f"{v:g}"
        draw.text((X(v) - _text_size(s, 12)[0] / 2, H - B + 6), s, fill="black", font=small)
    y_ticks = range(math.ceil(y_lo), math.floor(y_hi) + 1) if log_y else _ticks(y_lo, y_hi)
    for v in y_ticks:
        draw.line([(L, Y(v)), (W - R, Y(v))], fill=(232, 232, 232))
        draw.line([(L - 4, Y(v)), (L, Y(v))], fill="black")
        s = (("1" if v == 0 else f"1e{v}") if log_y else f"{v:g}")
        draw.text((L - 7 - _text_size(s, 12)[0], Y(v) - 8), s, fill="black", font=small)
    draw.rectangle([L, Tm, W - R, H - B], outline="black")
    for xs, ys, col in pts:
        xy = [(X(a), Y(min(max(b, y_lo), y_hi))) for a, b in zip(xs, ys)]
        if len(xy) > 1:
            draw.line(xy, fill=col, width=2, joint="curve")
        else:
            draw.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=col)
    draw.text(((W - _text_size(title, 15)[0]) / 2, 8), title, fill="black", font=_font(15))
    draw.text(((L + W - R - _text_size(xlabel, 13)[0]) / 2, H - B + 24), xlabel, fill="black", font=_font(13))
    yl = _text_image(ylabel, 13, pad=0).rotate(90, expand=True)
    img.paste(yl, (6, int((Tm + H - B - yl.height) / 2)))
    return img


def _legend(entries, size=13):
    """[(label, rgb)] -> one row: a short line in each colour, then its label."""
    parts = []
    for label, rgb in entries:
        swatch = Image.new("RGB", (30, int(1.4 * size) + 6), "white")
        ImageDraw.Draw(swatch).line([(4, swatch.height // 2), (26, swatch.height // 2)], fill=rgb, width=3)
        parts.append(_stack([swatch, _text_image(label, size)], vertical=False, gap=0))
    return _stack(parts, vertical=False, gap=18)


def _save_gif(frames, path, ms=90, hold_ms=1500):
    """An animated GIF that holds its last frame; frames are padded to one size."""
    w, h = max(f.width for f in frames), max(f.height for f in frames)
    canvases = [Image.new("RGB", (w, h), "white") for _ in frames]
    for canvas, frame in zip(canvases, frames):
        canvas.paste(frame, (0, 0))
    canvases[0].save(path, save_all=True, append_images=canvases[1:], loop=0,
                     duration=[ms] * (len(frames) - 1) + [hold_ms])


# ================================================================================================
# 4. make_figures
# ================================================================================================

def _one_per_class(data, n):
    """Indices of the first test image of each of the first n labels present (the test set may
    be sorted by class)."""
    labels = data.test_y.tolist()
    first = {}
    for i, y in enumerate(labels):
        first.setdefault(y, i)
    idx = [first[y] for y in sorted(first)][:n]
    return idx + [i for i in range(len(labels)) if i not in idx][:n - len(idx)]


def make_figures(cfg, out_dir=None, num_classes=256, num_timesteps=1000, num_images=4, log=print):
    """Write the figures into out_dir and return their paths.

    The forward-process figures use K = num_classes and T = num_timesteps for all three
    transitions (each with its default schedule) and MNIST test images from cfg.data_root.
    With cfg.resume, the checkpoint's figures use its own K, T and transition.
    out_dir defaults to cfg.out, or to contents/ when cfg.out is the config's default.
    """
    if out_dir is None:
        out_dir = "contents" if cfg.out == getattr(type(cfg), "out", None) else cfg.out
    os.makedirs(out_dir, exist_ok=True)
    K, T, paths = num_classes, num_timesteps, []

    def save(img, name):
        path = os.path.join(out_dir, name)
        if isinstance(img, list):
            _save_gif(img, path)
        else:
            img.save(path)
        log(f"wrote {path}")
        paths.append(path)

    data = d3.load_mnist(cfg.data_root, K)
    idx = _one_per_class(data, num_images)
    x_0, digits = data.test_x[idx], data.test_y[idx].tolist()               # (N, 1, 28, 28)
    marginal = pixel_marginal(data.test_x, K)
    u = torch.rand(x_0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(cfg.seed))
    names = {name: f"{name} ({d3.DEFAULT_SCHEDULE[name]})" for name in TRANSITIONS}
    names["absorbing"] = f"absorbing (jsd, m={K // 2})"       # m: the absorbing (grey) value

    # The t at which each picture needs Q̄_t. One pass per transition makes them all (the
    # gaussian's by a running product); the survival curves' are dropped once used.
    sample_ts = timestep_grid(0, T, 9)
    gif_ts = timestep_grid(0, T, 41)
    curve_ts = timestep_grid(0, T, 101)
    Q_ts = timestep_grid(1, T, 2)                              # Q_1 and Q_T
    Q_bar_ts = sorted({max(1, T // 20), max(1, T // 5), T})
    Q_bars, curves = {}, {"entropy_bits": _entropy_bits(marginal)}
    for name in TRANSITIONS:
        every = Q_bar_matrices(name, K, T, sample_ts + gif_ts + curve_ts + Q_bar_ts)
        curves[name] = survival({t: every[t] for t in curve_ts}, marginal)
        Q_bars[name] = {t: every[t] for t in sample_ts + gif_ts + Q_bar_ts}

    # (1) x_0 and x_t ~ q(x_t | x_0) at a row of t, the same images and uniforms for all three.
    scale = max(1, 56 // x_0.shape[-1])
    blocks = []
    for name in TRANSITIONS:
        cols = [_tiles(sample_from_rows(x_0, Q_bars[name][t], u), K, scale) for t in sample_ts]
        cells = [[col[i] for col in cols] for i in range(len(x_0))]
        table = _table(cells, [f"digit {y}" for y in digits],
                       ["x_0" if t == 0 else f"t={t}" for t in sample_ts])
        blocks.append(_titled(table, names[name], size=14))
    save(_titled(_stack(blocks, vertical=True, gap=10),
                 f"Forward process x_t ~ q(x_t | x_0) = Cat(x_0 Q̄_t), K={K}, T={T}",
                 subtitle="same images and the same uniform noise for every column and transition"),
         "forward_process.png")

    # (1b) the same as an animation over t
    frames = []
    for t in gif_ts:
        panels = []
        for name in TRANSITIONS:
            tiles = _tiles(sample_from_rows(x_0, Q_bars[name][t], u), K, scale)
            panels.append(_titled(_stack(tiles, vertical=False, gap=2), names[name], size=13))
        frames.append(_titled(_stack(panels, vertical=True, gap=6), f"t = {t} / {T}", size=15))
    save(frames, "forward_process.gif")

    # (2) Q_t and Q̄_t as K x K heatmaps on a log colour scale
    floor = -12
    rows = []
    for name in TRANSITIONS:
        mats = [Q_matrix(name, K, T, t) for t in Q_ts] + [Q_bars[name][t] for t in Q_bar_ts]
        rows.append([_heatmap(m, floor) for m in mats])
    table = _table(rows, [names[n] for n in TRANSITIONS],
                   [f"Q_{t}" for t in Q_ts] + [f"Q̄_{t}" for t in Q_bar_ts], gap=10, size=14)
    bar = _colour_bar(floor, rows[0][0].height)
    save(_titled(_stack([table, bar], vertical=False, gap=6, center=False),
                 f"Transition matrices Q_t (one step) and Q̄_t = Q_1···Q_t (t steps), K={K}, T={T}",
                 subtitle="entry [i, j] = probability of moving from value i (row, top = 0) to value "
                          "j (column, left = 0); log colour scale"),
         "transition_matrices.png")

    # (3) how much of x_0 survives in x_t
    ts = curves[TRANSITIONS[0]]["t"]
    H = float(curves["entropy_bits"])
    grey = (150, 150, 150)
    p_plot = line_plot([(ts, curves[n]["p_same"], COLOURS[n]) for n in TRANSITIONS],
                       "P(x_t = x_0)", "t", "probability", ylim=(0, 1.02))
    mi_plot = line_plot([([0, T], [H, H], grey)] + [(ts, curves[n]["mi_bits"], COLOURS[n])
                                                     for n in TRANSITIONS],
                        "I(x_t; x_0)", "t", "bits", ylim=(0, 1.05 * H))
    legend = _legend([(names[n], COLOURS[n]) for n in TRANSITIONS] + [("H(x_0)", grey)])
    save(_titled(_stack([_stack([p_plot, mi_plot], vertical=False, gap=10), legend], vertical=True),
                 f"How much of x_0 survives in x_t, K={K}, T={T}",
                 subtitle="x_0 ~ the pixel-value marginal of the MNIST test images; x_t ~ Cat(x_0 Q̄_t)"),
         "survival.png")

    if cfg.resume:
        _checkpoint_figures(cfg, num_images, save)
    return paths


def _checkpoint_figures(cfg, num_images, save):
    """The figures that need a trained network: bound_terms.png, x0_prediction.png/.gif."""
    d3pm, data, step, device = load_trained(cfg)
    K, T = d3pm.num_classes, d3pm.num_timesteps
    about = f"{d3pm.transition} ({d3pm.schedule_name}), K={K}, T={T}, EMA weights at step {step}"

    # (4) the terms of the bound against t
    idx = _one_per_class(data, 2 * num_images)
    x_0, y = data.test_x[idx].to(device), data.test_y[idx].to(device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    ts, terms, prior = bound_terms(d3pm, x_0, y, generator=g)
    note = f"L_0 = {terms[0]:.3g}, L_T = {prior:.3g} bits/dim"
    if len(ts) == T:
        note += f"; bound = {terms.sum() + prior:.3g} bits/dim"
    plot = line_plot([(ts, terms.clamp_min(1e-8), COLOURS[d3pm.transition])], note,
                     "t", "L_{t-1}, bits/dim (log scale)", size=(640, 380), log_y=True)
    save(_titled(plot, "Terms of the bound L_vb = L_T + Σ_t L_{t-1}, mean over "
                       f"{len(idx)} test images", subtitle=about), "bound_terms.png")
    if data.test_x.dim() != 4:  # not images (the 2-D heart toy): no picture of x̂_0
        return

    # (5) x_t and the network's x̂_0 at a row of timesteps during sampling, one row per class
    labels = torch.arange(data.num_labels, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    _, traj = d3pm.sample((len(labels),) + tuple(data.test_x.shape[1:]), labels,
                          steps=cfg.sample_steps or None, generator=g, return_trajectory=True,
                          guidance=cfg.guidance)
    grid = traj["t"].tolist()
    scale = max(1, 56 // data.test_x.shape[-1])

    rows = [str(c) for c in labels.tolist()]
    picked = timestep_grid(0, len(grid) - 1, 8)
    x_t = [_tiles(traj["x_t"][i], K, scale) for i in picked] + [_tiles(traj["x_t"][-1], K, scale)]
    x0 = [_tiles(traj["x0_pred"][i], K, scale) for i in picked]
    cols = [f"t={grid[i]}" for i in picked]
    left = _table([[c[r] for c in x_t] for r in range(len(rows))], rows, cols + ["x_0"])
    right = _table([[c[r] for c in x0] for r in range(len(rows))], rows, cols)
    save(_titled(_stack([_titled(left, "x_t (the sampler's state)", size=14),
                         _titled(right, "x̂_0 = argmax p̃_θ(x̃_0 | x_t)", size=14)],
                        vertical=False, gap=24, center=False),
                 "Reverse process: the state x_t and the network's prediction of x_0, one row "
                 "per class", subtitle=about), "x0_prediction.png")

    # (5b) the same as an animation over every step: x_t above, x̂_0 below, a column per class
    frames = []
    for i in timestep_grid(0, len(grid) - 1, 60):
        cells = [_tiles(traj["x_t"][i], K, scale), _tiles(traj["x0_pred"][i], K, scale)]
        frames.append(_titled(_table(cells, ["x_t", "x̂_0"], rows), f"t = {grid[i]} / {T}", size=15))
    save(frames, "x0_prediction.gif")


def main(argv=None):
    """The command line: the runner's flags (--data-root, --resume, --device, --seed, --out)."""
    given = vars(d3.make_parser(__doc__).parse_args(argv))
    try:
        make_figures(d3.Config(**given), out_dir=given.get("out", "contents"))
    except d3.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
