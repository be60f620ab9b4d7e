"""Tiny real models (transformers configs, random init, wrapped by real peft) and checks."""

from __future__ import annotations

import contextlib

import peft
import pytest
import torch
import transformers

from fieldkit.training import _kernel

VOCAB = 64
TOKENS = torch.tensor([[1, 5, 9, 2, 33, 17, 8, 63], [4, 4, 12, 40, 2, 7, 0, 11]])

# One entry per peft key form of ANCHORS §1: LoraConfig kwargs, LlamaConfig kwargs.
VARIANTS = {
    "linear": (dict(target_modules=["q_proj", "v_proj"]), {}),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), {}),
    "dora": (dict(target_modules=["q_proj", "v_proj"], use_dora=True), {}),
    "modules_to_save": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), {}),
    "trainable_tokens": (
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9]}),
        {},
    ),
    "bias": (dict(target_modules=["q_proj", "k_proj"], bias="all"), dict(attention_bias=True)),
}


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A tokenizer built in code: the words w0..w60 and three specials, one id each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def force_fsdp(trainer) -> None:
    """accelerate never picks FSDP on CPU ranks: tell it, as a GPU run would have it (its
    real FSDP2 prepare then runs inside train())."""
    if not trainer.args.fsdp:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()  # transformers < 5 sets the plugin up through the environment
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None) or {}
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def base_model(seed: int = 0, **config) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama with random weights; the same seed gives the same base weights."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **config,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_model(variant: str = "linear", *, seed: int, adapter_name: str = "default", **lora):
    """The variant's peft model over base weights of seed 0, every trainable tensor randomised
    by ``seed`` so that two seeds give two clearly different adapters."""
    lora_kwargs, config = VARIANTS[variant]
    model = peft.get_peft_model(
        base_model(0, **config),
        peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **lora_kwargs, **lora}),
        adapter_name=adapter_name,
    )
    perturb(model, seed)
    return model.eval()


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale
                p.add_(noise.to(p.device))


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits for TOKENS (moved to the model's device), on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(TOKENS.to(device)).logits.cpu()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that NaN payloads and -0.0 compare exactly."""
    if t.is_meta:  # offloaded: no values to compare
        return torch.empty(0, dtype=torch.uint8)
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def fingerprint(model: torch.nn.Module) -> dict:
    return {
        n: (p, bits(p).clone(), p.requires_grad, p.dtype, p.device, p.data_ptr())
        for n, p in model.named_parameters()
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    """Every parameter is the same object as before, with the same storage, bits, flag, dtype
    and device."""
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for name, (param, raw, requires_grad, dtype, device, ptr) in before.items():
        assert now[name] is param, f"{name}: parameter object replaced"
        assert param.data_ptr() == ptr, f"{name}: storage replaced"
        assert (param.requires_grad, param.dtype, param.device) == (requires_grad, dtype, device)
        assert torch.equal(bits(param), raw), f"{name}: value changed"


# --- CUDA: host waits -----------------------------------------------------------------------


def count_syncs(fn) -> int:
    """How many times ``fn()`` made the host wait for the GPU: the syncs torch's sync debug mode
    sees (device and stream synchronizations, blocking copies, ``.item()``), plus every
    ``torch.cuda.Event.synchronize()``, which that mode does not see."""
    import unittest.mock
    import warnings

    events = []
    real = torch.cuda.Event.synchronize

    def counted(event):
        events.append(event)
        return real(event)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            unittest.mock.patch.object(torch.cuda.Event, "synchronize", counted),
        ):
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught) + len(events)


# --- the two ways weight_delta computes on the CPU -----------------------------------------

DELTA_PATHS = [
    pytest.param(
        "kernel",
        marks=pytest.mark.skipif(
            _kernel.library() is None, reason=f"no C kernel here: {_kernel.status()}"
        ),
    ),
    "torch",
]
"""Parametrize a test over these, and run its body under :func:`delta_path`."""


@contextlib.contextmanager
def delta_path(path: str):
    """weight_delta and WeightDeltaTracker through the C kernel, or through torch ops."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FIELDKIT_NO_KERNEL", "1" if path == "torch" else "0")
        yield
