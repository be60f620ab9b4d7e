"""The reference-policy loop under DeepSpeed ZeRO-3: two ranks on CPU (gloo), a tiny Llama.

    torchrun --nproc-per-node 2 examples/deepspeed_reference_loop.py [--steps 6] [--stage 3]

The snapshot is taken from the SFT adapter on disk *before* ``deepspeed.initialize`` (the order
a Trainer imposes); at its first swap it keeps only this rank's partition of each tensor. Each
step runs a policy forward through the engine, the reference forward inside ``with
reference:`` (the reference's partitions written into DeepSpeed's, restored on exit; called
as ``policy.forward(...)`` so that it stays in the policy's step and DeepSpeed's prefetch
trace survives), a
KL-penalised loss, ``engine.backward`` and ``engine.step``. ``WeightDeltaTracker.delta()`` is a
collective: every rank gets the global L2 and max|Δ|, which rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import deepspeed
import torch
import torch.distributed as dist
from fsdp2_reference_loop import VOCAB, finish, log_step, losses, tiny_peft_model

from fieldkit.training import LoraReferenceSnapshot, WeightDeltaTracker


def main(steps: int, beta: float, lr: float, stage: int) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    policy = tiny_peft_model(seed=1)  # starts from the SFT adapter
    with tempfile.TemporaryDirectory() as tmp:
        # The SFT adapter, saved once by peft; every rank reads it.
        adapter_dir = [os.path.join(tmp, "sft") if rank == 0 else None]
        if rank == 0:
            tiny_peft_model(seed=1).save_pretrained(adapter_dir[0])
        dist.broadcast_object_list(adapter_dir, src=0)
        reference = LoraReferenceSnapshot.from_disk(policy, adapter_dir[0])
        dist.barrier()  # every rank has read the file before it goes away

    total = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, config=config)
    tracker = WeightDeltaTracker(policy)
    if rank == 0:
        print(f"{world} ranks, ZeRO-{stage}")
        print(f"{'step':>4} {'loss':>8} {'KL(pol||ref)':>13} {'L2 since start':>15} {'max|Δ|':>10}")
    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    for step in range(steps):
        batch = torch.randint(0, VOCAB, (4, 16), generator=g)
        logits = engine(batch).logits  # with grad
        with reference:  # this rank's partitions swapped in, no grad, restored on exit
            # Through the model's forward, not engine(...): a second call of the root module
            # would start a new DeepSpeed step and throw away its prefetch trace every step.
            ref_logits = policy.forward(batch).logits
        nll, kl = losses(logits, ref_logits, batch)
        engine.backward(nll + beta * kl)
        engine.step()
        log_step(step, nll, kl, tracker)
    held = sum(t.numel() for t in reference.state.values())
    finish(tracker, f"rank 0 holds {held:,} of the {total:,} reference values")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    args = parser.parse_args()
    main(args.steps, args.beta, args.lr, args.stage)
    sys.stdout.flush()
    os._exit(0)  # as the FSDP2 example: gloo can abort while threads tear down at exit
