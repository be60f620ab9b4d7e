"""fieldkit as the reference of TRL's own trainers: real trainers, one or two steps on the CPU.

A tiny Llama from a config, a WordLevel tokenizer built in code, datasets from
``Dataset.from_dict``. With an embedding LoRA, TRL's own "ref" adapter misses the embedding
tensors, so its step-1 KL is not 0; with a snapshot it is exactly 0, as it must be (policy and
reference are the same adapter at step 1)."""

import functools
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import base_model, perturb, word_tokenizer

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
from datasets import Dataset  # noqa: E402

from fieldkit.training import LoraReferenceSnapshot  # noqa: E402
from fieldkit.training.hf import ReferenceSyncCallback  # noqa: E402
from fieldkit.training.trl import SnapshotReference, use_snapshot_reference  # noqa: E402

EMBEDDING = ["q_proj", "v_proj", "embed_tokens"]
NO_EMBEDDING = ["q_proj", "v_proj"]


def _policy(targets=EMBEDDING, seed=1):
    """A PeftModel with a pre-trained (non-zero) adapter: TRL then builds its 'ref' copy."""
    base = base_model(0)
    for config in (base.config, base.generation_config):
        config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    perturb(model, seed, scale=0.05)
    return model


PROMPTS = {"prompt": ["w1 w2 w3", "w4 w5 w6", "w7 w8", "w9 w10 w11"]}
COMMON = dict(
    use_cpu=True,
    max_steps=1,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(kind, tmp_path, *, targets=EMBEDDING, with_eval=False, model=None, **options):
    """A real TRL trainer of ``kind`` over a fresh policy, or over ``model`` (a name, with
    ``peft_config`` among the options); DPO and KTO ``with_eval``: the training data as an
    eval dataset too."""
    peft_config = options.pop("peft_config", None)
    model = _policy(targets) if model is None else model
    common = {**COMMON, "output_dir": str(tmp_path / kind), **options}
    if kind in ("grpo", "rloo"):
        config = (trl.GRPOConfig if kind == "grpo" else trl.RLOOConfig)(
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=4,
            beta=common.pop("beta", 0.1),
            **common,
        )
        cls = trl.GRPOTrainer if kind == "grpo" else trl.RLOOTrainer
        return cls(
            model=model,
            reward_funcs=_reward,
            args=config,
            train_dataset=Dataset.from_dict(PROMPTS),
            processing_class=word_tokenizer(),
            peft_config=peft_config,
        )
    if kind == "dpo":
        data = {
            "prompt": ["w1 w2", "w3 w4"],
            "chosen": [" w5 w6", " w7"],
            "rejected": [" w8", " w9 w10"],
        }
        config, cls = trl.DPOConfig(per_device_train_batch_size=2, **common), trl.DPOTrainer
    else:
        data = {
            "prompt": ["w1 w2", "w3 w4", "w5", "w6 w7"],
            "completion": [" w5 w6", " w7", " w8", " w9"],
            "label": [True, False, True, False],
        }
        config, cls = trl.KTOConfig(per_device_train_batch_size=4, **common), trl.KTOTrainer
    return cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict(data),
        eval_dataset=Dataset.from_dict(data) if with_eval else None,
        processing_class=word_tokenizer(),
        peft_config=peft_config,
    )


def _of_ref(name: str) -> bool:
    return ".ref." in name or name.endswith(".ref")


# What each trainer logs that is exactly 0 when the reference is the policy.
ZERO_AT_STEP_1 = {
    "grpo": ("kl",),
    "rloo": ("kl",),
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins"),
    "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins"),
}


def _train(trainer) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    transformers.logging.set_verbosity_error()


@functools.cache
def _trl_own_step_fails(kind: str, tmp_path: str) -> str | None:
    """Why TRL's own trainer of ``kind``, with no fieldkit in it, cannot take a step here; None
    when it can. (TRL 1.16's KTOTrainer raises torch's CheckpointError in its own
    gradient-checkpointed step on torch < 2.11 with transformers 4.57.)"""
    try:
        _train(_trainer(kind, Path(tmp_path)))
    except torch.utils.checkpoint.CheckpointError as e:
        return (
            f"TRL {trl.__version__}'s own {kind} trainer fails its first step here, without "
            f"fieldkit (torch {torch.__version__}, transformers {transformers.__version__}): "
            f"{str(e).splitlines()[0]}"
        )
    return None


