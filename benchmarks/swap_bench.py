"""What a reference swap and a weight delta cost, beside the memory floor and the alternatives.

For each case (a Llama-shaped peft model built from a config, random weights, nothing
downloaded) it times, in one process, interleaved round by round, the median and min over
``--rounds`` rounds after warm-up:

- ``floor``: one contiguous ``copy_`` of the adapter's bytes (both buffers filled first; on
  CUDA a pinned host-to-device copy, the copy a CPU-held snapshot has to make);
- the round trip "swap the reference in, restore the policy", with no forward in between, for
  fieldkit (each mode, and the pure functions) and what users reach for instead: a per-tensor
  Python loop, ``torch._foreach_copy_``, ``torch.func.functional_call``'s swap, tensordict
  ``to_module`` (when installed), peft with two adapters and ``set_adapter`` there and back,
  ``load_state_dict(strict=False)`` and peft's ``set_peft_model_state_dict``;
- the weight delta: ``WeightDeltaTracker.delta()``, ``weight_delta`` on dicts, the tracker
  without the C kernel (torch ops, as where no compiler can build it), a naive per-tensor
  loop; with the peak of extra tensor memory one call allocates;
- one forward pass (batch 4 x 64 tokens), for scale.

Every method is checked before it is timed: inside the swap the model gives the reference's
logits exactly, after it the policy's, and every delta agrees with a float64 computation.
Then a sweep over LoRA ranks gives the plot of round-trip time against adapter size.

Run it from the repository root (``pip install -e ".[bench]"`` first)::

    python benchmarks/swap_bench.py            # the full run, a few minutes on 2 CPU cores
    python benchmarks/swap_bench.py --runs 3   # three whole runs: medians and their spread
    python benchmarks/swap_bench.py --quick    # tiny shapes, few rounds: a smoke run

It prints a table (ratios to the floor timed in the same table's rounds, and to one forward)
and writes ``swap_bench.json`` and ``swap_bench.png`` to ``--out`` (default
``benchmarks/results``; ``benchmarks/results-quick`` for ``--quick``). It runs on CUDA, with
CUDA-event timing, when a GPU is present (``--device`` to choose).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import peft
import torch
import transformers

from fieldkit.training import (
    LoraReferenceSnapshot,
    WeightDeltaTracker,
    _kernel,
    capture_trainable,
    restore,
    swap_in,
    weight_delta,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The ANCHORS §4 shape: 448 LoRA tensors, the tensor count of a 7B Llama.
FULL = dict(layers=32, hidden=1024, intermediate=2816)
SMALL = dict(layers=4, hidden=256, intermediate=704)
TINY = dict(layers=2, hidden=64, intermediate=128)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- the model and the reference ---------------------------------------------------------


def build_base(shape: dict, dtype: torch.dtype, device: str) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["hidden"] // 64,
        num_key_value_heads=shape["hidden"] // 64,
        max_position_embeddings=128,
    )
    with torch.device(device):  # built where it runs: a 7B-shaped base never touches the CPU
        return transformers.LlamaForCausalLM(cfg).to(dtype=dtype).eval()


def lora_config(r: int) -> peft.LoraConfig:
    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS)


def add_lora(base, r: int) -> tuple[peft.PeftModel, dict[str, torch.Tensor]]:
    """The policy (random LoRA weights) and a reference that differs from it everywhere."""
    model = peft.get_peft_model(base, lora_config(r))
    g = torch.Generator().manual_seed(r)
    ref = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                ref[name] = (torch.randn(p.shape, generator=g) * 0.02).to(p.dtype)
    return model, ref


# --- timing ------------------------------------------------------------------------------


class Timer:
    """Wall time on the CPU; CUDA events on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e6


def interleaved(fns: dict[str, Callable], timer: Timer, rounds: int, warmup: int = 3) -> dict:
    """Median and min ms per function, timed round by round so drift hits every one alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + rounds):
        for name, fn in fns.items():
            ms = timer(fn)
            if i >= warmup:
                samples[name].append(ms)
    return {n: (statistics.median(s), min(s)) for n, s in samples.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop to file descriptor 2; hide that."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """The most tensor memory ``fn`` holds at once beyond what existed before it ran."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them, frees come as "[memory]" events.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    now = peak = 0
    for e in events:
        now += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def pinned_bytes() -> int | None:
    """Bytes torch's pinned host allocator has handed out and not taken back (on a GB10 they
    are the GPU's memory too); None where this torch does not say."""
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()
    keys = [k for k in stats if k.startswith("allocated_bytes") and k.endswith("current")]
    return int(stats[keys[0]]) if keys else None


