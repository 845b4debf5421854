"""Laws of fmm.boxes (conversions, IoU, GIoU) and fmm.matching (exact assignment), and the
detection losses against TorchMultimodal's / MDETR's definitions."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fmm import boxes, matching, random
from tests.reference import reference


def _boxes(seed, *shape):
    """Random ``cxcywh`` boxes with positive sizes, inside ``[0, 1]``-ish."""
    k1, k2 = random.split(random.key(seed))
    centre = random.uniform(k1, (*shape, 2)) * 0.6 + 0.2
    size = random.uniform(k2, (*shape, 2)) * 0.35 + 0.05
    return torch.cat((centre, size), dim=-1)


@given(seed=st.integers(0, 10_000))
def test_cxcywh_and_xyxy_are_inverse(seed):
    b = _boxes(seed, 7)
    torch.testing.assert_close(boxes.xyxy_to_cxcywh(boxes.cxcywh_to_xyxy(b)), b)


@given(seed=st.integers(0, 10_000))
def test_giou_of_a_box_with_itself_is_one(seed):
    b = boxes.cxcywh_to_xyxy(_boxes(seed, 9))
    torch.testing.assert_close(boxes.generalized_iou(b, b), torch.ones(9))


@given(seed=st.integers(0, 10_000))
def test_giou_is_symmetric_and_in_minus_one_one(seed):
    a, b = boxes.cxcywh_to_xyxy(_boxes(seed, 5)), boxes.cxcywh_to_xyxy(_boxes(seed + 1, 6))
    table = boxes.generalized_iou(a[:, None], b[None])
    torch.testing.assert_close(table, boxes.generalized_iou(b[:, None], a[None]).T)
    assert (table >= -1).all() and (table <= 1).all()
    assert (table <= boxes.box_iou(a[:, None], b[None]) + 1e-7).all()  # GIoU <= IoU


@given(seed=st.integers(0, 10_000))
def test_giou_equals_iou_when_one_box_contains_the_other(seed):
    outer = boxes.cxcywh_to_xyxy(_boxes(seed, 8))
    shrink = random.uniform(random.key(seed + 7), (8, 4)) * 0.5  # move each side inward
    w = (outer[:, 2:] - outer[:, :2]).repeat(1, 2) / 2
    inner = outer + torch.tensor([1.0, 1.0, -1.0, -1.0]) * shrink * w
    torch.testing.assert_close(boxes.generalized_iou(outer, inner), boxes.box_iou(outer, inner))


def test_giou_of_far_apart_boxes_tends_to_minus_one():
    a = torch.tensor([0.0, 0.0, 1e-3, 1e-3])
    b = torch.tensor([1.0 - 1e-3, 1.0 - 1e-3, 1.0, 1.0])
    assert boxes.generalized_iou(a, b) < -0.99


def test_iou_and_giou_equal_torchvision_pairwise_tables():
    ops = reference("torchvision.ops")
    a, b = boxes.cxcywh_to_xyxy(_boxes(0, 6)), boxes.cxcywh_to_xyxy(_boxes(1, 4))
    torch.testing.assert_close(boxes.box_iou(a[:, None], b[None]), ops.box_iou(a, b))
    torch.testing.assert_close(
        boxes.generalized_iou(a[:, None], b[None]), ops.generalized_box_iou(a, b)
    )


def _brute_force(cost):
    n, m = cost.shape
    if n > m:
        return _brute_force(cost.T)
    return min(
        sum(cost[i, j].item() for i, j in enumerate(cols))
        for cols in itertools.permutations(range(m), n)
    )


@given(n=st.integers(1, 6), m=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_assignment_costs_what_brute_force_over_permutations_costs(n, m, seed):
    cost = random.normal(random.key(seed), (n, m), dtype=torch.float64)
    rows, cols = matching.linear_sum_assignment(cost)
    assert len(rows) == min(n, m) and len(set(cols.tolist())) == len(cols)
    assert rows.tolist() == sorted(rows.tolist())
    assert cost[rows, cols].sum().item() == pytest.approx(_brute_force(cost), abs=1e-9)


def test_assignment_equals_scipys_linear_sum_assignment():
    scipy_optimize = reference("scipy.optimize")
    for seed, (n, m) in enumerate([(1, 1), (4, 4), (3, 9), (9, 3), (20, 100), (100, 7)]):
        cost = random.uniform(random.key(seed), (n, m), dtype=torch.float64)
        rows, cols = matching.linear_sum_assignment(cost)
        want_rows, want_cols = scipy_optimize.linear_sum_assignment(cost.numpy())
        assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()


def test_assignment_handles_ties_and_refuses_non_finite_costs():
    _, cols = matching.linear_sum_assignment(torch.zeros(3, 3))
    assert sorted(cols.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="inf or nan"):
        matching.linear_sum_assignment(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match=r"cost must be \[n, m\]"):
        matching.linear_sum_assignment(torch.zeros(3))


def test_match_skips_padding_targets_and_gives_each_real_one_its_own_query():
    cost = random.uniform(random.key(3), (2, 5, 3))
    valid = torch.tensor([[True, False, True], [True, True, True]])
    query_of = matching.match(cost, valid)
    assert query_of[0, 1] == -1 and (query_of[valid] >= 0).all()
    for b in range(2):
        real = query_of[b][valid[b]]
        assert len(set(real.tolist())) == len(real)
        rows, cols = matching.linear_sum_assignment(cost[b][:, valid[b]])
        assert real[cols].tolist() == rows.tolist()


def test_match_is_one_opaque_node_of_a_compiled_graph():
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    fn = torch.compile(lambda c, v: matching.match(c * 2, v) + 1, backend=backend, fullgraph=True)
    cost, valid = random.uniform(random.key(4), (2, 6, 3)), torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(fn(cost, valid), matching.match(cost, valid) + 1)
    assert len(graphs) == 1


def _matched_case(seed, b=2, q=6, t=3, s=5, classes=8):
    keys = random.split(random.key(seed), 5)
    logits = random.normal(keys[0], (b, q, classes))
    pred = _boxes(seed + 1, b, q)
    target = _boxes(seed + 2, b, t)
    token_map = random.uniform(keys[1], (b, t, s)) < 0.4
    token_map[..., 0] = True  # every target names at least one token
    valid = torch.tensor([[True, True, False], [True, True, True]])
    query_of = matching.match(random.uniform(keys[2], (b, q, t)), valid)
    return logits, pred, target, token_map, valid, query_of


def _tmm_indices(query_of):
    out = []
    for row in query_of:
        targets = (row >= 0).nonzero().flatten()
        queries = row[targets]
        order = queries.argsort()
        out.append((queries[order], torch.arange(len(targets))[order]))
    return out


def test_box_and_soft_token_losses_equal_torchmultimodals():
    tmm = reference("torchmultimodal.modules.losses.mdetr")
    logits, pred, target, token_map, valid, query_of = _matched_case(0)
    n = valid.sum()
    indices = _tmm_indices(query_of)
    l1, giou = boxes.box_losses(pred, target, query_of, n)
    want = tmm.box_losses(pred, [target[i][valid[i]] for i in range(2)], indices, n)
    torch.testing.assert_close(l1, want.l1_loss)
    torch.testing.assert_close(giou, want.giou_loss)
    targets = boxes.token_targets(token_map, logits.shape[-1])
    ce = boxes.soft_token_loss(logits, targets, query_of, n, no_object_weight=0.1)
    positive = torch.cat([targets[i][valid[i]] for i in range(2)])
    want_ce = tmm.soft_token_prediction_loss(
        logits, valid.sum(1).tolist(), positive, indices, n, no_object_weight=0.1
    )
    torch.testing.assert_close(ce, want_ce)


def _alignment_by_loops(queries, tokens, token_map, query_of, n, temperature):
    """MDETR's contrastive alignment loss written out query by query and token by token."""
    total = torch.zeros(())
    for b in range(queries.shape[0]):
        logits = queries[b] @ tokens[b].T / temperature
        positive = torch.zeros_like(logits, dtype=torch.bool)
        for t, q in enumerate(query_of[b].tolist()):
            if q >= 0:
                positive[q] |= token_map[b, t]
        for scores, pos in ((logits, positive), (logits.T, positive.T)):
            for row, p in zip(scores, pos):
                if p.any():
                    total = total + (-row[p].mean() + row.logsumexp(0)) / 2
    return total / n


def test_contrastive_alignment_equals_its_written_out_definition():
    _, _, _, token_map, valid, query_of = _matched_case(1)
    keys = random.split(random.key(9))
    queries = torch.nn.functional.normalize(random.normal(keys[0], (2, 6, 4)), dim=-1)
    tokens = torch.nn.functional.normalize(random.normal(keys[1], (2, 5, 4)), dim=-1)
    got = boxes.contrastive_alignment_loss(queries, tokens, token_map, query_of, valid.sum())
    want = _alignment_by_loops(queries, tokens, token_map, query_of, valid.sum(), 0.07)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