@pytest.fixture
def trl_can_train(tmp_path_factory):
    """Skip, saying why, where TRL's own trainer of the test's kind cannot step at all."""

    def check(kind: str) -> None:
        why = _trl_own_step_fails(kind, str(tmp_path_factory.mktemp(f"own-{kind}")))
        if why is not None:
            pytest.skip(why)

    return check


@pytest.mark.parametrize("kind", sorted(ZERO_AT_STEP_1))
def test_an_online_snapshot_gives_exactly_zero_at_step_1_with_one_adapter(
    kind, tmp_path, trl_can_train
):
    trl_can_train(kind)
    trainer = _trainer(kind, tmp_path)
    model = trainer.model
    assert "ref" in model.peft_config  # TRL's second adapter
    flags = {n: p.requires_grad for n, p in model.named_parameters() if not _of_ref(n)}
    training = model.training
    snap = use_snapshot_reference(trainer)
    assert isinstance(trainer.ref_model, SnapshotReference) and trainer.ref_model.snapshot is snap
    assert list(model.peft_config) == ["default"]
    assert not any(_of_ref(n) for n, _ in model.named_parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training == training
    assert len(snap) == sum(p.requires_grad for p in model.parameters())
    step1 = _train(trainer)[0]
    for key in ZERO_AT_STEP_1[kind]:
        assert step1[key] == 0.0, (key, step1[key])
    if kind == "dpo":
        assert step1["loss"] == pytest.approx(0.693147, abs=1e-4)  # ln 2 (4.x logs 4 digits)


@pytest.mark.parametrize("kind", sorted(ZERO_AT_STEP_1))
def test_trls_own_reference_is_off_at_step_1_with_an_embedding_lora(kind, tmp_path, trl_can_train):
    """The anchor: TRL 1.16's own 'ref' adapter misses the embedding tensors. If a TRL release
    fixes that, this says so, rather than failing silently."""
    trl_can_train(kind)
    step1 = _train(_trainer(kind, tmp_path))[0]
    off = [key for key in ZERO_AT_STEP_1[kind] if step1[key] != 0.0]
    assert off, (
        f"TRL {trl.__version__}'s own reference now gives {ZERO_AT_STEP_1[kind]} == 0 at step 1 "
        "with an embedding LoRA: its 'ref' copy is fixed; update docs/guides/trl.md."
    )


def test_a_from_disk_reference_gives_exactly_zero_at_step_1(tmp_path):
    _policy().save_pretrained(tmp_path / "sft")  # the same adapter the trainer starts from
    trainer = _trainer("grpo", tmp_path)
    snap = LoraReferenceSnapshot.from_disk(trainer.model, tmp_path / "sft")
    assert use_snapshot_reference(trainer, snap) is snap
    assert _train(trainer)[0]["kl"] == 0.0
    other = _trainer("dpo", tmp_path)
    use_snapshot_reference(other, LoraReferenceSnapshot.from_disk(other.model, tmp_path / "sft"))
    assert _train(other)[0]["rewards/margins"] == 0.0


@pytest.mark.parametrize("kind", ["grpo", "dpo"])
def test_without_embeddings_every_logged_figure_equals_trls_own_path(kind, tmp_path):
    """Parity where TRL's copy is right: two steps, every per-step metric the same."""
    options = dict(max_steps=2)
    theirs = _train(_trainer(kind, tmp_path, targets=NO_EMBEDDING, **options))
    trainer = _trainer(kind, tmp_path, targets=NO_EMBEDDING, **options)
    use_snapshot_reference(trainer)
    ours = _train(trainer)
    timing = {"step_time"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in ours] == [
        {k: v for k, v in h.items() if k not in timing} for h in theirs
    ]


def test_only_this_trainer_changes(tmp_path):
    ours, theirs = _trainer("grpo", tmp_path), _trainer("grpo", tmp_path)
    use_snapshot_reference(ours)
    assert theirs.ref_model is None and "ref" in theirs.model.peft_config
    assert _train(theirs)[0]["kl"] != 0.0  # TRL's own path, untouched
    assert _train(ours)[0]["kl"] == 0.0


def test_a_soft_reference_through_reference_sync_callback_inside_trl(tmp_path):
    """TR-DPO for PEFT: alpha=1 every step makes the reference the policy after each step, so
    every step's rewards are 0 again; the snapshot ends equal to the trained policy."""
    trainer = _trainer("dpo", tmp_path, max_steps=3, learning_rate=1e-2)
    snap = use_snapshot_reference(trainer)
    start = {k: v.clone() for k, v in snap.state.items()}
    trainer.add_callback(ReferenceSyncCallback(snap, alpha=1.0, every=1))
    history = _train(trainer)
    assert [h["rewards/margins"] for h in history] == [0.0, 0.0, 0.0]
    live = dict(trainer.model.named_parameters())
    assert all(torch.equal(v, live[k].detach()) for k, v in snap.state.items())
    assert any(not torch.equal(v, start[k]) for k, v in snap.state.items())


# The option matrix: per trainer, the options people set (TRL 1.16), each one at a time.
GRPO_LOSSES = ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
DPO_LOSSES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
COMMON_OPTIONS = {
    "gradient checkpointing": {"gradient_checkpointing": True},
    "bf16": {"bf16": True},
}
OPTIONS = {
    "grpo": {
        **COMMON_OPTIONS,
        "num_iterations=2": {"num_iterations": 2},
        **{f"loss {t}": {"loss_type": t} for t in GRPO_LOSSES},
    },
    "rloo": {**COMMON_OPTIONS, "num_iterations=2": {"num_iterations": 2}},
    "dpo": {
        **COMMON_OPTIONS,
        "padding_free": {"padding_free": True},
        **{f"loss {t}": {"loss_type": [t]} for t in DPO_LOSSES},
        "loss exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},  # EXO needs it
    },
    "kto": {
        **COMMON_OPTIONS,
        **{f"loss {t}": {"loss_type": t} for t in ("kto", "apo_zero_unpaired")},
    },
}
MATRIX = [(kind, name) for kind, options in OPTIONS.items() for name in options]


def _logged(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "step_time"} for h in history]


