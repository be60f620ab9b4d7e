"""The CUDA paths: one test per way a missing wait or a wrong device would corrupt a figure or
a reference. Each holds a stream with ``torch.cuda._sleep`` (a side stream, where the default
stream's own order would hide the bug) so that a missing wait shows every time, not by chance.
Skipped, saying why, where there is no GPU (or fewer than two)."""

import importlib.util
import math

import pytest
import torch
from helpers import count_syncs, logits, peft_model, perturb

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
    """The copy out of the pinned snapshot queues on a side stream held by a sleep; the exit
    and update_(model, 0.5) run on the default stream, whose syncs do not cover the side one:
    only the wait for that copy keeps update_'s CPU write from overtaking it."""
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model)
    assert all(t.is_pinned() for t in snap.state.values())
    reference = {k: v.clone() for k, v in snap.state.items()}
    perturb(model, seed=7)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)  # the copy out of the snapshot queues behind this
        snap.__enter__()
        inside = {n: p.detach().clone() for n, p in model.named_parameters() if n in reference}
    snap.__exit__(None, None, None)  # on the default stream
    snap.update_(model, 0.5)  # a CPU write into the snapshot: must wait for that copy
    torch.cuda.synchronize()
    assert all(torch.equal(inside[n].cpu(), reference[n]) for n in reference)


def test_copy_mode_on_a_side_stream_is_ordered_with_the_default_stream():
    """A policy step still queued on the default stream (behind a sleep) when a copy mode swap
    is entered on a side stream: the stash must save the values after it. The restore queues
    on the side stream behind another sleep: a forward on the default stream must see it."""
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model, mode="copy")
    expected_ref = logits(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.detach() + 0.25 for n, p in trainable.items()}  # the step, computed aside
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.25)  # the policy's step, queued on the default stream behind the sleep
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with snap:
            inside = logits(model)
            torch.cuda._sleep(SLEEP)  # the restore's copies queue behind this
    after = logits(model)  # on the default stream
    torch.cuda.synchronize()
    assert torch.equal(inside, expected_ref)
    assert all(torch.equal(p, want[n]) for n, p in trainable.items()), "the step was lost"
    assert torch.equal(after, logits(model)), "the forward after the block read the reference"


def test_device_memory_is_back_to_its_baseline_after_the_block(mode):
    """Pointer mode: the staged device copy is freed at the exit. Copy mode: only the stash,
    one adapter, stays between entries."""
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model, mode=mode)
    nbytes = sum(t.numel() * t.element_size() for t in snap.state.values())
    logits(model)  # whatever a first forward keeps, before the baseline
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for _ in range(3):
        with snap:
            logits(model)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - baseline
        if mode == "pointer":
            assert held == 0, f"{held} bytes outlived the block"
        else:
            assert 0 < held <= nbytes + 1024, f"{held} bytes kept for a {nbytes}-byte stash"


def test_copy_mode_under_cuda_graph_replay_gives_the_reference():
    import peft

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    config = peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.get_peft_model(body, config).cuda().eval()
    x = torch.randn(16, 64, device="cuda")
    snap = LoraReferenceSnapshot(model, mode="copy")
    with torch.no_grad():
        expected_ref = model(x).clone()
        perturb(model, seed=7)
        expected_live = model(x).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture, as torch's docs say
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
    with snap:
        torch.cuda._sleep(SLEEP)
        graph.replay()
        inside = out.clone()
    graph.replay()
    assert torch.equal(inside, expected_ref)
    assert torch.equal(out, expected_live)


def test_a_cuda_model_with_a_pinned_snapshot_gives_the_reference_and_restores(mode):
    model = peft_model("linear", seed=2).cuda()
    expected_ref = logits(model)
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    expected_live = logits(model)
    with snap:
        assert torch.equal(logits(model), expected_ref)
    assert torch.equal(logits(model), expected_live)


