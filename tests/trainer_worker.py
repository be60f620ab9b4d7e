"""One rank of a two-rank ``transformers.Trainer`` run on CPU (gloo) under an engine, with
fieldkit's callbacks; started by test_hf.py.

    python tests/trainer_worker.py ENGINE OUT_DIR   (RANK, WORLD_SIZE, MASTER_ADDR/PORT in env)

Three runs on every rank: four steps uninterrupted; the same stopped after its checkpoint at
step 2; and that one resumed. Each asserts the engine really sharded (ZeRO-3 partitions,
DTensor parameters). Rank R writes OUT_DIR/rank<R>.json: per run, the logged delta figures and
the soft reference after each step (gathered whole), for the test to compare.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import transformers
from dist_worker import as_rank
from helpers import force_fsdp, peft_model
from test_hf import _trainer

from fieldkit.training import LoraReferenceSnapshot
from fieldkit.training import _sharding as sharding
from fieldkit.training.hf import PREFIX, ReferenceSyncCallback, WeightDeltaCallback

ZERO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
ENGINES = {
    "zero2": dict(deepspeed={**ZERO, "zero_optimization": {"stage": 2}}),
    "zero3": dict(
        deepspeed={
            **ZERO,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
    ),
    "fsdp2": dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2}),
}


class Recorder(transformers.TrainerCallback):
    """After each step (after ReferenceSyncCallback's update): the soft reference, gathered
    whole; and, at ``stop``, the end of the run (after its checkpoint)."""

    def __init__(self, snap, stop):
        self.snap, self.stop, self.references, self.sharded = snap, stop, {}, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.sharded = sum(map(sharding.is_sharded, model.parameters()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = sharding.named_parameters(model)
        self.references[state.global_step] = {
            n: sharding.gather(params[n], v).tolist() for n, v in self.snap.state.items()
        }
        if state.global_step == self.stop:
            control.should_training_stop = True


def run(engine: str, out: Path, *, stop: int = 0, resume: str | None = None) -> dict:
    model = peft_model("linear", seed=2, r=3).train()
    snap = LoraReferenceSnapshot(model)  # before train(), as the Trainer guide shows
    recorder = Recorder(snap, stop)
    callbacks = [WeightDeltaCallback(), ReferenceSyncCallback(snap, alpha=0.5, every=1), recorder]
    try:  # accelerate's own FSDP set-up, before any callback runs, may refuse a CPU
        options = dict(save_strategy="steps", save_steps=2, **ENGINES[engine])
        trainer = _trainer(out, model, callbacks, **options)
        force_fsdp(trainer)  # accelerate picks plain DDP on CPU ranks unless told
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
    except RuntimeError as e:
        if "is not supported on cpu" not in str(e) or recorder.sharded is not None:
            raise
        return {"skip": f"accelerate cannot set up FSDP on CPU ranks here: {e}"}
    logs = {
        h["step"]: {k: v for k, v in h.items() if k.startswith(PREFIX)}
        for h in trainer.state.log_history
        if "loss" in h
    }
    return {"logs": logs, "references": recorder.references, "sharded": recorder.sharded}


def main() -> None:
    engine, out = sys.argv[1], Path(sys.argv[2])

    def work() -> dict:
        result = {"whole": run(engine, out / "whole")}
        if "skip" not in result["whole"]:
            result["stopped"] = run(engine, out / "parts", stop=2)
            result["resumed"] = run(engine, out / "parts", resume=str(out / "parts/checkpoint-2"))
        return result

    as_rank(work, out, deepspeed=engine.startswith("zero"))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
