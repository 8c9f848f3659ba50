"""The score stage's prompt-building step: candidate rows -> encoded prompts, gates and quarantine
reasons, as Arrow columns a scorer actor turns back into ``ScoreRow``s.

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

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thinkrec.config import Config, from_dict
from thinkrec.data import schema as S
from thinkrec.data.ids import ids_table
from thinkrec.data.items import read_items
from thinkrec.data.prepare import INTERACTIONS, USERS
from thinkrec.io.commit import REASON, read_table, stable_shard
from thinkrec.io.fs import Storage
from thinkrec.model.base import load_tokenizer
from thinkrec.model.fusion import gate
from thinkrec.model.prompt import Encoded, ItemInfo, PromptBuilder
from thinkrec.model.thinkrec import CFTable, load_fusion
from thinkrec.scoring.base import Artifacts, ScoreRow, load_artifacts

NULL_ID = "null_id"
UNKNOWN_USER = "unknown_user"
UNKNOWN_ITEM = "unknown_item"
GATE_W = "_gate_w"
# Encoded prompts as list columns: prefix (p) and candidate (c) ids and CF slots.
PARTS = ("p", "c")
FIELDS = ("ids", "cf_pos", "cf_kind", "cf_id")


def enc_col(part: str, name: str) -> str:
    return f"_{part}_{name}"


def shard_key(user_ids: pa.ChunkedArray | pa.Array) -> pa.Array:
    """user_id with nulls as 0 (the padding id, never a real user), so null-id rows get a shard and
    every batch hashes integer keys the same way."""
    return pc.fill_null(pc.cast(user_ids, pa.int64()), 0)


def gate_mode(cfg: Config) -> str:
    return "global" if cfg.fusion.mode == "global" else "thinkrec"


class PromptStep:
    """Ray Data callable class: loads tokenizer, items, user timelines, CF table and fusion once."""

    def __init__(
        self, cfg: dict[str, Any], shards: Sequence[int] | None = None, artifacts: Artifacts | None = None
    ) -> None:
        self.cfg = from_dict(cfg)
        c = self.cfg
        # Loaded here, not on the driver: with an s3:// root each node needs its own local copy.
        artifacts = artifacts or load_artifacts(c)
        storage = Storage.from_config(c)
        self.shards = np.asarray(sorted(shards), dtype=np.int32) if shards is not None else None
        tok = load_tokenizer(artifacts.base_model, c.model.trust_remote_code)
        self.pb = PromptBuilder(
            tok,
            cf_tokens=c.model.cf_tokens,
            use_chat_template=c.model.use_chat_template,
            max_title_chars=c.model.max_title_chars,
        )
        items = read_items(storage).to_pydict()
        self.items = {
            int(i): ItemInfo(t or "", tuple(k or ()))
            for i, t, k in zip(items[S.ITEM_ID], items[S.TITLE], items[S.KEYWORDS], strict=True)
        }
        self.users = set(read_table(storage, storage.uri(USERS), [S.USER_ID]).column(0).to_pylist())
        # Raw-id tables: the id maps, one per actor (never on the driver); every prepared user and
        # item is in them, so a raw id missing here is unknown, never another entity's number.
        self.raw_maps: dict[str, dict[str, int]] = {}
        if c.score.candidates and c.score.id_space == "raw":
            for kind, raw_col, col in (
                ("user", S.RAW_USER_ID, S.USER_ID),
                ("item", S.RAW_ITEM_ID, S.ITEM_ID),
            ):
                t = ids_table(storage, kind)  # type: ignore[arg-type]
                self.raw_maps[raw_col] = dict(
                    zip(t.column(raw_col).to_pylist(), t.column(col).to_pylist(), strict=True)
                )
        hist = c.score.history
        self.use_ts = hist == "before_timestamp" or (hist == "auto")
        self.need_ts = hist == "before_timestamp" and bool(c.score.candidates)
        # Each user's timeline (time order) for tables without their own history columns.
        inter = read_table(storage, storage.uri(INTERACTIONS), [S.USER_ID, S.ITEM_ID, S.LABEL, S.TIMESTAMP])
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
        self.cf = CFTable.load(artifacts.cf_embeddings) if artifacts.cf_embeddings else None
        self.fusion = load_fusion(artifacts.fusion) if artifacts.fusion else None
        self.n_adapters = len(artifacts.adapter_names)
        self._gates: dict[int, tuple[np.ndarray, str]] = {}
        self._prefixes: dict[tuple[int, tuple[int, ...], tuple[int, ...]], Encoded] = {}
        self._cands: dict[int, Encoded] = {}

    # -- pieces ---------------------------------------------------------------------------------
    def _gate(self, user_id: int) -> tuple[np.ndarray, str]:
        hit = self._gates.get(user_id)
        if hit is None:
            if user_id == 0 or self.fusion is None or self.cf is None or self.n_adapters == 1:
                g = np.zeros(self.n_adapters)
                g[0] = 1.0
                hit = (g, "global")
            else:
                w, labels = gate(self.cf.user[user_id : user_id + 1], self.fusion, gate_mode(self.cfg))
                hit = (w[0].numpy(), labels[0])
            self._gates[user_id] = hit
        return hit

    def _timeline_history(self, user_id: int, ts: int | None) -> tuple[list[int], list[int]]:
        span = self._tl.get(user_id)
        if span is None:
            return [], []
        s, e = span
        if ts is not None:
            e = s + int(np.searchsorted(self._tl_ts[s:e], ts, side="left"))
        lo = max(s, e - self.cfg.data.history_len)
        return self._tl_items[lo:e].tolist(), self._tl_labels[lo:e].tolist()

    def _prefix(self, user_id: int, items: list[int], labels: list[int]) -> Encoded:
        n = self.cfg.data.history_len
        items, labels = items[-n:], labels[-n:]
        key = (user_id, tuple(items), tuple(labels))
        hit = self._prefixes.get(key)
        if hit is None:
            if len(self._prefixes) > 100_000:  # bounded memory over long streams
                self._prefixes.clear()
            hist = [
                (i, self.items.get(i, ItemInfo(f"item {i}")), int(lab))
                for i, lab in zip(items, labels, strict=True)
            ]
            hit = self._prefixes[key] = self.pb.encode_prefix(user_id, hist)
        return hit

    def _candidate(self, item_id: int) -> Encoded:
        hit = self._cands.get(item_id)
        if hit is None:
            # A cold item (id 0 after the checks) has no title; its CF slot reads the zero row.
            info = self.items.get(item_id, ItemInfo("unknown"))
            hit = self._cands[item_id] = self.pb.encode_candidate(item_id, info)
        return hit

    # -- batch ----------------------------------------------------------------------------------
    def _ids(
        self, batch: pa.Table, raw_col: str, col: str, known: set[int] | dict[int, Any]
    ) -> tuple[list, list]:
        """(output id, known?) per row. Raw ids: the mapped internal id, 0 when unknown (the raw id
        stays in its own column). Internal ids: the id as given. None where the input id is null."""
        if raw_col in batch.column_names:
            m = self.raw_maps[raw_col]
            raw = batch.column(raw_col).to_pylist()
            return [None if r is None else m.get(r, 0) for r in raw], [r in m for r in raw]
        ids = pc.cast(batch.column(col), pa.int64()).to_pylist()
        return ids, [i in known for i in ids]

    def __call__(self, batch: pa.Table) -> pa.Table:
        users, u_known = self._ids(batch, S.RAW_USER_ID, S.USER_ID, self.users)
        items, i_known = self._ids(batch, S.RAW_ITEM_ID, S.ITEM_ID, self.items)
        key = shard_key(pa.array(users, pa.int64()))
        if self.shards is not None:
            keep = np.isin(stable_shard(key, self.cfg.storage.num_shards), self.shards)
            batch, key = batch.filter(pa.array(keep)), key.filter(pa.array(keep))
            idx = np.flatnonzero(keep)
            users, items = [users[j] for j in idx], [items[j] for j in idx]
            u_known, i_known = [u_known[j] for j in idx], [i_known[j] for j in idx]
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
        has_hist = S.HISTORY_ITEMS in batch.column_names and S.HISTORY_LABELS in batch.column_names
        h_items = batch.column(S.HISTORY_ITEMS).to_pylist() if has_hist else None
        h_labels = batch.column(S.HISTORY_LABELS).to_pylist() if has_hist else None
        cold = self.cfg.score.unknown == "cold"
        reasons: list[str | None] = []
        gates, gate_labels = [], []
        enc: dict[str, list[list[int]]] = {enc_col(p, f): [] for p in PARTS for f in FIELDS}
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
                    hi, hl = self._timeline_history(uid, ts[r] if ts is not None else None)
                prefix, cand = self._prefix(uid, hi, hl), self._candidate(iid)
                g, glabel = self._gate(uid)
            for part, e in (("p", prefix), ("c", cand)):
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
    """The scorer's side: Arrow rows (without a quarantine reason) -> ScoreRow."""
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    rows = []
    for r in range(table.num_rows):

        def e(part: str, r: int = r) -> Encoded:
            return Encoded(*(cols[enc_col(part, f)][r] for f in FIELDS))

        rows.append(
            ScoreRow(
                int(cols[S.USER_ID][r]),
                int(cols[S.ITEM_ID][r]),
                e("p"),
                e("c"),
                np.asarray(cols[GATE_W][r], dtype=np.float64),
                cols[S.GATE][r],
            )
        )
    return rows