def _own_run_fails(kind: str, tmp_path, **options) -> str | None:
    """Why TRL's own trainer cannot take a step with ``options`` here (no fieldkit in it)."""
    try:
        return _logged(_train(_trainer(kind, tmp_path, **options))), None
    except Exception as e:  # noqa: BLE001 - reported as the skip's reason
        return None, f"TRL {trl.__version__}'s own {kind} trainer with {options}: {e!r}"[:300]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The base model saved to a directory: what a user passes by name."""
    base = base_model(0)
    for config in (base.config, base.generation_config):
        config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    path = tmp_path_factory.mktemp("base")
    base.save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "option"), MATRIX)
def test_the_option_matrix_by_name_with_a_fresh_adapter_equals_trls_own_run(
    kind, option, tmp_path, base_dir
):
    """A model passed by name with model_init_kwargs and a peft_config: the adapter starts
    equal to the base (peft's default init), so TRL's own reference (the adapter disabled) and
    the snapshot compute the same: every logged figure of two steps, bit for bit."""
    options = dict(
        OPTIONS[kind][option],
        model=base_dir,
        model_init_kwargs={"dtype": torch.float32},
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=EMBEDDING),
        max_steps=2,
        learning_rate=1e-2,
    )
    theirs, why = _own_run_fails(kind, tmp_path / "theirs", **options)
    if why is not None:
        pytest.skip(why)
    trainer = _trainer(kind, tmp_path / "ours", **options)
    assert use_snapshot_reference(trainer) is not None
    assert _logged(_train(trainer)) == theirs


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "option"), MATRIX)
def test_the_option_matrix_with_an_sft_adapter_gives_exactly_zero_at_step_1(kind, option, tmp_path):
    """A PeftModel passed in, holding an SFT adapter with an embedding LoRA: with the snapshot
    the step-1 figure that is 0 when the reference is the policy is exactly 0."""
    options = OPTIONS[kind][option]
    _, why = _own_run_fails(kind, tmp_path / "theirs", **options)
    if why is not None:
        pytest.skip(why)
    trainer = _trainer(kind, tmp_path / "ours", **options)
    use_snapshot_reference(trainer)
    step1 = _train(trainer)[0]
    for key in ZERO_AT_STEP_1[kind]:
        assert step1[key] == 0.0, (key, step1[key])


PRECOMPUTED = {"dpo": ("ref_chosen_logps", "ref_rejected_logps"), "kto": ("ref_logps",)}


@pytest.mark.parametrize("kind", sorted(PRECOMPUTED))
def test_precomputed_reference_log_probs_come_from_the_snapshot(kind, tmp_path, trl_can_train):
    """precompute_ref_log_probs=True: every precomputed value, train and eval, is the
    snapshot's forward (TRL's own, with its 'ref' copy missing the embedding LoRA, is not), and
    the first step sees the reference equal to the policy."""
    trl_can_train(kind)
    options = dict(precompute_ref_log_probs=True, with_eval=True)
    theirs = _trainer(kind, tmp_path / "theirs", **options)
    trainer = _trainer(kind, tmp_path / "ours", **options)
    snap = use_snapshot_reference(trainer)
    assert list(trainer.model.peft_config) == ["default"]
    for split in ("train_dataset", "eval_dataset"):
        ours, own = getattr(trainer, split), getattr(theirs, split)
        plain = ours.remove_columns(list(PRECOMPUTED[kind]))
        loader = torch.utils.data.DataLoader(plain, batch_size=2, collate_fn=trainer.data_collator)
        by_hand = [
            torch.cat(values)
            for values in zip(
                *(trainer.compute_ref_log_probs(trainer.ref_model, b) for b in loader),
                strict=False,
            )
        ]
        for column, expected in zip(PRECOMPUTED[kind], by_hand, strict=False):
            assert torch.equal(torch.tensor(ours[column]), expected), (split, column)
            assert not torch.equal(torch.tensor(own[column]), expected), (split, column)
    assert trainer.ref_model.snapshot is snap
    step1 = _train(trainer)[0]
    for key in ZERO_AT_STEP_1[kind]:
        assert step1[key] == 0.0, (key, step1[key])
    if kind == "dpo":
        assert step1["loss"] == pytest.approx(math.log(2), abs=1e-4)  # 4.x logs 4 digits
    assert _train(theirs)[0][ZERO_AT_STEP_1[kind][0]] != 0.0


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_beta_0_attaches_nothing_says_so_and_trains_as_trls_own(kind, tmp_path):
    """A beta sweep that includes 0 (TRL 1.16's GRPO default): no reference forward there."""
    timing = {"step_time"}
    theirs = [
        {k: v for k, v in h.items() if k not in timing}
        for h in _train(_trainer(kind, tmp_path / "theirs", beta=0.0, max_steps=2))
    ]
    trainer = _trainer(kind, tmp_path / "ours", beta=0.0, max_steps=2)  # seeded as theirs
    adapters, ref_model = list(trainer.model.peft_config), trainer.ref_model
    with pytest.warns(UserWarning, match=rf"{kind.upper()}Trainer with beta=0 .* no snapshot"):
        assert use_snapshot_reference(trainer) is None
    assert list(trainer.model.peft_config) == adapters and trainer.ref_model is ref_model
    ours = [{k: v for k, v in h.items() if k not in timing} for h in _train(trainer)]
    assert ours == theirs


_PRECOMPUTE_UNDER_DEEPSPEED = """
import sys, tempfile
from pathlib import Path
import pytest
import test_trl as T
from fieldkit.training.trl import use_snapshot_reference
options = dict(precompute_ref_log_probs=True, **T.ENGINES["deepspeed-zero2"])
trainer = T._trainer("dpo", Path(tempfile.mkdtemp()), **options)
adapters = list(trainer.model.peft_config)
with pytest.raises(ValueError, match="precompute_ref_log_probs=True under DeepSpeed"):
    use_snapshot_reference(trainer)
assert list(trainer.model.peft_config) == adapters and trainer.ref_model is None
print("refused", flush=True)
import os
os._exit(0)  # as in _SHARDED: gloo can abort in the interpreter's teardown
"""


@pytest.mark.slow
def test_precomputed_log_probs_under_deepspeed_are_refused_by_name():
    """TRL precomputes through a DeepSpeed inference engine of its own there (one rank)."""
    import socket

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "TQDM_DISABLE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run(
        [sys.executable, "-c", _PRECOMPUTE_UNDER_DEEPSPEED],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "refused" in done.stdout, done.stderr[-3000:]


def test_refusals_name_the_problem(tmp_path, monkeypatch):
    trainer = _trainer("grpo", tmp_path)
    with pytest.raises(TypeError, match="another model"):
        use_snapshot_reference(trainer, LoraReferenceSnapshot(_policy()))
    monkeypatch.setattr(trl, "__version__", "1.99.0")
    with pytest.raises(RuntimeError, match=r"TRL 1\.99\.0 .*supported: 1\.16\.x"):
        use_snapshot_reference(trainer)
    monkeypatch.undo()
    assert "ref" in trainer.model.peft_config and trainer.ref_model is None  # nothing changed
    sft = trl.SFTTrainer(
        model=_policy(),
        args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON),
        train_dataset=Dataset.from_dict({"text": ["w1 w2 w3"]}),
        processing_class=word_tokenizer(),
    )
    with pytest.raises(TypeError, match="SFTTrainer is not a trainer"):
        use_snapshot_reference(sft)


