"""Tests for the x_0-networks: ConvNet (images, d3pm_runner.py) and PointMLP (the 2-D toy, heart.py).

Run:  python -m pytest tests/test_convnet.py -q      (CPU, a few seconds)

Sections: shapes | batch independence | spatial layout (non-square images, so a swapped
height/width or a wrong permute shows up) | gradients and conditioning | PointMLP.
Each layout check is also run on a deliberately broken copy of the network, to show it can fail.
"""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d3pm_runner import ConvNet  # noqa: E402
from heart import PointMLP  # noqa: E402

B, H, W, T, NUM_LABELS, CH = 3, 8, 12, 10, 10, 8


def tiny(C=1, K=4, num_states=None, output="logits", seed=0):
    torch.manual_seed(seed)
    return ConvNet(num_states or K, K, in_channels=C, num_labels=NUM_LABELS, ch=CH,
                   num_timesteps=T, output=output).eval()


def inputs(C=1, num_states=4, B=B, H=H, W=W, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randint(0, num_states, (B, C, H, W), generator=g)
    t = torch.randint(1, T + 1, (B,), generator=g)
    cond = torch.randint(0, NUM_LABELS, (B,), generator=g)
    return x_t, t, cond


class TransposedLayout(nn.Module):
    """A ConvNet whose output reshaping has the classic bug: the (H, W) map is read as (W, H)
    and transposed back. The shape is still (B, C, H, W, K); the pixels are in the wrong places."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t, t, cond=None):
        out = self.net(x_t, t, cond)                                   # (B, C, H, W, K)
        B, C, H, W, K = out.shape
        return out.permute(0, 1, 4, 2, 3).reshape(B, C, K, W, H).permute(0, 1, 4, 3, 2)


# ------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("C", [1, 3])
def test_logits_shape_non_square(C):
    x_t, t, cond = inputs(C)
    out = tiny(C)(x_t, t, cond)
    assert out.shape == (B, C, H, W, 4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("C", [1, 3])
def test_logistic_output(C):
    K = 16
    x_t, t, cond = inputs(C, num_states=K)
    loc, log_scale = tiny(C, K=K, output="logistic")(x_t, t, cond)
    assert loc.shape == log_scale.shape == x_t.shape
    assert loc.min() >= -1 and loc.max() <= 1
    assert torch.isfinite(log_scale).all()


def test_rejects_sizes_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny()(*inputs(H=6))


# ------------------------------------------------------------------- batch independence

@pytest.mark.parametrize("C", [1, 3])
def test_images_do_not_see_each_other(C):
    net = tiny(C).train()    # train mode: a BatchNorm would mix images here
    x_t, t, cond = inputs(C)
    with torch.no_grad():
        out = net(x_t, t, cond)
        x2 = x_t.clone()
        x2[1] = (x2[1] + 1) % 4                       # change every pixel of image 1
        out2 = net(x2, t, cond)
        single = net(x_t[:1], t[:1], cond[:1])
    assert not torch.allclose(out[1], out2[1])        # the perturbation did reach image 1
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out2[2], out[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(single[0], out[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ spatial layout

def _circular(net):
    """Switch every conv to circular padding: the net then commutes with circular shifts by
    multiples of 4 pixels (its total down-sampling factor), exactly, if its reshapes are right."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular"
    return net


def _shift_equivariance_error(model, C, shifts=((4, 0), (0, 8), (8, 4)), H=12, W=20):
    """max |f(roll(x)) - roll(f(x))| over a few shifts on an H != W image."""
    x_t, t, cond = inputs(C, B=2, H=H, W=W)
    worst = 0.0
    with torch.no_grad():
        out = model(x_t, t, cond)
        for dh, dw in shifts:
            rolled = model(torch.roll(x_t, (dh, dw), dims=(2, 3)), t, cond)
            worst = max(worst, float((rolled - torch.roll(out, (dh, dw), dims=(2, 3))).abs().max()))
    return worst, float(out.abs().mean())


@pytest.mark.parametrize("C", [1, 3])
def test_output_pixels_follow_input_pixels(C):
    """Shift the input by (4, 0), (0, 8), (8, 4): the logits shift by the same amounts.
    A transposed or mis-permuted output map breaks this on a non-square image."""
    err, scale = _shift_equivariance_error(_circular(tiny(C)), C)
    assert err < 1e-4 * max(1.0, scale)
    err_bad, _ = _shift_equivariance_error(TransposedLayout(_circular(tiny(C))), C)
    assert err_bad > 1e-2 * scale                      # the check does catch a layout bug


def _influence_argmax(model, x_t, t, h, w):
    """Position (i, j) of the input pixel whose embedding most affects the logits at (h, w):
    argmax over (i, j) of ‖∂ sum_k out[0, 0, h, w, k] / ∂ emb[0, 0, i, j]‖."""
    net = model.net if isinstance(model, TransposedLayout) else model
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["emb"] = output

    handle = net.pixel_emb.register_forward_hook(keep)
    try:
        model(x_t, t)[0, 0, h, w].sum().backward()
    finally:
        handle.remove()
    g = captured["emb"].grad[0, 0].norm(dim=-1)     # (H, W)
    return divmod(int(g.argmax()), g.shape[1])


@pytest.mark.parametrize("broken", [False, True])
def test_logits_depend_most_on_nearby_pixels(broken):
    """With the real zero padding: the input pixel with the most influence on the logits at
    (h, w) lies within 8 pixels of (h, w). The receptive field is wide (GroupNorm even couples
    the whole image), so the bound is loose; at init it ranges 0..8 over seeds, while a
    transposed layout moves it 15+ pixels away at these positions of a 24 x 40 image."""
    H_, W_ = 24, 40
    model = tiny()
    if broken:
        model = TransposedLayout(model)
    x_t, t, _ = inputs(B=1, H=H_, W=W_)
    distances = []
    for h, w in [(2, 34), (20, 5), (12, 30)]:
        i, j = _influence_argmax(model, x_t, t, h, w)
        distances.append(max(abs(i - h), abs(j - w)))
    if broken:
        assert max(distances) > 8
    else:
        assert max(distances) <= 8, distances


# --------------------------------------------------------------- gradients, conditioning

@pytest.mark.parametrize("output", ["logits", "logistic"])
def test_every_parameter_gets_a_gradient(output):
    """One backward from the output reaches every parameter: every ResBlock's skip conv,
    FiLM layer, the time MLP and label embedding included."""
    net = tiny(C=3, K=8, output=output).train()
    if output == "logistic":  # its last conv starts at zero, which stops the gradient at init
        torch.nn.init.normal_(net.conv_out.weight, std=0.02, generator=torch.Generator().manual_seed(4))
    x_t, t, cond = inputs(C=3, num_states=8)
    out = net(x_t, t, cond)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    missing = [name for name, p in net.named_parameters()
               if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_unet_skips_carry_the_encoder_activations():
    """up2 sees down2's output and up1 sees down1's output as channels of their input (the
    U-Net skips), and the logits depend on those channels."""
    net = tiny()
    seen = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
             for n in ("down1", "down2")]
    hooks += [getattr(net, n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0]) or a[0].retain_grad()) for n in ("up1", "up2")]
    try:
        out = net(*inputs())
        out.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    for up, down in (("up2", "down2"), ("up1", "down1")):
        enc, h_in = seen[down].detach(), seen[up]
        c = enc.shape[1]
        slices = {"first": slice(0, c), "last": slice(h_in.shape[1] - c, None)}
        where = [k for k, sl in slices.items() if torch.equal(h_in[:, sl].detach(), enc)]
        assert where, f"{up} does not receive {down}'s output as a skip"
        assert h_in.grad[:, slices[where[0]]].abs().sum() > 0, f"the {down} skip does not reach the output"


