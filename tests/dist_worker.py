"""One rank of a 2-process gloo run on CPU, started by test_distributed.py.

    python tests/dist_worker.py SCENARIO OUT_DIR   (RANK, WORLD_SIZE, MASTER_ADDR/PORT in env)

Each scenario asserts on this rank and writes what the ranks must agree on to
OUT_DIR/rank<R>.json; the test compares the two files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TOKENS, bits, logits, peft_model, perturb

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    capture_trainable,
    restore,
    swap_in,
    weight_delta,
)
from fieldkit.training import _sharding as sharding

DEVICE = "cpu"  # "cuda" for the gpu_* scenarios: the same scenario on one GPU over NCCL
R = 3  # LoRA rank 3: lora_A is (3, 16), split 2 + 1 over two ranks (uneven shards)


def _local(p: torch.Tensor) -> torch.Tensor:
    return sharding.local(p)  # FSDP2: the local shard; ZeRO-3: this rank's partition


def _fingerprint(model) -> dict:
    sharding.named_parameters(model)  # FSDP2 keeps the root's unsharded ones after a forward
    return {n: (p, bits(_local(p)).clone()) for n, p in model.named_parameters()}


def _assert_unchanged(model, before: dict) -> None:
    sharding.named_parameters(model)
    for name, p in model.named_parameters():
        assert p is before[name][0], f"{name}: parameter object replaced"
        assert torch.equal(bits(_local(p)), before[name][1]), f"{name}: value changed"


def _grads(model) -> list[torch.Tensor]:
    return [_local(p.grad).clone() for p in model.parameters() if p.requires_grad]


def _step(model, reference=None) -> list[torch.Tensor]:
    """Policy forward, the reference forward in between, backward: the gradients."""
    model.zero_grad(set_to_none=True)
    out = model(TOKENS).logits
    if reference is not None:
        with reference:
            model(TOKENS)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1)).backward()
    return _grads(model)


def _shard(model, device: str = "cpu", per_layer: bool = True, **options) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers if per_layer else []:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def fsdp2(out: Path) -> dict:
    rank = dist.get_rank()
    adapter_dir = out / f"ref-{rank}"  # the reference adapter, unsharded, saved by peft
    peft_model("linear", seed=3, r=R).save_pretrained(adapter_dir)
    expected_ref = logits(peft_model("linear", seed=3, r=R))

    model = peft_model("linear", seed=2, r=R)
    full_state = capture_trainable(model)
    online_unsharded = LoraReferenceSnapshot(model)  # taken before sharding
    unsharded_logits = logits(model)
    _shard(model)
    shards = {n: _local(p).shape for n, p in model.named_parameters() if p.requires_grad}
    assert {s[0] for s in shards.values()} == {(2, 1)[rank], 8}  # lora_A's 3 rows: 2 + 1

    # Sharded and unsharded never mix silently.
    try:
        LoraReferenceSnapshot(model, snapshot=full_state)
        raise AssertionError("a full snapshot was accepted for a sharded model")
    except ValueError as e:
        assert "full (unsharded) tensors" in str(e), e
    # A snapshot taken before fully_shard (as a Trainer takes it) is cut to this rank's shards
    # at its first swap.
    with online_unsharded:
        torch.testing.assert_close(logits(model), unsharded_logits, rtol=1e-6, atol=1e-6)
    assert all(
        t.shape == _local(model.get_parameter(n)).shape for n, t in online_unsharded.state.items()
    )

    figures = {}
    for mode in ("pointer", "copy"):
        expected_online = logits(model)
        online = LoraReferenceSnapshot(model, mode=mode)  # each rank keeps its shard
        disk = LoraReferenceSnapshot.from_disk(model, adapter_dir, mode=mode)
        held = sum(t.numel() for t in disk.state.values())
        assert (
            held
            == sum(s.numel() for s in shards.values())
            < sum(t.numel() for t in full_state.values())
        )
        assert all(disk.state[n].shape == s for n, s in shards.items())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # a training step, different on each rank's shard
                    _local(p).add_(0.01 * (rank + 1))
        live = logits(model)
        before = _fingerprint(model)
        with disk:
            got = logits(model)
        torch.testing.assert_close(got, expected_ref, rtol=1e-6, atol=1e-6)
        with online:
            torch.testing.assert_close(logits(model), expected_online, rtol=0, atol=0)
        _assert_unchanged(model, before)
        torch.testing.assert_close(logits(model), live, rtol=0, atol=0)
        displaced = swap_in(model, disk.state, mode=mode)  # the pure functions, likewise
        torch.testing.assert_close(logits(model), got, rtol=0, atol=0)
        restore(model, displaced)
        _assert_unchanged(model, before)
        # Policy forward -> reference forward -> backward: the gradients are unchanged.
        plain, between = _step(model), _step(model, disk)
        assert all(torch.equal(a, b) for a, b in zip(plain, between, strict=True))
        _assert_unchanged(model, before)
        figures[mode] = float((got - live).abs().max())
        # An all-gather issued before the swap (unshard(async_op=True), or a prefetch that
        # never ran) must not hand the reference forward the policy's weights.
        for module in sharding.fsdp_modules(model):
            module.unshard(async_op=True)
        with disk:
            torch.testing.assert_close(logits(model), got, rtol=0, atol=0)
        torch.testing.assert_close(logits(model), live, rtol=0, atol=0)

    # A soft reference update mixes each rank's shards.
    online = LoraReferenceSnapshot(model)
    ref = {n: v.clone() for n, v in online.state.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                _local(p).add_(1.0)
    online.update_(model, 0.5)
    for n, v in online.state.items():
        expected = 0.5 * ref[n].double() + 0.5 * _local(model.get_parameter(n)).double()
        torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-7)

    # Saving a sharded reference: gathered, one whole adapter from rank 0, read back by shard.
    saved = online.save_pretrained(out / "saved-ref")  # a collective: both ranks call it
    again = LoraReferenceSnapshot.from_disk(model, saved, strict=True)
    assert all(torch.equal(bits(again.state[n]), bits(v)) for n, v in online.state.items())
    whole = {n: sharding.gather(model.get_parameter(n), v) for n, v in online.state.items()}
    unsharded = peft_model("linear", seed=2, r=R)
    with LoraReferenceSnapshot(unsharded, snapshot=whole):
        # peft itself loads the saved adapter in the test's own (undistributed) process: peft
        # 0.19's loader breaks inside an initialised process group with transformers 4.57.
        torch.save(logits(unsharded), out / f"saved-ref-logits-{rank}.pt")

    # Global figures: the delta of the gathered full tensors, on every rank.
    tracker = WeightDeltaTracker(model)
    start_full = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    start_local = capture_trainable(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                g = torch.Generator().manual_seed(rank)
                _local(p).add_(torch.randn(_local(p).shape, generator=g))
    now_full = {n: p.full_tensor() for n in start_full for p in [model.get_parameter(n)]}
    expected = weight_delta(start_full, now_full)
    got = tracker.delta()
    assert math.isclose(got[0], expected[0], rel_tol=1e-6) and got[1] == expected[1], (
        got,
        expected,
    )
    assert weight_delta(start_local, dict(model.named_parameters())) == got
    report = tracker.report()
    for row in report.rows:
        d = now_full[row.name].double() - start_full[row.name].double()
        assert math.isclose(row.l2, float(d.norm()), rel_tol=1e-9), row
        assert row.max_abs == float(d.abs().max()) and row.shape == tuple(d.shape)
    properties = _random_shardings(rank)
    return {"delta": got, "report_l2": report.l2, "swap_max_diff": figures, "props": properties}


def fsdp2_options(out: Path) -> dict:
    """FSDP2 with a bf16 MixedPrecisionPolicy (cast at all-gather) and with
    reshard_after_forward=False (the unsharded weights kept after a forward): the reference
    forward equals a model sharded the same way with the reference's weights, bit for bit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    options = {
        "bf16": dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)),
        "no-reshard": dict(reshard_after_forward=False),
    }
    for name, option in options.items():
        model, reference = (peft_model("linear", seed=s, r=R).to(DEVICE) for s in (2, 3))
        _shard(model, DEVICE, **option)
        _shard(reference, DEVICE, **option)
        expected = logits(reference)
        for mode in ("pointer", "copy"):
            snap = LoraReferenceSnapshot(model, snapshot=capture_trainable(reference), mode=mode)
            live = logits(model)
            before = _fingerprint(model)
            with snap:
                assert torch.equal(logits(model), expected), f"{name}, {mode}: not the reference"
            _assert_unchanged(model, before)
            assert torch.equal(logits(model), live), f"{name}, {mode}: not the policy after"
            # A step first: with reshard_after_forward=False, FSDP2's first gradients after a
            # no-grad forward differ from the next ones, fieldkit or not (torch 2.13, gloo).
            _step(model)
            plain, between = _step(model), _step(model, snap)
            assert all(torch.equal(a, b) for a, b in zip(plain, between, strict=True)), name
    return {"options": sorted(options)}