def test_a_model_that_is_not_a_peft_model_is_refused(tmp_path):
    base = base_model(0)
    for config in (base.config, base.generation_config):
        config.pad_token_id, config.eos_token_id = 0, 1
    trainer = trl.DPOTrainer(
        model=base,
        ref_model=base_model(0),
        args=trl.DPOConfig(output_dir=str(tmp_path / "plain"), **COMMON),
        train_dataset=Dataset.from_dict({"prompt": ["w1"], "chosen": [" w2"], "rejected": [" w3"]}),
        processing_class=word_tokenizer(),
    )
    with pytest.raises(TypeError, match=r"not a peft\.PeftModel"):
        use_snapshot_reference(trainer)


def test_importing_fieldkit_training_never_imports_trl():
    code = "import fieldkit.training, fieldkit.training.hf, sys; assert 'trl' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# Two ranks of accelerate + DeepSpeed ZeRO-3 or accelerate's FSDP2 plugin, as TRL runs them:
# accelerate prepares the model inside train(), after use_snapshot_reference took the snapshot
# of the whole model. The kind and the engine's options come as JSON in argv[1]; each run says
# how many of the trained model's parameters are sharded (DTensors, or ZeRO-3 partitions).
_SHARDED = """
import json, sys, tempfile
from pathlib import Path
import test_trl as T
from helpers import force_fsdp
from fieldkit.training import _sharding
from fieldkit.training.trl import use_snapshot_reference
kind, options = json.loads(sys.argv[1])
out = {}
for snap in (False, True):
    trainer = T._trainer(kind, Path(tempfile.mkdtemp()), **options)
    print("built", flush=True)  # from here on, an error in the test's own code is a failure
    force_fsdp(trainer)
    print("forced", flush=True)
    if snap:
        use_snapshot_reference(trainer)
    metric = T.ZERO_AT_STEP_1[kind][-1]
    name = "snapshot" if snap else "trl"
    out[name] = T._train(trainer)[0][metric]
    out[name + "_sharded"] = sum(map(_sharding.is_sharded, trainer.model.parameters()))
    print("TRL's own trainer ran", flush=True)  # what failed, if something does, was ours
print(json.dumps(out), flush=True)
# torch 2.13's gloo can abort while the interpreter tears down its threads at exit
# ("terminate called without an active exception"): the work is done, so leave now.
import os
os._exit(0)
"""


