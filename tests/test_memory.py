"""What a snapshot keeps between entries, and where its views sit: no device copy outlives
`with snap:`, and every packed view starts at a 256-byte offset, as a tensor of its own would."""

import gc
import weakref

import peft
import torch

import fieldkit.training._snapshot as snapshot_module
from fieldkit.training import LoraReferenceSnapshot, restore, swap_in


class _Odd(torch.nn.Module):
    """Shapes whose LoRA tensors are no multiple of 256 bytes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(33, 17), torch.nn.Linear(17, 5)

    def forward(self, x):
        return self.b(self.a(x))


def _odd_lora(dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=3, target_modules=["a", "b"], init_lora_weights=False)
    return peft.get_peft_model(_Odd(), config).to(dtype)


def test_every_packed_view_starts_at_a_256_byte_offset(mode):
    model = _odd_lora()
    snap = LoraReferenceSnapshot(model, mode=mode)
    starts = {n: v.storage_offset() * v.element_size() for n, v in snap.state.items()}
    assert (
        len(starts) == 4 and len({v.untyped_storage().data_ptr() for v in snap.state.values()}) == 1
    )
    assert all(s % 256 == 0 for s in starts.values()), starts
    x = torch.randn(2, 33, dtype=torch.bfloat16)
    expected = model(x)
    with snap:
        assert torch.equal(model(x), expected)
    displaced = swap_in(model, snap.state, mode=mode)  # the pure swap reads the aligned pack
    assert torch.equal(model(x), expected)
    restore(model, displaced)


def test_the_staged_copy_is_released_at_the_exit(mode, monkeypatch):
    # On the CPU the snapshot is used in place; stand in for a device copy with a clone, as
    # stage() makes on a GPU, and check nothing holds it once the block has left.
    model = _odd_lora(torch.float32)
    snap = LoraReferenceSnapshot(model, mode=mode)
    staged_refs = []
    real_stage = snapshot_module.stage

    def stage(values, packs):
        staged = [v.clone() for v in real_stage(values, packs)]
        staged_refs.extend(weakref.ref(t) for t in staged)
        return staged

    monkeypatch.setattr(snapshot_module, "stage", stage)
    for _ in range(2):
        with snap:
            pass
        gc.collect()
        assert staged_refs and all(r() is None for r in staged_refs), (
            "a staged copy outlived the exit"
        )


def test_from_disk_reads_the_file_straight_into_the_packed_snapshot(tmp_path, monkeypatch):
    """No unpinned copy beside the packed one: a GB10 held both at once (its pinned memory is
    the GPU's). The file's tensors go straight into the snapshot's packed views."""
    model = _odd_lora()
    model.save_pretrained(tmp_path)
    expected = LoraReferenceSnapshot(model).state

    def no_second_copy(*args, **kwargs):
        raise AssertionError("from_disk packed a second copy of what it read")

    monkeypatch.setattr(snapshot_module, "pack", no_second_copy)
    snap = LoraReferenceSnapshot.from_disk(model, tmp_path, strict=True)
    assert len({v.untyped_storage().data_ptr() for v in snap.state.values()}) == 1
    assert all(v.storage_offset() * v.element_size() % 256 == 0 for v in snap.state.values())
    assert snap.state.keys() == expected.keys()
    assert all(torch.equal(snap.state[n], v) for n, v in expected.items())