def _groups(model) -> list:
    """Every FSDP2 parameter group of ``model`` (torch < 2.8: one per module)."""
    states = [m._get_fsdp_state() for m in sharding.fsdp_modules(model)]
    one = [[s._fsdp_param_group] if getattr(s, "_fsdp_param_group", None) else [] for s in states]
    return [
        g for s, o in zip(states, one, strict=True) for g in getattr(s, "_fsdp_param_groups", o)
    ]


def fsdp2_failures(out: Path) -> dict:
    """FSDP2 as real runs live it, in every layout: a body that raises mid-forward (an error,
    a KeyboardInterrupt) leaves no unsharded copy, and the next forward and step are those of
    a twin that raised the same way without a swap, bit for bit; a tracker made before
    fully_shard measures the shards; save_pretrained works whatever FSDP2 holds unsharded, and
    a failed write on rank 0 is an error on every rank."""
    layouts = {
        "root-only": dict(per_layer=False),
        "per-layer": {},
        "no-reshard": dict(reshard_after_forward=False),
        "reshard-to-1": dict(reshard_after_forward=1),
    }
    for layout, options in layouts.items():
        model, twin, reference = (peft_model("linear", seed=s, r=R).to(DEVICE) for s in (2, 2, 3))
        start = capture_trainable(model)
        early = WeightDeltaTracker(model)  # before fully_shard, as a Trainer makes it
        for m in (model, twin, reference):
            _shard(m, DEVICE, **options)
        expected_ref = logits(reference)
        snap = LoraReferenceSnapshot(model, snapshot=capture_trainable(reference))
        optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)}

        def step(m, optimizers=optimizers) -> None:
            optimizers[id(m)].zero_grad(set_to_none=True)
            _loss(m(TOKENS).logits).backward()
            optimizers[id(m)].step()

        step(model)
        step(twin)
        for error in (RuntimeError("CUDA out of memory (simulated)"), KeyboardInterrupt()):

            def fail(module, args, error=error):
                raise error

            hooks = [
                m.base_model.model.model.layers[1]
                .self_attn.q_proj.lora_B["default"]
                .register_forward_pre_hook(fail)
                for m in (model, twin)
            ]
            try:
                with snap:
                    model(TOKENS)
                raise AssertionError("the body's error was lost")
            except type(error):
                pass
            try:
                with torch.no_grad():
                    twin(TOKENS)  # the same failure, without a swap
            except type(error):
                pass
            for hook in hooks:
                hook.remove()
            assert all(g.is_sharded for g in _groups(model)), f"{layout}: an unsharded copy"
            assert torch.equal(logits(model), logits(twin)), f"{layout}: not the policy"
            step(model)
            step(twin)
            _same_partitions(model, twin, f"{layout}: the step after a failed body changed")
        with snap:
            assert torch.equal(logits(model), expected_ref), f"{layout}: not the reference"
        now = {n: model.get_parameter(n).full_tensor().cpu() for n in start}
        got, want = early.delta(), weight_delta(start, now)
        assert math.isclose(got[0], want[0], rel_tol=1e-6) and got[1] == want[1], (got, want)
        # Saving while FSDP2 holds the LoRA parameters unsharded (after a forward).
        model(TOKENS)
        saved = snap.save_pretrained(out / f"saved-{layout}")
        again = LoraReferenceSnapshot.from_disk(model, saved, strict=True)
        assert all(torch.equal(bits(again.state[n]), bits(v)) for n, v in snap.state.items())
    # A write that fails on rank 0 fails on every rank, with no rank left waiting.
    blocker = out / "a-file"
    if dist.get_rank() == 0:
        blocker.write_text("not a directory")
    dist.barrier()
    try:
        snap.save_pretrained(blocker / "saved")
        raise AssertionError("a failed write was not reported")
    except (OSError, RuntimeError) as e:
        assert dist.get_rank() == 0 or "rank 0 could not write" in str(e), e
    return {"layouts": sorted(layouts)}


