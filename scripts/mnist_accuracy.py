"""Do class-conditional MNIST samples show the digit they were asked for, and are they diverse?

Trains an independent classifier (a small CNN, nothing shared with the diffusion model) on the
real MNIST training images quantised to the same K levels as the samples, reports its accuracy
on the real test images, then the fraction of samples it assigns to their requested label.
It also reports a Fréchet distance (FID's formula, Heusel et al. 2017) in that classifier's
penultimate-layer features (128 ReLU units) between the samples and the training images; the
real test images' distance is printed beside it as the floor for a set of that size. Recognised
but look-alike samples have a high accuracy and a high distance.

    python scripts/mnist_accuracy.py --data-root ../shared/data --samples runs/cpu/samples.pt
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from d3pm_runner import load_mnist  # noqa: E402  (the same loader and quantisation as training)


def classifier():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def features(net, x, num_classes):
    """The classifier's penultimate layer (the input of its last Linear): (N, 128) float64."""
    with torch.no_grad():
        return torch.cat([net[:-1](to_input(b, num_classes)) for b in x.split(500)]).double()


def frechet_distance(a, b):
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to two feature sets.
    Tr (Σ_a Σ_b)^½ = Σ √λ of the symmetric Σ_a^½ Σ_b Σ_a^½ (same eigenvalues as Σ_a Σ_b)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def to_input(x, num_classes):
    return x.float() / (num_classes - 1) * 2 - 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--samples", required=True, help="samples.pt from --sample-only")
    p.add_argument("--num-classes", type=int, default=0,
                   help="K of the samples (default: config.json beside them, else max + 1)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    s = torch.load(args.samples, weights_only=True)
    images, labels = s["images"], s["labels"]
    config = os.path.join(os.path.dirname(args.samples), "config.json")
    K = args.num_classes or (json.load(open(config))["num_classes"] if os.path.exists(config)
                             else int(images.max()) + 1)
    data = load_mnist(args.data_root, K)
    torch.manual_seed(args.seed)
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(args.epochs):
        net.train()
        for idx in torch.randperm(len(data.train_x)).split(64):
            x = data.train_x[idx]
            # small random shifts make the classifier robust to off-centre samples
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, (dx, dy), (2, 3))
            loss = F.cross_entropy(net(to_input(x, K)), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        test_acc = (net(to_input(data.test_x, K)).argmax(1) == data.test_y).float().mean().item()
        pred = torch.cat([net(to_input(x, K)).argmax(1) for x in images.clamp(max=K - 1).split(500)])
    hits = pred == labels
    per_class = {int(c): round(hits[labels == c].float().mean().item(), 3) for c in labels.unique()}
    train_feats = features(net, data.train_x, K)
    fd = frechet_distance(features(net, images.clamp(max=K - 1), K), train_feats)
    fd_test = frechet_distance(features(net, data.test_x, K), train_feats)
    print(json.dumps({"classifier_test_accuracy": round(test_acc, 4),
                      "sample_accuracy": round(hits.float().mean().item(), 4),
                      "frechet_distance": round(fd, 2), "test_frechet_distance": round(fd_test, 2),
                      "num_samples": len(labels), "num_test_images": len(data.test_x),
                      "per_class": per_class}))


if __name__ == "__main__":
    main()
