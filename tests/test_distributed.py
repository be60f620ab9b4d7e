"""Two ranks on CPU (gloo), started as two processes: FSDP2 and DDP keep every promise."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.distributed
from helpers import base_model, logits

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch is built without torch.distributed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    scenario: str, out: Path, timeout: int = 300, world: int = 2, worker: Path = WORKER
) -> list[dict]:
    """Start the ranks; a hang fails the test after ``timeout`` seconds instead of stalling."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), scenario, str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: the ranks did not finish in {timeout} s (a hang?)")
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_fsdp2_swaps_shards_and_reports_global_figures(tmp_path):
    rank0, rank1 = _run("fsdp2", tmp_path)
    assert rank0["delta"] == rank1["delta"] and rank0["delta"][0] > 0
    assert rank0["report_l2"] == rank1["report_l2"]
    assert rank0["props"] == rank1["props"] and len(rank0["props"]) == 6
    assert 1 in {r for r, _, _ in rank0["props"]}  # one rank held an empty shard
    # The sharded reference saved from both ranks is one whole adapter that peft reads.
    loaded = peft.PeftModel.from_pretrained(base_model(0), tmp_path / "saved-ref").eval()
    for rank in (0, 1):
        assert torch.equal(logits(loaded), torch.load(tmp_path / f"saved-ref-logits-{rank}.pt"))


@pytest.mark.slow
def test_fsdp2_with_bf16_mixed_precision_or_no_reshard_gives_the_reference_bit_for_bit(tmp_path):
    rank0, rank1 = _run("fsdp2_options", tmp_path)
    assert rank0 == rank1 == {"options": ["bf16", "no-reshard"]}


@pytest.mark.slow
def test_fsdp2_a_body_that_raises_an_early_tracker_and_saving_while_unsharded(tmp_path):
    rank0, rank1 = _run("fsdp2_failures", tmp_path)
    assert rank0 == rank1 and len(rank0["layouts"]) == 4


@pytest.mark.slow
def test_a_sharded_save_called_on_one_rank_only_is_an_error_naming_the_mistake(tmp_path):
    rank0, rank1 = _run("one_rank_saves", tmp_path, timeout=120)
    assert rank0 == {"refused": True} and rank1 == {"refused": False}


@pytest.mark.slow
def test_ddp_works_as_on_one_device_and_fsdp1_is_refused(tmp_path):
    rank0, rank1 = _run("ddp", tmp_path)
    assert rank0["delta"] == rank1["delta"] and rank0["delta"][0] > 0


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')",
)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero2_gives_the_reference_the_step_and_the_saved_adapter(tmp_path):
    rank0, rank1 = _run("zero2", tmp_path)
    assert rank0["delta"] == rank1["delta"] and rank0["delta"][0] > 0
    loaded = peft.PeftModel.from_pretrained(base_model(0), tmp_path / "saved-ref").eval()
    for rank in (0, 1):
        assert torch.equal(logits(loaded), torch.load(tmp_path / f"saved-ref-logits-{rank}.pt"))


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("scenario", ["zero3", "zero3_partitioned"])
def test_deepspeed_zero3_reference_step_delta_and_save_on_partitions(tmp_path, scenario):
    rank0, rank1 = _run(scenario, tmp_path)
    assert rank0["delta"] == rank1["delta"] and rank0["delta"][0] > 0
    assert (rank0["partitioned"] > 0) is (scenario == "zero3_partitioned")
    loaded = peft.PeftModel.from_pretrained(base_model(0), tmp_path / "saved-ref").eval()
    for rank in (0, 1):
        expected = torch.load(tmp_path / f"saved-ref-logits-{rank}.pt")
        torch.testing.assert_close(logits(loaded), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_engine_step_inside_the_swap_is_refused_under_zero1_and_zero2(tmp_path):
    assert _run("zero12_step", tmp_path) == [{"stages": [1, 2]}] * 2


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_prefetches_a_body_that_raises_and_a_step_inside_give_a_twins_run(
    tmp_path,
):
    rank0, rank1 = _run("zero3_failures", tmp_path)
    assert rank0["inflight"] > 0 and rank1["inflight"] > 0, "no prefetch was in flight"


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_hierarchical_partitions_are_refused_at_every_entry(tmp_path):
    rank0, rank1 = _run("zero3_hpz", tmp_path)
    assert rank0 == rank1 and len(rank0["refused"]) == 4


def test_a_zero3_rank_whose_piece_is_all_padding_cuts_nothing_past_the_end(monkeypatch):
    """Three ranks, a one-element tensor: rank 2's padded piece starts past the end."""
    from types import SimpleNamespace

    from fieldkit.training import _zero

    monkeypatch.setattr(_zero.dist, "get_rank", lambda group=None: 2)
    param = SimpleNamespace(ds_tensor=torch.empty(1), ds_numel=1, ds_process_group=None)
    assert _zero.span(param) == (1, 0)
    assert _zero.cut(param, torch.tensor([5.0])).numel() == 0
