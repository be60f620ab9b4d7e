"""Write the site's generated parts from their sources, so they cannot go stale.

    python docs/generate.py          # write them
    python docs/generate.py --check  # exit 1 if a written text differs from what it would write

- ``docs/troubleshooting.md``: every error and warning message in ``fieldkit/training``, read
  from the code itself (each ``raise ...(...)``, ``return ...Error(...)`` of a helper and
  ``warnings.warn(...)`` with a literal or f-string message, a module's string constants filled
  in, and the reasons the functions in ``REASONS`` give), grouped by what the user was doing;
- ``benchmarks/results/swap_bench.md`` and ``benchmarks/results/gpu_h100.md``: the benchmark
  tables, from ``swap_bench.json`` and ``gpu_report_h100.json``;
- ``docs/assets/*.png``: the pictures, drawn from the same JSON (needs matplotlib; ``--check``
  leaves them out).

The tests run ``--check``; the docs build runs it too.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT / "benchmarks")]

# What the user was doing when a module's messages reach them, and where to read more.
GROUPS = [
    ("Installing and importing", ["__init__.py"], "index.md#install"),
    (
        "Reading an adapter: `from_disk`, `load_adapter_dict`",
        ["_adapter.py", "_format.py"],
        "guides/reference-policy.md",
    ),
    (
        "Swapping a reference in and out: `with snap:`, `swap_in`, `restore`",
        ["_swap.py", "_guards.py", "_snapshot.py", "_binding.py", "_buffers.py"],
        "refusals.md",
    ),
    (
        "Capturing, measuring, updating: `capture_trainable`, the tracker, `weight_delta`, "
        "`soft_update_`",
        ["_state.py", "_checks.py", "_delta.py", "_tracker.py", "_report.py", "_kernel.py"],
        "guides/did-my-lora-move.md",
    ),
    (
        "Under FSDP2, DeepSpeed and accelerate",
        ["_sharding.py", "_zero.py"],
        "guides/sharded.md",
    ),
    ("Saving", ["_saving.py"], "guides/saving.md"),
    ("With `transformers.Trainer`: the callbacks", ["hf.py"], "guides/trainer.md"),
    ("With TRL", ["trl.py"], "guides/trl.md"),
    ("From the shell: `python -m fieldkit.training`", ["_cli.py"], "guides/did-my-lora-move.md"),
]


def _text(node: ast.AST, constants: dict[str, str], top: bool = True) -> str | None:
    """A message as a reader meets it: literal parts as they are (a module's string constants
    filled in), computed parts as ``…``; None for a message not written out where it is used."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and not top:
        return constants.get(node.id)
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left, constants, False), _text(node.right, constants, False)
        if top and left is None and right is None:
            return None
        return (left or "…") + (right or "…")
    return None


REASONS = ("_why", "_unusable", "unusable", "swapped")
"""Functions whose strings are the reasons filled into other messages (``{why}``)."""


class _Finder(ast.NodeVisitor):
    """Each message with the function (``Class.method``) that raises, returns or warns it."""

    def __init__(self, constants: dict[str, str]) -> None:
        self.constants = constants
        self.stack: list[str] = []
        self.found: list[tuple[int, str, str, str]] = []

    def _scope(self, node) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def _add(self, node, call: ast.Call, kind: str) -> None:
        self._found(node, call.args[0] if call.args else None, kind)

    def _found(self, node, message: ast.AST | None, kind: str) -> None:
        text = _text(message, self.constants) if message is not None else None
        if text is not None:
            self.found.append((node.lineno, kind, ".".join(self.stack) or "(module)", text))

    def visit_Raise(self, node: ast.Raise) -> None:
        kind = ast.unparse(node.exc.func) if isinstance(node.exc, ast.Call) else ""
        if kind.endswith(("Error", "Exception", "Interrupt")):  # not a helper that builds one
            self._add(node, node.exc, kind)
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:  # a helper that builds the error
        kind = ast.unparse(node.value.func) if isinstance(node.value, ast.Call) else ""
        if kind.endswith("Error"):
            self._add(node, node.value, kind)
        elif self.stack and self.stack[-1] in REASONS and node.value is not None:
            self._found(node, node.value, "fills a … in this group")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        reason = self.stack and self.stack[-1] in REASONS
        if reason and isinstance(node.func, ast.Attribute) and node.func.attr == "append":
            self._found(node, node.args[0], "fills a … in this group")  # a reason built up
        if ast.unparse(node.func) == "warnings.warn":
            category = node.args[1] if len(node.args) > 1 else None
            self._add(node, node, ast.unparse(category) if category else "UserWarning")
        self.generic_visit(node)


def messages(path: Path) -> list[tuple[str, str, str]]:
    """``(kind, function, message)`` for every message written out in ``path``, in order."""
    tree = ast.parse(path.read_text())
    constants = {
        target.id: text
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and (text := _text(node.value, {}, top=False)) is not None
    }
    finder = _Finder(constants)
    finder.visit(tree)
    return [(kind, name, text) for _, kind, name, text in sorted(finder.found)]


