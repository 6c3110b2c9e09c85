"""Benchmark: what the D3PM diffusion math costs on top of its network.

D3PM (Austin et al. 2021, arXiv:2107.03006) wraps an x_0-network in categorical math over
(B, C, H, W, K) tensors. This script times that math against the network alone, as ratios
measured side by side in one run (absolute times on a shared machine are noise; ratios are not).

    python bench.py --device cuda                                         # the full table
    python bench.py --shapes mnist --batch-size 32 --repeats 5 --threads 1    # quick, CPU (~1.5 min)
    python bench.py --shapes cifar --cifar-model DiT-T/2 --batch-size 8 --threads 1  # CIFAR, CPU
    python bench.py --profile --transitions gaussian --ks 256 --shapes mnist --threads 1

Each configuration is measured for both process classes, the reference d3pm_runner.D3PM (the
paper's form: no target) and d3pm_fast.FastD3PM (the targets below). On the CPU the bench
applies d3pm_fast.tune_cpu() first, as FastD3PM's first call would (--no-cpu-tuning: not).
On a CPU shared with other jobs, --threads 1 keeps the timings stable: with more threads than
free cores, OpenMP's waits can make single ops 10-100x slower at random.

For each transition (uniform, absorbing, gaussian), K and input shape, after warm-up and as
medians over --repeats:
  (a) a full training step: d3pm(x_0, y) -> loss, backward, AdamW step (as train() does it,
      under bf16 autocast on CUDA, range checks off on CUDA and on on CPU; no grad clipping);
  (b) the network's step alone on the same batch, fed x_t ~ q(x_t | x_0): forward, a loss
      that costs ~nothing (the mean of its raw output), backward, the same AdamW step.
      (a) and (b) alternate a, b, a, b, ... so drift hits both alike; a/b is the median of
      the per-pair ratios;
  (c) one ancestral step d3pm.p_sample(x_t, T//2, y) against the forward x0_model(x_t, t, y)
      alone, both under no_grad and without autocast (as sampling runs in d3pm_runner), also
      alternated; samp/fwd is the median of the per-pair ratios;
  (d) nll_bpd_terms on 4 timesteps spread over 1..T with its default batching (up to
      max(B, 256) images per network call), reported as (images x timesteps)/s, and as
      nll/fwd against the network's forwards on those same batches (alternated, paired);
  (e) bytes of the process's own buffers (D3PM.buffers(recurse=False): the network's are not
      counted), always at T = 1000; peak memory: torch.cuda.max_memory_allocated over one step
      of (a) and of (b) on CUDA, or on CPU the process-wide ru_maxrss so far (it only grows).
Targets: a/b <= 1.10 for uniform and absorbing at every K and <= 1.25 for gaussian at K = 256;
samp/fwd <= 1.05 for uniform and absorbing; buffers <= 1 MB for uniform and absorbing (checked
at every K; they grow with K, so K = 256 is the binding case).

Networks: MNIST-sized [B,1,28,28] uses d3pm_runner.ConvNet (--channels), CIFAR-sized
[B,3,32,32] uses dit.dit_from_name(--cifar-model). --profile runs torch.profiler instead of
the table: for each selected (shape, transition, K) it profiles steps (a) and (b), and the
sampling step and the forward, alternately, and lists the top ops by self time (each op's median
over --profile-steps) beside the network-only run; the excess column is the diffusion math.

Sections: set-up | timing | one configuration | profiling | command line.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn

import d3pm_runner as d3
from d3pm_fast import FastD3PM, tune_cpu
from dit import dit_from_name

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}   # (C, H, W)
CLASSES = {"reference": d3.D3PM, "fast": FastD3PM}     # targets apply to the fast class
NUM_LABELS = 10
BUFFER_T = 1000          # buffers are reported at T = 1000 whatever --num-timesteps is
TARGET_AB = {"uniform": 1.10, "absorbing": 1.10, "gaussian": 1.25}  # gaussian: at K = 256 only
TARGET_SAMPLE = 1.05     # uniform and absorbing
TARGET_BUFFER = 2 ** 20  # bytes; uniform and absorbing


# ================================================================================================
# Set-up: network, process, batch
# ================================================================================================

def build(args, cls, shape, transition, K, device):
    """(d3pm, net, optimizer, x_0, y) for one configuration and process class, seeded."""
    torch.manual_seed(args.seed)
    S = K + 1 if absorbing_arg(args, transition) == "mask" else K
    C, H, W = SHAPES[shape]
    if shape == "mnist":
        net = d3.ConvNet(S, K, C, NUM_LABELS, ch=args.channels, num_timesteps=args.num_timesteps,
                         output=args.model_output)
    else:
        net = dit_from_name(args.cifar_model, in_channels=C, num_states=S, num_classes=K,
                            num_labels=NUM_LABELS, num_timesteps=args.num_timesteps,
                            output=args.model_output)
    net = net.to(device)
    d3pm = CLASSES[cls](net, args.num_timesteps, K, transition, model_output=args.model_output,
                        absorbing_state=absorbing_arg(args, transition),
                        check_inputs=device.type != "cuda").to(device)  # as train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as train()
    x_0 = torch.randint(0, K, (args.batch_size, C, H, W), device=device)
    y = torch.randint(0, NUM_LABELS, (args.batch_size,), device=device)
    return d3pm, net, opt, x_0, y


def absorbing_arg(args, transition):
    """D3PM's absorbing_state: "mask" (S = K+1), or None (the grey value K//2, S = K)."""
    return "mask" if transition == "absorbing" and args.absorbing_state == "mask" else None


