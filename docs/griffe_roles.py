"""A Griffe extension for the API reference: the docstrings' Sphinx roles (``:func:`swap_in```,
``:meth:`from_disk```, ``:class:`~fieldkit.training.hf.ReferenceSyncCallback```) become links to
the documented names, checked by the strict build; a role naming something the reference does
not document (a private helper) becomes plain code. The sources keep their roles, which read
well in ``help()`` and editors.

Loaded by ``mkdocs.yml`` (``extensions: [docs/griffe_roles.py:SphinxRoles]``).
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

ROLE = re.compile(r":(?:func|meth|class|attr|mod|data):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.path != "fieldkit":
            return
        documented, classes = _documented(pkg)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                owner = next((c for c in obj.path.split(".") if c in classes), None)
                obj.docstring.value = ROLE.sub(
                    lambda m, owner=owner: _link(m, documented, classes, owner),
                    obj.docstring.value,
                )


def _documented(pkg: griffe.Module) -> tuple[set[str], dict[str, str]]:
    """The paths the API page renders — its ``::: <path>`` entries and the public members of
    each class among them — and those classes by name."""
    api = (Path(__file__).parent / "api.md").read_text()
    documented = set(re.findall(r"^::: (\S+)$", api, flags=re.M))
    classes: dict[str, str] = {}
    for path in list(documented):
        target = pkg.get_member(path.removeprefix("fieldkit."))
        target = target.final_target if target.is_alias else target
        if target.is_class:
            classes[path.rsplit(".", 1)[1]] = path
            documented |= {f"{path}.{m}" for m in target.members if not m.startswith("_")}
    return documented, classes


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _link(match: re.Match, documented: set[str], classes: dict[str, str], owner: str | None):
    short, target = match.group(1), match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    candidates = [target, f"fieldkit.training.{target}"]
    if owner is not None:
        candidates.append(f"{classes[owner]}.{target}")
    for path in candidates:
        if path in documented:
            return f"[`{title}`][{path}]"
    return f"`{title}`"
