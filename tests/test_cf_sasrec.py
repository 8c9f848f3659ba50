"""SASRec pieces: the causal mask against a hand computation, causality and padding of the encoder,
and BCE steps that rank the true next item above a negative."""

from __future__ import annotations

import torch

from thinkrec.cf.sasrec import SASRec, causal_mask


def test_causal_mask_by_hand():
    want = torch.tensor(
        [
            [False, True, True, True],
            [False, False, True, True],
            [False, False, False, True],
            [False, False, False, False],
        ]
    )
    assert torch.equal(causal_mask(4), want)


def test_position_reads_only_the_past():
    torch.manual_seed(0)
    model = SASRec(num_items=20, hidden=16, blocks=2, max_len=6, heads=2).eval()
    a = torch.tensor([[0, 0, 3, 5, 7, 9]])
    b = torch.tensor([[0, 0, 3, 5, 11, 2]])  # differs from position 4 on
    ha, hb = model.encode(a), model.encode(b)
    torch.testing.assert_close(ha[:, :4], hb[:, :4])
    assert not torch.allclose(ha[:, 4:], hb[:, 4:])
    assert torch.isfinite(ha).all()  # left padding never yields NaN
    torch.testing.assert_close(model.user_vectors(a), ha[:, -1])  # the last position's vector


def test_bce_steps_rank_the_next_item_first():
    torch.manual_seed(0)
    model = SASRec(num_items=10, hidden=16, blocks=2, max_len=5, dropout=0.0)
    seq = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 5, 6, 7]])
    pos = torch.tensor([[0, 2, 3, 4, 5], [0, 0, 6, 7, 8]])
    neg = torch.tensor([[0, 9, 9, 9, 9], [0, 0, 1, 1, 1]])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = model.bce_loss(seq, pos, neg).item()
    for _ in range(60):
        loss = model.bce_loss(seq, pos, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    model.eval()
    u = model.user_vectors(seq)  # (2, H)
    s = u @ model.item.weight.T  # (2, I+1)
    assert s[0, 5] > s[0, 9] and s[1, 8] > s[1, 1]
