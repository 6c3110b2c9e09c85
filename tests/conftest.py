"""Shared test fixtures: one intra-op thread, and a tiny fake MNIST in torchvision's raw layout."""

import os
import struct

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every model here is tiny: extra intra-op threads only add overhead (and stall badly on a
    loaded machine), and one thread also fixes the summation order. Restored at the end."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_fake_mnist(root, n_train=64, n_test=32, seed=0):
    """MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte under root, read by the real
    torchvision.datasets.MNIST(root, download=False): class c is a horizontal bar at rows
    2c+2..2c+4 and a vertical bar at columns 2c+2..2c+3, with 2% of pixels flipped."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:5 + 2 * c, 4:24] = 255
            images[i, 4:24, 2 + 2 * c:4 + 2 * c] = 255
        flip = rng.random(images.shape) < 0.02
        images[flip] = 255 - images[flip]
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    """A data root holding a tiny fake MNIST (64 train / 32 test images)."""
    return write_fake_mnist(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module", params=["reference", "fast"])
def both_classes(request):
    """Runs the tests of a module (pytestmark = pytest.mark.usefixtures("both_classes")) against
    the reference d3pm_runner.D3PM and against d3pm_fast.FastD3PM: the module's global name D3PM
    is bound to each class in turn."""
    import d3pm_fast
    import d3pm_runner
    cls = {"reference": d3pm_runner.D3PM, "fast": d3pm_fast.FastD3PM}[request.param]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(request.module, "D3PM", cls)
        yield cls
