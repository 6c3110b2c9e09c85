"""How close is the heart toy's model to its data? Total-variation distance over 16 x 16 cells.

Draws --num-samples points from a heart checkpoint (EMA weights, the checkpoint's sampling
settings) and compares their 16 x 16-cell histogram with the heart distribution; a data sample
of the same size gives the floor (mean over 5 seeds). Prints one JSON line.

    python scripts/heart_tv.py --resume runs/heart/checkpoint.pt
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import d3pm_runner as R  # noqa: E402
import heart  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resume", required=True, help="checkpoint of a heart.py run")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    ckpt = R.load_checkpoint(args.resume)
    cfg = heart.HeartConfig(**ckpt["config"])
    data = heart.build_data(cfg)
    net = heart.build_model(cfg, data)
    ema = torch.optim.swa_utils.AveragedModel(net)
    ema.load_state_dict(ckpt["ema"])
    d3pm = R.build_d3pm(cfg, ema.module)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    with torch.no_grad():
        x = torch.cat([d3pm.sample((len(b), 2), torch.zeros(len(b), dtype=torch.long), generator=g,
                                   steps=cfg.sample_steps or None)
                       for b in torch.arange(args.num_samples).split(5000)])
    seconds = time.time() - start
    K = cfg.num_classes
    floor = sum(heart.heart_tv(heart.heart_points(args.num_samples, K, torch.Generator().manual_seed(s)),
                               K) for s in range(5)) / 5
    tv = heart.heart_tv(x, K)
    print(json.dumps({"tv": round(tv, 4), "floor": round(floor, 4), "ratio": round(tv / floor, 2),
                      "num_samples": args.num_samples, "sample_seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
