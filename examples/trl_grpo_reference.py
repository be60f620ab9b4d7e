"""TRL's GRPOTrainer with an SFT-initialised adapter read from disk as the reference, on a tiny
Llama it builds itself (nothing is downloaded), on the CPU.

1. "SFT": a LoRA adapter on q_proj, v_proj and embed_tokens, saved with ``save_pretrained``.
2. The policy starts from that adapter (``PeftModel.from_pretrained(..., is_trainable=True)``).
   TRL copies it into a second adapter "ref" on the device, but misses the tensors whose names
   end in the adapter name (the embedding LoRA), so its step-1 KL is not 0.
3. One line, ``use_snapshot_reference(trainer, LoraReferenceSnapshot.from_disk(...))``, makes
   every reference forward run the policy with the SFT adapter swapped in from the CPU: the
   "ref" adapter is gone, and the step-1 KL is exactly 0, as it must be.

Run:  python examples/trl_grpo_reference.py [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import peft
import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers

from fieldkit.training import LoraReferenceSnapshot
from fieldkit.training.trl import use_snapshot_reference

WORDS = 61


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=WORDS + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def sft_adapter(directory: str) -> None:
    """Stands for an SFT run: a LoRA adapter with every tensor non-zero, saved by peft."""
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base_model(), lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.save_pretrained(directory)


def reward(completions, **kwargs) -> list[float]:
    """More distinct words, more reward."""
    return [float(len(set(c.split()))) for c in completions]


def trainer(directory: str, steps: int, output_dir: str) -> trl.GRPOTrainer:
    policy = peft.PeftModel.from_pretrained(base_model(), directory, is_trainable=True)
    args = trl.GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        beta=0.1,
        learning_rate=5e-3,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(0, 48, 3)]})
    grpo = trl.GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer(),
    )
    grpo.remove_callback(transformers.PrinterCallback)  # the table below says it shorter
    return grpo


def adapter_bytes(model: torch.nn.Module, adapter: str) -> int:
    return sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if f".{adapter}." in n or n.endswith(f".{adapter}")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sft_adapter(f"{tmp}/sft-init")

        theirs = trainer(f"{tmp}/sft-init", 1, f"{tmp}/theirs")
        ref_bytes = adapter_bytes(theirs.model, "ref")
        theirs.train()
        trl_kl = theirs.state.log_history[0]["kl"]

        ours = trainer(f"{tmp}/sft-init", args.steps, f"{tmp}/ours")
        reference = LoraReferenceSnapshot.from_disk(ours.model, f"{tmp}/sft-init")
        use_snapshot_reference(ours, reference)  # the one line
        print(f"reference: {reference}")
        print(f"adapters on the device: {list(ours.model.peft_config)} (TRL's own: default, ref)")
        ours.train()

    rows = [h for h in ours.state.log_history if "kl" in h]
    print(f"\n{'step':>4}  {'kl':>10}  {'reward':>7}  {'loss':>10}")
    for h in rows:
        print(f"{h['step']:>4}  {h['kl']:>10.3e}  {h['reward']:>7.3f}  {h['loss']:>10.3e}")
    print(f"\nstep-1 KL: {rows[0]['kl']:.4g} with the snapshot; {trl_kl:.4g} with TRL's own 'ref'")
    print(f"device memory saved: one adapter, {ref_bytes / 1024:.1f} KiB here")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
