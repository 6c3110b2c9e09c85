"""Several processes for d3pm_runner.train() under torchrun: one per GPU with NCCL, or gloo on
the CPU (how tests/test_cifar.py runs it).

train() asks its processes for the same few things whether there is one or several (see
`OneProcess` in d3pm_runner.py); this module answers for several and is imported only when
WORLD_SIZE > 1, so d3pm_runner.py alone still trains in one process.

    torchrun --nproc_per_node 8 d3pm_runner_cifar.py --data-root ./data --compile
"""

import os

import torch
import torch.distributed as dist

from d3pm_runner import UsageError


class Processes:
    """This process's rank, the world size and its device; DDP, and reductions over ranks."""

    def __init__(self, cfg):
        if cfg.sample_only or cfg.eval_only:
            raise UsageError("--sample-only and --eval-only run in one process; start them "
                             "without torchrun")
        self.world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    def wrap(self, net):
        """DistributedDataParallel: gradients averaged over ranks in the backward."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def all_min(self, x):
        dist.all_reduce(x, dist.ReduceOp.MIN)
        return x

    def all_mean(self, x):
        dist.all_reduce(x)
        return x / self.world

    def close(self, net, log, finished):
        """At the end of training, check that the replicas are still identical (DDP keeps
        them so; a desync would be a silent bug); then leave the process group."""
        same = True
        if finished:
            flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
            weights = 1 + torch.arange(len(flat), device=flat.device) % 9973
            mine = torch.stack([flat.sum(), (flat * weights).sum()])
            gathered = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(gathered, mine)
            same = all(torch.equal(g, gathered[0]) for g in gathered)
            log(f"weights identical across {len(gathered)} ranks: {same}")
        dist.destroy_process_group()
        if not same:
            raise RuntimeError("DDP replicas diverged: weights differ across ranks")
