"""load_adapter_dict / from_disk against peft itself, on adapters written by save_pretrained."""

import os
import shutil

import peft
import pytest
import torch
from helpers import (
    VARIANTS,
    assert_unchanged,
    base_model,
    fingerprint,
    logits,
    peft_model,
    perturb,
)

from fieldkit.training import LoraReferenceSnapshot, load_adapter_dict


def _save(tmp_path, variant="linear", *, seed=1, adapter_name="default", **lora):
    reference = peft_model(variant, seed=seed, adapter_name=adapter_name, **lora)
    reference.save_pretrained(tmp_path)
    return reference


def _peft_reference_logits(path, variant, adapter_name="default"):
    """What peft itself computes with the saved adapter: the ground truth."""
    loaded = peft.PeftModel.from_pretrained(
        base_model(0, **VARIANTS[variant][1]), path, adapter_name=adapter_name
    )
    return logits(loaded.eval())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_from_disk_reproduces_peft_from_pretrained(tmp_path, variant, mode):
    _save(tmp_path, variant)
    expected_ref = _peft_reference_logits(tmp_path, variant)
    live = peft_model(variant, seed=2)
    expected_live = logits(live)
    assert not torch.allclose(expected_ref, expected_live)  # the two adapters differ
    before = fingerprint(live)

    snap = LoraReferenceSnapshot.from_disk(live, tmp_path, mode=mode)
    assert snap.mode == mode

    assert snap.report.missing == ()
    assert set(snap.report.loaded) == {n for n, p in live.named_parameters() if p.requires_grad}
    with snap:
        torch.testing.assert_close(logits(live), expected_ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(live), expected_live, rtol=0, atol=0)
    assert_unchanged(live, before)


def test_from_disk_leaves_train_mode_flags_and_the_device_alone(tmp_path):
    _save(tmp_path, "linear")
    live = peft_model("linear", seed=2).train()
    flags = {n: p.requires_grad for n, p in live.named_parameters()}
    snap = LoraReferenceSnapshot.from_disk(live, tmp_path)
    with snap:
        assert all(m.training for m in live.modules())  # peft's load_adapter would eval()
    assert all(m.training for m in live.modules())
    assert flags == {n: p.requires_grad for n, p in live.named_parameters()}
    assert list(live.peft_config) == ["default"]  # no second adapter
    assert all(t.device.type == "cpu" for t in snap.state.values())


def test_embedding_base_layer_saved_by_peft_is_skipped_and_reported(tmp_path):
    _save(tmp_path, "embedding")
    state, report = load_adapter_dict(peft_model("embedding", seed=2), tmp_path)
    assert report.skipped == ("base_model.model.model.embed_tokens.base_layer.weight",)
    assert "base_model.model.model.embed_tokens.lora_embedding_A.default" in state
    assert "skipped" in str(report)
    with pytest.raises(ValueError, match=r"strict=True.*embed_tokens\.base_layer\.weight"):
        load_adapter_dict(peft_model("embedding", seed=2), tmp_path, strict=True)


def test_non_default_adapter_name_is_read_from_its_subfolder(tmp_path):
    _save(tmp_path, "linear", adapter_name="policy")
    assert os.path.isfile(tmp_path / "policy" / "adapter_model.safetensors")
    expected_ref = _peft_reference_logits(tmp_path / "policy", "linear", "policy")
    live = peft_model("linear", seed=2, adapter_name="policy")
    expected_live = logits(live)

    snap = LoraReferenceSnapshot.from_disk(live, tmp_path, adapter_name="policy")

    assert snap.report.path == str(tmp_path / "policy" / "adapter_model.safetensors")
    assert all(".policy." in name for name in snap.state)
    with snap:
        torch.testing.assert_close(logits(live), expected_ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(live), expected_live, rtol=0, atol=0)


def test_only_the_named_adapter_is_loaded_when_the_model_has_two(tmp_path):
    _save(tmp_path, "linear")
    live = peft_model("linear", seed=2)
    live.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    live.set_adapter("default")
    state, report = load_adapter_dict(live, tmp_path)
    assert report.loaded and all(".default." in n for n in report.loaded)
    assert report.missing == ()


def test_file_dtype_is_cast_to_the_live_dtype(tmp_path):
    saved = _save(tmp_path, "linear")  # float32 on disk
    live = peft_model("linear", seed=2).to(torch.bfloat16)
    state, _ = load_adapter_dict(live, tmp_path)
    saved_params = dict(saved.named_parameters())
    for name, value in state.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, saved_params[name].detach().to(torch.bfloat16))


def test_a_loaded_state_is_independent_of_the_file_and_sorted(tmp_path):
    _save(tmp_path, "linear")
    state, report = load_adapter_dict(peft_model("linear", seed=2), tmp_path)
    assert list(state) == sorted(state) == list(report.loaded)
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in state.values())


# --- bad input: a clear error, and the model keeps exactly what it had -----------------------


