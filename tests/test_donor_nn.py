"""Bag pooling and ordinal losses (pure torch): hand-computed cases and float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellfm_sc.nn.ordinal import (
    CumulativeLinkOutput,
    class_probabilities,
    corn_loss,
    corn_probabilities,
    cumulative_link_log_probabilities,
    cumulative_link_loss,
    exceedance_probabilities,
    n_outputs,
    ordinal_loss,
    predict_classes,
)
from cellfm_sc.nn.pooling import (
    GatedAttentionPooling,
    MeanPooling,
    RunningStandardize,
    segment_softmax,
    segment_sum,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------ pooling


def test_segment_softmax_matches_per_segment_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(11, generator=g, dtype=torch.float64) * 5
    seg = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1, 1, 2])
    w = segment_softmax(scores, seg, 3)
    for s in range(3):
        m = seg == s
        torch.testing.assert_close(w[m], torch.softmax(scores[m], 0))
        assert float(w[m].sum()) == pytest.approx(1.0, abs=1e-12)


def test_segment_softmax_is_stable_for_large_scores():
    w = segment_softmax(torch.tensor([1000.0, 1000.0, -1000.0]), torch.tensor([0, 0, 1]), 2)
    assert torch.isfinite(w).all()
    assert w.tolist() == [0.5, 0.5, 1.0]


def test_gated_attention_matches_the_formula_in_float64():
    torch.manual_seed(1)
    pool = GatedAttentionPooling(6, hidden=5).double().eval()
    h = torch.randn(7, 6, dtype=torch.float64)
    bag = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    pooled, weight = pool(h, bag, 2)
    v, u, w = pool.V, pool.U, pool.w
    for b in range(2):
        hb = h[bag == b]
        s = (torch.tanh(hb @ v.weight.T + v.bias) * torch.sigmoid(hb @ u.weight.T + u.bias)) @ (
            w.weight.T
        ) + w.bias
        a = torch.softmax(s.squeeze(1), 0)
        torch.testing.assert_close(weight[bag == b], a)
        torch.testing.assert_close(pooled[b], (a[:, None] * hb).sum(0))


def test_mean_pooling_is_the_mean_and_weights_sum_to_one():
    h = torch.arange(12, dtype=torch.float64).view(6, 2)
    bag = torch.tensor([1, 0, 1, 1, 0, 1])
    pooled, weight = MeanPooling()(h, bag, 2)
    torch.testing.assert_close(pooled[0], h[bag == 0].mean(0))
    torch.testing.assert_close(pooled[1], h[bag == 1].mean(0))
    torch.testing.assert_close(segment_sum(weight, bag, 2), torch.ones(2, dtype=torch.float64))


def test_running_standardize_uses_running_statistics_never_the_batch_alone():
    norm = RunningStandardize(2, momentum=0.5)
    first = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    out = norm.train()(first)  # the first batch sets the statistics
    torch.testing.assert_close(norm.mean, torch.tensor([1.0, 20.0]))
    torch.testing.assert_close(norm.var, torch.tensor([1.0, 100.0]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-4, rtol=0)
    # a later batch of one donor's cells is not centred on itself
    second = torch.tensor([[4.0, 20.0], [6.0, 20.0]])
    out2 = norm(second)
    torch.testing.assert_close(norm.mean, torch.tensor([3.0, 20.0]))  # halfway (momentum 0.5)
    assert float(out2[:, 0].mean()) > 0.5
    frozen = norm.eval()(second)  # eval: no update
    torch.testing.assert_close(norm.mean, torch.tensor([3.0, 20.0]))
    torch.testing.assert_close(frozen, out2)


# ------------------------------------------------------------------------------------ ordinal


def test_cumulative_link_hand_computed_case():
    # score 0.5, thresholds -1 and 1: logits s - t = [1.5, -0.5]
    out = CumulativeLinkOutput(1, 3)
    with torch.no_grad():
        out.score.weight.fill_(1.0)
        out.score.bias.zero_()
        out.first.fill_(-1.0)
        out.gaps.fill_(math.log(math.expm1(2.0 - 1e-3)))  # softplus(gap) + 1e-3 = 2
    z = out(torch.tensor([[0.5]]))
    torch.testing.assert_close(z, torch.tensor([[1.5, -0.5]]))
    # P(y>0) = sigmoid(1.5) = 0.8175744762, P(y>1) = sigmoid(-0.5) = 0.3775406688
    expected = torch.tensor([[0.1824255238, 0.4400338074, 0.3775406688]])
    torch.testing.assert_close(class_probabilities("cumulative_link", z), expected)
    losses = [cumulative_link_loss(z, torch.tensor([k])).item() for k in range(3)]
    assert losses == pytest.approx([1.7014132779, 0.8209037200, 0.9740769842], abs=1e-6)
    objective, per = ordinal_loss("cumulative_link", z.repeat(2, 1), torch.tensor([0, 2]))
    assert objective.item() == pytest.approx((1.7014132779 + 0.9740769842) / 2, abs=1e-6)
    assert per.tolist() == pytest.approx([1.7014132779, 0.9740769842], abs=1e-6)


def test_cumulative_link_log_probabilities_match_float64_differences():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(50, 1, generator=g, dtype=torch.float64) * 4
    t = torch.tensor([-2.0, -0.3, 0.1, 3.0], dtype=torch.float64)
    z = s - t
    logp = cumulative_link_log_probabilities(z).double()
    gt = torch.sigmoid(z)
    ref = torch.cat([1 - gt[:, :1], gt[:, :-1] - gt[:, 1:], gt[:, -1:]], dim=1)
    torch.testing.assert_close(logp.exp(), ref, atol=1e-6, rtol=1e-5)
    extreme = cumulative_link_log_probabilities(torch.tensor([[80.0, 79.0], [-80.0, -81.0]]))
    assert torch.isfinite(extreme).all()


def test_corn_hand_computed_case():
    logits = torch.tensor([[1.0, -0.5], [1.0, -0.5]])
    labels = torch.tensor([1, 0])
    # label 1: task 0 (target 1) -log sig(1) = 0.3132616875, task 1 (target 0)
    # -log(1 - sig(-0.5)) = 0.4740769842; label 0: task 0 only, target 0: -log sig(-1) =
    # 1.3132616875; three (example, task) pairs
    assert corn_loss(logits, labels).item() == pytest.approx(
        (0.3132616875 + 0.4740769842 + 1.3132616875) / 3, abs=1e-6
    )
    objective, per = ordinal_loss("corn", logits, labels)
    assert objective.item() == pytest.approx(corn_loss(logits, labels).item())
    assert per.tolist() == pytest.approx([0.3132616875 + 0.4740769842, 1.3132616875], abs=1e-6)
    # P(y>0) = sig(1) = 0.7310585786, P(y>1) = sig(1) sig(-0.5) = 0.2760043
    p = corn_probabilities(logits[:1])
    torch.testing.assert_close(p, torch.tensor([[0.2689414214, 0.4550542339, 0.2760043447]]))
    # a zero weight leaves an example out of both sums
    w = torch.tensor([1.0, 0.0])
    assert corn_loss(logits, labels, w).item() == pytest.approx(
        (0.3132616875 + 0.4740769842) / 2, abs=1e-6
    )


def test_corn_loss_matches_a_loop_over_tasks():
    g = torch.Generator().manual_seed(4)
    k = 5
    logits = torch.randn(40, k - 1, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (40,), generator=g)
    total, pairs = 0.0, 0
    for task in range(k - 1):
        for i in range(40):
            y = int(labels[i])
            if y > task - 1:
                z = float(logits[i, task])
                total += -math.log(_sigmoid(z)) if y > task else -math.log(1 - _sigmoid(z))
                pairs += 1
    assert corn_loss(logits, labels).item() == pytest.approx(total / pairs, rel=1e-6)


def test_cross_entropy_and_prediction_rules():
    z = torch.tensor([[2.0, 0.0, 0.0]])
    objective, per = ordinal_loss("cross_entropy", z, torch.tensor([1]))
    expected = -math.log(1.0 / (math.exp(2.0) + 2.0))
    assert per.item() == pytest.approx(expected, abs=1e-6)
    assert objective.item() == pytest.approx(expected, abs=1e-6)
    # median class vs arg max
    p = torch.tensor([[0.4, 0.2, 0.4], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    assert predict_classes(p, ordinal=True).tolist() == [1, 2, 0]
    assert predict_classes(p, ordinal=False).tolist() == [0, 2, 0]
    torch.testing.assert_close(exceedance_probabilities(p[:1]), torch.tensor([[0.6, 0.4]]))
    assert n_outputs("cross_entropy", 4) == 4 and n_outputs("corn", 4) == 3
    with pytest.raises(ValueError, match="loss must be one of"):
        n_outputs("hinge", 4)


@pytest.mark.parametrize("loss", ["cumulative_link", "corn", "cross_entropy"])
def test_probabilities_are_distributions(loss):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(20, n_outputs(loss, 4), generator=g)
    if loss == "cumulative_link":
        z = torch.sort(z, dim=1, descending=True).values
    p = class_probabilities(loss, z)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(1).numpy(), 1.0, atol=1e-6)
