"""Two CPU slow paths that FastD3PM works around, timed on this machine (README "Speed").

    python scripts/cpu_slow_paths.py            # ~20 s; prints one line per measurement

1. Denormal float32 operands in a matmul split over OpenMP threads. `torch.set_flush_denormal`
   sets only the calling thread; worker threads made before it keep the slow path, until
   `d3pm_fast.tune_cpu()` releases the pool so that it is remade with the setting.
2. torch's CPU exp on arguments whose result is not a normal float32 (below about -87.3),
   against `d3pm_fast._exp_`, which gives 0 there.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ms(f, n=5):
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


def main():
    torch.manual_seed(0)
    # a Gaussian-like case: (32 images x 784 pixels, 256) probabilities, mostly tiny, times Q̄ + eps
    p = torch.softmax(30 * torch.randn(32, 784, 256), -1)
    q = torch.rand(32, 256, 256) * 1e-6 + 1e-6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"bmm, denormals not flushed:                  {ms(lambda: torch.bmm(p, q)):7.1f} ms")
    torch.set_flush_denormal(True)
    print(f"bmm, set_flush_denormal after the pool:      {ms(lambda: torch.bmm(p, q)):7.1f} ms")
    from d3pm_fast import _exp_, tune_cpu
    tune_cpu()
    print(f"bmm, after d3pm_fast.tune_cpu():             {ms(lambda: torch.bmm(p, q)):7.1f} ms")
    for value in (-50.0, -87.0, -88.0, -1000.0, float("-inf")):
        x = torch.full((32 * 784, 256), value)
        print(f"exp of 6.4 M values at {value:>7}: torch {ms(lambda: x.exp()):7.1f} ms, "
              f"_exp_ {ms(lambda: _exp_(x.clone())):5.1f} ms (clone included)")


if __name__ == "__main__":
    main()
