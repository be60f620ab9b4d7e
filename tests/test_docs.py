"""Every public docstring's example runs and gives what it says."""

import doctest
import importlib

import pytest

import fieldkit.training

MODULES = sorted(
    {f"fieldkit.training.{m}" for m in fieldkit.training._EXPORTS.values()}
    | {"fieldkit.training.hf", "fieldkit.training._names"}
)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0


def test_every_public_name_has_a_runnable_example():
    finder = doctest.DocTestFinder()
    for name in fieldkit.training.__all__:
        obj = getattr(fieldkit.training, name)
        if name == "StateDict":
            continue  # a type alias
        tests = finder.find(obj, name)
        assert any(t.examples for t in tests), f"{name} has no >>> example"