def one_rank_saves(out: Path) -> dict:
    """save_pretrained of a sharded snapshot called on rank 0 only: an error naming the
    mistake (gloo can tell), not a hang or a peer's "connection reset"."""
    from datetime import timedelta

    sharding.AGREE_TIMEOUT = timedelta(seconds=3)
    model = peft_model("linear", seed=2, r=R)
    _shard(model)
    snap = LoraReferenceSnapshot(model)
    said = ""
    if dist.get_rank() == 0:
        try:
            snap.save_pretrained(out / "saved")
            raise AssertionError("a save on one rank was accepted")
        except RuntimeError as e:
            said = str(e)
            assert "every rank must call it" in said, said
    else:
        time.sleep(2 * sharding.AGREE_TIMEOUT.total_seconds())  # past rank 0's wait
    assert not (out / "saved").exists()
    return {"refused": dist.get_rank() == 0 and bool(said)}


def _random_shardings(rank: int, cases: int = 6) -> list:
    """Property checks over random ranks r (r=1: one rank holds an empty shard of lora_A) and
    random training steps: round trip bit-identical on every rank, global delta equal to that
    of the gathered full tensors. The same seeds on both ranks draw the same cases."""
    out = []
    for case in range(cases):
        g = torch.Generator().manual_seed(1000 + case)
        r = (1, 5)[case] if case < 2 else int(torch.randint(1, 9, (), generator=g))
        mode = ("pointer", "copy")[case % 2]
        model = peft_model("linear", seed=case, r=r)
        _shard(model)
        snap = LoraReferenceSnapshot(model, mode=mode)
        tracker = WeightDeltaTracker(model)
        start = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        scale = float(torch.rand((), generator=g)) * 10 ** int(
            torch.randint(-6, 1, (), generator=g)
        )
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                if p.requires_grad:
                    noise = torch.Generator().manual_seed(100 * case + 10 * rank + i)
                    _local(p).add_(torch.randn(_local(p).shape, generator=noise) * scale)
        before = _fingerprint(model)
        with snap:
            for n, v in snap.state.items():
                assert torch.equal(bits(_local(model.get_parameter(n))), bits(v)), n
        _assert_unchanged(model, before)
        now = {n: model.get_parameter(n).full_tensor() for n in start}
        expected, got = weight_delta(start, now), tracker.delta()
        assert math.isclose(got[0], expected[0], rel_tol=1e-6), (r, got, expected)
        assert got[1] == expected[1], (r, got, expected)
        out.append([r, got[0], got[1]])
    return out


