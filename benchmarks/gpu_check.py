"""One command that proves the GPU path: the GPU tests, the CUDA timings, host syncs, memory.

Run from the repository root, with nothing installed beyond torch, peft, transformers,
safetensors and pytest (the GPU machine has no network)::

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # writes $OUT/gpu_report.{md,json}
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR  # or ./gpu-check without $OUT

It does five things, and says what it skipped and why:

1. runs every test marked ``gpu`` (``tests/test_gpu.py``) in a pytest subprocess; a test that
   needs what the machine lacks (a second GPU) skips, saying which;
2. times, with CUDA events, the round trip "swap the reference in, restore the policy" for a
   LoRA on a 7B-shaped bf16 base (32 layers, hidden 4096, intermediate 11008, r=16 on all 7
   projections: 448 tensors, 152.5 MiB, float32 as peft keeps them) and, GB10-sized, the same
   base with r=64 — each beside its floor (one pinned host-to-device copy of the adapter's
   bytes), beside peft ``set_adapter``, ``functional_call``'s swap and ``load_state_dict``, and
   beside one real forward (batch 4 x 64), with ``benchmarks/swap_bench.py``'s ``run_case``;
3. counts host syncs per call (torch's sync debug mode, plus ``Event.synchronize``, which that
   mode does not see) for ``delta()``, the snapshot's entry and exit, ``update_`` and
   ``refresh``, and the device and pinned host memory a snapshot and a tracker keep;
4. runs ``benchmarks/engine_bench.py`` with a world of one over NCCL (FSDP2, and ZeRO-3 where
   DeepSpeed imports): a reference's memory and step time beside TRL's paths;
5. writes ``gpu_report.md`` (tables a person reads) and ``gpu_report.json``, and exits
   non-zero if any test failed.

Without CUDA (a dry run, which the test suite makes) it runs the tests (all skip), times a
tiny CPU case through the same code, says plainly that the CUDA rows were skipped, and exits 0.
It finishes in a few minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import peft
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".gpu-deps"
"""A git-ignored folder of packages the GPU machine lacks (DeepSpeed and its pure-Python
dependencies), which travels with the working tree when present; make it here with
``pip install --target .gpu-deps --no-deps deepspeed hjson py-cpuinfo msgpack ninja einops
pydantic pydantic-core annotated-types typing-inspection``, for the GPU machine's Python."""
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
sys.path += [str(DEPS)] if DEPS.is_dir() else []  # after the machine's own packages

import swap_bench as bench  # noqa: E402
from helpers import count_syncs, peft_model, perturb  # noqa: E402

from fieldkit.training import LoraReferenceSnapshot, WeightDeltaTracker  # noqa: E402

SEVEN_B = dict(layers=32, hidden=4096, intermediate=11008)
CASES = [("7B-shaped, bf16, r=16", 16), ("GB10-sized: 7B-shaped, bf16, r=64", 64)]


def versions() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
    }


def _run(cmd: list[str], seconds: float) -> tuple[int, str]:
    """Run ``cmd`` from the root with the .gpu-deps path, for at most ``seconds``: its exit code
    (124 when it ran out of time, as ``timeout`` says) and its output."""
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=max(seconds, 1)
        )
    except subprocess.TimeoutExpired as e:
        parts = (x.decode() if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        text = "".join(parts)
        return 124, text + f"\n[stopped: ran past its {seconds:.0f} s of the check's budget]"
    return proc.returncode, proc.stdout + proc.stderr


def run_tests(out: Path, seconds: float) -> dict:
    """Every ``gpu`` test, in a subprocess: counts, and each failure and skip with its reason."""
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += ["tests/test_gpu.py", f"--junitxml={xml}"]
    started = time.perf_counter()
    code, text = _run(cmd, seconds)
    result = {"command": " ".join(cmd[1:]), "exit_code": code, "tests": []}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, why = "passed", ""
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome = "failed" if tag != "skipped" else "skipped"
                    why = (found.get("message") or "").strip()
            result["tests"].append({"name": case.get("name"), "outcome": outcome, "why": why})
    result["seconds"] = round(time.perf_counter() - started, 1)
    for outcome in ("passed", "failed", "skipped"):
        result[outcome] = sum(t["outcome"] == outcome for t in result["tests"])
    if code not in (0, 5) or not result["tests"]:  # 5: all deselected
        result["output"] = text[-4000:]
    return result


def _env() -> dict:
    """This environment, with the .gpu-deps folder on the path of every subprocess (and the
    tests' worker processes, which inherit it)."""
    env = dict(os.environ)
    if DEPS.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(DEPS)]))
    return env