def held_memory(make: Callable[[], object], device: str) -> dict:
    """What the object ``make()`` returns keeps: device bytes (the caching allocator's) and
    pinned host bytes, beside each other; None where there is no GPU."""
    if not device.startswith("cuda"):
        return {"device_bytes": None, "pinned_bytes": None}
    torch.cuda.synchronize()
    device0, pinned0 = torch.cuda.memory_allocated(), pinned_bytes()
    kept = make()  # noqa: F841 - held while measured
    torch.cuda.synchronize()
    pinned = pinned_bytes()
    return {
        "device_bytes": torch.cuda.memory_allocated() - device0,
        "pinned_bytes": None if pinned is None else pinned - pinned0,
    }


# --- the round-trip methods: each gives (enter, exit) ------------------------------------


def swap_methods(model, ref: dict[str, torch.Tensor], r: int) -> dict[str, tuple]:
    params = {n: model.get_parameter(n) for n in ref}
    on_device = {n: v.to(params[n].device) for n, v in ref.items()}
    methods: dict[str, tuple] = {}

    for mode in ("pointer", "copy"):
        snap = LoraReferenceSnapshot(model, snapshot=ref, mode=mode)
        methods[f"fieldkit snapshot, mode={mode!r}"] = (
            snap.__enter__,
            lambda snap=snap: snap.__exit__(None, None, None),
        )
    # The opt-in debugging check (a copy at entry, a bit-for-bit compare at exit).
    snap = LoraReferenceSnapshot(model, snapshot=ref, check_writes=True)
    methods["fieldkit snapshot, mode='pointer', check_writes=True"] = (
        snap.__enter__,
        lambda: snap.__exit__(None, None, None),
    )

    held: dict = {}
    methods["fieldkit swap_in + restore (functions)"] = (
        lambda: held.__setitem__("fn", swap_in(model, on_device)),
        lambda: restore(model, held.pop("fn")),
    )

    def loop_in():
        held["loop"] = [p.detach().clone() for p in params.values()]
        for p, v in zip(params.values(), on_device.values(), strict=True):
            p.data.copy_(v)

    def loop_out():
        for p, v in zip(params.values(), held.pop("loop"), strict=True):
            p.data.copy_(v)

    methods["per-tensor loop, clone + copy_"] = (loop_in, loop_out)

    stash = [torch.empty_like(p) for p in params.values()]
    datas = [p.data for p in params.values()]
    values = list(on_device.values())

    def foreach_in():
        torch._foreach_copy_(stash, datas)
        torch._foreach_copy_(datas, values)

    methods["torch._foreach_copy_ (stash, load, restore)"] = (
        foreach_in,
        lambda: torch._foreach_copy_(datas, stash),
    )

    def func_in():
        held["func"] = torch.nn.utils.stateless._reparametrize_module(model, on_device)
        held["func"].__enter__()

    methods["torch.func.functional_call's swap"] = (
        func_in,
        lambda: held.pop("func").__exit__(None, None, None),
    )

    try:
        from tensordict import TensorDict
    except ImportError:
        methods["tensordict to_module"] = "skipped: tensordict is not installed"
    else:
        td = TensorDict(on_device).unflatten_keys(".")
        methods["tensordict to_module"] = (
            lambda: held.__setitem__("td", td.to_module(model, return_swap=True)),
            lambda: held.pop("td").to_module(model),
        )

    model.add_adapter("ref", lora_config(r))
    with torch.no_grad():
        for n, v in on_device.items():
            model.get_parameter(n.replace(".default.", ".ref.")).copy_(v)
    methods["peft two adapters, set_adapter there and back"] = (
        lambda: model.set_adapter("ref"),
        lambda: model.set_adapter("default"),
    )

    def load_in():
        held["sd"] = {n: p.detach().clone() for n, p in params.items()}
        model.load_state_dict(on_device, strict=False)

    methods["load_state_dict(strict=False) there and back"] = (
        load_in,
        lambda: model.load_state_dict(held.pop("sd"), strict=False),
    )

    ref_file = peft.get_peft_model_state_dict(model, state_dict=on_device)

    def peft_in():
        live = peft.get_peft_model_state_dict(model, state_dict=dict(params))
        held["peft"] = {k: v.detach().clone() for k, v in live.items()}
        peft.set_peft_model_state_dict(model, ref_file)

    methods["peft set_peft_model_state_dict there and back"] = (
        peft_in,
        lambda: peft.set_peft_model_state_dict(model, held.pop("peft")),
    )
    return methods


