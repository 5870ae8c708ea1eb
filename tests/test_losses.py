import math

import pytest
import torch

from stitching.errors import StitchingError
from stitching.objectives import fula_loss, fula_weights, hint_loss, relative_error, slm_loss, tlm_loss


def test_relative_error_is_per_sample_then_averaged():
    target = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    pred = torch.tensor([[3.0, 5.0], [0.0, 3.0]])    # errors 1 and 2
    assert relative_error(pred, target).item() == pytest.approx((1 / 5 + 2 / 1) / 2)


def test_fula_matches_the_formula_on_a_hand_built_example():
    # three hint terms (cut points j, j+1, j+2), two samples, tiny maps
    stitched = [torch.tensor([[[[1.0, 2.0]]], [[[0.0, 1.0]]]]),
                torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
                torch.tensor([[1.0], [4.0]])]
    targets = [torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]]),
               torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]),
               torch.tensor([[2.0], [2.0]])]
    weights = torch.tensor([0.5, 0.3, 0.2])
    # hand computation: sample-wise ||s - t|| / ||t||, averaged over the two samples
    term_j = (1 / math.sqrt(2) + 1 / 2) / 2
    term_j1 = (1 / 1 + 1 / math.sqrt(2)) / 2
    term_j2 = (1 / 2 + 2 / 2) / 2
    expected = 0.5 * term_j + 0.3 * term_j1 + 0.2 * term_j2
    assert fula_loss(stitched, targets, weights).item() == pytest.approx(expected, rel=1e-6)


def test_fula_with_first_weight_only_is_hint():
    torch.manual_seed(0)
    stitched = [torch.randn(4, 3, 5, 5), torch.randn(4, 6, 3, 3), torch.randn(4, 8)]
    targets = [torch.randn(4, 3, 5, 5), torch.randn(4, 6, 3, 3), torch.randn(4, 8)]
    first_only = fula_weights("first", 3)
    assert first_only.tolist() == [1.0, 0.0, 0.0]
    assert fula_loss(stitched, targets, first_only).item() == pytest.approx(hint_loss(stitched[0], targets[0]).item())
    assert fula_loss(stitched, targets, torch.tensor([1.0, 0.0, 0.0])).item() != pytest.approx(
        fula_loss(stitched, targets, fula_weights("uniform", 3)).item())


def test_fula_weights_from_config():
    assert fula_weights("uniform", 4).tolist() == pytest.approx([0.25] * 4)
    assert fula_weights("last", 3).tolist() == [0.0, 0.0, 1.0]
    assert fula_weights("first:2", 4).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert fula_weights("first:7", 3).tolist() == pytest.approx([1 / 3] * 3)
    assert fula_weights("first:1", 3).tolist() == fula_weights("first", 3).tolist()
    assert fula_weights([1, 3], 2).tolist() == pytest.approx([0.25, 0.75])
    with pytest.raises(StitchingError, match="non-negative"):
        fula_weights([1.0, -0.5, 0.5], 3)
    with pytest.raises(StitchingError, match="has 2 entries but this end layer has 3 hint terms"):
        fula_weights([0.5, 0.5], 3)
    with pytest.raises(StitchingError, match="not understood"):
        fula_weights("deepest", 3)


def test_slm_is_cross_entropy_against_soft_labels():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    teacher = torch.tensor([[0.0, 1.0, 3.0]])
    p = torch.softmax(teacher, -1)[0].tolist()
    q = torch.softmax(logits, -1)[0].tolist()
    expected = -sum(pi * math.log(qi) for pi, qi in zip(p, q))
    assert slm_loss(logits, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_tlm_is_cross_entropy_against_labels():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    q0 = math.exp(0.5) / (math.exp(1) + math.exp(2) + math.exp(0.5))
    expected = (-math.log(q0) + math.log(3)) / 2
    assert tlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_the_next_token_loss_is_the_mean_over_scored_positions_only():
    """Padded and unscored positions leave the language-model loss: the mean of −log p(next
    token) over the real pairs, written out position by position."""
    from stitching.objectives.tasks import NextToken

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (3, 6), generator=generator)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    logits = torch.randn(3, 6, 11, generator=generator)
    task = NextToken()
    _, labels = task.split({"input_ids": ids, "attention_mask": mask})
    terms = [-torch.log_softmax(logits[n, t], -1)[ids[n, t + 1]] for n in range(3) for t in range(5)
             if mask[n, t] and mask[n, t + 1]]
    assert len(terms) == 5 + 3 + 1
    assert task.loss(logits, labels).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
