"""``thinkrec compare RUN_ROOT...``: several runs' ThinkRec scores in one table with paired intervals.

Each run's score table is read (labelled rows), the rows every run scored are kept (keyed by
user_id, item_id; the count each run lacks is reported), and the runs are evaluated side by side by
``eval.engine.evaluate_models``: the same user resamples for every run, so the difference of each
run to the first is a paired bootstrap. Writes ``comparison.md``, ``comparison.html`` and
``comparison.json`` to the output directory (a URI, like every output root).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from eval import engine as E
from eval import inputs as I
from eval.html import render_html
from eval.markdown import ci, diff
from thinkrec.data import schema as S
from thinkrec.io.fs import Storage

METRICS = ("auc", "uauc", "gauc", "logloss", "ece", "ndcg@10")


def _names(roots: list[str]) -> list[str]:
    names: list[str] = []
    for r in roots:
        base = os.path.basename(r.rstrip("/")) or r
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _read(storage: Storage, table: str) -> dict[str, np.ndarray]:
    cols = [S.USER_ID, S.ITEM_ID, S.LABEL, S.SCORE, S.P_YES]
    parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
    for b in I.iter_batches(storage, table, cols):
        for c in cols:
            dtype = np.int64 if c in (S.USER_ID, S.ITEM_ID) else np.float64
            parts[c].append(I._np(b.column(c), dtype, -1 if c == S.LABEL else None))
    d = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    keep = d[S.LABEL] >= 0
    return {c: v[keep] for c, v in d.items()}


def compare(
    roots: list[str],
    out: str,
    *,
    resamples: int = 200,
    seed: int = 0,
    k_values: tuple[int, ...] = (1, 3, 5, 10),
    s3_endpoint: str | None = None,
    table: str = I.SCORES,
) -> dict[str, Any]:
    if len(roots) < 2:
        raise ValueError("compare needs at least two run roots")
    names = _names(roots)
    runs = {}
    for name, root in zip(names, roots, strict=True):
        storage = Storage(root=root, s3_endpoint=s3_endpoint)
        if not I.committed(storage, table):
            raise FileNotFoundError(f"{storage.uri(table)} is not committed: run the score stage for {root}")
        runs[name] = _read(storage, table)
    stride = int(max(r[S.ITEM_ID].max(initial=0) for r in runs.values())) + 1
    keys = {n: I.make_keys(r[S.USER_ID], r[S.ITEM_ID], stride) for n, r in runs.items()}
    common = keys[names[0]]
    for n in names[1:]:
        common = np.intersect1d(common, keys[n])
    uni = I.Universe(common)
    first = runs[names[0]]
    label, _ = uni.place(keys[names[0]], first[S.LABEL])
    users = uni.keys // stride
    models = {}
    for n, r in runs.items():
        lab, _ = uni.place(keys[n], r[S.LABEL])
        if (lab != label).any():
            raise ValueError(
                f"run {n} labels {int((lab != label).sum())} common rows differently from {names[0]}"
            )
        s, _ = uni.place(keys[n], r[S.SCORE])
        p, _ = uni.place(keys[n], r[S.P_YES])
        models[n] = (s, p)
    res = E.evaluate_models(E.Rows.build(users, label), models, k_values, resamples, seed, names[0])
    doc = {
        "runs": dict(zip(names, roots, strict=True)),
        "reference": names[0],
        "rows": {
            "common": len(uni.keys),
            "by_run": {
                n: {"scored": len(keys[n]), "not_common": len(keys[n]) - len(uni.keys)} for n in names
            },
        },
        "bootstrap": {"unit": "user", "resamples": resamples, "seed": seed, "level": 0.95},
        "models": res,
    }
    md = [
        "# Runs compared",
        "",
        f"{len(uni.keys)} rows scored by every run; 95% bootstrap intervals over users ({resamples} resamples, seed {seed}); "
        f"differences are paired, each run minus `{names[0]}`.",
        "",
        "| run | root | rows scored | "
        + " | ".join(METRICS)
        + f" | AUC minus {names[0]} | UAUC minus {names[0]} |",
        "|---|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for n in names:
        m = res[n]
        d = m.get("vs_reference", {})
        # vs_reference holds reference minus run; the table shows run minus reference.
        flip = {
            k: {
                "diff": -v["diff"],
                "lo": None if v["hi"] is None else -v["hi"],
                "hi": None if v["lo"] is None else -v["lo"],
            }
            for k, v in d.items()
        }
        md.append(
            f"| {n} | `{runs and doc['runs'][n]}` | {len(keys[n])} | "
            + " | ".join(ci(m["metrics"].get(k)) for k in METRICS)
            + f" | {diff(flip.get('auc')) or '-'} | {diff(flip.get('uauc')) or '-'} |"
        )
    text = "\n".join(md) + "\n"
    st = Storage(root=out, s3_endpoint=s3_endpoint)
    st.write_bytes(st.uri("comparison.md"), text.encode())
    st.write_bytes(st.uri("comparison.html"), render_html(text, {}).encode())
    st.write_json(st.uri("comparison.json"), doc)
    print(text)
    return doc