def buffer_bytes(d3pm):
    """Bytes held by the process's own buffers (betas, ᾱ, stationary; Q and Q̄ for gaussian)."""
    return sum(b.numel() * b.element_size() for b in d3pm.buffers(recurse=False))


def raw_loss(out):
    """A loss on the network's raw output that costs ~nothing: its mean (both heads if logistic)."""
    return out.float().mean() if torch.is_tensor(out) else sum(o.float().mean() for o in out)


def make_steps(d3pm, net, opt, x_0, y, device, t_mid):
    """The four timed closures: (a) full step, (b) network step, (c) sampling step, forward."""
    autocast = d3.autocast_for(device)
    B = x_0.shape[0]
    t = torch.randint(1, d3pm.num_timesteps + 1, (B,), device=device)
    x_t = d3pm.q_sample(x_0, t)                          # (b) is fed this x_t
    tt_mid = torch.full((B,), t_mid, dtype=torch.long, device=device)
    x_mid = d3pm.q_sample(x_0, tt_mid)                   # (c) samples from this x_t

    def full_step():                                     # (a)
        with autocast:
            loss, _ = d3pm(x_0, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def net_step():                                      # (b)
        with autocast:
            loss = raw_loss(net(x_t, t, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample_step():                                   # (c) numerator
        d3pm.p_sample(x_mid, t_mid, y)

    @torch.no_grad()
    def forward():                                       # (c) denominator
        net(x_mid, tt_mid, y)

    return full_step, net_step, sample_step, forward


# ================================================================================================
# Timing
# ================================================================================================

def make_sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternate(fn_a, fn_b, warmup, repeats, sync):
    """Time fn_a and fn_b alternately; returns (median a, median b, median of a_i/b_i) in s."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(fn_a, sync))
        b.append(timed(fn_b, sync))
    return (statistics.median(a), statistics.median(b),
            statistics.median(x / y for x, y in zip(a, b)))


def peak_memory(fn, device, sync):
    """Peak bytes allocated during one call of fn (CUDA), or the process's maxrss so far (CPU)."""
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(device)
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ================================================================================================
# One configuration
# ================================================================================================

def bench_one(args, cls, shape, transition, K, device):
    sync = make_sync(device)
    d3pm, net, opt, x_0, y = build(args, cls, shape, transition, K, device)
    T = args.num_timesteps
    full_step, net_step, sample_step, forward = make_steps(d3pm, net, opt, x_0, y, device,
                                                           t_mid=max(2, T // 2))
    r = {"class": cls, "shape": shape, "transition": transition, "K": K, "B": args.batch_size}
    r["full_s"], r["net_s"], r["a_over_b"] = alternate(full_step, net_step, args.warmup,
                                                      args.repeats, sync)
    r["sample_s"], r["fwd_s"], r["sample_over_fwd"] = alternate(sample_step, forward, args.warmup,
                                                               args.repeats, sync)
    # (d) the bound's terms at 4 timesteps (nll_bpd_terms' default batching: up to
    #     max(B, 256) images per network call), against the network's forwards on those
    #     same batches, alternated
    ts = sorted({round(x) for x in torch.linspace(1, T, 4).tolist()})
    nll = lambda: d3pm.nll_bpd_terms(x_0, y, timesteps=ts)  # noqa: E731
    B, per_call = args.batch_size, max(1, max(args.batch_size, 256) // args.batch_size)
    calls = [(x_0.repeat(n, 1, 1, 1), torch.full((n * B,), T // 2, device=device), y.repeat(n))
             for n in (len(ts[i:i + per_call]) for i in range(0, len(ts), per_call))]

    @torch.no_grad()
    def nll_forwards():
        for x, t, c in calls:
            net(x, t, c)

    nll_s, _, r["nll_over_fwd"] = alternate(nll, nll_forwards, args.warmup, args.repeats, sync)
    r["nll_img_t_per_s"] = B * len(ts) / nll_s
    # (e) buffers at T = 1000 and peak memory
    if T == BUFFER_T:
        r["buffer_bytes"] = buffer_bytes(d3pm)
    else:
        r["buffer_bytes"] = buffer_bytes(CLASSES[cls](nn.Identity(), BUFFER_T, K, transition,
                                                      absorbing_state=absorbing_arg(args, transition)))
    r["peak_a"] = peak_memory(full_step, device, sync)
    r["peak_b"] = peak_memory(net_step, device, sync) if device.type == "cuda" else None
    r.update(targets(r))
    return r


def targets(r):
    """PASS/FAIL (or None where the issue sets no target) for each target column."""
    tr, K = r["transition"], r["K"]
    if r["class"] != "fast":
        return {"ab_target": None, "sample_target": None, "buffer_target": None}
    closed_form = tr in ("uniform", "absorbing")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    return {
        "ab_target": verdict(r["a_over_b"] <= TARGET_AB[tr]) if closed_form or K == 256 else None,
        "sample_target": verdict(r["sample_over_fwd"] <= TARGET_SAMPLE) if closed_form else None,
        "buffer_target": verdict(r["buffer_bytes"] <= TARGET_BUFFER) if closed_form else None,
    }


def print_table(rows, device):
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    mem = "peak a/b MiB" if device.type == "cuda" else "maxrss MiB*"
    head = (f"{'class':9} {'shape':6} {'transition':10} {'K':>4} | {'a ms':>8} {'b ms':>8} {'a/b':>6} {'tgt':>4} | "
            f"{'samp ms':>8} {'fwd ms':>8} {'s/fwd':>6} {'tgt':>4} | {'nll im*t/s':>10} "
            f"{'nll/fwd':>8} | {'buffers':>10} {'tgt':>4} | {mem}")
    print(head)
    print("-" * len(head))
    for r in rows:
        peak = mib(r["peak_a"]) + ("/" + mib(r["peak_b"]) if r["peak_b"] is not None else "")
        print(f"{r['class']:9} {r['shape']:6} {r['transition']:10} {r['K']:>4} | {1e3 * r['full_s']:8.1f} "
              f"{1e3 * r['net_s']:8.1f} {r['a_over_b']:6.2f} {r['ab_target'] or '-':>4} | "
              f"{1e3 * r['sample_s']:8.1f} {1e3 * r['fwd_s']:8.1f} {r['sample_over_fwd']:6.2f} "
              f"{r['sample_target'] or '-':>4} | {r['nll_img_t_per_s']:10.0f} "
              f"{r['nll_over_fwd']:8.2f} | {format_bytes(r['buffer_bytes']):>10} "
              f"{r['buffer_target'] or '-':>4} | {peak}")
    print()
    for col, name in (("ab_target", "a/b <= 1.10 (uniform, absorbing), <= 1.25 (gaussian, K=256)"),
                      ("sample_target", "samp/fwd <= 1.05 (uniform, absorbing)"),
                      ("buffer_target", "buffers <= 1 MB at T=1000 (uniform, absorbing)")):
        checked = [r[col] for r in rows if r[col] is not None]
        overall = "PASS" if all(v == "PASS" for v in checked) else "FAIL"
        print(f"{overall if checked else '-':4}  {name}: {checked.count('PASS')}/{len(checked)} pass")
    if device.type != "cuda":
        print("* maxrss is the whole process's peak resident memory so far (it never decreases).")


def format_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ================================================================================================
# Profiling: which ops of one training step (and one sampling step) are not the network's
# ================================================================================================

def profile_pair(fn_a, fn_b, steps, device, sync):
    """Profile fn_a and fn_b alternately, one step each per profiler session, `steps` times.
    Returns for each a dict {op: (self time in us, calls)} holding each op's median over the
    steps (a median, because on a shared machine noise only ever adds time)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    runs = ([], [])
    for _ in range(steps):
        for fn, out in zip((fn_a, fn_b), runs):
            sync()
            with profile(activities=activities) as prof:
                fn()
                sync()
            out.append({e.key: (getattr(e, key), e.count) for e in prof.key_averages()})
    return tuple({op: (statistics.median(r.get(op, (0.0, 0))[0] for r in out),
                       statistics.median(r.get(op, (0.0, 0))[1] for r in out))
                  for op in set().union(*out)} for out in runs)


def print_profile(title, ops_full, ops_net, rows):
    """Top ops of the full run by self time, with the network-only run's time beside them."""
    total_full = sum(v[0] for v in ops_full.values())
    total_net = sum(v[0] for v in ops_net.values())
    print(f"\n{title}: summed self time {total_full / 1e3:.1f} ms vs network alone "
          f"{total_net / 1e3:.1f} ms (excess {(total_full - total_net) / 1e3:+.1f} ms)")
    print(f"{'op':44} {'full ms':>8} {'calls':>6} {'net ms':>8} {'calls':>6} {'excess ms':>9}")
    for name, (us, calls) in sorted(ops_full.items(), key=lambda kv: -kv[1][0])[:rows]:
        us_net, calls_net = ops_net.get(name, (0.0, 0))
        print(f"{name[:44]:44} {us / 1e3:8.2f} {calls:6.1f} {us_net / 1e3:8.2f} {calls_net:6.1f} "
              f"{(us - us_net) / 1e3:9.2f}")


def profile_one(args, cls, shape, transition, K, device):
    sync = make_sync(device)
    d3pm, net, opt, x_0, y = build(args, cls, shape, transition, K, device)
    full_step, net_step, sample_step, forward = make_steps(
        d3pm, net, opt, x_0, y, device, t_mid=max(2, args.num_timesteps // 2))
    for fn in (full_step, net_step, sample_step, forward) * max(1, args.warmup):
        fn()
    steps = args.profile_steps
    where = "CUDA" if device.type == "cuda" else "CPU"
    print(f"\n=== profile: {cls} {shape} {transition} K={K} B={args.batch_size} T={args.num_timesteps}, "
          f"self {where} time per step, per-op median of {steps} alternated steps ===")
    print_profile("training step (a) vs network step (b)",
                  *profile_pair(full_step, net_step, steps, device, sync), args.profile_rows)
    print_profile("sampling step p_sample vs network forward",
                  *profile_pair(sample_step, forward, steps, device, sync), args.profile_rows)


# ================================================================================================
# Command line
# ================================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--transitions", nargs="+", default=["uniform", "absorbing", "gaussian"],
                   choices=("uniform", "absorbing", "gaussian"))
    p.add_argument("--ks", nargs="+", type=int, default=[2, 16, 256], help="values of K")
    p.add_argument("--shapes", nargs="+", default=["mnist", "cifar"], choices=tuple(SHAPES))
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--num-timesteps", type=int, default=1000, help="T (buffers: always T=1000)")
    p.add_argument("--channels", type=int, default=64, help="ConvNet base width (MNIST shape)")
    p.add_argument("--cifar-model", default="DiT-S/2", help="DiT for the CIFAR shape, e.g. DiT-T/2")
    p.add_argument("--model-output", default="logits", choices=("logits", "logistic"))
    p.add_argument("--absorbing-state", default="mask", choices=("mask", "grey"),
                   help="absorbing: an extra [MASK] state (S = K+1, the runner's default) or K//2")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here as JSON")
    p.add_argument("--classes", nargs="+", default=["reference", "fast"], choices=tuple(CLASSES),
                   help="process classes, each measured on the same configurations")
    p.add_argument("--no-cpu-tuning", action="store_true",
                   help="CPU: skip d3pm_fast.tune_cpu() (denormals flushed, freed memory kept by "
                        "glibc), which FastD3PM makes on its first CPU call")
    p.add_argument("--profile", action="store_true",
                   help="profile each selected (shape, transition, K) instead of the table")
    p.add_argument("--profile-steps", type=int, default=5, help="steps per profile (median per op)")
    p.add_argument("--profile-rows", type=int, default=25, help="ops listed per profile")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA device is available")
    bad = [k for k in args.ks if not 2 <= k <= 256]
    if bad:
        p.error(f"--ks must lie in 2..256, got {bad}")
    if min(args.repeats, args.profile_steps) < 1 or args.warmup < 0 or args.num_timesteps < 2:
        p.error("--repeats and --profile-steps must be >= 1, --warmup >= 0, --num-timesteps >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = d3.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 64
    if args.no_cpu_tuning:
        FastD3PM.tune_cpu_on_first_use = False
    elif device.type == "cpu":  # FastD3PM's first call would: make it so for every row alike
        tune_cpu()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads, tune_cpu "
             f"{'off' if args.no_cpu_tuning else 'on'}")
          + f"; B={args.batch_size}, T={args.num_timesteps}, warmup {args.warmup}, repeats "
          f"{args.repeats}; ConvNet ch={args.channels}, {args.cifar_model}, {args.model_output} "
          f"head, absorbing state {args.absorbing_state}", flush=True)
    start, rows = time.perf_counter(), []
    for shape in args.shapes:
        for transition in args.transitions:
            for K in args.ks:
                for cls in args.classes:
                    if args.profile:
                        profile_one(args, cls, shape, transition, K, device)
                        continue
                    rows.append(bench_one(args, cls, shape, transition, K, device))
                    r = rows[-1]
                    print(f"  done {cls} {shape} {transition} K={K}: a/b {r['a_over_b']:.2f}, samp/fwd "
                          f"{r['sample_over_fwd']:.2f} ({time.perf_counter() - start:.0f} s)",
                          file=sys.stderr, flush=True)
    if rows:
        print()
        print_table(rows, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