@pytest.fixture
def live():
    model = peft_model("linear", seed=2)
    return model, fingerprint(model)


def _fails(live, path, error, match, **kwargs):
    model, before = live
    with pytest.raises(error, match=match):
        LoraReferenceSnapshot.from_disk(model, path, **kwargs)
    assert_unchanged(model, before)


def test_missing_directory(tmp_path, live):
    _fails(live, tmp_path / "nope", FileNotFoundError, r"nope.*is not a directory")


def test_missing_weights_file(tmp_path, live):
    _fails(live, tmp_path, FileNotFoundError, r"no weights file 'adapter_model\.safetensors'")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_bad_safetensors_file_names_the_path(tmp_path, live, damage):
    _save(tmp_path, "linear")
    path = tmp_path / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(
        {"truncated": raw[: len(raw) // 2], "garbage": b"not a file" * 9, "empty": b""}[damage]
    )
    _fails(live, tmp_path, ValueError, rf"cannot read '{path}' as safetensors")


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, live):
    _save(tmp_path, "linear", r=8)
    os.remove(tmp_path / "adapter_config.json")  # else the config check speaks first
    _fails(
        live, tmp_path, ValueError, r"shape mismatch.*q_proj\.lora_A\.weight.*\(8, 16\).*\(4, 16\)"
    )


def test_config_mismatch_is_an_error(tmp_path, live):
    _save(tmp_path, "linear", lora_alpha=32)
    _fails(live, tmp_path, ValueError, r"lora_alpha: file 32, live 8")


def test_zero_matches_is_always_an_error(tmp_path, live):
    _save(tmp_path, "linear", target_modules=["o_proj"])
    _fails(live, tmp_path, ValueError, r"nothing in .* matches a trainable parameter")


def test_frozen_live_adapter_gets_a_hint(tmp_path):
    _save(tmp_path, "linear")
    frozen = peft.PeftModel.from_pretrained(base_model(0), tmp_path)  # is_trainable=False
    with pytest.raises(ValueError, match=r"frozen.*is_trainable=True"):
        load_adapter_dict(frozen, tmp_path)


def test_strict_lists_missing_parameters(tmp_path):
    _save(tmp_path, "linear", target_modules=["q_proj"])
    live = peft_model("linear", seed=2)  # q_proj and v_proj
    with pytest.warns(UserWarning, match=r"will differ.*v_proj.*not in the file.*strict=True"):
        state, report = load_adapter_dict(live, tmp_path)
    assert report.missing and all("v_proj" in n for n in report.missing)
    with pytest.raises(ValueError, match=r"Missing trainable parameter\(s\): .*v_proj"):
        load_adapter_dict(live, tmp_path, strict=True)


def test_not_a_peft_model_and_unknown_adapter_name(tmp_path):
    _save(tmp_path, "linear")
    with pytest.raises(TypeError, match=r"must be a peft\.PeftModel .*, got LlamaForCausalLM"):
        load_adapter_dict(base_model(0), tmp_path)
    with pytest.raises(ValueError, match=r"no adapter 'ref'; its adapters: 'default'"):
        load_adapter_dict(peft_model("linear", seed=2), tmp_path, adapter_name="ref")


def test_bin_only_adapter_gets_a_hint(tmp_path, live):
    _save(tmp_path, "linear")
    shutil.move(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    _fails(live, tmp_path, FileNotFoundError, r"safe_serialization=True")


def _bias_and_modules_to_save(seed):
    # bias="all" with a modules_to_save layer that has a bias: peft maps two file keys
    # (o_proj.bias and o_proj.modules_to_save.bias) to one live parameter.
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], bias="all", modules_to_save=["o_proj"])
    model = peft.get_peft_model(base_model(0, attention_bias=True), config)
    perturb(model, seed)
    return model.eval()


def test_a_parameter_two_file_keys_map_to_holds_one_slot_and_a_write_is_caught(tmp_path, mode):
    reference = _bias_and_modules_to_save(seed=3)
    reference.save_pretrained(tmp_path)
    expected = logits(reference)
    live = _bias_and_modules_to_save(seed=2)
    snap = LoraReferenceSnapshot.from_disk(live, tmp_path, mode=mode)
    assert sum(len(idx) for _, _, idx in snap._packs) == len(snap) == len(set(snap.state))
    with snap:
        assert torch.equal(logits(live), expected)
    before = fingerprint(live)
    with pytest.raises(RuntimeError, match="written in place inside `with snap:`"):
        with snap:
            for p in live.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    assert_unchanged(live, before)
    if mode == "pointer":  # the write went into the snapshot: refused until re-taken
        with pytest.raises(RuntimeError, match="Re-take"), snap:
            pass


def test_a_file_whose_two_keys_for_one_parameter_disagree_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    _bias_and_modules_to_save(seed=3).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.o_proj.modules_to_save.bias"
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"different values under file keys .*o_proj\.bias"):
        load_adapter_dict(_bias_and_modules_to_save(seed=2), tmp_path)