def check_swaps(model, methods: dict, ref: dict, tokens: torch.Tensor) -> None:
    """Inside each swap the reference's logits exactly; after it, the policy's."""

    def logits():
        with torch.no_grad():
            return model(tokens).logits

    live = logits()
    with LoraReferenceSnapshot(model, snapshot=ref):
        expected = logits()
    # An independent reference: the values written in by hand.
    displaced = {n: model.get_parameter(n).detach().clone() for n in ref}
    with torch.no_grad():
        for n, v in ref.items():
            model.get_parameter(n).copy_(v)
        by_hand = logits()
        for n, v in displaced.items():
            model.get_parameter(n).copy_(v)
    assert torch.equal(expected, by_hand), "fieldkit's reference differs from a copy by hand"
    assert not torch.equal(expected, live)
    for name, method in methods.items():
        if isinstance(method, str):
            continue
        enter, leave = method
        enter()
        inside = logits()
        leave()
        assert torch.equal(inside, expected), f"{name}: not the reference's logits inside"
        assert torch.equal(logits(), live), f"{name}: not the policy's logits after"


def remove_ref_adapter(model) -> None:
    model.delete_adapter("ref")


# --- the delta methods -------------------------------------------------------------------


def naive_delta(before: dict, model) -> tuple[float, float]:
    """What a training script writes: one subtraction, norm and max per tensor."""
    sq, mx = 0.0, 0.0
    for name, p in model.named_parameters():
        if name in before:
            d = p.detach().float() - before[name].to(p.device).float()
            sq += float(d.square().sum())
            mx = max(mx, float(d.abs().max()))
    return math.sqrt(sq), mx


def delta_methods(model) -> tuple[dict[str, Callable], dict]:
    tracker = WeightDeltaTracker(model)
    torch_ops = WeightDeltaTracker(model)  # measured without the C kernel
    before = capture_trainable(model)
    with torch.no_grad():  # a training step: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    exact = [
        (p.detach().double() - before[n].to(p.device).double()).reshape(-1)
        for n, p in model.named_parameters()
        if n in before
    ]
    truth = (
        math.sqrt(sum(float(d.square().sum()) for d in exact)),
        max(float(d.abs().max()) for d in exact),
    )
    return {
        "fieldkit WeightDeltaTracker.delta()": tracker.delta,
        "fieldkit weight_delta(before, named_parameters)": lambda: weight_delta(
            before, dict(model.named_parameters())
        ),
        "fieldkit delta(), torch ops (FIELDKIT_NO_KERNEL=1)": lambda: without_kernel(
            torch_ops.delta
        ),
        "naive per-tensor loop": lambda: naive_delta(before, model),
    }, truth


def without_kernel(fn: Callable[[], object]) -> object:
    """``fn()`` as fieldkit computes it where the C kernel can't be built."""
    with mock.patch.dict(os.environ, {"FIELDKIT_NO_KERNEL": "1"}):
        return fn()


# --- one case ----------------------------------------------------------------------------


