"""The evaluate stage: every model of the run on the same test rows, with intervals, slices,
baselines, explanation quality and a self-contained report.

Models: ThinkRec (``score`` logit for ranking, ``p_yes`` for calibration), every ``cf_<model>``
column of cf/scores (logit; sigmoid for calibration), and the simple baselines (``item_rate``:
the item's train positive rate smoothed toward the global rate with ``eval.smoothing`` pseudo-rows;
``history_rate``: the share of "Yes" in the prompt's history, the global train rate for an empty
history; ``logistic``: a logistic regression of the two fitted on the valid split).

Rows: the labelled test rows of prepare/interactions (without it, the labelled rows of the score
table). A model's missing rows are counted in ``rows.by_model``; the metrics use the rows every
model scored (``rows.evaluated``), so every model sees exactly the same rows.

Outputs under ``report/``: metrics.json (schema in eval/SCHEMA.md), report.md, report.html (images
inline), PNGs, committed with ``mark_success`` (a rerun with the same config and inputs skips).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow.compute as pc

from eval import describe as D
from eval import engine as E
from eval import inputs as I
from eval import plots as P
from eval.html import render_html
from eval.markdown import render_markdown
from thinkrec.data import schema as S
from thinkrec.io.commit import MANIFEST, fingerprint, is_complete, mark_success, read_table
from thinkrec.io.fs import Storage

log = logging.getLogger(__name__)

SCHEMA_VERSION = "thinkrec.metrics/3"
EXPLANATIONS = "explain/explanations"
ITEMS = "prepare/items"
TRACES = "reason/traces"
CURVES = "train/curves.json"
GROUPS = "train/groups.json"
CF_METRICS = "cf/model/metrics.json"
REPORT = "report"
REFERENCE = "thinkrec"
BASELINES = ("item_rate", "history_rate", "logistic")


class MissingInputError(FileNotFoundError):
    """A required input table is not committed; the message names the stage that writes it."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -60, 60)))


def _take(p: E.Probability, mask: np.ndarray) -> E.Probability:
    return p[mask] if isinstance(p, np.ndarray) else p


class _Masked(Mapping):
    """Every model's values on a slice's rows, made one model at a time as the engine asks for them
    (not every model's slice copy at once)."""

    def __init__(self, models: Mapping[str, tuple[np.ndarray, E.Probability]], mask: np.ndarray):
        self.models, self.mask = models, mask

    def __getitem__(self, name: str) -> tuple[np.ndarray, E.Probability]:
        s, p = self.models[name]
        return s[self.mask], _take(p, self.mask)

    def __iter__(self) -> Iterator[str]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)


def gate_kind(gate: str) -> str:
    if gate.startswith("expert"):
        return "single expert"
    if gate.startswith("mix"):
        return "mixture"
    return gate or "none"


def gate_group(gate: str) -> str:
    """The user group a gate routes to: the expert, or the mixture's largest weight."""
    if gate.startswith("expert-"):
        return "group " + gate.split("-", 1)[1]
    if gate.startswith("mix:"):
        w = [float(x) for x in gate[4:].split(",")]
        return f"group {int(np.argmax(w))}"
    return "global"


def gate_max_weight(gate: str) -> float:
    if gate.startswith("mix:"):
        return max(float(x) for x in gate[4:].split(","))
    return 1.0


