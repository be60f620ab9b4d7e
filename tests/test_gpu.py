"""The CUDA paths: one test per way a missing wait or a wrong device would corrupt a figure or
a reference. Each holds the stream with ``torch.cuda._sleep`` so that a missing wait shows every
time, not by chance. Skipped, saying why, where there is no GPU (or fewer than two)."""

import math
import warnings

import pytest
import torch
from helpers import logits, peft_model, perturb

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    capture_trainable,
    delta_report,
    restore,
    swap_in,
    weight_delta,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here"),
]
SLEEP = 200_000_000  # GPU cycles (~0.1 s): long enough that an unwaited copy is read too early


def test_weight_delta_of_a_cuda_before_and_a_cpu_after_waits_for_the_copy():
    n = 1 << 20
    before = {"w": torch.full((n,), 1.0, device="cuda")}
    after = {"w": torch.full((n,), 3.0)}
    torch.cuda._sleep(SLEEP)  # a non-blocking copy to the CPU would land after it is read
    assert weight_delta(before, after) == (2.0 * math.sqrt(n), 2.0)


def test_swap_in_a_cuda_state_into_a_cpu_model_waits_for_the_copy():
    layer = torch.nn.Linear(512, 512)
    state = {"weight": torch.full((512, 512), 2.0, device="cuda")}
    torch.cuda._sleep(SLEEP)
    displaced = swap_in(layer, state)
    try:
        assert torch.equal(layer.weight.detach(), torch.full((512, 512), 2.0))
    finally:
        restore(layer, displaced)


def test_update_waits_for_the_copy_out_of_the_pinned_snapshot():
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model)
    assert all(t.is_pinned() for t in snap.state.values())
    reference = {k: v.clone() for k, v in snap.state.items()}
    perturb(model, seed=7)
    torch.cuda._sleep(SLEEP)  # the copy out of the snapshot queues behind this
    with snap:
        inside = {n: p.detach().clone() for n, p in model.named_parameters() if n in reference}
    snap.update_(model, 1.0)  # a CPU write into the snapshot: must wait for that copy
    torch.cuda.synchronize()
    assert all(torch.equal(inside[n].cpu(), reference[n]) for n in reference)


def test_a_cuda_model_with_a_pinned_snapshot_gives_the_reference_and_restores(mode):
    model = peft_model("linear", seed=2).cuda()
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    expected_live = logits(model)
    with snap:
        assert torch.equal(logits(model), expected_ref)
    assert torch.equal(logits(model), expected_live)


def _syncs(fn) -> int:
    """How many times ``fn()`` made the host wait for the GPU (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_delta_on_cuda_reads_the_device_once_and_equals_the_cpu_figures():
    model = peft_model("linear", seed=2).cuda()
    start = capture_trainable(model)
    tracker = WeightDeltaTracker(model)
    tracker.delta()  # the plan, made once
    perturb(model, seed=7)
    got = []
    assert _syncs(lambda: got.append(tracker.delta())) == 1
    live = {n: p.detach().cpu() for n, p in model.named_parameters() if n in start}
    expected = weight_delta(start, live)
    assert math.isclose(got[0][0], expected[0], rel_tol=1e-5) and got[0][1] == expected[1]
    report = delta_report(start, dict(model.named_parameters()))
    assert math.isclose(report.l2, expected[0], rel_tol=1e-5)


def test_copies_to_the_host_wait_once_per_call_not_once_per_tensor():
    """Each call queues its device-to-host copies (into pinned memory) and waits once; the
    copies land before the call returns."""
    model = peft_model("linear", seed=2).cuda()
    made: dict = {}
    assert _syncs(lambda: made.update(start=capture_trainable(model))) == 1
    assert _syncs(lambda: made.update(tracker=WeightDeltaTracker(model))) == 1
    assert _syncs(lambda: made.update(snap=LoraReferenceSnapshot(model))) == 1
    start, tracker, snap = made["start"], made["tracker"], made["snap"]
    assert len(start) > 4 and all(t.is_pinned() for t in start.values())
    live = {n: p for n, p in model.named_parameters() if n in start}
    assert all(torch.equal(start[n], p.detach().cpu()) for n, p in live.items())
    perturb(model, seed=7)
    assert _syncs(tracker.reset) == 1 and tracker.delta() == (0.0, 0.0)
    assert _syncs(lambda: made.update(report=delta_report(start, live))) == 1
    assert made["report"].max_abs > 0
    with snap:  # queues a copy out of the pinned snapshot, which update_ waits for
        pass
    # At most one wait for that copy and one for the policy's values.
    assert _syncs(lambda: snap.update_(model, 0.5)) <= 2
    assert _syncs(lambda: snap.refresh(model)) <= 1
    assert all(torch.equal(snap.state[n], p.detach().cpu()) for n, p in live.items())


def _pinned_blocks_handed_out() -> int:
    """How many pinned blocks torch's host allocator has handed out in this process so far."""
    stats = torch.cuda.host_memory_stats()
    return next(v for k, v in stats.items() if k.startswith("active_requests") and "allocated" in k)


