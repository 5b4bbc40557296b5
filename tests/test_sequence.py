"""tdkd.sequence: the logits/actions shift, support restriction, action membership."""

from __future__ import annotations

import pytest
import torch

from tdkd.sequence import action_in_support, align_steps, restrict_support_mask
from tdkd.topp import nucleus_size, top_p_support


def test_align_steps_matches_a_loop():
    torch.manual_seed(0)
    b, length, v, k = 3, 6, 7, 4
    logits = torch.randn(b, length, v)
    tokens = torch.randint(0, v, (b, length))
    response = torch.zeros(b, length, dtype=torch.bool)
    response[0, 2:5] = True
    response[1, 1:6] = True
    response[2, 3:4] = True
    extra = torch.randn(b, length, k)
    steps = align_steps(logits, tokens, response, {"extra": extra})
    for i in range(b):
        for t in range(length - 1):
            # the action tokens[t+1] is chosen at the state whose logits are at position t
            torch.testing.assert_close(steps.q[i, t], logits[i, t])
            assert steps.actions[i, t] == tokens[i, t + 1]
            assert steps.mask[i, t] == response[i, t + 1]
            torch.testing.assert_close(steps.fields["extra"][i, t], extra[i, t + 1])


def test_align_steps_is_a_view_of_the_logits():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    steps = align_steps(
        logits, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool)
    )
    steps.q.sum().backward()
    assert (logits.grad[:, :-1] == 1).all() and (logits.grad[:, -1] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"logits": torch.zeros(2, 3)}, "logits must be"),
        ({"tokens": torch.zeros(2, 4, dtype=torch.long)}, "logits must be"),
        ({"response_mask": torch.ones(2, 3, dtype=torch.bool)}, "position 0"),
        ({"per_token": {"x": torch.zeros(2, 2)}}, "per-token field 'x'"),
    ],
)
def test_align_steps_bad_input(kwargs, match):
    args = {
        "logits": torch.zeros(2, 3, 5),
        "tokens": torch.zeros(2, 3, dtype=torch.long),
        "response_mask": torch.zeros(2, 3, dtype=torch.bool),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        align_steps(args["logits"], args["tokens"], args["response_mask"], args.get("per_token"))


@pytest.mark.parametrize("p_store", [1.0, 0.9])
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.9])
def test_restrict_equals_the_nucleus_computed_at_p(p_store, p):
    if p > p_store:
        return
    torch.manual_seed(1)
    logits = torch.randn(5, 11) * 2
    logits[0, 3] = logits[0, 4]  # a tie
    stored = top_p_support(logits, p_store)
    restricted = restrict_support_mask(stored.log_probs, stored.mask, p)
    direct = top_p_support(logits, p)
    for row in range(5):
        kept = stored.ids[row][restricted[row]].tolist()
        assert kept == direct.ids[row][direct.mask[row]].tolist()
    # slow reference: sort + cumsum on the full distribution
    probs = torch.softmax(logits.double(), -1)
    for row in range(5):
        order = sorted(range(11), key=lambda j, row=row: (-probs[row, j].item(), j))
        mass, size = 0.0, 0
        for j in order:
            if mass < p:
                size += 1
                mass += probs[row, j].item()
        assert int(restricted[row].sum()) == max(size, 1)
    assert (nucleus_size(stored.log_probs, p) == restricted.sum(-1)).all()


def test_restrict_keeps_empty_rows_empty():
    lp = torch.full((2, 3), float("-inf"))
    lp[0] = torch.tensor([0.7, 0.2, 0.1]).log()
    mask = torch.tensor([[True, True, True], [False, False, False]])
    out = restrict_support_mask(lp, mask, 0.5)
    assert out.tolist() == [[True, False, False], [False, False, False]]


def test_action_in_support_padding_never_matches():
    ids = torch.tensor([[0, 0], [2, 0]])
    mask = torch.tensor([[False, False], [True, False]])
    assert action_in_support(torch.tensor([0, 0]), ids, mask).tolist() == [False, False]
    assert action_in_support(torch.tensor([2, 2]), ids, mask).tolist() == [False, True]