def ddp(out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = peft_model("linear", seed=2)
    wrapped = DistributedDataParallel(model)
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model)
    tracker = WeightDeltaTracker(model)
    perturb(model, seed=7)  # the same "training step" on every rank, as DDP keeps them
    before = _fingerprint(model)
    with snap:
        torch.testing.assert_close(wrapped(TOKENS).logits, expected_ref, rtol=0, atol=0)
    _assert_unchanged(model, before)

    def step(reference=None):
        model.zero_grad(set_to_none=True)
        out = wrapped(TOKENS).logits
        if reference is not None:
            with reference, torch.no_grad():
                wrapped(TOKENS)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1)).backward()
        return _grads(model)

    assert all(torch.equal(a, b) for a, b in zip(step(), step(snap), strict=True))
    delta = tracker.delta()
    assert delta[0] > 0

    # FSDP1 is refused by name.
    from torch.distributed.fsdp import FullyShardedDataParallel

    for orig in (False, True):
        fsdp1 = FullyShardedDataParallel(
            torch.nn.Linear(4, 4), device_id=torch.device("cpu"), use_orig_params=orig
        )
        for use in (LoraReferenceSnapshot, WeightDeltaTracker, capture_trainable):
            try:
                use(fsdp1)
                raise AssertionError(f"FSDP1 was accepted by {use.__name__}")
            except ValueError as e:
                assert "FSDP1 flat parameters" in str(e) and "fully_shard" in str(e), e
    return {"delta": delta}


def _engine(stage: int, model=None, **zero):
    """A DeepSpeed engine of ``stage`` over ``model`` (a fresh policy), with torch's AdamW."""
    import deepspeed

    model = peft_model("linear", seed=2, r=R) if model is None else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **zero},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _engine_step(engine, reference=None) -> None:
    out = engine(TOKENS).logits
    if reference is not None:
        with reference:
            engine(TOKENS)
    engine.backward(F.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1)))
    engine.step()


