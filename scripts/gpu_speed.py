"""GPU speed figures for scripts/gpu_check.sh, on generated data (nothing is downloaded).

D3PM (Austin et al. 2021, arXiv:2107.03006) through the repository's own runners:

    python scripts/gpu_speed.py cifar --out runs/gpu_check/cifar   # DiT-S/2, batch 128
    python scripts/gpu_speed.py mnist --out runs/gpu_check/mnist   # `python d3pm_runner.py`
    python scripts/gpu_speed.py cifar --device cpu --model DiT-T/2 --batch-size 8 --steps 40  # smoke

cifar: d3pm_runner_cifar.py's defaults (K = 256, discretized Gaussian, logistic head, T = 1000)
  on random CIFAR-shaped images. Training images/s as train() runs it, for --precision fp32
  eager (TF32 matmuls, as train() sets on CUDA) against --precision bf16 --compile; and the time
  of one reverse step on a batch: fp32 eager, bf16 eager (how the runner samples: it compiles
  the training network only) and bf16 compiled.
mnist: `python d3pm_runner.py` with its defaults on a full-size fake MNIST
  (scripts/fake_mnist.py): training steps/s over a few hundred steps, the time of one sample
  grid and of the test bounds, and from these the wall-clock of the whole default run.

Rates leave out the first log interval (compilation, warm-up). Each mode prints its figures,
ending with a one-line summary (the row scripts/gpu_check.sh puts in its table), and writes the
same lines to OUT/report.txt.
Sections: measuring | cifar | mnist | command line.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3pm_runner as R  # noqa: E402
import d3pm_runner_cifar as C  # noqa: E402
from fake_mnist import write_fake_mnist  # noqa: E402  (this folder is on sys.path)


# ================================================================================================
# Measuring
# ================================================================================================

def training_rate(cfg, run):
    """Run a training config from scratch; (steps/s between its first and last metrics line,
    seconds to the first line: building, compiling and the first log interval)."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    run(cfg)
    with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"]), first["elapsed_s"]


def reverse_step_seconds(cfg, build_model, data, device, precision, compiled, steps):
    """Seconds per ancestral step x_{t-1} ~ p_θ(x_{t-1} | x_t) on a batch of cfg.batch_size,
    from t = T down (the steps of a full-T sampler), after two untimed steps."""
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, data).to(device)
    d3pm = R.build_d3pm(cfg, torch.compile(net) if compiled else net,
                        check_inputs=device.type != "cuda").to(device)  # as train()
    g = torch.Generator(device).manual_seed(0)
    shape = (cfg.batch_size,) + tuple(data.train_x.shape[1:])
    x = torch.randint(0, d3pm.num_states, shape, generator=g, device=device)
    y = torch.arange(cfg.batch_size, device=device) % data.num_labels
    T = cfg.num_timesteps
    with R.autocast_for(device, precision):
        for t in (T, T - 1):
            x = d3pm.p_sample(x, t, y, generator=g)
        sync(device)
        start = time.perf_counter()
        for t in range(T - 2, T - 2 - steps, -1):
            x = d3pm.p_sample(x, t, y, generator=g)
        sync(device)
    return (time.perf_counter() - start) / steps


