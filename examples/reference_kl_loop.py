"""A bespoke policy-gradient loop with a KL penalty to a frozen SFT reference, on a tiny Llama.

What it shows, end to end, on a model it builds itself (nothing is downloaded):

1. SFT: a few supervised steps on a LoRA adapter, saved with peft's own ``save_pretrained``.
2. RL: the policy starts from that adapter; ``LoraReferenceSnapshot.from_disk`` holds the same
   adapter on the CPU as the reference policy -- no second model, no second adapter on the device.
3. Each step samples completions, scores them, and minimises
   ``-advantage * log p(completion) + beta * KL(policy || reference)``, the reference
   log-probabilities computed inside ``with reference:``, between the policy forward and its
   backward. At step 0 the KL is exactly 0: the reference *is* the SFT adapter.
4. ``WeightDeltaTracker`` proves each step moved the weights (since the start and since the
   previous step), and its ``report()`` ends the run with a per-tensor table.
5. Every ``--sync-every`` steps, a soft reference update (TR-DPO): the snapshot moves
   ``--mixup-alpha`` of the way towards the policy, ``reference.update_(policy, alpha)``.

Run:  python examples/reference_kl_loop.py [--steps 8] [--mixup-alpha 0.2 --sync-every 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import peft
import torch
import transformers

from fieldkit.training import LoraReferenceSnapshot, WeightDeltaTracker

VOCAB, PROMPT_LEN, GEN_LEN = 128, 8, 8
REWARDED = VOCAB // 8  # the reward: how often the policy emits a token below this


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def lora_config() -> peft.LoraConfig:
    return peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )


def sft(adapter_dir: str, steps: int = 40) -> None:
    """Supervised steps on counting sequences (0 1 2 ...), then save_pretrained."""
    model = peft.get_peft_model(tiny_llama(), lora_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    starts = torch.arange(16).unsqueeze(1)
    batch = (starts + torch.arange(PROMPT_LEN + GEN_LEN)) % VOCAB
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(adapter_dir)
    print(f"SFT: {steps} steps, final loss {loss.item():.3f}, adapter saved to {adapter_dir}")


@torch.no_grad()
def sample(model, prompts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    ids = prompts
    for _ in range(GEN_LEN):
        probs = model(ids).logits[:, -1].float().softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def completion_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits that predict each completion token."""
    return model(ids).logits[:, PROMPT_LEN - 1 : -1]


def main(steps: int, beta: float, lr: float, mixup_alpha: float, sync_every: int) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as adapter_dir:
        sft(adapter_dir)
        policy = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dir, is_trainable=True)
        reference = LoraReferenceSnapshot.from_disk(policy, adapter_dir)  # read once, into RAM
    print(f"reference: {reference}")
    print(f"           {reference.report}")

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    since_start = WeightDeltaTracker(policy)
    this_step = WeightDeltaTracker(policy)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (16, PROMPT_LEN), generator=generator)

    print()
    header = f"{'step':>4} {'reward':>7} {'KL(pol||ref)':>13} {'loss':>8}"
    header += f" {'L2 since start':>15} {'max|Δ| start':>13} {'L2 this step':>13}"
    print(header)
    print("-" * len(header))
    for step in range(steps):
        this_step.reset()  # measure this step only
        ids = sample(policy, prompts, generator)
        completion = ids[:, PROMPT_LEN:]
        reward = (completion < REWARDED).float().mean(dim=1)
        advantage = reward - reward.mean()

        policy_logits = completion_logits(policy, ids)  # with grad
        with reference:  # frozen SFT adapter swapped in, no grad, restored on exit
            ref_logits = completion_logits(policy, ids)
        logp = policy_logits.log_softmax(-1)
        ref_logp = ref_logits.log_softmax(-1)
        token_logp = logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()
        loss = -(advantage.unsqueeze(1) * token_logp).mean() + beta * kl
        loss.backward()
        opt.step()
        opt.zero_grad()

        l2, max_abs = since_start.delta()
        step_l2, _ = this_step.delta()
        print(
            f"{step:>4} {reward.mean().item():>7.3f} {kl.item():>13.6f} {loss.item():>8.4f}"
            f" {l2:>15.6f} {max_abs:>13.6f} {step_l2:>13.6f}"
        )
        if step == 0:
            # The reference is the adapter the policy started from: the first KL is exactly 0.
            assert kl.item() == 0.0, kl.item()
        assert step_l2 > 0, "the optimizer step did not move the weights"
        if mixup_alpha and (step + 1) % sync_every == 0:
            reference.update_(policy, mixup_alpha)  # TR-DPO: ref <- (1-a) ref + a policy
            print(f"     reference <- {1 - mixup_alpha:g} * reference + {mixup_alpha:g} * policy")
    print("\nper tensor, since the start:")
    print(since_start.report())
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--beta", type=float, default=0.05, help="weight of the KL penalty")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--mixup-alpha", type=float, default=0.2, help="0: a fixed reference")
    parser.add_argument("--sync-every", type=int, default=4, help="steps between soft updates")
    args = parser.parse_args()
    main(args.steps, args.beta, args.lr, args.mixup_alpha, args.sync_every)