def run_case(name, shape, dtype, r, device, rounds, timer, forward_rounds) -> dict:
    log(f"[{name}] building the model ...")
    model, ref = add_lora(build_base(shape, dtype, device), r)
    nbytes = sum(v.numel() * v.element_size() for v in ref.values())
    tokens = torch.randint(0, 256, (1, 8), device=device)
    src = torch.randn(nbytes // 4, pin_memory=device.startswith("cuda"))
    dst = torch.zeros(nbytes // 4, device=device)
    dst.copy_(src)
    floor = lambda: dst.copy_(src, non_blocking=True)  # noqa: E731

    methods = swap_methods(model, ref, r)
    log(f"[{name}] checking {len(methods)} swap methods ...")
    check_swaps(model, methods, ref, tokens)
    runnable = {n: m for n, m in methods.items() if not isinstance(m, str)}
    fns = {"floor": floor, **{n: (lambda e=e, x=x: (e(), x())) for n, (e, x) in runnable.items()}}
    log(f"[{name}] timing the round trips, {rounds} rounds ...")
    swap_times = interleaved(fns, timer, rounds)
    remove_ref_adapter(model)

    deltas, truth = delta_methods(model)
    log(f"[{name}] checking and timing {len(deltas)} delta methods ...")
    # First calls, so that scratch buffers a method keeps between calls are counted too.
    peaks = {n: peak_extra_bytes(fn, device) for n, fn in deltas.items()}
    for n, fn in deltas.items():
        got = fn()
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, truth, strict=True)), (
            f"{n}: {got} != {truth}"
        )
    delta_times = interleaved({"floor": floor, **deltas}, timer, rounds)

    log(f"[{name}] one forward, batch 4 x 64 ...")
    batch = torch.randint(0, 256, (4, 64), device=device)

    def forward():
        with torch.no_grad():
            model(batch)

    fwd = interleaved({"forward": forward}, timer, forward_rounds, warmup=1)["forward"][0]

    def rows(times, extra=None):
        floor_ms = times["floor"][0]  # each table against the floor timed in its own rounds
        return [
            {
                "method": n,
                "median_ms": med,
                "min_ms": lo,
                "x_floor": med / floor_ms,
                "x_forward": med / fwd,
                **({"peak_extra_bytes": extra[n]} if extra and n in extra else {}),
            }
            for n, (med, lo) in times.items()
            if n != "floor"
        ]

    memory = {
        "snapshot": held_memory(lambda: LoraReferenceSnapshot(model, snapshot=ref), device),
        "tracker": held_memory(lambda: WeightDeltaTracker(model), device),
    }
    return {
        "case": name,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "r": r,
        "tensors": len(ref),
        "adapter_bytes": nbytes,
        "largest_tensor_bytes": max(v.numel() * v.element_size() for v in ref.values()),
        "floor_ms": swap_times["floor"][0],
        "delta_floor_ms": delta_times["floor"][0],
        "forward_ms": fwd,
        "swap": rows(swap_times)
        + [{"method": n, "skipped": m} for n, m in methods.items() if isinstance(m, str)],
        "delta": rows(delta_times, peaks),
        "memory": memory,
    }


# --- output ------------------------------------------------------------------------------


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def table(case: dict) -> str:
    head = (
        f"\n{case['case']}: {case['tensors']} LoRA tensors, r={case['r']}, {case['dtype']}, "
        f"{human(case['adapter_bytes'])} (largest tensor {human(case['largest_tensor_bytes'])}); "
        "floor (one copy of those bytes) "
        f"{case['floor_ms']:.3f} ms in the swap rounds, {case['delta_floor_ms']:.3f} ms in the "
        f"delta rounds; one forward (4 x 64 tokens) {case['forward_ms']:.1f} ms"
        + (f"; medians over {case['runs']} runs" if case.get("runs", 1) > 1 else "")
        + "\n"
    )
    lines = [
        f"| {'method':<50} | {'median ms':>9} | {'min ms':>8} | {'x floor':>7} | "
        f"{'x floor, runs':>13} | {'x forward':>9} | {'peak extra':>10} |",
        f"|{'-' * 52}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 15}|{'-' * 11}|{'-' * 12}|",
    ]
    for section in ("swap", "delta"):
        label = "round trip: swap in + restore" if section == "swap" else "weight delta"
        lines.append(f"| **{label}** |  |  |  |  |  |  |")
        for row in case[section]:
            if "skipped" in row:
                lines.append(f"| {row['method']:<50} | {row['skipped']} |  |  |  |  |  |")
                continue
            peak = row.get("peak_extra_bytes")
            peak = human(peak) if peak is not None else ""
            lo, hi = row.get("x_floor_runs", (row["x_floor"], row["x_floor"]))
            lines.append(
                f"| {row['method']:<50} | {row['median_ms']:>9.3f} | {row['min_ms']:>8.3f} | "
                f"{row['x_floor']:>7.2f} | {f'{lo:.2f}-{hi:.2f}':>13} | "
                f"{row['x_forward']:>9.4f} | {peak:>10} |"
            )
    held = [
        f"{what} {human(m['device_bytes'])} on the device, "
        + (f"{human(m['pinned_bytes'])} pinned" if m["pinned_bytes"] is not None else "pinned: ?")
        for what, m in case.get("memory", {}).items()
        if m["device_bytes"] is not None
    ]
    return head + "\n".join(lines) + (f"\nheld: {'; '.join(held)}" if held else "")


