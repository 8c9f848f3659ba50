"""SASRec pieces: the causal mask against a hand computation, causality and padding of the encoder,
point-wise BCE steps, the per-row sequences and the export against hand computations."""

from __future__ import annotations

import numpy as np
import torch

from thinkrec.cf.sasrec import SASRec, causal_mask, export, scores, sequences


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


def test_sequences_by_hand():
    # User 1: items 5 (t=10), 3 (t=20), 4 (t=20, same second: ordered by item id), 9 (t=30).
    # User 2: item 7 (t=15). Queries see only what came strictly before their timestamp.
    users = np.array([1, 1, 2, 1, 1])
    items = np.array([9, 5, 7, 4, 3])
    ts = np.array([30, 10, 15, 20, 20])
    got = sequences(
        users,
        items,
        ts,
        query_users=np.array([1, 1, 1, 1, 2, 2, 3]),
        query_timestamps=np.array([10, 11, 20, 31, 15, 99, 50]),
        max_len=3,
    )
    want = [
        [0, 0, 0],  # nothing before t=10
        [0, 0, 5],
        [0, 0, 5],  # the two t=20 items are not strictly before t=20
        [3, 4, 9],  # last 3 of 5, 3, 4, 9
        [0, 0, 0],
        [0, 0, 7],
        [0, 0, 0],  # a user with no interactions
    ]
    np.testing.assert_array_equal(got, np.array(want))
    assert sequences(users[:0], items[:0], ts[:0], np.array([1]), np.array([5]), 2).tolist() == [[0, 0]]


def test_bce_steps_separate_liked_from_disliked():
    """Point-wise BCE on (sequence, target, label), as the reference trains it."""
    torch.manual_seed(0)
    model = SASRec(num_items=10, hidden=16, blocks=2, max_len=5, dropout=0.0)
    seq = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 5, 6, 7], [0, 1, 2, 3, 4], [0, 0, 5, 6, 7]])
    items = torch.tensor([5, 8, 9, 1])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    first = bce(model(seq, items), labels).item()
    for _ in range(60):
        loss = bce(model(seq, items), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    s = scores(model, seq.numpy(), items.numpy())
    assert s[0] > s[2] and s[1] > s[3]
    # The export: a user's vector is the last state of its sequence, <user, item> its logit.
    table = export(model, np.array([2]), seq[:1].numpy(), num_users=3)
    assert not table.user[[0, 1, 3]].any() and not table.item[0].any()
    np.testing.assert_allclose(float(table.user[2] @ table.item[5]), s[0], rtol=0, atol=1e-5)
