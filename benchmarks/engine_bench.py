"""What a reference policy costs on the engines: per-rank memory and step time, on two ranks.

For a Llama-shaped peft model (random weights from a config, LoRA r=16 on all seven
projections), under DeepSpeed ZeRO-3 (small parameters persistent, DeepSpeed's default, and
every parameter partitioned) and under FSDP2 (per layer and root), one training step is
policy forward, reference forward, backward, optimizer step. Per engine, each way of getting
the reference runs in a fresh set of ranks:

- ``none``: no reference forward (the floor);
- ``fieldkit``: ``with snapshot:`` around the reference forward, between the policy forward and
  backward (``fieldkit-first``: before the policy forward; ``fieldkit-in-step``, ZeRO-3 only:
  called as ``model.forward(...)``, which keeps the reference forward inside the policy's step,
  and DeepSpeed's prefetch trace with it);
- ``trl-disabled``: TRL's path for a fresh adapter, the forward inside ``disable_adapter()``;
- ``trl-ref-adapter``: TRL 1.16's path for a pre-trained adapter, a second adapter ``"ref"``
  (a copy of the policy's) made active around the forward (``use_adapter``);
- ``separate-model``: a second model prepared by the same engine (no optimizer), as TRL does
  for a model that is not a PEFT model.

Per rank it measures the peak resident memory of the process (on CUDA: the peak allocated
device memory) and the bytes of tensors each option holds; the step time (median of the steps
of each run; ``--runs`` runs after warm-up steps, their spread); the reference forward's and
the swap's share of the step; and, under ZeRO-3, how many times per step DeepSpeed threw away
its prefetch trace (its parameter coordinator's ``_invalidate_trace``, counted). Every figure is
also given as a ratio to ``none`` from the same engine.

    python benchmarks/engine_bench.py                # the full run, 2 gloo ranks on the CPU
    python benchmarks/engine_bench.py --tiny         # a tiny model, one timed step: a smoke run
    python benchmarks/engine_bench.py --world 1      # one rank (on a GPU: NCCL, CUDA timing)

It prints a table and writes ``engine_bench.json``, ``.md`` and ``.png`` to ``--out``
(``benchmarks/results``; ``benchmarks/results-quick`` for ``--tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("zero3", "zero3-partitioned", "fsdp2")
CONFIGS = (
    "none",
    "fieldkit",
    "fieldkit-in-step",
    "fieldkit-first",
    "trl-disabled",
    "trl-ref-adapter",
    "separate-model",
)
FULL = dict(layers=8, hidden=512, intermediate=1408, heads=8, vocab=2048, r=16, batch=2, seq=64)
TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, vocab=128, r=4, batch=2, seq=16)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(shape: dict, seed: int):
    import peft
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=shape["seq"],
    )
    lora = peft.LoraConfig(r=shape["r"], lora_alpha=2 * shape["r"], target_modules=TARGETS)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    with torch.no_grad():  # a pre-trained adapter: the reference is not the base model
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model


def _trl_ref_adapter(model, r: int) -> None:
    """What TRL 1.16 does for a pre-trained adapter: a second adapter "ref", a copy."""
    import peft

    model.add_adapter("ref", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".ref.")].copy_(p)
    model.set_adapter("default")


def _local_bytes(tensors) -> int:
    from fieldkit.training import _sharding as sharding

    return sum(sharding.local(t).numel() * t.element_size() for t in tensors)


def _shard_fsdp2(model, device: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _prepare(engine: str, model, device: str, *, train: bool):
    """``(module to call, backward, step)`` for ``model`` under ``engine``."""
    if engine == "fsdp2":
        model.to(device)
        _shard_fsdp2(model, device)
        if not train:
            return model, None, None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, lambda loss: loss.backward(), lambda: (opt.step(), opt.zero_grad())
    import deepspeed

    zero = {"stage": 3}
    if engine == "zero3-partitioned":
        zero["stage3_param_persistence_threshold"] = 0
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    if not train:  # as TRL prepares a reference model: no optimizer
        ref, *_ = deepspeed.initialize(model=model, config=config)
        ref.eval()
        return ref, None, None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ds, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return ds, ds.backward, ds.step


def _rank(rank: int, world: int, port: int, engine: str, config: str, shape: dict, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    backend = "nccl" if cuda else "gloo"
    if engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    sys.path[:0] = [str(ROOT)]
    from fieldkit.training import LoraReferenceSnapshot

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = _model(shape, seed=0)
    if config == "trl-ref-adapter":
        _trl_ref_adapter(model, shape["r"])
    module, backward, step = _prepare(engine, model, device, train=True)
    held = {"model": _local_bytes(model.parameters())}
    reference = None
    if config.startswith("fieldkit"):
        snap = LoraReferenceSnapshot(model)
        held["snapshot (host)"] = sum(t.numel() * t.element_size() for t in snap.state.values())
    elif config == "trl-ref-adapter":
        ref_params = [p for n, p in model.named_parameters() if ".ref." in n]
        held["ref adapter"] = _local_bytes(ref_params)
    elif config == "separate-model":
        reference, _, _ = _prepare(engine, _model(shape, seed=0), device, train=False)
        held["reference model"] = _local_bytes(reference.parameters())
    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(device)
    invalidations = [0]
    if engine.startswith("zero"):
        coordinator = module.optimizer.parameter_offload.get_param_coordinator()
        invalidate = coordinator._invalidate_trace

        def counted():
            invalidations[0] += 1
            invalidate()

        coordinator._invalidate_trace = counted  # counted, not changed: the benchmark's probe

    # ZeRO-3 starts a step in a pre-hook of the root module: called through ``forward`` the
    # reference forward stays inside the policy's step (and its prefetch trace).
    call = model.forward if engine.startswith("zero") else module

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def ref_forward(parts: dict) -> None:
        t0 = clock()
        if config.startswith("fieldkit"):
            with snap:
                t1 = clock()
                (call if config == "fieldkit-in-step" else module)(batch)
                t2 = clock()
            parts["swap"] += (t1 - t0) + (clock() - t2)
            parts["reference forward"] += t2 - t1
            return
        with torch.no_grad():
            if config == "trl-disabled":
                with model.disable_adapter():
                    module(batch)
            elif config == "trl-ref-adapter":
                model.set_adapter("ref")  # TRL's use_adapter
                try:
                    module(batch)
                finally:
                    model.set_adapter("default")
            elif config == "separate-model":
                reference(batch)
        parts["reference forward"] += clock() - t0

    def one_step() -> dict:
        parts = {"swap": 0.0, "reference forward": 0.0}
        t0 = clock()
        if config == "fieldkit-first":
            ref_forward(parts)
        logits = module(batch).logits
        if config not in ("none", "fieldkit-first"):
            ref_forward(parts)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.reshape(-1))
        backward(loss)
        step()
        parts["step"] = clock() - t0
        return parts

    for _ in range(args.warmup):
        one_step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = invalidations[0]
    runs = [[one_step() for _ in range(args.steps)] for _ in range(args.runs)]
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    )
    result = {
        "rank": rank,
        "peak_bytes": peak,
        "held_bytes": held,
        "runs": [{k: statistics.median(s[k] for s in run) for k in run[0]} for run in runs],
        "invalidations_per_step": (invalidations[0] - before) / (args.runs * args.steps),
    }
    Path(args.scratch, f"{engine}-{config}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(engine: str, config: str, shape: dict, args) -> list[dict]:
    """One fresh set of ranks for ``engine`` x ``config``: each rank's figures."""
    # On the CPU forked from a parent that imported the libraries and ran no torch op: each set
    # of ranks starts in a second instead of re-importing them. CUDA cannot be forked.
    rank_args = (args.world, _free_port(), engine, config, shape, args)
    start = "spawn" if args.device == "cuda" else "fork"
    mp.start_processes(_rank, args=rank_args, nprocs=args.world, start_method=start)
    files = [Path(args.scratch, f"{engine}-{config}-{r}.json") for r in range(args.world)]
    return [json.loads(f.read_text()) for f in files]