def zero2(out: Path) -> dict:
    """DeepSpeed ZeRO-2: parameters whole on every rank, the optimizer's master copy its own."""
    rank = dist.get_rank()
    adapter_dir = out / f"ref-{rank}"
    peft_model("linear", seed=3, r=R).save_pretrained(adapter_dir)
    expected_ref = logits(peft_model("linear", seed=3, r=R))
    engine = _engine(2)
    model = engine.module
    expected_online = logits(model)
    online = LoraReferenceSnapshot(model)  # taken on the engine's model
    disk = LoraReferenceSnapshot.from_disk(model, adapter_dir, strict=True)
    tracker = WeightDeltaTracker(model)
    _engine_step(engine)  # a real step moves the policy
    live = logits(model)
    before = _fingerprint(model)
    with disk:
        assert torch.equal(logits(model), expected_ref)
    with online:
        assert torch.equal(logits(model), expected_online)
    _assert_unchanged(model, before)
    assert torch.equal(logits(model), live)
    # A step with a reference forward between the policy forward and backward, against a plain
    # step of an identical engine: the parameters after it are the same, bit for bit.
    twin = _engine(2)
    _engine_step(twin)
    _engine_step(engine, disk)
    _engine_step(twin)
    for (n, a), (_, b) in zip(
        model.named_parameters(), twin.module.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), f"{n}: the reference forward changed the step"
    delta = tracker.delta()
    assert delta[0] > 0
    saved = online.save_pretrained(out / "saved-ref")
    torch.save(expected_online, out / f"saved-ref-logits-{rank}.pt")
    again = LoraReferenceSnapshot.from_disk(model, saved, strict=True)
    assert all(torch.equal(bits(again.state[n]), bits(v)) for n, v in online.state.items())
    return {"delta": delta}


def _whole(model) -> dict:
    """The full trainable tensors of a ZeRO-3 model, gathered the way DeepSpeed does it."""
    import deepspeed

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _zero3(out: Path, **zero) -> dict:
    """DeepSpeed ZeRO-3, every parameter partitioned or the small ones persistent: snapshots
    (online, from disk, taken before deepspeed.initialize), the step, the global delta, saving."""
    import deepspeed

    rank = dist.get_rank()
    adapter_dir = out / f"ref-{rank}"
    peft_model("linear", seed=3, r=R).save_pretrained(adapter_dir)
    expected_ref = logits(peft_model("linear", seed=3, r=R))
    model = peft_model("linear", seed=2, r=R)
    expected_online = logits(model)
    early = LoraReferenceSnapshot(model)  # before deepspeed.initialize, as a Trainer takes it
    engine = _engine(3, model, **zero)
    online = LoraReferenceSnapshot(model)
    disk = LoraReferenceSnapshot.from_disk(model, adapter_dir, strict=True)
    full = sum(math.prod(p.ds_shape) for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in disk.state.values()) < full  # this rank's partitions only
    tracker = WeightDeltaTracker(model)
    start = _whole(model)
    _engine_step(engine)
    live = logits(model)
    cases = [(disk, expected_ref), (online, expected_online), (early, expected_online)]
    for snap, expected in cases * 2:  # the second time round, each is bound already
        with snap:
            torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)
        # Released (after the exit) or gathered again (after a forward): the same binding.
        assert snap._binding.current(), "DeepSpeed freeing a parameter looked like a change"
        assert torch.equal(logits(model), live), "the policy's weights did not come back"
        assert snap._binding.current(), "DeepSpeed gathering a parameter looked like a change"
    # A step with a reference forward between the policy forward and backward, against a plain
    # step of an identical engine: the partitions after it are the same, bit for bit.
    twin = _engine(3, **zero)
    _engine_step(twin)
    _engine_step(engine, disk)
    _engine_step(twin)
    ours, theirs = capture_trainable(model), capture_trainable(twin.module)
    assert all(torch.equal(bits(v), bits(theirs[n])) for n, v in ours.items()), "step changed"
    # The global delta, on every rank, against the gathered full tensors.
    expected = weight_delta(start, _whole(model))
    got = tracker.delta()
    assert math.isclose(got[0], expected[0], rel_tol=1e-6) and got[1] == expected[1], (
        got,
        expected,
    )
    assert math.isclose(tracker.report().l2, expected[0], rel_tol=1e-6)
    # A soft update mixes each rank's partitions; saving gathers one whole adapter.
    ref = {n: v.clone() for n, v in online.state.items()}
    now = capture_trainable(model)
    online.update_(model, 0.5)
    for n, v in online.state.items():
        want = 0.5 * ref[n].double() + 0.5 * now[n].double()
        torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-7)
    online.refresh(model)
    saved = online.save_pretrained(out / "saved-ref")
    torch.save(logits(model), out / f"saved-ref-logits-{rank}.pt")
    again = LoraReferenceSnapshot.from_disk(model, saved, strict=True)
    assert all(torch.equal(bits(again.state[n]), bits(v)) for n, v in online.state.items())
    # Inside GatheredParameters the forward reads the gathered values: refused, nothing changed.
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = _fingerprint(model)
    with deepspeed.zero.GatheredParameters(trainable):
        try:
            with disk:
                raise AssertionError("a swap inside GatheredParameters was accepted")
        except ValueError as e:
            assert "GatheredParameters" in str(e), e
    _assert_unchanged(model, before)
    # Parameters offloaded to the CPU (offload_param) are refused by name, before anything.
    offloaded = _engine(3, offload_param={"device": "cpu"}, **zero).module
    for use in (LoraReferenceSnapshot, WeightDeltaTracker, capture_trainable):
        try:
            use(offloaded)
            raise AssertionError("ZeRO-3 offload_param was accepted")
        except ValueError as e:
            assert "offloaded to the CPU (offload_param)" in str(e), e
    return {"delta": got, "partitioned": sum(not p.ds_persist for p in trainable)}