def combine(runs: list[list[dict]]) -> list[dict]:
    """One case list from several runs: each figure the median over the runs, and each
    ratio's min and max over them (``x_floor_runs``), so the spread is there to read."""
    if len(runs) == 1:
        return runs[0]
    cases = []
    for same in zip(*runs, strict=True):
        case = {**same[0], "runs": len(same)}
        for key in ("floor_ms", "delta_floor_ms", "forward_ms"):
            case[key] = statistics.median(c[key] for c in same)
        for section in ("swap", "delta"):
            case[section] = []
            for rows in zip(*(c[section] for c in same), strict=True):
                row = dict(rows[0])
                if "skipped" not in row:
                    for key in ("median_ms", "x_floor", "x_forward"):
                        row[key] = statistics.median(r[key] for r in rows)
                    row["min_ms"] = min(r["min_ms"] for r in rows)
                    ratios = [r["x_floor"] for r in rows]
                    row["x_floor_runs"] = (min(ratios), max(ratios))
                case[section].append(row)
        cases.append(case)
    return cases


def pyplot():
    """matplotlib's pyplot, drawing to files; None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# Every method its own colour, line style and marker, so that each line reads in black and
# white too; fieldkit's lines are thick and drawn last (on top), the others thin.
_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
_MARKERS = "osD^vP*Xh<>p"
_OURS = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2"]  # warm: fieldkit
_OTHERS = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#bcbd22", "#7f7f7f", "#393b79",
           "#637939"]  # fmt: skip


def plot(sweep: list[dict], path: Path) -> str:
    """The round trip against the adapter's size, one line per method, beside the floor."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    fig, ax = plt.subplots(figsize=(12, 6.5))
    sizes = [p["adapter_bytes"] / 2**20 for p in sweep]
    methods = [m for m in sweep[0]["median_ms"] if m != "floor"]
    methods.sort(key=lambda m: m.startswith("fieldkit"))  # fieldkit's on top
    ax.plot(sizes, [p["median_ms"]["floor"] for p in sweep], color="black", lw=3.5,
            label="floor: one copy of the adapter's bytes", zorder=5)  # fmt: skip
    ours_seen = others_seen = 0
    for i, m in enumerate(methods):
        ours = m.startswith("fieldkit")
        if ours:
            colour, ours_seen = _OURS[ours_seen % len(_OURS)], ours_seen + 1
        else:
            colour, others_seen = _OTHERS[others_seen % len(_OTHERS)], others_seen + 1
        ax.plot(
            sizes,
            [p["median_ms"][m] for p in sweep],
            linestyle=_STYLES[i % len(_STYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            color=colour,
            lw=3.0 if ours else 1.2,
            markersize=8 if ours else 5,
            label=("fieldkit: " + m.removeprefix("fieldkit ")) if ours else m,
            zorder=6 if ours else 3,
        )
    for p, x in zip(sweep, sizes, strict=True):
        ax.annotate(f"r={p['r']}", (x, p["median_ms"]["floor"]), fontsize=8, va="top")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="adapter size (MiB)",
        ylabel="round trip: swap in + restore (ms, median)",
        title=f"Reference swap cost, {sweep[0]['tensors']} LoRA tensors ({sweep[0]['device']}); "
        "fieldkit's lines are thick",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def plot_delta(cases: list[dict], path: Path) -> str:
    """The weight-delta rows of each case, as multiples of that case's floor: grouped bars,
    each method its own colour and hatch, fieldkit's edged thick."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    methods = [row["method"] for row in cases[0]["delta"] if "skipped" not in row]
    hatches = ["//", "\\\\", "xx", "..", "++", "oo"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ours = m.startswith("fieldkit")
        xs = [c + (j - len(methods) / 2 + 0.5) * width for c in range(len(cases))]
        ys = [next(r["x_floor"] for r in case["delta"] if r["method"] == m) for case in cases]
        palette = _OURS if ours else _OTHERS
        ax.bar(xs, ys, width, label=m, color=palette[j % len(palette)],
               hatch=hatches[j % len(hatches)], edgecolor="black",
               linewidth=1.8 if ours else 0.6)  # fmt: skip
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", lw=2, label="floor: one copy of the adapter's bytes")
    labels = [f"{c['case']}\n{c['tensors']} tensors, {human(c['adapter_bytes'])}" for c in cases]
    ax.set_xticks(range(len(cases)), labels)
    ax.set_ylabel("weight delta, x floor (median)")
    ax.set_title("Did the weights move? The delta's cost against one copy (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# --- main --------------------------------------------------------------------------------


def default_out(quick: bool) -> Path:
    """Where results go unless ``--out`` says: a smoke run never overwrites the full run's."""
    return Path(__file__).parent / ("results-quick" if quick else "results")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few rounds (smoke)")
    ap.add_argument("--rounds", type=int, help="timed rounds per method (default 30; quick 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=1, help="whole runs, for the spread (default 1)")
    ap.add_argument(
        "--out",
        type=Path,
        help="where the JSON and plot go (default results/; results-quick/ for --quick, so a "
        "smoke run never overwrites the committed figures)",
    )
    args = ap.parse_args(argv)
    args.out = args.out or default_out(args.quick)
    rounds = args.rounds or (3 if args.quick else 30)
    big, small = (TINY, TINY) if args.quick else (FULL, SMALL)
    ranks = [2, 4] if args.quick else [4, 8, 16, 32, 64]
    timer = Timer(args.device)
    fwd_rounds = 1 if args.quick else 3

    r_big, r_small = (4, 2) if args.quick else (16, 8)
    specs = [
        ("default", big, torch.float32, r_big),
        ("bfloat16", big, torch.bfloat16, r_big),
        ("small", small, torch.float32, r_small),
    ]
    runs = []
    for run in range(args.runs):
        if args.runs > 1:
            log(f"=== run {run + 1} of {args.runs}")
        runs.append(
            [
                run_case(name, shape, dtype, r, args.device, rounds, timer, fwd_rounds)
                for name, shape, dtype, r in specs
            ]
        )
    cases = combine(runs)
    sweep = []
    base = build_base(big, torch.float32, args.device)
    for r in ranks:
        log(f"[sweep] r={r} ...")
        model, ref = add_lora(base, r)
        methods = {n: m for n, m in swap_methods(model, ref, r).items() if not isinstance(m, str)}
        nbytes = sum(v.numel() * v.element_size() for v in ref.values())
        src = torch.randn(nbytes // 4, pin_memory=args.device.startswith("cuda"))
        dst = torch.zeros(nbytes // 4, device=args.device)
        fns = {
            "floor": lambda d=dst, s=src: d.copy_(s, non_blocking=True),
            **{n: (lambda e=e, x=x: (e(), x())) for n, (e, x) in methods.items()},
        }
        times = interleaved(fns, timer, max(3, rounds // 3))
        remove_ref_adapter(model)
        sweep.append(
            {
                "r": r,
                "tensors": len(ref),
                "adapter_bytes": nbytes,
                "device": args.device,
                "median_ms": {n: med for n, (med, _) in times.items()},
            }
        )
        base = model.unload()

    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "weight_delta on the CPU": _kernel.status(),
        },
        "command": "python benchmarks/swap_bench.py"
        + (" --quick" if args.quick else "")
        + (f" --runs {args.runs}" if args.runs > 1 else ""),
        "rounds": rounds,
        "cases": cases,
        "runs": runs if args.runs > 1 else None,
        "sweep": sweep,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swap_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"weight_delta on the CPU: {_kernel.status()}")
    for case in cases:
        print(table(case))
    print(f"\njson: {args.out / 'swap_bench.json'}")
    print(plot(sweep, args.out / "swap_bench.png"))
    print(plot_delta(cases, args.out / "delta_bench.png"))
    return result


if __name__ == "__main__":
    main()