def test_delta_on_cuda_reads_the_device_once_and_equals_the_cpu_figures():
    model = peft_model("linear", seed=2).cuda()
    start = capture_trainable(model)
    tracker = WeightDeltaTracker(model)
    tracker.delta()  # the plan, made once
    perturb(model, seed=7)
    got = []
    assert count_syncs(lambda: got.append(tracker.delta())) == 1
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
    assert count_syncs(lambda: made.update(start=capture_trainable(model))) == 1
    assert count_syncs(lambda: made.update(tracker=WeightDeltaTracker(model))) == 1
    assert count_syncs(lambda: made.update(snap=LoraReferenceSnapshot(model))) == 1
    start, tracker, snap = made["start"], made["tracker"], made["snap"]
    assert len(start) > 4 and all(t.is_pinned() for t in start.values())
    live = {n: p for n, p in model.named_parameters() if n in start}
    assert all(torch.equal(start[n], p.detach().cpu()) for n, p in live.items())
    perturb(model, seed=7)
    assert count_syncs(tracker.reset) == 1 and tracker.delta() == (0.0, 0.0)
    assert count_syncs(lambda: made.update(report=delta_report(start, live))) == 1
    assert made["report"].max_abs > 0
    with snap:  # queues a copy out of the pinned snapshot, which update_ waits for
        pass
    # One wait for the policy's values and one for that copy (an event); then none is left.
    assert count_syncs(lambda: snap.update_(model, 0.5)) == 2
    assert count_syncs(lambda: snap.refresh(model)) == 1  # the policy's values only
    torch.cuda.synchronize()
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


def test_a_soft_update_pins_one_block_per_dtype_not_one_per_tensor():
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model)
    perturb(model, seed=7)
    torch.cuda.synchronize()
    before = _pinned_blocks_handed_out()
    snap.update_(model, 0.5)
    assert _pinned_blocks_handed_out() - before == 1  # one (device, dtype): one block


def test_a_resumed_reference_sync_pins_no_second_adapter(tmp_path):
    """The callback's resume path reads the saved reference unpinned and writes it into the
    snapshot in place (it built a second, pinned snapshot to copy from)."""
    import transformers

    from fieldkit.training.hf import ReferenceSyncCallback

    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model)
    saved = {k: v.clone() for k, v in snap.state.items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = transformers.TrainerState(global_step=4)
    snap.save_pretrained(tmp_path / "checkpoint-4" / "fieldkit" / "reference")
    perturb(model, seed=7)
    snap.refresh(model)  # the snapshot moved on; the resume must bring the saved one back
    callback = ReferenceSyncCallback(snap, alpha=0.5, every=2)
    torch.cuda.synchronize()
    before = _pinned_blocks_handed_out()
    callback.on_step_begin(args, state, transformers.TrainerControl(), model=model)
    assert _pinned_blocks_handed_out() == before
    assert all(torch.equal(snap.state[k], v) for k, v in saved.items())


def test_gradients_exact_with_a_reference_forward_between_on_a_side_stream(mode):
    """The reference forward and its restore run on a side stream held by a sleep; backward on
    the default stream must wait for the restore (in copy mode the parameters' own storage
    holds the reference until then)."""
    model = peft_model("linear", seed=2).cuda()
    snap = LoraReferenceSnapshot(model, mode=mode)
    perturb(model, seed=7)
    tokens = torch.arange(16, device="cuda").reshape(2, 8)
    side = torch.cuda.Stream()
    grads = []
    for with_ref in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(tokens).logits
        if with_ref:
            with torch.cuda.stream(side):
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


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not importable here (gpu_check.py adds a .gpu-deps folder if present)",
)


def test_fsdp2_on_one_gpu_a_body_that_raises_an_early_tracker_and_saving_while_unsharded(
    tmp_path,
):
    """The gloo scenario on one GPU over NCCL (a world of one), every layout: after a body
    that raises no unsharded copy is left and the next forward and step are a twin's."""
    from test_distributed import _run

    assert len(_run("gpu_fsdp2_failures", tmp_path, world=1)[0]["layouts"]) == 4


def test_fsdp2_on_one_gpu_with_bf16_mixed_precision_or_no_reshard_is_bit_exact(tmp_path):
    from test_distributed import _run

    assert _run("gpu_fsdp2_options", tmp_path, world=1) == [{"options": ["bf16", "no-reshard"]}]


@needs_deepspeed
def test_deepspeed_zero3_on_one_gpu_prefetches_a_body_that_raises_and_a_step_inside(tmp_path):
    """ZeRO-3 on one GPU over NCCL: DeepSpeed prefetches on its own stream; the swap lands
    those gathers before it writes or releases, at entry and at exit."""
    from test_distributed import _run

    _run("gpu_zero3_failures", tmp_path, world=1)


@needs_deepspeed
def test_deepspeed_zero3_quantized_weights_are_refused_at_every_entry(tmp_path):
    """DeepSpeed's quantizer has no CPU kernel: this refusal can only be seen on a GPU."""
    from test_distributed import _run

    refused = _run("gpu_zero3_quantized", tmp_path, world=1)[0]["refused"]
    assert refused == ["zero_quantized_weights", "zero_quantized_nontrainable_weights"]
