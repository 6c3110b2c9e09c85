"""Tests for dit.py, the DiT x_0-network of D3PM (Austin et al. 2021, arXiv:2107.03006).

Run:  python -m pytest tests/test_dit.py -q      (CPU, a few seconds)

Sections: shapes and dtypes | layout (patchify, locality on non-square images) |
          batch independence | adaLN-Zero init | conditioning paths and gradients | sizes.
Images are 8 x 12 (H != W) so that a transposed height/width shows up as an error.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dit import (DiT, DiTBlock, count_parameters, dit_from_name, patchify, sincos_1d,  # noqa: E402
                 sincos_2d, unpatchify)

B, C, H, W, K, T, NUM_LABELS = 3, 3, 8, 12, 16, 10, 5


def tiny(num_states=K, num_classes=K, output="logits", seed=0):
    torch.manual_seed(seed)
    return dit_from_name("DiT-T/2", in_channels=C, num_states=num_states, num_classes=num_classes,
                         num_labels=NUM_LABELS, num_timesteps=T, output=output)


def inputs(num_states=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randint(0, num_states, (B, C, H, W), generator=g)
    t = torch.randint(1, T + 1, (B,), generator=g)
    cond = torch.randint(0, NUM_LABELS, (B,), generator=g)
    return x_t, t, cond


def perturb(model, modules, std=0.5, seed=2):
    """Overwrite the given zero-initialised layers with noise, so their paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def zero_init_layers(model):
    """The layers adaLN-Zero sets to 0: every block's modulation, the final modulation and head."""
    return [b.adaLN_modulation[-1] for b in model.blocks] + [
        model.final_layer.adaLN_modulation[-1], model.final_layer.linear]


# --------------------------------------------------------------------------------------
#                    Shapes and dtypes
# --------------------------------------------------------------------------------------

def test_logits_shape_and_dtype():
    model = tiny()
    out = model(*inputs())
    assert out.shape == (B, C, H, W, K) and out.dtype == torch.float32


def test_logistic_output():
    model = tiny(output="logistic")
    x_t, t, cond = inputs()
    loc, log_scale = model(x_t, t, cond)
    assert loc.shape == log_scale.shape == x_t.shape
    assert loc.dtype == log_scale.dtype == torch.float32
    # Zero-initialised head: raw_loc = 0, so loc = tanh(atanh(0.999 x_scaled)) = 0.999 x_scaled:
    # x_t itself (the official tanh(x_scaled) would put black, -1, at -0.76)
    torch.testing.assert_close(loc, 0.999 * (2 * x_t.float() / (K - 1) - 1))
    assert torch.all(log_scale == 0)


def test_large_K_with_mask_state():
    """K = 256 pixel values plus an absorbing [MASK] state (value K) as input."""
    model = tiny(num_states=257, num_classes=256)
    x_t, t, cond = inputs(num_states=257)
    x_t[0, :, :2, :2] = 256                                           # a masked patch
    perturb(model, zero_init_layers(model))
    out = model(x_t, t, cond)
    assert out.shape == (B, C, H, W, 256) and torch.isfinite(out).all()