def _same_partitions(a, b, what: str) -> None:
    ours, theirs = capture_trainable(a), capture_trainable(b)
    assert all(torch.equal(bits(v), bits(theirs[n])) for n, v in ours.items()), what


def _master(engine) -> list[torch.Tensor]:
    """The ZeRO optimizer's fp32 master partitions and its torch optimizer's state, copied."""
    inner = engine.optimizer.optimizer
    masters = [p for g in inner.param_groups for p in g["params"]]
    state = [t for p in masters for t in inner.state.get(p, {}).values() if torch.is_tensor(t)]
    return [t.detach().clone() for t in masters + state]


def _loss(out) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1))


def _step_inside_the_swap_is_refused(engine, twin, snap) -> None:
    """engine.step() inside `with snap:` is refused before it writes; where it belongs, the
    step is a twin's, bit for bit."""
    engine.backward(_loss(engine(TOKENS).logits))
    twin.backward(_loss(twin(TOKENS).logits))
    master, before = _master(engine), capture_trainable(engine.module)
    try:
        with snap:
            engine.step()
        raise AssertionError("engine.step() inside the swap was accepted")
    except RuntimeError as e:
        assert "engine.step()" in str(e) and "swapped in by" in str(e), e
    assert all(torch.equal(a, b) for a, b in zip(master, _master(engine), strict=True))
    assert all(torch.equal(v, capture_trainable(engine.module)[n]) for n, v in before.items())
    engine.step()
    twin.step()
    _same_partitions(engine.module, twin.module, "the refused step changed the next one")


def zero12_step(out: Path) -> dict:
    """ZeRO-1 and ZeRO-2: engine.step() inside the swap refused, the master copy untouched."""
    for stage in (1, 2):
        engine, twin = _engine(stage), _engine(stage)
        _step_inside_the_swap_is_refused(engine, twin, LoraReferenceSnapshot(engine.module))
    return {"stages": [1, 2]}


def zero3_failures(out: Path) -> dict:
    """ZeRO-3 as real runs live it, every parameter partitioned and a prefetch bucket small
    enough that LoRA parameters are in flight between modules: the reference forward after a
    no-grad policy forward, first after a step, and between forward and backward; a body that
    raises mid-forward; engine.step() inside the swap. Against a twin engine that never swaps,
    bit for bit."""
    zero = dict(
        stage3_param_persistence_threshold=0,
        stage3_max_reuse_distance=0,
        stage3_prefetch_bucket_size=200,
    )
    engine, twin = _engine(3, **zero), _engine(3, **zero)
    model = engine.module
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model)
    for _ in range(2):  # DeepSpeed records its trace, then prefetches by it
        _engine_step(engine)
        _engine_step(twin)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def reference() -> None:
        with snap:
            torch.testing.assert_close(logits(model), expected_ref, rtol=1e-6, atol=1e-6)
        assert all(p.ds_status.name == "NOT_AVAILABLE" for p in trainable)

    inflight = 0
    for placement in ("after a no-grad forward", "first", "between"):
        if placement == "after a no-grad forward":  # old log-probs: prefetches left in flight
            with torch.no_grad():
                engine(TOKENS)
                twin(TOKENS)
            inflight += sum(p.ds_status.name == "INFLIGHT" for p in trainable)
        if placement != "between":
            reference()
        out_ = engine(TOKENS).logits
        if placement == "between":
            reference()
        engine.backward(_loss(out_))
        engine.step()
        _engine_step(twin)
        _same_partitions(model, twin.module, f"reference forward {placement}: step changed")
    # Called as model.forward(...) between the policy forward and backward, the reference
    # forward stays inside the policy's step: no step throws DeepSpeed's prefetch trace away.
    # (Called as model(...), a second root forward per step, it is lost at every backward.)
    invalidations = {how: _reference_in_the_step(how, zero) for how in ("forward", "call")}
    assert invalidations["forward"] == 0 < invalidations["call"], invalidations
    # A body that raises mid-forward (what an out-of-memory error does): the user's error comes
    # through, the parameters are partitioned holding the live values, and the next forward and
    # step are the twin's.
    layer = model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"]

    def oom(module, args):
        raise RuntimeError("CUDA out of memory (simulated)")

    hook = layer.register_forward_pre_hook(oom)
    live = capture_trainable(model)
    try:
        with snap:
            model(TOKENS)
        raise AssertionError("the body's error was lost")
    except RuntimeError as e:
        assert "simulated" in str(e), e
    finally:
        hook.remove()
    assert all(p.ds_status.name == "NOT_AVAILABLE" for p in trainable), "left gathered"
    assert all(torch.equal(v, capture_trainable(model)[n]) for n, v in live.items())
    _engine_step(engine)
    _engine_step(twin)
    _same_partitions(model, twin.module, "after a body that raised: step changed")
    assert torch.equal(logits(model), logits(twin.module))
    _step_inside_the_swap_is_refused(engine, twin, snap)
    return {"inflight": inflight}