def summarise(ranks: list[dict]) -> dict:
    """Rank figures as one row: the slowest rank's step (the step waits for it), each rank's
    memory (the largest), the spread over runs."""
    steps = [max(r["runs"][i]["step"] for r in ranks) for i in range(len(ranks[0]["runs"]))]
    row = {
        "step_s": statistics.median(steps),
        "step_s_spread": [min(steps), max(steps)],
        "reference_forward_s": statistics.median(
            max(r["runs"][i]["reference forward"] for r in ranks) for i in range(len(steps))
        ),
        "swap_s": statistics.median(
            max(r["runs"][i]["swap"] for r in ranks) for i in range(len(steps))
        ),
        "peak_bytes": max(r["peak_bytes"] for r in ranks),
        "held_bytes": {k: max(r["held_bytes"][k] for r in ranks) for k in ranks[0]["held_bytes"]},
        "invalidations_per_step": max(r["invalidations_per_step"] for r in ranks),
    }
    return row


def table(results: dict) -> str:
    head = (
        f"{'engine':<18}{'reference':<17}{'step ms':>9}{'x none':>8}{'spread ms':>15}"
        f"{'ref fwd':>9}{'swap':>7}{'peak MiB':>10}{'x none':>8}{'extra held MiB':>16}"
        f"{'inval/step':>11}"
    )
    lines = [head, "-" * len(head)]
    for engine, rows in results.items():
        floor = rows["none"]
        for config, row in rows.items():
            extra = sum(v for k, v in row["held_bytes"].items() if k != "model") / 2**20
            lo, hi = (1e3 * s for s in row["step_s_spread"])
            lines.append(
                f"{engine:<18}{config:<17}{1e3 * row['step_s']:>9.1f}"
                f"{row['step_s'] / floor['step_s']:>8.2f}{f'{lo:.0f}-{hi:.0f}':>15}"
                f"{row['reference_forward_s'] / row['step_s']:>9.0%}"
                f"{row['swap_s'] / row['step_s']:>7.1%}{row['peak_bytes'] / 2**20:>10.0f}"
                f"{row['peak_bytes'] / max(floor['peak_bytes'], 1):>8.2f}{extra:>16.2f}"
                f"{row['invalidations_per_step']:>11.2f}"
            )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The table as Markdown, for the Performance page."""
    lines = [
        "| engine | reference | step ms (spread) | × none | reference forward | swap | "
        "peak MiB / rank | × none | extra held / rank | trace lost / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, rows in results.items():
        floor = rows["none"]
        for config, row in rows.items():
            extra = {k: v for k, v in row["held_bytes"].items() if k != "model"}
            held = "; ".join(f"{v / 2**20:.2f} MiB {k}" for k, v in extra.items()) or "0"
            lo, hi = (1e3 * t for t in row["step_s_spread"])
            name = f"**{config}**" if config.startswith("fieldkit") else config
            lines.append(
                f"| {engine} | {name} | {1e3 * row['step_s']:.0f} ({lo:.0f}–{hi:.0f}) | "
                f"{row['step_s'] / floor['step_s']:.2f} | "
                f"{row['reference_forward_s'] / row['step_s']:.0%} | "
                f"{row['swap_s'] / row['step_s']:.1%} | {row['peak_bytes'] / 2**20:.0f} | "
                f"{row['peak_bytes'] / max(floor['peak_bytes'], 1):.2f} | {held} | "
                f"{row['invalidations_per_step']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def seven_b(results: dict, shape: dict, world: int) -> dict:
    """Per-rank bytes each option would hold at 7B (a bf16 model, its LoRA r=16 on all seven
    projections in float32 as peft keeps it),
    computed from this run's per-parameter figures: held bytes / parameters they stand for."""
    lora_7b = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # A and B, per layer, r=16
    model_7b = 6.74e9
    layers, h, i, r = shape["layers"], shape["hidden"], shape["intermediate"], shape["r"]
    lora = layers * r * (4 * 2 * h + 3 * (h + i))
    rows = results.get("fsdp2") or next(iter(results.values()))
    out = {}
    for config, key in (
        ("fieldkit", "snapshot (host)"),
        ("trl-ref-adapter", "ref adapter"),
        ("separate-model", "reference model"),
    ):
        if config in rows and key in rows[config]["held_bytes"]:
            measured = rows[config]["held_bytes"][key]
            per_param = measured / (lora if key != "reference model" else _params(shape))
            # A bf16 model at 7B: half of this run's float32 bytes per parameter. Its LoRA stays
            # float32, as here: peft keeps adapters in float32 over a bf16 base by default.
            if key == "reference model":
                out[config] = {"where": key, "bytes_per_rank": per_param * model_7b / 2}
            else:
                out[config] = {"where": key, "bytes_per_rank": per_param * lora_7b}
    return {"world": world, "computed, not measured": out}