def test_autocast_bf16_returns_float32():
    model = tiny()
    perturb(model, zero_init_layers(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(*inputs()), atol=0.3, rtol=0.1)  # bf16 ≈ fp32


def test_rejects_bad_shapes_and_names():
    model = tiny()
    x_t, t, cond = inputs()
    with pytest.raises(ValueError):
        model(x_t[:, :, :7], t, cond)                                 # H not a multiple of p
    with pytest.raises(ValueError):
        dit_from_name("DiT-Q/2", in_channels=C, num_states=K, num_classes=K,
                      num_labels=NUM_LABELS, num_timesteps=T)


# --------------------------------------------------------------------------------------
#                    Layout: patchify / unpatchify and locality on H != W
# --------------------------------------------------------------------------------------

def test_patchify_layout_and_inverse():
    p = 2
    x = torch.arange(B * C * H * W).reshape(B, C, H, W)
    tokens = patchify(x, p)                                           # (B, L, p*p*C)
    assert tokens.shape == (B, (H // p) * (W // p), p * p * C)
    # Token l = i*(W/p) + j holds pixel (i*p + r, j*p + s) of channel c at (r*p + s)*C + c.
    b, c, h, w = 1, 2, 5, 7
    l, slot = (h // p) * (W // p) + w // p, ((h % p) * p + w % p) * C + c
    assert tokens[b, l, slot] == x[b, c, h, w]
    torch.testing.assert_close(unpatchify(tokens, p, C, H, W)[..., 0], x)
    feats = torch.randn(B, C, H, W, 4)                                # E = 4 features per pixel
    per_token = patchify(feats.permute(0, 4, 1, 2, 3).reshape(B, 4 * C, H, W), p)
    assert per_token.shape[-1] == p * p * C * 4


def test_positional_embedding_is_row_major():
    """Token l = i*w + j sits at grid row i, column j: half its channels encode i, half j."""
    h, w, D = H // 2, W // 2, 64
    pe = sincos_2d(h, w, D)                                           # (L, D)
    i, j = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    torch.testing.assert_close(pe[:, :D // 2], sincos_1d(i, D // 2))
    torch.testing.assert_close(pe[:, D // 2:], sincos_1d(j, D // 2))
    assert torch.cdist(pe, pe).add(torch.eye(h * w)).min() > 0       # all positions distinct


def test_pixel_change_stays_in_its_patch():
    """With the blocks at identity (adaLN-Zero) and only the head perturbed, the network is a
    per-token function, so changing pixel (h, w) may change only the logits of its p x p patch.
    Any height/width mix-up in patchify/unpatchify would move the change elsewhere."""
    model = tiny()
    perturb(model, [model.final_layer.adaLN_modulation[-1], model.final_layer.linear])
    x_t, t, cond = inputs()
    p = model.patch_size
    for h, w in [(0, 0), (3, 10), (7, 5)]:
        x_new = x_t.clone()
        x_new[0, 1, h, w] = (x_t[0, 1, h, w] + 1) % K
        diff = (model(x_new, t, cond) - model(x_t, t, cond)).abs().amax(dim=(1, 4))  # (B, H, W)
        inside = torch.zeros(B, H, W, dtype=torch.bool)
        inside[0, h // p * p:(h // p + 1) * p, w // p * p:(w // p + 1) * p] = True
        assert torch.all(diff[~inside] == 0)
        assert torch.all(diff[inside] > 0)


def test_patch_embedding_knows_slot_and_channel():
    """A patch token sums one row per (row, column, channel, value); swapping two pixels of
    a patch, or two channels of a pixel, must change it (a shared table would not notice)."""
    model = tiny()
    perturb(model, [model.final_layer.adaLN_modulation[-1], model.final_layer.linear])
    x_t, t, cond = inputs()
    x_t[0, 0, 2, 4], x_t[0, 0, 2, 5] = 1, 2                         # same patch, same channel
    x_t[0, 1, 2, 4], x_t[0, 2, 2, 4] = 3, 4                         # same pixel, two channels
    out = model(x_t, t, cond)
    swapped_pixels, swapped_channels = x_t.clone(), x_t.clone()
    swapped_pixels[0, 0, 2, 4], swapped_pixels[0, 0, 2, 5] = 2, 1
    swapped_channels[0, 1, 2, 4], swapped_channels[0, 2, 2, 4] = 4, 3
    assert not torch.allclose(model(swapped_pixels, t, cond)[0, :, 2:4, 4:6], out[0, :, 2:4, 4:6])
    assert not torch.allclose(model(swapped_channels, t, cond)[0, :, 2:4, 4:6], out[0, :, 2:4, 4:6])


def test_patch_position_not_grid_size_sets_its_embedding():
    """Per-token state again: a top-left crop must give the same logits as the full image
    there, since patch (i, j) gets the same 2-D position code in any grid. A positional
    embedding built for the wrong (h, w) order shifts the codes and breaks this."""
    model = tiny()
    perturb(model, [model.final_layer.adaLN_modulation[-1], model.final_layer.linear])
    x_t, t, cond = inputs()
    full = model(x_t, t, cond)
    for h, w in [(4, 8), (8, 6)]:
        torch.testing.assert_close(model(x_t[:, :, :h, :w], t, cond), full[:, :, :h, :w])


# --------------------------------------------------------------------------------------
#                    Batch independence
# --------------------------------------------------------------------------------------

def test_images_do_not_see_each_other():
    model = tiny()
    perturb(model, zero_init_layers(model))
    x_t, t, cond = inputs()
    out = model(x_t, t, cond)
    x_new = x_t.clone()
    x_new[1] = (x_t[1] + 3) % K
    out_new = model(x_new, t, cond)
    torch.testing.assert_close(out_new[0], out[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_new[1], out[1])
    torch.testing.assert_close(model(x_t[:1], t[:1], cond[:1])[0], out[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
#                    adaLN-Zero initialisation
# --------------------------------------------------------------------------------------

def test_blocks_start_as_identity():
    block = DiTBlock(hidden_size=64, num_heads=2)
    # The same init DiT.initialize_weights gives: the modulation regressor is zero.
    torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
    x, c = torch.randn(B, 24, 64), torch.randn(B, 64)
    torch.testing.assert_close(block(x, c), x, atol=0, rtol=0)
    model = tiny()
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, atol=0, rtol=0)
    assert torch.all(model(*inputs()) == 0)                           # zero head: uniform p̃(x_0)


# --------------------------------------------------------------------------------------
#                    Conditioning: null label, label, timestep, gradients
# --------------------------------------------------------------------------------------

def test_null_label():
    model = tiny()
    perturb(model, zero_init_layers(model))
    x_t, t, _ = inputs()
    null = torch.full((B,), NUM_LABELS)
    torch.testing.assert_close(model(x_t, t, None), model(x_t, t, null), atol=0, rtol=0)
    # Mixed batch for classifier-free guidance: row 0 null, rows 1.. conditional.
    cond = torch.tensor([NUM_LABELS, 1, 2])
    mixed = model(x_t, t, cond)
    torch.testing.assert_close(mixed[0], model(x_t[:1], t[:1], None)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1], model(x_t[1:2], t[1:2], None)[0])


def test_label_and_timestep_reach_output():
    model = tiny()
    perturb(model, zero_init_layers(model))
    x_t, t, cond = inputs()
    out = model(x_t, t, cond)
    assert not torch.allclose(model(x_t, t, (cond + 1) % NUM_LABELS), out)
    assert not torch.allclose(model(x_t, t % T + 1, cond), out)      # t stays in 1..T
    # t and T enter only through t/T: scaling both leaves the output unchanged.
    twice = tiny()
    twice.load_state_dict(model.state_dict())
    twice.t_embedder.num_timesteps = 2 * T
    torch.testing.assert_close(twice(x_t, 2 * t, cond), out)


@pytest.mark.parametrize("output", ["logits", "logistic"])
def test_every_parameter_gets_a_gradient(output):
    model = tiny(output=output)
    perturb(model, zero_init_layers(model))
    x_t, t, _ = inputs()
    cond = torch.tensor([0, 3, NUM_LABELS])                           # includes the null row
    out = model(x_t, t, cond)
    loss = out.square().mean() if output == "logits" else sum(o.square().mean() for o in out)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------
#                    Named sizes   [DiT Table 1]
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, depth, hidden, heads, patch", [
    ("DiT-S/2", 12, 384, 6, 2), ("DiT-B/2", 12, 768, 12, 2), ("DiT-T/2", 2, 64, 2, 2),
    ("DiT-XL/2", 28, 1152, 16, 2), ("DiT-S/4", 12, 384, 6, 4)])
def test_registry_sizes(name, depth, hidden, heads, patch):
    with torch.device("meta"):                                        # shapes only, no memory
        model = dit_from_name(name, in_channels=3, num_states=256, num_classes=256,
                              num_labels=10, num_timesteps=1000)
    assert isinstance(model, DiT) and len(model.blocks) == depth
    assert model.hidden_size == hidden and model.patch_size == patch
    assert model.blocks[0].attn.num_heads == heads


def test_dit_s2_parameter_count():
    """DiT-S/2 has 33M parameters in the paper (ImageNet latents: 4 channels, 1000 labels).
    Our input embedding and head are sized by K, so compare the body without them."""
    with torch.device("meta"):
        model = dit_from_name("DiT-S/2", in_channels=4, num_states=256, num_classes=256,
                              num_labels=1000, num_timesteps=1000)
    io = model.x_embedder.weight.numel() + sum(p.numel() for p in model.final_layer.linear.parameters())
    body = count_parameters(model) - io
    assert 32e6 < body < 34e6, body