def engine_costs(out: Path, seconds: float) -> dict:
    """``benchmarks/engine_bench.py`` with a world of one over NCCL (ZeRO-3 where DeepSpeed
    imports), in its own interpreter: its table, or its error."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--world", "1"]
    # One run of two steps: each configuration starts fresh ranks (CUDA cannot be forked, so
    # every start re-imports torch, transformers and DeepSpeed: 15 to 30 s on an H100 machine).
    cmd += ["--runs", "1", "--steps", "2", "--warmup", "1"]
    cmd += ["--device", "cuda", "--out", str(out / "engine")]
    code, text = _run(cmd, seconds)
    return {"command": " ".join(cmd[1:]), "exit_code": code, "output": text[-6000:]}


def syncs_and_memory() -> dict:
    """Host waits per call and what a snapshot and a tracker keep, on a small CUDA model."""
    model = peft_model("linear", seed=2).cuda()
    tracker = WeightDeltaTracker(model)
    snap = LoraReferenceSnapshot(model)
    perturb(model, seed=7)
    tracker.delta()  # the plan, made once
    calls = {
        "WeightDeltaTracker.delta()": tracker.delta,
        "with snap: (entry)": snap.__enter__,
        "with snap: (exit)": lambda: snap.__exit__(None, None, None),
        "snap.update_(model, 0.5)": lambda: snap.update_(model, 0.5),
        "snap.refresh(model)": lambda: snap.refresh(model),
    }
    counts = {name: count_syncs(fn) for name, fn in calls.items()}
    return {"syncs": counts, "target": {"WeightDeltaTracker.delta()": 1}}


def cuda_cases(rounds: int) -> list[dict]:
    timer = bench.Timer("cuda")
    return [
        bench.run_case(name, SEVEN_B, torch.bfloat16, r, "cuda", rounds, timer, 3)
        for name, r in CASES
    ]


def report(result: dict) -> str:
    v, tests = result["versions"], result["tests"]
    lines = [
        "# fieldkit GPU check",
        "",
        f"{v['gpu'] or 'no CUDA device'}; torch {v['torch']} (CUDA {v['cuda']}), peft "
        f"{v['peft']}, transformers {v['transformers']}, Python {v['python']}; "
        f"{result['date']}; {result['seconds']:.0f} s in all.",
        "",
        f"## GPU tests: {tests['passed']} passed, {tests['failed']} failed, "
        f"{tests['skipped']} skipped ({tests['seconds']} s)",
        "",
        "| test | outcome | why |",
        "|---|---|---|",
        *(f"| {t['name']} | {t['outcome']} | {t['why']} |" for t in tests["tests"]),
    ]
    if "output" in tests:
        lines += ["", "```", tests["output"], "```"]
    lines += ["", "## Timings (CUDA events; ratios to the floor timed in the same rounds)", ""]
    if result["skipped"]:
        lines += [f"**Skipped:** {why}" for why in result["skipped"]] + [""]
    lines += [bench.table(case) for case in result["cases"]]
    if result.get("syncs"):
        lines += ["", "## Host syncs per call", "", "| call | syncs |", "|---|---|"]
        lines += [f"| {call} | {n} |" for call, n in result["syncs"]["syncs"].items()]
    if result.get("engines"):
        engines = result["engines"]
        lines += ["", "## A reference on the engines (world of one, NCCL)", ""]
        lines += [f"`{engines['command']}`: exit {engines['exit_code']}", "", "```"]
        lines += [engines["output"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "gpu-check"
    ap.add_argument("--out", type=Path, default=default, help="where the report goes")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per method")
    ap.add_argument(
        "--budget", type=float, default=540, help="seconds in all; a stage past it is stopped"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"versions": versions(), "date": time.strftime("%Y-%m-%d"), "skipped": []}
    for key, value in result["versions"].items():
        print(f"{key}: {value}", flush=True)

    def left() -> float:
        """Seconds of the budget not yet spent."""
        return args.budget - (time.perf_counter() - started)

    def write() -> str:
        """The report so far, written after every stage (a stopped call still leaves one)."""
        result["seconds"] = time.perf_counter() - started
        text = report(result)
        (args.out / "gpu_report.md").write_text(text)
        (args.out / "gpu_report.json").write_text(json.dumps(result, indent=2) + "\n")
        return text

    print("running the gpu tests ...", flush=True)
    result["tests"] = run_tests(args.out, left() - 120)  # the timings and engines need time too
    print(
        f"gpu tests: {result['tests']['passed']} passed, {result['tests']['failed']} failed, "
        f"{result['tests']['skipped']} skipped",
        flush=True,
    )
    result["cases"] = []
    write()
    if torch.cuda.is_available():
        result["syncs"] = syncs_and_memory()
        result["cases"] = cuda_cases(args.rounds)
        write()
        print("running benchmarks/engine_bench.py with a world of one ...", flush=True)
        result["engines"] = engine_costs(args.out, left())
    else:
        why = "no CUDA device here: the CUDA rows, sync counts and memory figures need one"
        result["skipped"].append(why)
        print(f"skipped: {why}; timing a tiny CPU case through the same code", flush=True)
        cpu = bench.run_case(
            "dry run: tiny, CPU", bench.TINY, torch.float32, 2, "cpu", 2, bench.Timer("cpu"), 1
        )
        result["cases"] = [cpu]
    print(write())
    failed = result["tests"]["failed"] or result["tests"]["exit_code"] not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