def _reference_in_the_step(how: str, zero: dict) -> int:
    """Trace invalidations in the last three of five steps of fresh engines with a reference
    forward between the policy forward and backward, called as ``model.forward(...)`` or as
    ``model(...)``; each step checked against a twin that makes no reference forward."""
    engine, twin = _engine(3, **zero), _engine(3, **zero)
    model = engine.module
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model)
    call = model.forward if how == "forward" else model
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    invalidate, count = coordinator._invalidate_trace, [0]

    def counted():
        count[0] += 1
        invalidate()

    coordinator._invalidate_trace = counted  # counted, not changed
    for i in range(5):
        out_ = engine(TOKENS).logits
        with snap:
            reference = call(TOKENS).logits.cpu()
        torch.testing.assert_close(reference, expected_ref, rtol=1e-6, atol=1e-6)
        engine.backward(_loss(out_))
        engine.step()
        _engine_step(twin)
        _same_partitions(model, twin.module, f"reference forward ({how}): step changed")
        if i == 1:  # two steps record the step's pattern (after the forward above)
            count[0] = 0
    return count[0]


def zero3_hpz(out: Path) -> dict:
    """ZeRO++ hierarchical partitions: refused by every entry point, also after a step (when
    DeepSpeed has dropped the secondary partitions)."""
    engine = _engine(3, zero_hpz_partition_size=2, stage3_param_persistence_threshold=0)
    _engine_step(engine)
    model = engine.module
    adapter_dir = out / f"ref-{dist.get_rank()}"
    peft_model("linear", seed=3, r=R).save_pretrained(adapter_dir)
    entries = {
        "LoraReferenceSnapshot": lambda: LoraReferenceSnapshot(model),
        "from_disk": lambda: LoraReferenceSnapshot.from_disk(model, adapter_dir),
        "WeightDeltaTracker": lambda: WeightDeltaTracker(model),
        "capture_trainable": lambda: capture_trainable(model),
    }
    for name, entry in entries.items():
        try:
            entry()
            raise AssertionError(f"{name} accepted hpZ parameters")
        except ValueError as e:
            assert "hierarchical partitions" in str(e), e
    return {"refused": sorted(entries)}


def zero3_quantized(out: Path) -> dict:
    """ZeRO-3 quantized weights (DeepSpeed's quantizer needs CUDA: run as gpu_zero3_quantized):
    refused by every entry point, before anything changes."""
    # DeepSpeed builds its quantizer at first use, and its build cannot read an architecture
    # with a letter ("9.0a", as CUDA images set TORCH_CUDA_ARCH_LIST): this device's, plain.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
    refused = []
    for option in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        model = _engine(3, **{option: True}).module
        for entry in (LoraReferenceSnapshot, WeightDeltaTracker, capture_trainable):
            try:
                entry(model)
                raise AssertionError(f"{option} was accepted by {entry.__name__}")
            except ValueError as e:
                assert "quantized weights" in str(e), e
        refused.append(option)
    return {"refused": refused}


def zero3(out: Path) -> dict:
    return _zero3(out)


def zero3_partitioned(out: Path) -> dict:
    return _zero3(out, stage3_param_persistence_threshold=0)


