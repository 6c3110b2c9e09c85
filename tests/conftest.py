"""Shared test fixtures: one intra-op thread, a tiny fake MNIST in torchvision's raw layout, and
the device for the tests that make sense on a GPU ($D3PM_TEST_DEVICE; the CPU when unset)."""

import os
import sys

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)
from fake_mnist import write_fake_mnist  # noqa: E402  (scripts/gpu_check.sh writes a full-size one)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every model here is tiny: extra intra-op threads only add overhead (and stall badly on a
    loaded machine), and one thread also fixes the summation order. Restored at the end."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def device():
    """Where the device-agnostic tests run: $D3PM_TEST_DEVICE (scripts/gpu_check.sh sets cuda),
    the CPU when unset. Every other test runs on the CPU either way."""
    name = os.environ.get("D3PM_TEST_DEVICE", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("D3PM_TEST_DEVICE=cuda, but torch sees no CUDA device")
    return torch.device(name)