def test_from_disk_pins_the_snapshot_once(tmp_path):
    """Each tensor read from the file was pinned, and then pinned again when packed: twice the
    pinned memory, which on a GB10 is the GPU's. Now one packed block per (device, dtype)."""
    model = peft_model("linear", seed=2).cuda()
    model.save_pretrained(tmp_path)
    torch.cuda.synchronize()
    before = _pinned_blocks_handed_out()
    snap = LoraReferenceSnapshot.from_disk(model, tmp_path)
    assert all(t.is_pinned() for t in snap.state.values())
    assert len({t.dtype for t in snap.state.values()}) == 1
    assert _pinned_blocks_handed_out() - before == 1  # one (device, dtype): one block


def test_gradients_exact_with_a_reference_forward_between_on_a_busy_stream(mode):
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    tokens = torch.arange(16, device="cuda").reshape(2, 8)
    grads = []
    for with_ref in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(tokens).logits
        if with_ref:
            with snap:
                model(tokens)
                torch.cuda._sleep(SLEEP)  # the restore queues behind this
        torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), tokens.reshape(-1)
        ).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


needs_two = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL, FSDP2, device maps)"
)


@needs_two
def test_a_model_over_two_gpus_swaps_and_measures_on_each(mode):
    model = peft_model("linear", seed=2)
    layers = model.base_model.model.model.layers
    model.cuda(0)
    layers[1].cuda(1)  # as a device_map over two GPUs places it
    snap = LoraReferenceSnapshot(model, mode=mode)
    start = capture_trainable(model)
    tracker = WeightDeltaTracker(model)
    perturb(model, seed=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with snap:
        for n, p in model.named_parameters():
            if n in snap.state:
                assert torch.equal(p.detach().cpu(), snap.state[n])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    live = {n: p.detach().cpu() for n, p in model.named_parameters() if n in start}
    assert tracker.delta()[1] == weight_delta(start, live)[1]


@needs_two
def test_fsdp2_on_nccl_backward_sees_the_restored_weights(tmp_path):
    """Two ranks, FSDP2 on NCCL: the restore's shard copies are queued behind a sleep on the
    current stream; FSDP2's first all-gather in backward runs on its own stream and must still
    see them (the gradients equal a step without the reference forward)."""
    from test_distributed import _run

    results = _run("nccl", tmp_path)
    assert results[0] == results[1]


@needs_two
def test_fsdp2_with_cpu_offload_on_nccl_keeps_the_reference_and_reduces_on_the_gpu(tmp_path):
    """Two ranks, FSDP2 with CPUOffloadPolicy on NCCL: the shards live on the CPU and FSDP2
    moves them to the GPU with non-blocking copies, held here behind a sleep; the restore's
    CPU writes must not overtake them (the reference forward gives the reference), and the
    delta's reduction runs on the GPU (NCCL takes no CPU tensors)."""
    from test_distributed import _run

    results = _run("offload", tmp_path)
    assert results[0] == results[1]