def say(args, line):
    """A figure: printed, and appended to OUT/report.txt (the runs around it print too)."""
    print(line, flush=True)
    with open(os.path.join(args.out, "report.txt"), "a") as f:
        f.write(line + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def clock(seconds):
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s"


# ================================================================================================
# CIFAR-10 shape: fp32 eager against bf16 + compile
# ================================================================================================

def cifar(args, device):
    base = C.CifarConfig(dataset="fake", model=args.model, batch_size=args.batch_size,
                         train_steps=args.steps, log_every=args.log_every, eval_every=0,
                         checkpoint_every=args.steps, eval_images=0, num_samples=10,
                         sample_steps=1, device=device.type)
    data = C.build_data(base)
    say(args, f"CIFAR-10 shape (random images), {args.model}, K={base.num_classes}, "
              f"{base.transition}, {base.model_output} head, T={base.num_timesteps}, batch "
              f"{args.batch_size}, {args.steps} steps ({args.log_every} of warm-up)")
    rates, step_ms = {}, {}
    for name, precision, compiled in (("fp32 eager", "fp32", False), ("bf16 + compile", "bf16", True)):
        out = os.path.join(args.out, name.replace(" + ", "_").replace(" ", "_"))
        cfg = dataclasses.replace(base, precision=precision, compile=compiled, out=out)
        rate, first = training_rate(cfg, C.run)
        rates[name] = rate * args.batch_size
        say(args, f"  training, {name}: {rates[name]:.0f} images/s (first {args.log_every} "
                  f"steps, with compilation: {first:.1f} s)")
    for name, precision, compiled in (("fp32 eager", "fp32", False), ("bf16 eager", "bf16", False),
                                      ("bf16 + compile", "bf16", True)):
        s = reverse_step_seconds(base, C.build_model, data, device, precision, compiled,
                                 args.sample_steps)
        step_ms[name] = 1e3 * s
        say(args, f"  sampling, {name}: {step_ms[name]:.1f} ms per reverse step on "
                  f"{args.batch_size} images ({s * base.num_timesteps:.1f} s for all "
                  f"T = {base.num_timesteps} steps)")
    a, b = rates["fp32 eager"], rates["bf16 + compile"]
    say(args, f"training {a:.0f} -> {b:.0f} images/s (x{b / a:.2f}); reverse step on "
              f"{args.batch_size} images {step_ms['fp32 eager']:.1f} -> "
              f"{step_ms['bf16 + compile']:.1f} ms (bf16 eager, as the runner samples: "
              f"{step_ms['bf16 eager']:.1f} ms)")


# ================================================================================================
# `python d3pm_runner.py` with its defaults: steps/s and the whole run's wall-clock
# ================================================================================================

def mnist(args, device):
    root = args.data_root or write_fake_mnist(os.path.join(args.out, "data"), 60000, 10000)
    cfg = R.Config(data_root=root, device=device.type, out=os.path.join(args.out, "samples"))
    run = dataclasses.replace(cfg, train_steps=args.steps, log_every=args.log_every,
                              eval_images=0, num_samples=10, sample_steps=1,
                              checkpoint_every=args.steps, out=os.path.join(args.out, "run"))
    rate, first = training_rate(run, R.train)
    say(args, f"python d3pm_runner.py defaults (ConvNet width {cfg.model_channels}, "
              f"K={cfg.num_classes}, {cfg.transition}, T={cfg.num_timesteps}, batch "
              f"{cfg.batch_size}, precision {cfg.precision}) on a fake MNIST of 60,000 images")
    say(args, f"  training: {rate:.1f} steps/s over steps {args.log_every}-{args.steps} "
              f"(first {args.log_every} steps, with warm-up: {first:.1f} s)")
    data = R.build_data(cfg)
    torch.manual_seed(cfg.seed)
    net = R.build_model(cfg, data).to(device)
    d3pm = R.build_d3pm(cfg, net, check_inputs=device.type != "cuda").to(device)  # as train()
    os.makedirs(cfg.out, exist_ok=True)
    grid_s = timed(lambda: R.write_samples(cfg, d3pm, net, data, device, "timing"), device)
    say(args, f"  one sample grid ({cfg.num_samples} samples, all T steps, PNG and GIF): "
              f"{grid_s:.1f} s")
    nll_cfg = dataclasses.replace(cfg, eval_images=args.nll_images)
    nll_s = timed(lambda: R.test_bounds(nll_cfg, d3pm, net, data, device), device)
    nll_s *= cfg.eval_images / args.nll_images
    say(args, f"  both test bounds on {cfg.eval_images} images (full bound, null label and "
              f"labels; timed on {args.nll_images}): {nll_s:.1f} s")
    grids = len(range(cfg.eval_every, cfg.train_steps, cfg.eval_every)) + 1  # during, and final
    total = cfg.train_steps / rate + grids * grid_s + nll_s
    say(args, f"{rate:.1f} steps/s; the whole default run ({cfg.train_steps} steps, {grids} "
              f"sample grids, test bounds): about {clock(total)} (checkpoints not counted)")


# ================================================================================================
# Command line
# ================================================================================================

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("cifar", "mnist"))
    p.add_argument("--out", default="runs/gpu_speed", help="run directories and the fake data")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default: cifar 220, mnist 300)")
    p.add_argument("--log-every", type=int, default=None,
                   help="steps per metrics line; the first interval is warm-up (cifar 20, mnist 100)")
    p.add_argument("--model", default="DiT-S/2", help="cifar: the DiT")
    p.add_argument("--batch-size", type=int, default=128, help="cifar: images per step and per sampling batch")
    p.add_argument("--sample-steps", type=int, default=50, help="cifar: timed reverse steps")
    p.add_argument("--data-root", default="", help="mnist: a folder holding MNIST/raw (default: "
                                                    "a fake one written under --out)")
    p.add_argument("--nll-images", type=int, default=128, help="mnist: test images timed for the NLL")
    args = p.parse_args(argv)
    args.steps = args.steps or {"cifar": 220, "mnist": 300}[args.mode]
    args.log_every = args.log_every or {"cifar": 20, "mnist": 100}[args.mode]
    if args.steps < 2 * args.log_every:
        p.error("--steps must be at least twice --log-every (the first interval is warm-up)")
    device = R.pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.txt"), "w"):
        pass
    say(args, f"torch {torch.__version__}, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"))
    {"cifar": cifar, "mnist": mnist}[args.mode](args, device)


if __name__ == "__main__":
    main()