def _score_universe(storage: Storage, st: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Without prepare/interactions: the labelled rows of the score table are the universe."""
    parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "label": []}
    for b in I.iter_batches(storage, st, [S.USER_ID, S.ITEM_ID, S.LABEL]):
        lab = I._np(b.column(S.LABEL), np.int8, -1)
        ok = lab >= 0
        parts["user"].append(I._np(b.column(S.USER_ID), np.int64)[ok])
        parts["item"].append(I._np(b.column(S.ITEM_ID), np.int64)[ok])
        parts["label"].append(lab[ok])
    return tuple(np.concatenate(v) if v else np.zeros(0, np.int64) for v in parts.values())  # type: ignore[return-value]


def load(cfg: Any, storage: Storage) -> dict[str, Any]:
    """Every model's values on the universe of rows, plus the columns slices need.

    Streams: the universe (test rows) is read first, then each model's table one batch at a time is
    placed straight onto it, so no table is ever held whole; a model's values are float32 when its
    table stores float32 (nothing is lost) and float64 when computed here (the baselines)."""
    notes: list[str] = []
    st = I.scores_table(cfg)
    inter = I.read_interactions(storage) if I.committed(storage, I.INTERACTIONS) else None
    if inter is not None:
        t = inter["test"]
        users, items, labels = t["user"], t["item"], t["label"]
    else:
        users, items, labels = _score_universe(storage, st)
        notes.append("prepare/interactions is absent: the rows are the labelled rows of the score table")
    stride = int(items.max(initial=0)) + 1
    uni = I.Universe(I.make_keys(users, items, stride))
    if uni.duplicates:
        notes.append(f"{uni.duplicates} repeated (user_id, item_id) test rows counted once (first kept)")
    pick = uni.first
    base: dict[str, np.ndarray] = {"user": users[pick], "item": items[pick], "label": labels[pick]}
    del users, items, labels
    N = len(pick)

    # The score table, batch by batch: score and p_yes (float32, as stored), gate codes, label check.
    s = np.full(N, np.nan, np.float32)
    p = np.full(N, np.nan, np.float32)
    g = np.full(N, np.nan, np.float32)  # gate code (index into gate_names)
    lab_sc = np.full(N, np.nan, np.float32)
    gate_codes: dict[str, int] = {}
    scored_total = unlabelled = outside_sc = 0
    for b in I.iter_batches(storage, st, [S.USER_ID, S.ITEM_ID, S.LABEL, S.SCORE, S.P_YES, S.GATE]):
        keys = I.make_keys(I._np(b.column(S.USER_ID), np.int64), I._np(b.column(S.ITEM_ID), np.int64), stride)
        lab = I._np(b.column(S.LABEL), np.float32, -1)
        scored_total += len(keys)
        unlabelled += int((lab < 0).sum())
        hit = uni.place_into(s, keys, I._np(b.column(S.SCORE), np.float32))
        outside_sc += int((~hit).sum())
        uni.place_into(p, keys, I._np(b.column(S.P_YES), np.float32))
        uni.place_into(lab_sc, keys, lab)
        enc = pc.dictionary_encode(pc.fill_null(b.column(S.GATE), "none"))
        remap = np.array([gate_codes.setdefault(str(v), len(gate_codes)) for v in enc.dictionary.to_pylist()])
        codes = remap[I._np(enc.indices, np.int64)] if len(remap) else np.zeros(0, np.int64)
        uni.place_into(g, keys, codes.astype(np.float32))
    gate_names = np.array(sorted(gate_codes, key=gate_codes.get), dtype=object)
    bad = np.isfinite(lab_sc) & (lab_sc >= 0) & (lab_sc != base["label"])
    if bad.any():
        raise ValueError(
            f"{storage.uri(st)} and prepare/interactions disagree on the label of {int(bad.sum())} rows: "
            "they were made from different prepare outputs"
        )
    del lab_sc, bad
    values: dict[str, tuple[np.ndarray, E.Probability]] = {REFERENCE: (s, p)}
    outside: dict[str, int] = {REFERENCE: outside_sc}
    base["gate"] = g

    cf_models: list[str] = []
    if I.committed(storage, I.CF_SCORES):
        names = I.schema_names(storage, I.CF_SCORES)
        cf_cols = [c for c in names if c.startswith("cf_") and c != S.CF_SCORE]
        configured = f"cf_{cfg.cf.model}"
        use_cf_score = configured not in cf_cols and S.CF_SCORE in names
        read = cf_cols + ([S.CF_SCORE] if use_cf_score else [])
        placed = {c: np.full(N, np.nan, np.float32) for c in read}
        out_cf = 0
        for b in I.iter_batches(storage, I.CF_SCORES, [S.USER_ID, S.ITEM_ID, S.SPLIT] + read):
            b = b.filter(pc.equal(b.column(S.SPLIT), "test"))
            keys = I.make_keys(
                I._np(b.column(S.USER_ID), np.int64), I._np(b.column(S.ITEM_ID), np.int64), stride
            )
            for c in read:
                hit = uni.place_into(placed[c], keys, I._np(b.column(c), np.float32))
            out_cf += int((~hit).sum()) if read else 0
        for c in read:
            name = configured if c == S.CF_SCORE else c
            # Its probability is sigmoid(logit), computed when needed rather than held as a second array.
            values[name], outside[name] = (placed[c], _sigmoid), out_cf
            cf_models.append(name)
    else:
        notes.append("cf/scores is absent: no CF model in this report (run the cf stage)")

    baseline_info: dict[str, Any] = {}
    if inter is not None:
        m = float(cfg.eval.smoothing)
        prior = inter["train_rate"]

        def item_rate(it: np.ndarray) -> np.ndarray:
            n = inter["train_count"][it]
            return (inter["train_pos"][it] + m * prior) / (n + m)

        def hist_rate(r: np.ndarray) -> np.ndarray:
            return np.where(np.isfinite(r), r, prior)

        t = inter["test"]
        ir, hr = item_rate(base["item"]), hist_rate(t["hist_rate"][pick].astype(np.float64))
        values["item_rate"] = (ir, ir)
        values["history_rate"] = (hr, hr)
        base["not_cold"] = t["not_cold"][pick]
        base["hist_len"] = t["hist_len"][pick]
        base["popularity"] = inter["train_count"][base["item"]].astype(np.float32)
        inter["test"] = t = None  # the test columns are placed: free them before the baselines' work
        baseline_info = {"smoothing": m, "prior": prior}
        v = inter["valid"]
        vy = v["label"]
        if len(vy) and len(np.unique(vy[vy >= 0])) == 2:
            from sklearn.linear_model import LogisticRegression

            ok = vy >= 0
            X = np.c_[item_rate(v["item"][ok]), hist_rate(v["hist_rate"][ok].astype(np.float64))]
            lr = LogisticRegression(C=1.0, max_iter=1000).fit(X, vy[ok].astype(int))
            pr = lr.predict_proba(np.c_[ir, hr])[:, 1]
            values["logistic"] = (pr, pr)
            baseline_info["logistic"] = {
                "fitted_on_valid_rows": int(ok.sum()),
                "coef": lr.coef_[0].tolist(),
                "intercept": float(lr.intercept_[0]),
            }
        else:
            notes.append("logistic baseline skipped: the valid split has no rows of both labels")
    else:
        notes.append("simple baselines skipped: they need prepare/interactions")

    return {
        "base": base,
        "values": values,
        "outside": outside,
        "cf_models": cf_models,
        "gate_names": gate_names,
        "scored_total": scored_total,
        "unlabelled": unlabelled,
        "baseline_info": baseline_info,
        "notes": notes,
        "score_table": st,
    }


def _slices(base: dict[str, np.ndarray], gate_names: np.ndarray, cfg: Any) -> dict[str, np.ndarray]:
    """Slice label -> row mask over the evaluated rows."""
    out: dict[str, np.ndarray] = {}
    if "not_cold" in base:
        out["warm (not_cold)"] = base["not_cold"]
        out["cold"] = ~base["not_cold"]
    if "hist_len" in base:
        edges = list(cfg.eval.history_buckets)
        h = base["hist_len"]
        for lo, hi in zip([0] + edges, edges + [None], strict=True):
            lab = f"history {lo}-{hi - 1}" if hi is not None else f"history >= {lo}"
            out[lab] = (h >= lo) & (h < hi) if hi is not None else h >= lo
    if "popularity" in base:
        pop = base["popularity"]
        qs = np.quantile(pop, [1 / 3, 2 / 3]) if len(pop) else [0, 0]
        out[f"items: train count <= {qs[0]:.0f}"] = pop <= qs[0]
        out[f"items: train count in ({qs[0]:.0f}, {qs[1]:.0f}]"] = (pop > qs[0]) & (pop <= qs[1])
        out[f"items: train count > {qs[1]:.0f}"] = pop > qs[1]
    g = base["gate"]
    if len(gate_names):
        codes = g.astype(np.int64)
        # Kinds and groups are looked up per gate name, then per row through the small code table (no
        # per-row string arrays: at 10M rows those alone would take GBs).
        for label_of, prefix in ((gate_kind, "gate: "), (gate_group, "user ")):
            per_gate = [label_of(str(n)) for n in gate_names]
            for k in sorted(set(per_gate)):
                out[prefix + k] = np.isin(codes, [i for i, x in enumerate(per_gate) if x == k])
    return out


def stage_meta(cfg: Any, storage: Storage) -> dict[str, str]:
    tables = (I.scores_table(cfg), I.CF_SCORES, I.INTERACTIONS, ITEMS, TRACES, EXPLANATIONS)
    inputs = [storage.uri(t) for t in tables if I.committed(storage, t)]
    sections = {k: v for k, v in cfg.to_dict().items() if k not in ("ray", "storage")}
    return fingerprint({**sections, "stage": SCHEMA_VERSION}, inputs, storage)


def evaluate(cfg: Any, storage: Storage) -> tuple[dict[str, Any], dict[str, bytes], dict[str, Any]]:
    """The metrics document, the PNGs and the in-memory pieces the renderers need."""
    t0 = time.perf_counter()
    inp = load(cfg, storage)
    base, values = inp["base"], inp["values"]
    n_universe = len(base["label"])
    scored = {m: np.isfinite(s) for m, (s, _) in values.items()}
    common = np.ones(n_universe, bool)
    for mask in scored.values():
        common &= mask
    if common.all():  # no copy (10M rows: about 1 GB saved)
        ev, vals = base, values
    else:
        ev = {k: v[common] for k, v in base.items()}
        vals = {m: (s[common], _take(p, common)) for m, (s, p) in values.items()}
    k_values = tuple(cfg.eval.k_values)
    e = cfg.eval
    rows = E.Rows.build(ev["user"], ev["label"])
    models = vals
    headline = E.evaluate_models(rows, models, k_values, e.bootstrap_resamples, cfg.seed, REFERENCE)
    slice_masks = _slices(ev, inp["gate_names"], cfg)
    slices: dict[str, Any] = {}
    for name, mask in slice_masks.items():
        if not mask.any():
            slices[name] = {"rows": 0, "users": 0, "models": {}}
            continue
        r = rows.take(mask)
        sub = _Masked(models, mask)
        res = E.evaluate_models(r, sub, k_values, e.slice_resamples, cfg.seed, REFERENCE)
        slices[name] = {"rows": int(mask.sum()), "users": r.n_users, "models": res}
    baselines = [b for b in BASELINES if b in models] + list(inp["cf_models"])
    strongest = max(baselines, key=lambda b: headline[b]["metrics"]["auc"]["value"] or -1, default=None)
    margin = headline[strongest].get("vs_reference", {}).get("auc") if strongest else None
    # What ThinkRec's score follows: its rank agreement with each other model, over all rows and
    # within users (how alike the two rank a user's own candidates).
    agreement = (
        E.score_agreement(rows, vals[REFERENCE][0], {m: s for m, (s, _) in vals.items() if m != REFERENCE})
        if REFERENCE in vals
        else {}
    )

    gate_names = inp["gate_names"]
    g_all = base["gate"][np.isfinite(base["gate"])].astype(np.int64)
    gate_counts = {
        str(gate_names[i]): int(c) for i, c in enumerate(np.bincount(g_all, minlength=len(gate_names)))
    }
    kinds: dict[str, int] = {}
    for n, c in gate_counts.items():
        kinds[gate_kind(n)] = kinds.get(gate_kind(n), 0) + c
    maxw = (
        np.array([gate_max_weight(str(n)) for n in gate_names], np.float32)[g_all]
        if len(gate_names)
        else np.zeros(0)
    )
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "config_hash": cfg.hash(),
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "k_values": list(k_values),
        "bootstrap": {
            "unit": "user",
            "resamples": e.bootstrap_resamples,
            "slice_resamples": e.slice_resamples,
            "seed": cfg.seed,
            "level": 0.95,
            "method": "percentile; paired for differences to thinkrec",
        },
        "auc_method": (
            "exact: rows sorted by score, a tie counts 1/2 (Mann-Whitney, as sklearn's roc_auc_score), no "
            "binning; error bound: float64 summation only, relative error below n * 2**-52 = "
            f"{max(int(common.sum()), 1) * 2.0**-52:.1e} for these rows"
        ),
        "rows": {
            "test": n_universe,
            "evaluated": int(common.sum()),
            "score_table_rows": inp["scored_total"],
            "score_table_unlabelled": inp["unlabelled"],
            "by_model": {
                m: {
                    "scored": int(mask.sum()),
                    "missing": int((~mask).sum()),
                    "outside_test_rows": inp["outside"].get(m, 0),
                }
                for m, mask in scored.items()
            },
        },
        "models": {
            m: {
                "kind": "thinkrec" if m == REFERENCE else ("cf" if m.startswith("cf_") else "baseline"),
                "probability": "p_yes"
                if m == REFERENCE
                else ("sigmoid(logit)" if m.startswith("cf_") else "itself"),
            }
            for m in models
        },
        "baselines": inp["baseline_info"],
        "metrics": {"all": headline},
        "strongest_baseline": {"model": strongest, "by": "auc", "thinkrec_margin": margin},
        "score_agreement": agreement,
        "slices": slices,
        "gates": {
            "counts": gate_counts,
            "kinds": kinds,
            "max_weight_mean": float(maxw.mean()) if len(maxw) else None,
        },
        "notes": inp["notes"],
    }
    pngs: dict[str, bytes] = {}
    y = ev["label"].astype(np.int8)
    if len(np.unique(y)) == 2:
        # Generators: one model's (probability) array at a time.
        pngs["roc_pr.png"] = P.roc_pr(y, ((m, s) for m, (s, _) in vals.items()))
        pngs["reliability.png"] = P.reliability(
            y, ((m, p(s) if callable(p) else p) for m, (s, p) in vals.items() if p is not None)
        )
        pngs["score_hist.png"] = P.histograms(y, {m: s for m, (s, _) in vals.items()})
    pts = [
        (name, *(lambda d: (d["value"], d["lo"], d["hi"]))(sl["models"][REFERENCE]["metrics"]["auc"]))
        for name, sl in slices.items()
        if sl["models"]
    ]
    if pts:
        pngs["slices.png"] = P.slices(pts, "AUC")
    if gate_counts:
        pngs["gate_usage.png"] = P.bars(gate_counts, "gate usage (test rows scored)", "rows")
        pngs["gate_weights.png"] = P.hist(maxw, "largest gate weight per row", "max weight")
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    return doc, pngs, {"ev": ev, "vals": vals}


def run(cfg: Any) -> dict[str, Any]:
    """Evaluate the run under cfg's output root and write report/. Returns the metrics document."""
    storage = Storage.from_config(cfg)
    out = storage.uri(REPORT)
    st = I.scores_table(cfg)
    if not I.committed(storage, st):
        raise MissingInputError(
            f"{storage.uri(st)} is not committed (no _SUCCESS): run the score stage first "
            "(`thinkrec score --config ...`)"
        )
    meta = stage_meta(cfg, storage)
    if is_complete(storage, out, meta):
        log.info("evaluate: up to date, skipped (%s)", out)
        return storage.read_json(f"{out}/metrics.json")
    storage.delete(out)
    doc, pngs, mem = evaluate(cfg, storage)
    manifests = {
        t: storage.read_json(f"{storage.uri(t)}/{MANIFEST}")
        for t in (I.INTERACTIONS, ITEMS, "prepare/users", I.CF_SCORES, TRACES, st, EXPLANATIONS)
        if I.committed(storage, t)
    }
    doc["model"] = D.describe_model(cfg)
    doc["data"] = D.describe_data(cfg, manifests)
    traces = (
        read_table(storage, storage.uri(TRACES), columns=[S.TEACHER]).to_pandas()
        if I.committed(storage, TRACES)
        else None
    )
    doc["teacher"] = D.describe_teacher(cfg, traces)
    doc["quarantine"] = D.quarantine_counts(manifests)
    sm = manifests.get(st, {})
    # The score stage's own record (thinkrec.scoring.stage.throughput); None for tables from before it.
    doc["score_throughput"] = sm.get("throughput")
    groups = storage.read_json(storage.uri(GROUPS)) if storage.exists(storage.uri(GROUPS)) else None
    doc["groups"] = groups
    if groups and groups.get("sizes"):
        pngs["group_sizes.png"] = P.bars(
            {f"group {i}": s for i, s in enumerate(groups["sizes"])},
            "expert group sizes (train users)",
            "users",
        )
    curves = storage.read_json(storage.uri(CURVES)) if storage.exists(storage.uri(CURVES)) else None
    series = D._series(curves) if curves is not None else {}
    doc["training_curves"] = sorted(series) or None
    doc["training_restarts"] = D.restarts(curves) or None
    if series:
        pngs["curves.png"] = P.curves(series)
    doc["explanations"] = explanations(cfg, storage, mem)
    doc["paper_reference_ml1m_llama3_8b"] = {m: {"auc": a, "uauc": u} for m, (a, u) in D.PAPER_ML1M.items()}
    doc = D._clean(doc)
    md = render_markdown(doc, pngs)
    for name, data in pngs.items():
        storage.write_bytes(f"{out}/{name}", data)
    storage.write_json(f"{out}/metrics.json", doc)
    storage.write_bytes(f"{out}/report.md", md.encode())
    storage.write_bytes(f"{out}/report.html", render_html(md, pngs).encode())
    mark_success(storage, out, meta, config=cfg.to_dict())
    log.info(
        "evaluate: %s (%d rows, ThinkRec AUC %s)",
        out,
        doc["rows"]["evaluated"],
        doc["metrics"]["all"][REFERENCE]["metrics"]["auc"]["value"],
    )
    return doc


def explanations(cfg: Any, storage: Storage, mem: dict[str, Any]) -> dict[str, Any] | None:
    """Explanation metrics. The score's decision, each row's history and the item titles are looked up
    for the explained rows only (the score table and prepare/interactions streamed, not loaded)."""
    from eval import text as T

    if not I.committed(storage, EXPLANATIONS):
        return None
    ex = read_table(storage, storage.uri(EXPLANATIONS)).to_pandas()
    users, items = ex[S.USER_ID].to_numpy(np.int64), ex[S.ITEM_ID].to_numpy(np.int64)
    scored = I.lookup(storage, I.scores_table(cfg), users, items, [S.P_YES])
    decisions = [
        None if r is None or r[S.P_YES] is None or np.isnan(r[S.P_YES]) else int(r[S.P_YES] >= 0.5)
        for r in scored
    ]
    hist = titles = None
    if I.committed(storage, I.INTERACTIONS) and I.committed(storage, ITEMS):
        rows = I.lookup(storage, I.INTERACTIONS, users, items, [S.HISTORY_ITEMS], split="test")
        hist = [(r or {}).get(S.HISTORY_ITEMS) or [] for r in rows]
        it = read_table(storage, storage.uri(ITEMS), columns=[S.ITEM_ID, S.TITLE])
        titles = dict(zip(it.column(S.ITEM_ID).to_pylist(), it.column(S.TITLE).to_pylist(), strict=True))
    res = T.explanation_metrics(
        ex[S.EXPLANATION].tolist(),
        ex[S.REASONING].tolist(),
        decisions,
        history_items=hist,
        candidates=items.tolist(),
        titles=titles,
        embeddings=cfg.eval.bertscore,
    )
    if titles is None:
        res["named_items_check"] = "not computed: it needs prepare/interactions and prepare/items"
    per_row = res.pop("per_row")
    samples = []
    for i, r in enumerate(ex.head(cfg.eval.explanation_samples).to_dict("records")):
        samples.append(
            {
                "user_id": int(r[S.USER_ID]),
                "item_id": int(r[S.ITEM_ID]),
                "label": None if r[S.LABEL] is None else int(r[S.LABEL]),
                "explanation": r[S.EXPLANATION],
                "reference": r[S.REASONING],
                **per_row[i],
            }
        )
    res["samples"] = samples
    return res
