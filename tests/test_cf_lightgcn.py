"""LightGCN pieces: the symmetric normalisation against a hand computation on a tiny graph, the
propagation rule, and BCE steps that separate a liked from a disliked item."""

from __future__ import annotations

import math

import numpy as np
import torch

from thinkrec.cf.lightgcn import LightGCN, normalized_adjacency


def test_normalized_adjacency_by_hand():
    # Users 1, 2; items 1, 2, 3. Edges u1-i1, u1-i2 (given twice), u2-i2; item 3 and the padding rows
    # are isolated. Nodes: users 0..2, items at 3 + (0..3) -> u1=1, u2=2, i1=4, i2=5, i3=6.
    a = normalized_adjacency(np.array([1, 1, 2, 1]), np.array([1, 2, 2, 2]), num_users=2, num_items=3)
    assert a.shape == (7, 7)
    # Degrees: u1 2, u2 1, i1 1, i2 2; entry (r, c) = 1 / sqrt(d_r d_c).
    want = np.zeros((7, 7))
    for r, c, v in [(1, 4, 1 / math.sqrt(2 * 1)), (1, 5, 1 / math.sqrt(2 * 2)), (2, 5, 1 / math.sqrt(1 * 2))]:
        want[r, c] = want[c, r] = v
    np.testing.assert_allclose(a.to_dense().numpy(), want, rtol=0, atol=1e-7)


def test_propagation_is_the_layer_mean():
    torch.manual_seed(0)
    adj = normalized_adjacency(np.array([1, 1, 2]), np.array([1, 2, 2]), num_users=2, num_items=3)
    model = LightGCN(2, 3, 4, layers=2, adjacency=adj)
    e0 = model.embedding.weight.detach()
    dense = adj.to_dense()
    e1 = dense @ e0
    e2 = dense @ e1
    want = (e0 + e1 + e2) / 3
    user, item = model.propagate()
    torch.testing.assert_close(user, want[:3])
    torch.testing.assert_close(item, want[3:])
    table = model.table()
    assert not table.user[0].any() and not table.item[0].any()
    # Item 3 is isolated: its final embedding is its own layer-0 vector over K + 1.
    torch.testing.assert_close(item[3], e0[6] / 3)


def test_bce_steps_rank_the_liked_item_first():
    """Point-wise BCE on the train labels (the reference's LightGCN loss) over the positive graph."""
    torch.manual_seed(0)
    users, items = np.array([1, 1, 2, 2, 3]), np.array([1, 2, 2, 3, 3])
    model = LightGCN(3, 4, 8, layers=2, adjacency=normalized_adjacency(users, items, 3, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    u, i = torch.tensor([1, 2, 3, 1, 2, 3]), torch.tensor([1, 3, 3, 4, 4, 1])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    first = bce(model(u, i), y).item()
    for _ in range(50):
        loss = bce(model(u, i), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    s = model(torch.tensor([1, 1]), torch.tensor([1, 4]))
    assert s[0] > s[1]