def _cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def troubleshooting() -> str:
    lines = [
        "# Troubleshooting",
        "",
        "Every error and warning fieldkit can give, word for word as the code writes it (`…` "
        "stands for what is filled in: the keys, the shapes, the adapter's name), grouped by "
        "what you were doing. Each message says what went wrong and, where there is something "
        "to do, what to do; the page linked under each heading says why. This page is "
        "generated from the code (`python docs/generate.py`), and the tests fail when it falls "
        "behind. A row *raised as* “fills a … in this group” is a reason that completes another "
        "message of its group (the `…` of `…: …. Nothing was changed.`).",
        "",
        "Two rules hold for all of them: an error raised before a swap changes anything leaves "
        "the model exactly as it was (values and parameter objects), and an error on the way "
        "out of a swap is raised after the live weights are back.",
        "",
    ]
    found = {p.name: messages(p) for p in (ROOT / "fieldkit" / "training").glob("*.py")}
    grouped = {f for _, files, _ in GROUPS for f in files}
    missing = sorted(name for name, rows in found.items() if rows and name not in grouped)
    if missing:
        raise SystemExit(f"generate.py: no group for the messages of {missing}")
    for title, files, more in GROUPS:
        rows = [(f, *m) for f in files for m in found[f]]
        if not rows:
            continue
        page = more.split("#")[0].removeprefix("guides/").removesuffix(".md").replace("-", " ")
        lines += [f"## {title}", "", f"Why, and what to do: [{page}]({more}).", ""]
        lines += ["| message | raised as | where |", "|---|---|---|"]
        lines += [
            f"| {_cell(text)} | `{kind}` | `{file.removesuffix('.py')}.{name}` |"
            for file, kind, name, text in rows
        ]
        lines.append("")
    return "\n".join(lines)


def _blocks(text: str) -> str:
    """A blank line wherever a table starts or ends, as Markdown needs around a table."""
    out: list[str] = []
    for line in text.strip("\n").splitlines():
        if out and out[-1] and out[-1].startswith("|") != line.startswith("|"):
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


def tables() -> dict[Path, str]:
    """The benchmark tables the Performance page includes, from the committed JSON."""
    import swap_bench

    cpu = json.loads((RESULTS / "swap_bench.json").read_text())
    gpu = json.loads((RESULTS / "gpu_report_h100.json").read_text())
    head = "<!-- generated by docs/generate.py from {} -->\n\n`{}` — torch {}, {}, {}\n\n"
    v, m = gpu["versions"], cpu["machine"]
    return {
        RESULTS / "swap_bench.md": head.format(
            "swap_bench.json", cpu["command"], m["torch"], m["device"], m["cpu"]
        )
        + _blocks("\n".join(swap_bench.table(case) for case in cpu["cases"])),
        RESULTS / "gpu_h100.md": head.format(
            "gpu_report_h100.json",
            "PYTHONPATH=. python3 benchmarks/gpu_check.py",
            v["torch"],
            v["gpu"],
            gpu["date"],
        )
        + _blocks("\n".join(swap_bench.table(case) for case in gpu["cases"])),
    }


def timeline(path: Path) -> str:
    """One training step with a reference forward between the policy's forward and backward:
    what each parameter's ``.data`` holds at each moment (pointer mode)."""
    import swap_bench

    plt = swap_bench.pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed"
    steps = [  # (what, length, colour, hatch, what the LoRA parameters hold)
        ("policy forward\n(with grad)", 3, "#1f77b4", "", "policy"),
        ("swap in", 0.6, "#d62728", "//", ""),
        ("reference forward\n(no_grad)", 3, "#ff7f0e", "..", "reference"),
        ("restore", 0.6, "#d62728", "//", ""),
        ("backward", 4, "#2ca02c", "\\\\", "policy"),
        ("optimizer\nstep", 1.2, "#7f7f7f", "xx", "policy"),
    ]
    fig, ax = plt.subplots(figsize=(11, 2.6))
    x = 0.0
    for what, length, colour, hatch, holds in steps:
        ax.barh(1, length, left=x, color=colour, hatch=hatch, edgecolor="black")
        ax.text(x + length / 2, 1, what, ha="center", va="center", fontsize=9,
                bbox=dict(facecolor="white", alpha=0.8, lw=0))  # fmt: skip
        if holds:
            ax.text(x + length / 2, 0.45, f"LoRA .data: {holds}", ha="center", fontsize=8)
        x += length
    ax.set(xlim=(0, x), ylim=(0.2, 1.6), yticks=[], xticks=[])
    ax.set_title(
        "One step (not to scale), the reference forward between the policy's forward and its "
        "backward.\nThe swap and the restore move no autograd version counter: the backward's "
        "gradients are exactly those of a step without it.",
        fontsize=9,
    )
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def pictures(out: Path) -> list[str]:
    import engine_bench
    import swap_bench

    out.mkdir(parents=True, exist_ok=True)
    cpu = json.loads((RESULTS / "swap_bench.json").read_text())
    engines = json.loads((RESULTS / "engine_bench.json").read_text())
    done = [
        swap_bench.plot(cpu["sweep"], out / "swap_bench.png"),
        swap_bench.plot_delta(cpu["cases"], out / "delta_bench.png"),
    ]
    engine_bench.plot(engines["results"], out / "engine_bench.png")
    return [*done, f"plot: {out / 'engine_bench.png'}", timeline(out / "timeline.png")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare the texts; write nothing")
    args = ap.parse_args(argv)
    texts = {ROOT / "docs" / "troubleshooting.md": troubleshooting(), **tables()}
    stale = [p for p, text in texts.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run python docs/generate.py)")
        return 1 if stale else 0
    for p, text in texts.items():
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")
    for line in pictures(ROOT / "docs" / "assets"):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
