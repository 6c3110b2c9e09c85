"""D3PM on CIFAR-10 with a class-conditioned DiT: only the data and the network live here.

The process, config, training loop, checkpoints, sampling and NLL all come from d3pm_runner.py.
Defaults are the paper's best CIFAR-10 setting: K = 256, discretized Gaussian transition with
the linear schedule, truncated discretized logistic output, hybrid loss with λ = 0.001.

    python d3pm_runner_cifar.py --data-root ./data --model DiT-S/2 --compile          # one GPU
    torchrun --nproc_per_node 8 d3pm_runner_cifar.py --data-root ./data --compile      # eight
    python d3pm_runner_cifar.py --dataset fake --device cpu --train-steps 2 --model DiT-T/2
"""

import os
from dataclasses import dataclass

import torch

import d3pm_runner as d3
from dit import dit_from_name


@dataclass
class CifarConfig(d3.Config):
    dataset: str = "cifar10"          # cifar10 (torchvision, random flips) | fake (random images)
    num_classes: int = 256            # K: intensity levels per channel (256 = 8-bit, as the paper)
    transition: str = "gaussian"      # uniform | absorbing | gaussian
    model_output: str = "logistic"    # logistic (the paper's best) | logits
    model: str = "DiT-S/2"            # DiT-{T,S,B,L,XL}/{2,4,8} (dit.DIT_SIZES; T is a test size)
    save_npz: str = ""                # with --sample-only: write samples as uint8 NHWC .npz here
    batch_size: int = 128             # images per step, over all processes
    lr: float = 1e-4                  # AdamW peak learning rate
    train_steps: int = 400000         # total optimizer steps
    eval_every: int = 10000           # steps between sample grids/GIFs (0 = only at the end)
    checkpoint_every: int = 5000      # steps between checkpoints
    eval_images: int = 500            # test images for the final NLL (full bound)
    out: str = "runs/cifar"           # run directory


PRESETS = {"fake": dict(dataset="fake", model="DiT-T/2", num_timesteps=20, batch_size=8,
                        train_steps=4, log_every=2, checkpoint_every=2, num_samples=10,
                        eval_images=4, out="runs/fake", device="cpu")}
MODEL_FIELDS = d3.MODEL_FIELDS + ("model",)


@dataclass
class CifarData(d3.Data):
    """Random horizontal flips, seeded by (seed, step, rank) so a resumed run flips the same
    images."""
    seed: int = 0

    def augment(self, x, step):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 64 + rank)
        flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def build_data(cfg):
    if cfg.dataset == "fake":  # CIFAR-shaped random images for smoke runs and tests
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randint(0, 256, (96, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.arange(96) % 10
        xq = d3.quantize(x, cfg.num_classes)
        return CifarData(xq[:64], y[:64], xq[64:], y[64:], num_labels=10, seed=cfg.seed)
    if cfg.dataset != "cifar10":
        raise d3.UsageError(f"--dataset must be cifar10 or fake, got {cfg.dataset!r}")
    from torchvision.datasets import CIFAR10
    dist = torch.distributed
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()  # rank 0 downloads alone; the others wait, then read its files
    split = {}
    for train in (True, False):
        try:
            ds = CIFAR10(cfg.data_root, train=train, download=first)
        except Exception as e:
            raise d3.UsageError(f"CIFAR-10 not found under {cfg.data_root} and could not be "
                                f"downloaded ({type(e).__name__}); put cifar-10-batches-py there "
                                "or pass --data-root") from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
        split[train] = (d3.quantize(x, cfg.num_classes), torch.tensor(ds.targets))
    if first and dist.is_initialized():
        dist.barrier()
    return CifarData(*split[True], *split[False], num_labels=10, seed=cfg.seed)


def build_model(cfg, data):
    net = dit_from_name(cfg.model, in_channels=data.train_x.shape[1], num_states=d3.num_states(cfg),
                        num_classes=cfg.num_classes, num_labels=data.num_labels,
                        num_timesteps=cfg.num_timesteps, output=cfg.model_output)
    return net


def validate(cfg):
    try:  # build on the meta device: checks the name without allocating anything
        with torch.device("meta"):
            dit_from_name(cfg.model, in_channels=3, num_states=2, num_classes=2, num_labels=1,
                          num_timesteps=1)
    except ValueError as e:
        raise d3.UsageError(f"--model: {e}") from None
    if cfg.save_npz and not cfg.sample_only:
        raise d3.UsageError("--save-npz needs --sample-only --resume CHECKPOINT")


def run(cfg):
    result = d3.train(cfg, build_data=build_data, build_model=build_model)
    if cfg.save_npz and int(os.environ.get("RANK", "0")) == 0:
        import numpy as np  # comes with torchvision

        # The layout FID/IS tools read (e.g. OpenAI's evaluator): uint8 (N, H, W, 3), key arr_0.
        s = torch.load(os.path.join(cfg.out, "samples.pt"), weights_only=True)
        images = (s["images"].float() * 255 / (cfg.num_classes - 1)).round().byte()
        np.savez(cfg.save_npz, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=s["labels"].numpy())
        print(f"wrote {len(images)} samples as uint8 NHWC to {cfg.save_npz}")
    return result


if __name__ == "__main__":
    d3.main(run=run, description=__doc__, config_cls=CifarConfig, presets=PRESETS,
            model_fields=MODEL_FIELDS, validate=validate)
