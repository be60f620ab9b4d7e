"""Hypothesis strategies, all in one place."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)  # () is a scalar


@st.composite
def tensors(draw, shape=None, dtype=None, specials=True):
    """Random values; optionally NaN / inf / -0.0 in the first element, to test bit-exactness."""
    shape = draw(shapes) if shape is None else shape
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if specials and t.numel() and draw(st.booleans()):
        t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0]))
    return t


@st.composite
def module_trees(draw, max_depth: int = 2):
    """An nn.Module tree of random depth whose parameters have random shapes, dtypes (zero-size
    and scalar included) and requires_grad flags."""

    def fill(module: nn.Module, depth: int) -> None:
        for i in range(draw(st.integers(0, 3))):
            value = draw(tensors())
            module.register_parameter(
                f"p{i}", nn.Parameter(value, requires_grad=draw(st.booleans()))
            )
        if depth < max_depth:
            for j in range(draw(st.integers(0, 2))):
                child = nn.Module()
                module.add_module(f"m{j}", child)
                fill(child, depth + 1)

    root = nn.Module()
    fill(root, 0)
    return root


@st.composite
def states_for(draw, model: nn.Module):
    """A state dict for a random subset of ``model``'s parameters, matching shape and dtype."""
    params = dict(model.named_parameters())
    names = draw(st.lists(st.sampled_from(sorted(params)), unique=True)) if params else []
    return {n: draw(tensors(shape=params[n].shape, dtype=params[n].dtype)) for n in names}


@st.composite
def state_pairs(draw):
    """Two finite state dicts with the same names, shapes and dtypes (before, after)."""
    names = draw(st.lists(st.text("abcxyz.", min_size=1, max_size=6), unique=True, max_size=5))
    before, after = {}, {}
    for name in names:
        shape, dtype = draw(shapes), draw(st.sampled_from(DTYPES))
        before[name] = draw(tensors(shape=shape, dtype=dtype, specials=False))
        after[name] = draw(tensors(shape=shape, dtype=dtype, specials=False))
    return before, after
