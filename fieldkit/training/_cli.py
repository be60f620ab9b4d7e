"""``python -m fieldkit.training``: diff and inspect adapters saved by peft's save_pretrained.

    python -m fieldkit.training diff ADAPTER_A ADAPTER_B [--top N] [--json]
    python -m fieldkit.training inspect ADAPTER [--json]

ADAPTER is a directory written by ``save_pretrained`` or its ``.safetensors`` file. Exit status
0 on success; 1 when ``diff`` finds no tensor the two adapters share (nothing was compared, so
its figures say nothing); 2 on a bad path or file (with a message saying which), bad arguments,
or a missing dependency. ``--version`` prints the version and the CPU delta path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .. import __version__
from . import missing

PROG = "python -m fieldkit.training"


# What a bad path or file raises here (the messages name it); main() turns them into status 2.
BAD_INPUT = (FileNotFoundError, ValueError)


def _path(adapter: str) -> str:
    from ._format import PEFT_FILE, weights_path

    if os.path.isfile(adapter):
        return adapter
    if not os.path.exists(adapter):
        raise FileNotFoundError(f"{adapter!r}: no such file or directory")
    return weights_path(adapter, "default", PEFT_FILE, fn=PROG)


def _read(adapter: str) -> tuple[str, dict]:
    """The file's path and its tensors, keyed as in the file."""
    from safetensors.torch import load_file

    from ._format import reading

    path = _path(adapter)
    with reading(PROG, path):
        return path, load_file(path)


def diff(a: str, b: str, top: int | None) -> tuple[dict, str]:
    from ._checks import first
    from ._report import delta_report

    path_a, sa = _read(a)
    path_b, sb = _read(b)
    common = [k for k in sa if k in sb and sa[k].shape == sb[k].shape]
    mismatched = [
        {"key": k, "shape_a": list(sa[k].shape), "shape_b": list(sb[k].shape)}
        for k in sa
        if k in sb and sa[k].shape != sb[k].shape
    ]
    report = delta_report({k: sa[k] for k in common}, {k: sb[k] for k in common})
    rows = sorted(report.rows, key=lambda r: r.l2, reverse=True)
    result = {
        "a": path_a,
        "b": path_b,
        "l2": report.l2,
        "max_abs": report.max_abs,
        "compared": len(common),
        "unchanged": [r.name for r in report.unmoved],
        "only_in_a": sorted(k for k in sa if k not in sb),
        "only_in_b": sorted(k for k in sb if k not in sa),
        "shape_mismatch": mismatched,
        "tensors": [
            {
                "key": r.name,
                "shape": list(r.shape),
                "dtype": r.dtype,
                "l2": r.l2,
                "max_abs": r.max_abs,
            }
            for r in rows[:top]
        ],
    }
    lines = [
        f"A: {path_a} ({len(sa)} tensors)",
        f"B: {path_b} ({len(sb)} tensors)",
        f"B - A over {len(common)} common tensors: L2 {report.l2:.6e}, "
        f"max|Δ| {report.max_abs:.6e}; {len(report.unmoved)} identical",
    ]
    for label, keys in (("only in A", result["only_in_a"]), ("only in B", result["only_in_b"])):
        if keys:
            lines.append(f"{label} ({len(keys)}): {first(keys, limit=10)}")
    for m in mismatched:
        lines.append(f"shape differs: {m['key']}: A {m['shape_a']}, B {m['shape_b']}")
    if rows:
        shown = rows[:top]
        width = max(len(r.name) for r in shown)
        lines.append(f"\n{'tensor':<{width}}  {'shape':>14}  {'L2':>10}  {'max|Δ|':>10}")
        lines += [
            f"{r.name:<{width}}  {str(list(r.shape)):>14}  {r.l2:>10.3e}  {r.max_abs:>10.3e}"
            for r in shown
        ]
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more (--top)")
    return result, "\n".join(lines)


def inspect(adapter: str) -> tuple[dict, str]:
    from safetensors import safe_open

    from ._format import reading, saved_config

    path = _path(adapter)
    with reading(PROG, path), safe_open(path, framework="pt") as f:
        tensors = [
            {"key": k, "shape": f.get_slice(k).get_shape(), "dtype": f.get_slice(k).get_dtype()}
            for k in f.keys()  # noqa: SIM118 - safe_open is not a mapping
        ]
    numel = sum(math.prod(t["shape"]) for t in tensors)
    config = saved_config(path, PROG)
    result = {"path": path, "tensors": tensors, "parameters": numel, "config": config}
    width = max([len("tensor"), *(len(t["key"]) for t in tensors)])
    lines = [f"{path}: {len(tensors)} tensors, {numel:,} parameters"]
    if config is None:
        lines.append("no adapter_config.json beside it")
    else:
        keys = ("peft_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora")
        shown = {k: config[k] for k in keys if k in config}
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines.append(f"\n{'tensor':<{width}}  {'shape':>14}  dtype")
    lines += [f"{t['key']:<{width}}  {str(t['shape']):>14}  {t['dtype']}" for t in tensors]
    return result, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="version and CPU delta path")
    commands = parser.add_subparsers(dest="command")
    p_diff = commands.add_parser("diff", help="L2 and max|Δ| between two saved adapters")
    p_diff.add_argument("adapter_a")
    p_diff.add_argument("adapter_b")
    p_diff.add_argument("--top", type=int, default=None, metavar="N", help="show the N largest")
    p_diff.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_inspect = commands.add_parser("inspect", help="keys, shapes, dtypes and config")
    p_inspect.add_argument("adapter")
    p_inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if args.command is None and not args.version:
        parser.error("a command is required (diff or inspect), or --version")
    if args.command == "diff" and args.top is not None and args.top < 0:
        parser.error("--top must be >= 0")
    where = f"{PROG} {args.command or '--version'}"
    try:
        if args.version:
            from ._delta import weight_delta_path

            print(f"fieldkit-training {__version__}")
            print(f"weight_delta on the CPU: {weight_delta_path()}")
            return 0
        if args.command == "diff":
            result, text = diff(args.adapter_a, args.adapter_b, args.top)
        else:
            result, text = inspect(args.adapter)
    except ModuleNotFoundError as e:
        print(f"{where}: {missing(PROG, e.name or 'torch')}", file=sys.stderr)
        return 2
    except BAD_INPUT as e:
        print(f"{where}: {str(e).removeprefix(f'{PROG}: ')}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else text)
    if args.command == "diff" and not result["compared"]:
        print(
            f"{where}: the two adapters share no tensor (same key and shape), so nothing was "
            "compared and the figures above say nothing; see the keys only in one and the "
            "shape differences.",
            file=sys.stderr,
        )
        return 1
    return 0
