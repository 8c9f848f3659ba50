"""The score stage's prompt-building step: candidate rows -> encoded prompts, gates and quarantine
reasons, as Arrow columns a scorer actor turns back into ``ScoreRow``s.

Per batch (in the stage: one shard, whose rows are one set of users), ``Lookups`` reads only what
the batch needs from the prepared tables: its raw ids' map entries, its users, their timelines and
the texts of its candidate and history items (``read_rows``: streamed, filtered, and for tables
sharded by user only the matching shards), never a whole table.

Per row:
- ids are mapped and checked: a raw-id table's ids go through prepare's id maps; a null user or item
  id is quarantined (``null_id``); an id outside the maps (raw) or prepare/users / prepare/items
  (internal) is quarantined (``unknown_user`` / ``unknown_item``) or, with ``score.unknown=cold``,
  scored as a cold start: a zero CF vector (id 0, the padding row) and, for an unknown user, no
  history and the global adapter;
- history (what the prompt shows): the row's own ``history_items``/``history_labels`` when the table
  has them (the test split of prepare/interactions, exactly as in training); else the user's last
  ``data.history_len`` interactions strictly before the row's ``timestamp``; else (no timestamp) the
  user's latest ``data.history_len`` interactions;
- gate: ThinkRec's gate (thinkrec/model/fusion.py) from the user's raw CF embedding and fusion.json,
  computed once per user.

Rows leave each block sorted by (gate, user), so a scorer batch holds runs of one adapter mixture
and one user's candidates (one prefix pass in the HF backend, prefix-cache hits in vLLM).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data import tables as T
from thinkrec.data.ids import lookup
from thinkrec.data.items import lookup_items
from thinkrec.io.commit import REASON, read_rows
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_prompt_tokenizer
from thinkrec.model.fusion import load_fusion, user_embeddings, user_gate
from thinkrec.model.prompt import Encoded, ItemInfo, PromptBuilder
from thinkrec.scoring.base import Artifacts, ScoreRow, load_artifacts
from thinkrec.scoring.candidates import shard_key

NULL_ID = "null_id"
UNKNOWN_USER = "unknown_user"
UNKNOWN_ITEM = "unknown_item"
GATE_W = "_gate_w"


def ref_col(part: str) -> str:
    """Rows with the same value in this column carry the same encoding of ``part`` (a user's prefix,
    an item's candidate text): the scorer's side converts each from Arrow once, not once per row."""
    return f"_{part}_ref"


# Encoded prompts as list columns: prefix (p) and candidate (c) ids and CF slots.
PARTS = ("p", "c")
FIELDS = ("ids", "cf_pos", "cf_kind", "cf_id")


def enc_col(part: str, name: str) -> str:
    return f"_{part}_{name}"


class Lookups:
    """What one batch (in the stage: one shard) needs from the prepared tables, and nothing more:
    its raw ids' map entries, its users, its users' timelines and the texts of its candidate and
    history items. Read with filtered streaming reads (``read_rows``), so no actor ever holds the
    whole interactions table, the whole id maps or the whole item table."""

    def __init__(self, cfg: Config, storage: Storage, batch: pa.Table) -> None:
        cols = batch.column_names
        self.raw_maps: dict[str, dict[str, int]] = {}
        if S.RAW_USER_ID in cols:
            # Every prepared user and item is in the maps, so a raw id missing here is unknown,
            # never another entity's number.
            self.raw_maps[S.RAW_USER_ID] = lookup(storage, "user", batch.column(S.RAW_USER_ID))
            self.raw_maps[S.RAW_ITEM_ID] = lookup(storage, "item", batch.column(S.RAW_ITEM_ID))
            user_ids = pa.array(list(self.raw_maps[S.RAW_USER_ID].values()), pa.int64())
            item_ids = pa.array(list(self.raw_maps[S.RAW_ITEM_ID].values()), pa.int64())
        else:
            user_ids = pc.cast(batch.column(S.USER_ID), pa.int64())
            item_ids = pc.cast(batch.column(S.ITEM_ID), pa.int64())
        users = read_rows(storage, storage.uri(T.USERS), S.USER_ID, user_ids, [S.USER_ID])
        self.users = set(users.column(0).to_pylist())
        self.has_hist = S.HISTORY_ITEMS in cols and S.HISTORY_LABELS in cols
        # Each user's timeline (time order), for tables without their own history columns.
        self._tl: dict[int, tuple[int, int]] = {}
        self._tl_items = self._tl_labels = self._tl_ts = np.zeros(0, np.int64)
        if self.has_hist:
            hist_items = pc.list_flatten(batch.column(S.HISTORY_ITEMS))
        else:
            inter = read_rows(
                storage,
                storage.uri(T.INTERACTIONS),
                S.USER_ID,
                pa.array(sorted(self.users), pa.int64()),
                [S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP],
            )
            order = np.lexsort(
                (inter.column(S.TIMESTAMP).to_numpy(), inter.column(S.USER_ID).to_numpy())
            )  # by user, then time
            u = inter.column(S.USER_ID).to_numpy()[order]
            self._tl_items = inter.column(S.ITEM_ID).to_numpy()[order]
            self._tl_labels = inter.column(S.LABEL).to_numpy()[order]
            self._tl_ts = inter.column(S.TIMESTAMP).to_numpy()[order]
            starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, int)
            ends = np.r_[starts[1:], len(u)]
            self._tl = {int(u[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
            hist_items = pa.array(self._tl_items, pa.int64())
        needed = pa.chunked_array(
            [pc.cast(item_ids, pa.int64()), pc.cast(hist_items, pa.int64())], pa.int64()
        )
        items = lookup_items(storage, needed).to_pydict()
        self.items = {
            int(i): ItemInfo(t or "", tuple(k or ()))
            for i, t, k in zip(items[S.ITEM_ID], items[S.TITLE], items[S.KEYWORDS], strict=True)
        }
        self.history_len = cfg.data.history_len

    def timeline_history(self, user_id: int, ts: int | None) -> tuple[list[int], list[int]]:
        span = self._tl.get(user_id)
        if span is None:
            return [], []
        s, e = span
        if ts is not None:
            e = s + int(np.searchsorted(self._tl_ts[s:e], ts, side="left"))
        lo = max(s, e - self.history_len)
        return self._tl_items[lo:e].tolist(), self._tl_labels[lo:e].tolist()


class PromptStep:
    """Loads tokenizer, CF table and fusion once per actor; per batch (a shard, in the stage), the
    batch's ``Lookups``, then prompts, gates and quarantine reasons."""

    def __init__(
        self, cfg: dict[str, Any], artifacts: Artifacts | None = None, tokenizer: Any | None = None
    ) -> None:
        self.cfg = from_dict(cfg)
        c = self.cfg
        # Loaded here, not on the driver: with an s3:// root each node needs its own local copy.
        artifacts = artifacts or load_artifacts(c)
        self.storage = Storage.from_config(c)
        tok = tokenizer or load_prompt_tokenizer(
            artifacts.base_model, c.model.trust_remote_code, c.model.use_chat_template
        )
        self.pb = PromptBuilder(
            tok,
            cf_tokens=c.model.cf_tokens,
            use_chat_template=c.model.use_chat_template,
            max_title_chars=c.model.max_title_chars,
        )
        hist = c.score.history
        self.use_ts = hist == "before_timestamp" or (hist == "auto")
        self.need_ts = hist == "before_timestamp" and bool(c.score.candidates)
        self.cf_users = user_embeddings(artifacts.cf_embeddings) if artifacts.cf_embeddings else None
        self.fusion = load_fusion(artifacts.fusion, c.fusion) if artifacts.fusion else None
        self.n_adapters = len(artifacts.adapter_names)
        self._gates: dict[int, tuple[np.ndarray, str]] = {}
        self._prefixes: dict[tuple[int, tuple[int, ...], tuple[int, ...]], Encoded] = {}
        self._cands: dict[int, Encoded] = {}
        self.lk: Lookups | None = None

    def lookups(self, batch: pa.Table) -> Lookups:
        """Load what ``batch`` (and any slice of it passed to ``__call__`` later) needs."""
        self.lk = Lookups(self.cfg, self.storage, batch)
        # Item texts and users change with the shard: encodings of another shard's items go.
        self._prefixes.clear()
        self._cands.clear()
        return self.lk

    # -- pieces ---------------------------------------------------------------------------------
    def _gate(self, user_id: int) -> tuple[np.ndarray, str]:
        hit = self._gates.get(user_id)
        if hit is None:
            hit = user_gate(self.cf_users, self.fusion, self.n_adapters, user_id, self.cfg.fusion.mode)
            self._gates[user_id] = hit
        return hit

    def _prefix(self, user_id: int, items: list[int], labels: list[int]) -> Encoded:
        n = self.cfg.data.history_len
        items, labels = items[-n:], labels[-n:]
        key = (user_id, tuple(items), tuple(labels))
        hit = self._prefixes.get(key)
        if hit is None:
            if len(self._prefixes) > 100_000:  # bounded memory over long streams
                self._prefixes.clear()
            hist = [
                (i, self.lk.items.get(i, ItemInfo(f"item {i}")), int(lab))
                for i, lab in zip(items, labels, strict=True)
            ]
            hit = self._prefixes[key] = self.pb.encode_prefix(user_id, hist)
        return hit

    def _candidate(self, item_id: int) -> Encoded:
        hit = self._cands.get(item_id)
        if hit is None:
            # A cold item (id 0 after the checks) has no title; its CF slot reads the zero row.
            info = self.lk.items.get(item_id, ItemInfo("unknown"))
            hit = self._cands[item_id] = self.pb.encode_candidate(item_id, info)
        return hit

    # -- batch ----------------------------------------------------------------------------------
    def _ids(
        self, batch: pa.Table, raw_col: str, col: str, known: set[int] | dict[int, Any]
    ) -> tuple[list, list]:
        """(output id, known?) per row. Raw ids: the mapped internal id, 0 when unknown (the raw id
        stays in its own column). Internal ids: the id as given. None where the input id is null."""
        if raw_col in batch.column_names:
            m = self.lk.raw_maps[raw_col]
            raw = batch.column(raw_col).to_pylist()
            return [None if r is None else m.get(r, 0) for r in raw], [r in m for r in raw]
        ids = pc.cast(batch.column(col), pa.int64()).to_pylist()
        return ids, [i in known for i in ids]

    def __call__(self, batch: pa.Table, lookups: Lookups | None = None) -> pa.Table:
        """Prompts for ``batch``, with ``lookups`` loaded before (for a batch it covers); without,
        the batch's own."""
        if lookups is None:
            self.lookups(batch)
        elif lookups is not self.lk:
            raise ValueError("PromptStep: lookups come from this step's lookups()")
        lk = self.lk
        assert lk is not None
        users, u_known = self._ids(batch, S.RAW_USER_ID, S.USER_ID, lk.users)
        items, i_known = self._ids(batch, S.RAW_ITEM_ID, S.ITEM_ID, lk.items)
        key = shard_key(pa.array(users, pa.int64()))
        n = batch.num_rows
        labels = (
            pc.cast(batch.column(S.LABEL), pa.int8()).to_pylist()
            if S.LABEL in batch.column_names
            else [None] * n
        )
        if self.need_ts and S.TIMESTAMP not in batch.column_names:
            raise ValueError(
                f"score.history=before_timestamp: {self.cfg.score.candidates} has no {S.TIMESTAMP!r} column"
            )
        ts = (
            pc.cast(batch.column(S.TIMESTAMP), pa.int64()).to_pylist()
            if S.TIMESTAMP in batch.column_names and self.use_ts
            else None
        )
        has_hist = lk.has_hist
        h_items = batch.column(S.HISTORY_ITEMS).to_pylist() if has_hist else None
        h_labels = batch.column(S.HISTORY_LABELS).to_pylist() if has_hist else None
        cold = self.cfg.score.unknown == "cold"
        reasons: list[str | None] = []
        gates, gate_labels = [], []
        enc: dict[str, list[list[int]]] = {enc_col(p, f): [] for p in PARTS for f in FIELDS}
        # Per part, id() of an encoding (cached, so shared between rows) -> its number in this batch.
        refs: dict[str, dict[int, int]] = {p: {} for p in PARTS}
        ref_of: dict[str, list[int]] = {p: [] for p in PARTS}
        for r in range(n):
            u, i = users[r], items[r]
            reason = None
            if u is None or i is None:
                reason = NULL_ID
            elif not u_known[r] and not cold:
                reason = UNKNOWN_USER
            elif not i_known[r] and not cold:
                reason = UNKNOWN_ITEM
            reasons.append(reason)
            if reason is not None:
                prefix = cand = Encoded([])
                g, glabel = np.zeros(0), ""
            else:
                uid = u if u_known[r] else 0
                iid = i if i_known[r] else 0
                if uid == 0:
                    hi, hl = [], []
                elif has_hist:
                    hi, hl = h_items[r] or [], h_labels[r] or []  # type: ignore[index]
                else:
                    hi, hl = lk.timeline_history(uid, ts[r] if ts is not None else None)
                prefix, cand = self._prefix(uid, hi, hl), self._candidate(iid)
                g, glabel = self._gate(uid)
            for part, e in (("p", prefix), ("c", cand)):
                ref_of[part].append(refs[part].setdefault(id(e), len(refs[part])))
                enc[enc_col(part, "ids")].append(e.ids)
                enc[enc_col(part, "cf_pos")].append(e.cf_pos)
                enc[enc_col(part, "cf_kind")].append(e.cf_kind)
                enc[enc_col(part, "cf_id")].append(e.cf_id)
            gates.append(g.tolist())
            gate_labels.append(glabel)
        # Columns this step does not consume travel on unchanged: raw ids and passthrough columns.
        carried = {
            c: batch.column(c)
            for c in batch.column_names
            if c not in (S.USER_ID, S.ITEM_ID, S.LABEL, S.HISTORY_ITEMS, S.HISTORY_LABELS, S.SPLIT)
        }
        out = pa.table(
            {
                S.USER_ID: key,  # null ids are quarantined; their shard key is 0
                S.ITEM_ID: pc.fill_null(pa.array(items, pa.int64()), 0),
                S.LABEL: pa.array(labels, pa.int8()),
                REASON: pa.array(reasons, pa.string()),
                S.GATE: pa.array(gate_labels, pa.string()),
                GATE_W: pa.array(gates, pa.list_(pa.float64())),
                **{ref_col(p): pa.array(v, pa.int32()) for p, v in ref_of.items()},
                **{
                    k: pa.array(v, pa.list_(pa.int64() if k.endswith("cf_id") else pa.int32()))
                    for k, v in enc.items()
                },
                **carried,
            }
        )
        if n:
            # (gate, user) order inside the block: adapter runs for vLLM, prefix runs for HF.
            out = out.take(pc.sort_indices(out, [(S.GATE, "ascending"), (S.USER_ID, "ascending")]))
        return out


def rows_from_table(table: pa.Table) -> list[ScoreRow]:
    """The scorer's side: Arrow rows (without a quarantine reason) -> ScoreRow. Rows with the same
    ``ref_col`` value share one ``Encoded``, converted once (a user's prefix repeats over their
    candidates, an item's text over its users)."""

    def encoded(part: str) -> list[Encoded]:
        ref = ref_col(part)
        t, inverse = table, None
        if ref in table.column_names:
            _, first, inverse = np.unique(
                table.column(ref).to_numpy(), return_index=True, return_inverse=True
            )
            t = table.take(first)
        cols = [t.column(enc_col(part, f)).to_pylist() for f in FIELDS]
        unique = [Encoded(*c) for c in zip(*cols, strict=True)]
        return unique if inverse is None else [unique[j] for j in inverse]

    prefixes, cands = encoded("p"), encoded("c")
    users = table.column(S.USER_ID).to_pylist()
    items = table.column(S.ITEM_ID).to_pylist()
    gates = table.column(GATE_W).to_pylist()
    labels = table.column(S.GATE).to_pylist()
    return [
        ScoreRow(
            int(users[r]), int(items[r]), prefixes[r], cands[r], np.asarray(gates[r], np.float64), labels[r]
        )
        for r in range(table.num_rows)
    ]
