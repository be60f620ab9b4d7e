"""The reference-policy loop under FSDP2: two ranks on CPU (gloo), a tiny Llama it builds itself.

    torchrun --nproc-per-node 2 examples/fsdp2_reference_loop.py [--steps 6]

Each rank holds its shard of the LoRA weights, and of the reference: ``from_disk`` reads only
this rank's rows of the SFT adapter. Each step runs a policy forward, the reference forward
inside ``with reference:`` (the reference's shards copied into FSDP2's shard storage, restored
on exit), a KL-penalised loss and an optimizer step. ``WeightDeltaTracker.delta()`` is a
collective there: every rank calls it and gets the global L2 and max|Δ|, which rank 0 prints
(and every rank checks they agree).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import peft
import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fieldkit.training import LoraReferenceSnapshot, WeightDeltaTracker

VOCAB = 128


def tiny_peft_model(seed: int) -> peft.PeftModel:
    torch.manual_seed(0)  # the same base weights on every rank
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    lora = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    g = torch.Generator().manual_seed(seed)  # a trained-looking adapter: lora_B not zero
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def losses(logits, ref_logits, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token NLL and KL(policy || reference), averaged over the batch."""
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
    )
    return nll, kl


def log_step(step: int, nll, kl, tracker: WeightDeltaTracker) -> None:
    """The global delta (a collective: every rank calls it and gets the same figures), checked
    equal on every rank; rank 0 prints the step's row."""
    l2, max_abs = tracker.delta()
    figures = [None] * dist.get_world_size()
    dist.all_gather_object(figures, (l2, max_abs))
    assert all(f == figures[0] for f in figures), figures
    if step == 0:
        assert kl.item() < 1e-6, kl.item()  # the policy starts as the reference
    if dist.get_rank() == 0:
        print(f"{step:>4} {nll.item():>8.4f} {kl.item():>13.6f} {l2:>15.6f} {max_abs:>10.6f}")


def finish(tracker: WeightDeltaTracker, *lines: str) -> None:
    """The per-tensor diagnosis (``report()`` is a collective too), printed by rank 0 after
    ``lines``; then the process group is torn down once every rank is done with it."""
    report = tracker.report()
    if dist.get_rank() == 0:
        print(*lines, report.diagnosis(), sep="\n")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def main(steps: int, beta: float, lr: float) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        # The SFT adapter, saved once by peft; every rank reads its own shard of it.
        adapter_dir = [os.path.join(tmp, "sft") if rank == 0 else None]
        if rank == 0:
            tiny_peft_model(seed=1).save_pretrained(adapter_dir[0])
        dist.broadcast_object_list(adapter_dir, src=0)

        policy = tiny_peft_model(seed=1)  # starts from the SFT adapter
        mesh = init_device_mesh("cpu", (world,))
        for layer in policy.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        reference = LoraReferenceSnapshot.from_disk(policy, adapter_dir[0])
        dist.barrier()  # every rank has read the file before it goes away

    held = sum(t.numel() for t in reference.state.values())
    total = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    if rank == 0:
        print(f"{world} ranks; rank 0 holds {held:,} of the {total:,} reference values")
        print(f"{'step':>4} {'loss':>8} {'KL(pol||ref)':>13} {'L2 since start':>15} {'max|Δ|':>10}")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    tracker = WeightDeltaTracker(policy)
    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    for step in range(steps):
        batch = torch.randint(0, VOCAB, (4, 16), generator=g)
        logits = policy(batch).logits  # with grad
        with reference:  # the reference's shards swapped in, no grad, restored on exit
            ref_logits = policy(batch).logits
        nll, kl = losses(logits, ref_logits, batch)
        (nll + beta * kl).backward()
        opt.step()
        opt.zero_grad()
        log_step(step, nll, kl, tracker)
    finish(tracker)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    main(args.steps, args.beta, args.lr)
    # torch 2.13's gloo can abort while the interpreter tears down its threads at exit
    # ("terminate called without an active exception"): the work is done, so leave now.
    sys.stdout.flush()
    os._exit(0)
