"""Parallelism fieldkit refuses, on one process: each refusal names the parameters, says what to
do, and changes nothing. (FSDP2, DDP, FSDP1 and DeepSpeed ZeRO-2/3 run on two ranks in
test_distributed.py.)"""

import accelerate
import pytest
import torch
from helpers import assert_unchanged, fingerprint, logits, peft_model

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    capture_trainable,
    swap_in,
)

LAYER1 = "base_model.model.model.layers.1"


def test_a_device_map_with_a_layer_offloaded_to_disk_is_refused_by_name(tmp_path):
    model = peft_model("linear", seed=2)
    state = capture_trainable(model)
    expected = logits(model)
    device_map = {
        "base_model.model.model.embed_tokens": "cpu",
        "base_model.model.model.layers.0": "cpu",
        LAYER1: "disk",
        "base_model.model.model.norm": "cpu",
        "base_model.model.model.rotary_emb": "cpu",
        "base_model.model.lm_head": "cpu",
    }
    accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    torch.testing.assert_close(logits(model), expected)  # accelerate itself still works
    before = fingerprint(model)
    first = rf"'{LAYER1}\.self_attn\.q_proj\.lora_A\.default\.weight'"
    match = first + r".* on the 'meta' device.*device_map"
    for attempt in (
        lambda: LoraReferenceSnapshot(model),
        lambda: LoraReferenceSnapshot(model, snapshot=state),
        lambda: WeightDeltaTracker(model),
        lambda: swap_in(model, state, mode="copy"),
    ):
        with pytest.raises(ValueError, match=match):
            attempt()
    assert_unchanged(model, before)
    # Only the offloaded layer is named; the layer that stayed on the CPU is fine.
    layer0 = {n: v for n, v in state.items() if ".layers.0." in n}
    with LoraReferenceSnapshot(model, snapshot=layer0):
        pass
    assert_unchanged(model, before)


def test_the_one_walk_parameter_listing_equals_named_parameters_tied_weights_included():
    from helpers import base_model

    from fieldkit.training import _sharding

    for model in (peft_model("embedding", seed=2), base_model(0, tie_word_embeddings=True)):
        got = list(_sharding.named_parameters(model).items())
        expected = list(model.named_parameters())
        assert [n for n, _ in got] == [n for n, _ in expected]
        assert all(a is b for (_, a), (_, b) in zip(got, expected, strict=True))