def _params(shape: dict) -> int:
    h, i, v, layers, r = (shape[k] for k in ("hidden", "intermediate", "vocab", "layers", "r"))
    base = 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    return base + layers * r * (4 * 2 * h + 3 * (h + i))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    hatches = {"none": "", "fieldkit": "//", "fieldkit-first": "\\\\", "fieldkit-in-step": "++",
               "trl-disabled": "..",
               "trl-ref-adapter": "xx", "separate-model": "oo"}  # fmt: skip
    colours = {"none": "0.85", "fieldkit": "tab:red", "fieldkit-first": "salmon",
               "fieldkit-in-step": "darkred",
               "trl-disabled": "tab:blue", "trl-ref-adapter": "tab:cyan",
               "separate-model": "tab:gray"}  # fmt: skip
    engines = list(results)
    width = 0.8 / len(CONFIGS)
    for ax, key, label in (
        (axes[0], "step_s", "step time, x no reference"),
        (axes[1], "peak_bytes", "peak memory per rank, x no reference"),
    ):
        for j, config in enumerate(CONFIGS):
            xs, ys = [], []
            for e, engine in enumerate(engines):
                if config in results[engine]:
                    floor = results[engine]["none"][key]
                    xs.append(e + (j - len(CONFIGS) / 2 + 0.5) * width)
                    ys.append(results[engine][config][key] / (floor or 1))
            edge = 1.6 if config.startswith("fieldkit") else 0.6
            ax.bar(xs, ys, width, label=config, color=colours[config], hatch=hatches[config],
                   edgecolor="black", linewidth=edge)  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(engines)), engines)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle("A reference forward on the engines (2 ranks); fieldkit's bars are red, thick")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, one timed step")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else FULL
    if args.tiny:
        args.runs, args.steps, args.warmup = 1, 1, 1
    out = args.out or ROOT / "benchmarks" / ("results-quick" if args.tiny else "results")
    out.mkdir(parents=True, exist_ok=True)
    args.scratch = str(out / ".engine-ranks")
    Path(args.scratch).mkdir(exist_ok=True)
    engines = [e for e in args.engines if e == "fsdp2" or _has_deepspeed()]
    import peft  # noqa: F401 - imported once here, before the ranks are forked
    import transformers  # noqa: F401

    if any(e.startswith("zero") for e in engines):
        import deepspeed  # noqa: F401
    results: dict = {}
    for engine in engines:
        configs = [c for c in CONFIGS if c != "fieldkit-in-step" or engine != "fsdp2"]
        results[engine] = {}
        for config in configs:  # a line as each is done: a stopped run still shows its rows
            row = results[engine][config] = summarise(measure(engine, config, shape, args))
            print(f"{engine} {config}: step {row['step_s'] * 1e3:.1f} ms", flush=True)
    report = {
        "what": __doc__.splitlines()[0],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "shape": shape,
        "parameters": _params(shape),
        "world": args.world,
        "runs": args.runs,
        "steps_per_run": args.steps,
        "skipped": [] if len(engines) == len(args.engines) else ["zero3: no DeepSpeed here"],
        "results": results,
        "seven_b": seven_b(results, shape, args.world),
    }
    print(table(results))
    (out / "engine_bench.json").write_text(json.dumps(report, indent=1))
    (out / "engine_bench.md").write_text(markdown(results))
    plot(results, out / "engine_bench.png")
    return report


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


if __name__ == "__main__":
    main()