def test_label_and_timestep_change_the_output():
    net = tiny()
    x_t, t, cond = inputs()
    with torch.no_grad():
        out = net(x_t, t, cond)
        other_label = net(x_t, t, (cond + 1) % NUM_LABELS)
        other_t = net(x_t, t % T + 1, cond)
    for changed in (other_label, other_t):
        diff = (changed - out).abs().flatten(1).amax(1)
        assert (diff > 1e-4).all(), diff                     # in every image of the batch


def test_no_label_is_the_null_class():
    net = tiny()
    x_t, t, _ = inputs()
    with torch.no_grad():
        none = net(x_t, t, None)
        null = net(x_t, t, torch.full((B,), NUM_LABELS, dtype=torch.long))
        some = net(x_t, t, torch.zeros(B, dtype=torch.long))
    assert torch.equal(none, null)
    assert not torch.allclose(none, some)


# ------------------------------------------------------------------------------ PointMLP

def test_point_mlp_shape_and_batch_independence():
    K = 32
    torch.manual_seed(0)
    net = PointMLP(K, K, num_labels=1, hidden=64, num_timesteps=T).eval()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randint(0, K, (5, 2), generator=g)
    t = torch.randint(1, T + 1, (5,), generator=g)
    with torch.no_grad():
        out = net(x_t, t)
        x2 = x_t.clone()
        x2[3] = (x2[3] + 7) % K
        out2 = net(x2, t)
        single = net(x_t[:1], t[:1])
        cond = net(x_t, t, torch.zeros(5, dtype=torch.long))
    assert out.shape == (5, 2, K) and torch.isfinite(out).all()
    assert not torch.allclose(out2[3], out[3])
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(out2[keep], out[keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(single[0], out[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond, out)                     # the label reaches the output


def test_logistic_head_starts_as_a_narrow_logistic_at_x_t():
    """At init the logistic head returns loc = x_t's value (black and white included, where
    tanh(loc + x) would give ±0.76) and log_scale = -2, and its pixel embedding orders the values:
    neighbouring grey levels are closer than distant ones."""
    K = 256
    net = ConvNet(K, K, in_channels=1, num_labels=10, ch=16, num_timesteps=10, output="logistic")
    x_t = torch.tensor([0, 1, 128, 254, 255]).repeat(16 * 16 // 5 + 1)[:256].view(1, 1, 16, 16)
    loc, log_scale = net(x_t, torch.tensor([3]), torch.tensor([1]))
    value = 2.0 * x_t.float() / (K - 1) - 1.0
    assert (loc - value).abs().max() < 0.5 / (K - 1)   # within a quarter of a bin
    assert torch.all(log_scale == -2.0)
    e = net.pixel_emb.weight
    assert (e[100] - e[101]).norm() < (e[100] - e[140]).norm() < (e[100] - e[255]).norm()
