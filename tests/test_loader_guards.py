"""The loader compares what the forward depends on, for every peft tuner type, and a tolerant
load says what it skipped."""

import warnings

import peft
import pytest
import torch
from helpers import base_model, peft_model, perturb

from fieldkit.training import LoraReferenceSnapshot, load_adapter_dict


def _peft(config, seed=1):
    model = peft.get_peft_model(base_model(0), config)
    perturb(model, seed)
    return model.eval()


def test_a_loha_file_with_another_alpha_is_refused(tmp_path):
    _peft(peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path
    )
    live = _peft(peft.LoHaConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"]), seed=2)
    with pytest.raises(ValueError, match=r"alpha: file 8, live 16"):
        LoraReferenceSnapshot.from_disk(live, tmp_path)
    same = _peft(peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=2)
    assert len(LoraReferenceSnapshot.from_disk(same, tmp_path)) > 0


def test_a_pissa_file_into_a_plain_lora_is_refused_but_random_inits_are_alike(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _peft(peft.LoraConfig(init_lora_weights="pissa", **config)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"init_lora_weights: file 'pissa', live True"):
        load_adapter_dict(peft_model("linear", seed=2), tmp_path)
    plain = tmp_path / "plain"
    peft_model("linear", seed=1, init_lora_weights=False).save_pretrained(plain)
    state, _ = load_adapter_dict(peft_model("linear", seed=2, init_lora_weights="gaussian"), plain)
    assert state


def test_a_vera_file_whose_projections_differ_is_refused(tmp_path):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], save_projection=True)
    _peft(peft.VeraConfig(**config)).save_pretrained(tmp_path)
    live = _peft(peft.VeraConfig(**config), seed=2)
    assert len(LoraReferenceSnapshot.from_disk(live, tmp_path)) > 0  # same projections: fine
    with torch.no_grad():
        next(b for n, b in live.named_buffers() if "vera_A" in n).add_(1.0)
    with pytest.raises(ValueError, match=r"buffer\(s\) .*vera_A.* differ"):
        LoraReferenceSnapshot.from_disk(live, tmp_path)


def test_a_tolerant_load_warns_about_keys_of_targeted_modules_it_could_not_use(tmp_path):
    peft_model("linear", seed=1).save_pretrained(tmp_path)  # q_proj and v_proj
    live = peft_model("linear", seed=2, target_modules=["q_proj"])
    with pytest.warns(UserWarning, match=r"v_proj\.lora_A\.weight' \(no such tensor"):
        snap = LoraReferenceSnapshot.from_disk(live, tmp_path)
    assert snap.report.skipped
    with pytest.raises(ValueError, match="strict=True"):
        LoraReferenceSnapshot.from_disk(live, tmp_path, strict=True)


def test_frozen_base_weights_peft_saved_are_skipped_quietly_when_they_match(tmp_path):
    peft_model("embedding", seed=1).save_pretrained(tmp_path)  # saves embed_tokens.base_layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        snap = LoraReferenceSnapshot.from_disk(peft_model("embedding", seed=2), tmp_path)
    assert not [w for w in caught if "load_adapter_dict" in str(w.message)]
    assert snap.report.skipped == ("base_model.model.model.embed_tokens.base_layer.weight",)
    live = peft_model("embedding", seed=2)
    with torch.no_grad():
        live.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"base_layer\.weight' \(differs from the live"):
        LoraReferenceSnapshot.from_disk(live, tmp_path)


def test_prompt_learning_adapters_are_refused_by_name(tmp_path):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(base_model(0), config)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"PROMPT_TUNING adapter \(prompt learning\)"):
        load_adapter_dict(model, tmp_path)
