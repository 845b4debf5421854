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


# Trees of dicts and lists with odd sizes, as models build them (names like flatten's).
_names = st.text("abcxyz_", min_size=1, max_size=3)
_trees = st.recursive(
    st.integers(1, 3).map(lambda n: torch.zeros(n)),
    lambda kids: (
        st.dictionaries(_names, kids, min_size=1, max_size=3)
        | st.lists(kids, min_size=1, max_size=3)
    ),
    max_leaves=8,
).filter(lambda t: isinstance(t, dict))


@given(t=_trees)
def test_unflatten_inverts_flatten_on_any_tree(t):
    flat = tree.flatten(t)
    back = tree.unflatten(flat)
    assert tree.flatten(back).keys() == flat.keys()
    assert torch.utils._pytree.tree_structure(back) == torch.utils._pytree.tree_structure(t)


@pytest.mark.parametrize(
    ("flat", "error", "offending"),
    [
        ({"a..b": 1}, ValueError, "'a..b'"),
        ({"a.": 1}, ValueError, "'a.'"),
        ({".a": 1}, ValueError, "'.a'"),
        ({"": 1}, ValueError, "''"),
        ({1: 1}, TypeError, r"got 1 \(int\)"),
        ({("a", "b"): 1}, TypeError, r"\('a', 'b'\)"),
        ({"a.0": 1, "a.2": 2}, ValueError, r"'a\.2'.*not exactly 0\.\.1"),
        ({"a.1": 1}, ValueError, r"'a\.1'"),
        ({"a.0": 1, "a.00": 2}, ValueError, r"'a\.00'"),
        ({"a.b": 1, "a": 2}, ValueError, r"'a' is both a leaf and a prefix of 'a\.b'"),
        ({"a": 2, "a.b.c": 1}, ValueError, r"'a\.b\.c' nests under a leaf 'a'"),
    ],
)
def test_unflatten_refuses_what_flatten_never_writes(flat, error, offending):
    with pytest.raises(error, match=offending):
        tree.unflatten(flat)


@pytest.mark.parametrize(
    ("t", "error", "offending"),
    [
        ({"a": {"": 1}}, ValueError, "''"),
        ({"a": {3: 1}}, TypeError, "got 3 .* at 'a'"),
        ({"a": {"0": 1, "2": 2}}, ValueError, r"'a\.2'"),
    ],
)
def test_flatten_refuses_what_unflatten_could_not_invert(t, error, offending):
    with pytest.raises(error, match=offending):
        tree.flatten(t)


def test_digit_keys_that_are_list_positions_and_other_keys_stay_a_dict():
    back = tree.unflatten({"a.0": 1, "a.b": 2, "c.0": 3, "c.1": 4})
    assert back == {"a": {"0": 1, "b": 2}, "c": [3, 4]}
