"""A fake MNIST in torchvision's raw layout, for machines that cannot download the real one.

The tests train on a tiny one, and scripts/gpu_check.sh times `python d3pm_runner.py` on a
full-sized one (a GPU machine here has no internet). The images are easy to learn and are not
MNIST: use them for timings and plumbing, never for a quality figure.

    python scripts/fake_mnist.py DATA_ROOT --train 60000 --test 10000
    python d3pm_runner.py --data-root DATA_ROOT ...
"""

import argparse
import os
import struct

import numpy as np


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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="data root: MNIST/raw is written under it")
    p.add_argument("--train", type=int, default=60000, help="training images (MNIST: 60000)")
    p.add_argument("--test", type=int, default=10000, help="test images (MNIST: 10000)")
    args = p.parse_args()
    print(f"fake MNIST ({args.train} + {args.test} images) in "
          f"{os.path.join(write_fake_mnist(args.root, args.train, args.test), 'MNIST', 'raw')}")
