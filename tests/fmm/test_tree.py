"""Flatten/unflatten round trips and the helpers that build ensembles."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fmm import tree


def _example():
    return {
        "embed": {"weight": torch.randn(5, 3)},
        "blocks": [{"w": torch.randn(3, 3), "b": torch.zeros(3)} for _ in range(3)],
        "scale": torch.tensor(1.0),
        "ids": torch.arange(4),
    }


def test_flatten_names_read_like_a_state_dict():
    flat = tree.flatten(_example())
    assert list(flat) == [
        "embed.weight",
        "blocks.0.w",
        "blocks.0.b",
        "blocks.1.w",
        "blocks.1.b",
        "blocks.2.w",
        "blocks.2.b",
        "scale",
        "ids",
    ]


@given(n=st.integers(1, 12), width=st.integers(1, 4))
def test_unflatten_inverts_flatten(n, width):
    t = {"blocks": [{"w": torch.randn(width)} for _ in range(n)], "top": {"x": torch.ones(1)}}
    back = tree.unflatten(tree.flatten(t))
    assert isinstance(back["blocks"], list) and len(back["blocks"]) == n
    assert tree.flatten(back).keys() == tree.flatten(t).keys()
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(t)))


def test_stack_then_unstack_round_trips():
    trees = [_example() for _ in range(3)]
    stacked = tree.stack(trees)
    assert stacked["embed"]["weight"].shape == (3, 5, 3)
    for a, b in zip(tree.unstack(stacked), trees):
        assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b)))


def test_count_cast_and_map_with_path():
    t = _example()
    assert tree.count(t) == 15 + 3 * 12 + 1 + 4
    c = tree.cast(t, torch.float64)
    assert c["embed"]["weight"].dtype == torch.float64 and c["ids"].dtype == torch.int64
    named = tree.map_with_path(lambda name, x: name, t)
    assert named["blocks"][1]["w"] == "blocks.1.w"


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match=r"'a\.b'"):
        tree.flatten({"a.b": torch.ones(1)})
    with pytest.raises(ValueError, match="nests under a leaf"):
        tree.unflatten({"a": torch.ones(1), "a.b": torch.ones(1)})
    with pytest.raises(ValueError, match="leading axis"):
        tree.unstack({"a": torch.ones(2), "b": torch.ones(3)})