ENGINES = {
    "deepspeed-zero2": {
        "deepspeed": {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 2},
        }
    },
    "deepspeed-zero3": {
        "deepspeed": {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3},
        }
    },
    "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ZERO_AT_STEP_1))
@pytest.mark.parametrize("engine", ["deepspeed-zero3", "fsdp2"])
def test_every_trainer_sharded_on_two_ranks_gives_the_snapshot_as_reference(engine, kind):
    """Each of the four trainers on two gloo ranks, really sharded (asserted on every rank):
    the step-1 figure that is 0 when the reference is the policy is exactly 0 with the
    snapshot, on both ranks; TRL's own path beside it is not (its copy misses the embedding
    LoRA)."""
    import json
    import socket

    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env |= {"MASTER_PORT": str(port), "TQDM_DISABLE": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARDED, json.dumps([kind, ENGINES[engine]])],
            cwd=Path(__file__).parent,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for p, (out, err) in zip(ranks, outputs, strict=True):
        theirs = "built" not in out or ("forced" in out and "TRL's own trainer ran" not in out)
        if p.returncode and theirs:  # TRL's own trainer failed to build or to train
            why = err.strip().splitlines()[-1] if err.strip() else "no output"
            pytest.skip(f"TRL's own {kind} trainer under {engine} cannot run here: {why}")
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1], results  # the global figure, on both ranks
    assert results[0]["trl_sharded"] > 0 and results[0]["snapshot_sharded"] > 0, results
    assert results[0]["snapshot"] == 0.0, results
    assert results[0]["trl"] != 0.0, results  # TRL's own "ref" adapter misses the embedding LoRA
