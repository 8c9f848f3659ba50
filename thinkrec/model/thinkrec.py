"""The ThinkRec LLM pieces shared by training and scoring: CF tables, the CF-token projector,
batching of encoded prompts, and the forward pass that reads only the positions it needs.

CF tokens (CoLLM lineage): frozen CF embeddings of the user, the target item and each history item
are mapped by Linear(d, 10d) -> ReLU -> Linear(10d, hidden) and written over the placeholder token
embeddings right after the embedding layer.

History summary (``model.cf_history``, a projector saved with ``history``): a CF model's user vector
is fixed when it is trained, so on a time split it knows nothing of what the user did since, while the
prompt's history does. The projector then reads, for every slot, ``[v, label, rate, taste]`` (width
2d + 2): ``v`` the slot's CF vector; ``label`` +1 / -1 on a liked / disliked history item's slot, else
0; and on the user's slot only, the history's smoothed like-rate as ``rate = 2 (likes + 1) / (n + 2) - 1``
and ``taste``, the label-signed mean of the history items' vectors (a fold-in of the user's recent
feedback in CF space; zeros elsewhere). Both are functions of the prompt's own history slots, so a
user's prefix embeds the same alone or with a candidate, and users the CF model never saw get them too.

With ``model.cf_history_item`` (a projector saved with ``history_item``) the target item's slot carries
the same ``rate`` and ``taste`` too, so one slot holds both what the item is and what the user's history
says: the projector can combine them (the item's bias with the user's like-rate, the item's vector with
the user's taste) before the transformer has to route anything to the answer. A candidate embedded
apart from its prefix (the hf scorer's shared prefix) takes its prefix's summary (``history_summary``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from thinkrec.model.base import decoder_and_head
from thinkrec.model.layout import ADAPTERS, FUSION, GLOBAL, PROJECTOR  # noqa: F401 (re-exported)
from thinkrec.model.prompt import CF_DISLIKED, CF_ITEM, CF_LIKED, CF_USER, Encoded


def expert_name(group: int) -> str:
    return f"expert-{group}"


class CFProjector(nn.Module):
    """CF vectors (d = the table's width) -> token embeddings; with ``history`` it reads the table's
    vectors with the history summary (width 2d + 2, module docstring)."""

    def __init__(
        self, cf_dim: int, hidden_size: int, history: bool = False, history_item: bool = False
    ) -> None:
        super().__init__()
        self.cf_dim, self.hidden_size, self.history = cf_dim, hidden_size, history
        self.history_item = history and history_item
        d = 2 * cf_dim + 2 if history else cf_dim
        self.net = nn.Sequential(nn.Linear(d, 10 * d), nn.ReLU(), nn.Linear(10 * d, hidden_size))
        # Per-column input scale (``fit_scale``), a frozen parameter so that it is saved and gathered
        # with the weights; ones (no scaling) until fitted, and in projectors saved before it.
        self.scale = nn.Parameter(torch.ones(d), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, d) -> (n, H)
        return self.net(x * self.scale)

    @torch.no_grad()
    def fit_scale(self, table: CFTable) -> None:
        """Scale each CF column to unit root-mean-square over the table's users and items. In MF's
        biased layout ``[p_u, b_u, 1] / [q_i, 1, b_i]`` the constant column holds most of a vector's
        norm (1 against about 0.13 per embedding column on ML-100K), so at initialisation every item's
        token comes out nearly the same (what the scale changed: bench/results/collm-cf-scale-cpu.md).
        Scaling keeps zeros zero (unknown ids, the summary's empty slots); the history layout's
        ``taste`` columns live in the items' space and take the same scale, ``label`` and ``rate``
        are already in units of 1."""
        rows = torch.cat([table.user[1:], table.item[1:]]).float()
        inv = rows.pow(2).mean(0).sqrt().clamp_min(1e-6).reciprocal()
        if self.history:
            inv = torch.cat([inv, inv.new_ones(2), inv])
        self.scale.copy_(inv.to(self.scale.dtype))

    def save(self, path: str) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "cf_dim": str(self.cf_dim),
            "hidden_size": str(self.hidden_size),
            "history": str(int(self.history)),
            "history_item": str(int(self.history_item)),
        }
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> CFProjector:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata()
        proj = cls(
            int(meta["cf_dim"]),
            int(meta["hidden_size"]),
            meta.get("history") == "1",
            meta.get("history_item") == "1",  # absent in projectors saved before the item's summary
        )
        state = load_file(path)
        state.setdefault("scale", torch.ones_like(proj.scale))  # saved before the input scale
        proj.load_state_dict(state)
        return proj


@dataclass
class CFTable:
    """Frozen CF embeddings, row 0 = padding / unknown (zeros)."""

    user: torch.Tensor  # (U+1, d)
    item: torch.Tensor  # (I+1, d)

    @property
    def dim(self) -> int:
        return int(self.user.shape[1])

    @classmethod
    def load(cls, path: str) -> CFTable:
        t = load_file(path)
        return cls(t["user"].float(), t["item"].float())

    def save(self, path: str) -> None:
        save_file({"user": self.user.contiguous(), "item": self.item.contiguous()}, path)

    def lookup(self, kinds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(n,) kinds and ids -> (n, d). Ids beyond the table (unknown) read the zero row."""
        out = torch.zeros(len(ids), self.dim, dtype=self.user.dtype)
        for table, m in ((self.user, kinds == CF_USER), (self.item, kinds != CF_USER)):
            if m.any():
                idx = ids[m].clamp(min=0)
                idx = torch.where(idx < len(table), idx, torch.zeros_like(idx))
                out[m] = table[idx]
        return out


@dataclass
class Batch:
    """Right-padded token ids with CF slot coordinates."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    lengths: torch.Tensor  # (B,)
    cf_row: torch.Tensor  # (n,) batch row of each CF slot
    cf_col: torch.Tensor  # (n,) position of each CF slot
    cf_kind: torch.Tensor  # (n,)
    cf_id: torch.Tensor  # (n,)


def collate(encoded: Sequence[Encoded], pad_id: int) -> Batch:
    lengths = torch.tensor([len(e.ids) for e in encoded])
    T = int(lengths.max())
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    rows, cols, kinds, cids = [], [], [], []
    for i, e in enumerate(encoded):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        rows += [i] * len(e.cf_pos)
        cols += e.cf_pos
        kinds += e.cf_kind
        cids += e.cf_id
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(ids, mask, lengths, as_long(rows), as_long(cols), as_long(kinds), as_long(cids))


def _labels(kinds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (kinds == CF_LIKED).to(dtype) - (kinds == CF_DISLIKED).to(dtype)  # (n,) +1 / -1 / 0


def history_summary(
    vec: torch.Tensor, rows: torch.Tensor, kinds: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch row's history summary over its own liked / disliked slots: ``rate`` (B,) and
    ``taste`` (B, d) (module docstring). vec: (n, d) slot vectors; rows, kinds: (n,)."""
    label = _labels(kinds, vec.dtype)
    count = torch.zeros(n_rows, dtype=vec.dtype).index_add_(0, rows, label.abs())  # (B,) history length
    likes = torch.zeros(n_rows, dtype=vec.dtype).index_add_(0, rows, (label > 0).to(vec.dtype))
    taste = torch.zeros(n_rows, vec.shape[1], dtype=vec.dtype).index_add_(0, rows, label[:, None] * vec)
    rate = 2 * (likes + 1) / (count + 2) - 1  # (B,) 0 for an empty history
    return rate, taste / count.clamp(min=1)[:, None]


def with_history(
    vec: torch.Tensor,
    rows: torch.Tensor,
    kinds: torch.Tensor,
    *,
    on_item: bool = False,
    summary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(n, d) slot vectors -> (n, 2d + 2) ``[v, label, rate, taste]`` (module docstring): the summary
    rides on the user's slot, and with ``on_item`` on the target item's too. ``summary``: each batch
    row's (rate, taste) given, for rows embedded without their history (else taken over each row's own
    liked / disliked slots). rows, kinds: (n,)."""
    if summary is None:
        summary = history_summary(vec, rows, kinds, int(rows.max()) + 1 if len(rows) else 0)
    rate, taste = summary
    on = kinds == CF_USER
    if on_item:
        on = on | (kinds == CF_ITEM)
    on = on.to(vec.dtype)[:, None]
    return torch.cat(
        [vec, _labels(kinds, vec.dtype)[:, None], on * rate[rows, None], on * taste[rows]], dim=1
    )


def input_embeddings(
    model: Any,
    batch: Batch,
    cf: CFTable | None = None,
    projector: CFProjector | None = None,
    summary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Token embeddings with CF slots overwritten by projected CF embeddings. (B, T, H). ``summary``:
    each row's history summary, for rows that hold a candidate without its prefix (``prefix_summary``)."""
    embed = model.get_input_embeddings()
    ids = batch.input_ids.clamp(max=embed.num_embeddings - 1).to(embed.weight.device)
    x = embed(ids)  # (B, T, H)
    if projector is not None and cf is not None and len(batch.cf_row):
        vec = cf.lookup(batch.cf_kind, batch.cf_id)
        if projector.history:
            vec = with_history(
                vec, batch.cf_row, batch.cf_kind, on_item=projector.history_item, summary=summary
            )
        vec = vec.to(device=x.device, dtype=next(projector.parameters()).dtype)
        proj = projector(vec).to(x.dtype)  # (n, H)
        x = x.index_put((batch.cf_row.to(x.device), batch.cf_col.to(x.device)), proj)
    return x


def prefix_summary(
    batch: Batch, cf: CFTable | None, projector: CFProjector | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The history summary of each row of a batch of prefixes, for their candidates embedded apart
    (``input_embeddings(..., summary=...)``); None where the projector does not put it on the item."""
    if projector is None or cf is None or not projector.history_item:
        return None
    vec = cf.lookup(batch.cf_kind, batch.cf_id)
    return history_summary(vec, batch.cf_row, batch.cf_kind, len(batch.lengths))


def hidden_states(
    model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kw: Any
) -> Any:
    """Run the transformer body only (no vocabulary projection). Returns the body's output."""
    body, _ = decoder_and_head(model)
    return body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)


def logits_at(model: Any, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits at selected positions only: (n, V). The full (B, T, V) tensor is never built."""
    _, head = decoder_and_head(model)
    return head(hidden[rows, cols])


def p_yes_of(yes: np.ndarray) -> np.ndarray:
    """p_yes of raw Yes logits: sigmoid(Yes logit), the probability the recommendation loss trains
    (BCE-with-logits on the Yes logit alone, REFERENCE.md). Not softmax over {Yes, No}: the No logit
    is trained only by the LM term, which lifts the answer token far above the rest of the vocabulary
    while the BCE holds the Yes logit near 0, so that softmax was near 0 on every row."""
    return 1.0 / (1.0 + np.exp(-np.asarray(yes, np.float64)))