def nccl(out: Path) -> dict:
    """FSDP2 on NCCL (one GPU per rank): the restore's shard copies queue behind a sleep on the
    current stream; backward's first all-gather (FSDP2's own stream) must see them."""
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    model = peft_model("linear", seed=2, r=R).cuda()
    _shard(model, "cuda")
    snap = LoraReferenceSnapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                _local(p).add_(0.01 * (rank + 1))
    tokens = TOKENS.cuda()

    def step(reference=None):
        model.zero_grad(set_to_none=True)
        out = model(tokens).logits
        if reference is not None:
            with reference:
                model(tokens)
                torch.cuda._sleep(200_000_000)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), tokens.reshape(-1)).backward()
        return [_local(p.grad).cpu() for p in model.parameters() if p.requires_grad]

    plain, between = step(), step(snap)
    assert all(torch.equal(a, b) for a, b in zip(plain, between, strict=True))
    tracker = WeightDeltaTracker(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                _local(p).add_(1.0)
    delta = tracker.delta()  # global: the same on both ranks
    # A NaN on one rank only reaches both (NCCL's MAX may drop it; the SUM carries it).
    lora = next(p for p in model.parameters() if p.requires_grad and _local(p).numel())
    if rank == 1:
        with torch.no_grad():
            _local(lora).view(-1)[0] = math.nan
    assert all(map(math.isnan, tracker.delta())), "a NaN on rank 1 was lost in the reduction"
    return {"delta": delta}


def offload(out: Path) -> dict:
    """FSDP2 with CPUOffloadPolicy on NCCL: shards on the CPU, moved to the GPU by FSDP2's
    non-blocking copies. The reference forward's copies are held behind a sleep (FSDP2's
    all-gather streams wait for the current stream at the root's forward); the restore's CPU
    writes into the shards must wait for them. The delta's reduction must run on the GPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    model = peft_model("linear", seed=2, r=R).cuda()
    _shard(model, "cuda", offload_policy=CPUOffloadPolicy())
    tokens = TOKENS.cuda()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(_local(p).device.type == "cpu" for p in trainable)
    with torch.no_grad():
        expected = model(tokens).logits.cpu()
    snap = LoraReferenceSnapshot(model)
    tracker = WeightDeltaTracker(model)
    torch.cuda.synchronize()
    with torch.no_grad():
        for p in trainable:
            _local(p).add_(0.5 * (rank + 1))
    with snap:
        torch.cuda._sleep(200_000_000)  # FSDP2's copies of the CPU shards queue behind this
        reference = model(tokens).logits
    assert torch.equal(reference.cpu(), expected), "the reference forward read live weights"
    return {"delta": tracker.delta()}  # reduced over NCCL from CPU shards: on the GPU


def main() -> None:
    global DEVICE, TOKENS
    scenario, out = sys.argv[1], Path(sys.argv[2])
    if scenario.startswith("gpu_"):  # the CPU scenario, on this rank's GPU over NCCL
        scenario, DEVICE = scenario.removeprefix("gpu_"), "cuda"
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        TOKENS = TOKENS.cuda()
    backend = "nccl" if DEVICE == "cuda" or scenario in ("nccl", "offload") else "gloo"
    scenarios = {"fsdp2": fsdp2, "fsdp2_options": fsdp2_options, "ddp": ddp}
    scenarios |= {"fsdp2_failures": fsdp2_failures, "one_rank_saves": one_rank_saves}
    scenarios |= {"zero2": zero2, "zero3": zero3, "zero3_partitioned": zero3_partitioned}
    scenarios |= {"zero12_step": zero12_step, "zero3_failures": zero3_failures}
    scenarios |= {"zero3_hpz": zero3_hpz, "zero3_quantized": zero3_quantized}
    scenarios |= {"nccl": nccl, "offload": offload}
    as_rank(
        lambda: scenarios[scenario](out),
        out,
        deepspeed=scenario.startswith("zero"),
        backend=backend,
        barrier=scenario != "one_rank_saves",  # there gloo has closed the pair, as it does
    )


def as_rank(work, out: Path, *, deepspeed: bool, backend: str = "gloo", barrier: bool = True):
    """One rank's life: join the process group (through DeepSpeed for its engines), run
    ``work()``, write its result to ``out/rank<R>.json`` and, with ``barrier``, wait for the
    others (no rank tears gloo down while another still talks to it) before leaving."""
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    try:
        result = work()
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13's gloo can abort while the interpreter tears down its threads at exit
    # ("terminate called without an active exception"): the work is done, so leave now.
    sys.stdout.flush()
    os._exit(0)
