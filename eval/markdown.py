"""report.md from the metrics document (eval/SCHEMA.md); images are referenced by file name."""

from __future__ import annotations

import math
from typing import Any


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def ci(m: dict[str, Any] | None) -> str:
    if not m:
        return "n/a"
    if m.get("lo") is None:
        return fmt(m.get("value"))
    return f"{fmt(m['value'])} [{fmt(m['lo'])}, {fmt(m['hi'])}]"


def diff(d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    if d.get("lo") is None:
        return f"{d['diff']:+.4f}" if d.get("diff") is not None else "n/a"
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


HEAD = ("auc", "uauc", "gauc", "logloss", "ece")


def model_table(models: dict[str, Any], k_values: list[int]) -> list[str]:
    keys = list(HEAD) + [f"{m}@{k}" for m in ("hr", "ndcg", "map") for k in k_values]
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(ci(models[n]["metrics"].get(key)) for n in names) + " |")
    lines.append("| rows | " + " | ".join(str(models[n]["counts"]["rows"]) for n in names) + " |")
    lines.append("| users | " + " | ".join(str(models[n]["counts"]["users"]) for n in names) + " |")
    return lines


def diff_table(models: dict[str, Any]) -> list[str]:
    lines = ["| ThinkRec minus | AUC | UAUC | log-loss | NDCG@10 |", "|---|---|---|---|---|"]
    for n, m in models.items():
        d = m.get("vs_reference")
        if d:
            lines.append(
                f"| {n} | {diff(d.get('auc'))} | {diff(d.get('uauc'))} | {diff(d.get('logloss'))} | {diff(d.get('ndcg@10'))} |"
            )
    return lines


def img(pngs: dict[str, bytes], name: str, alt: str, absent: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if name in pngs else [f"> {absent}", ""]


def render_markdown(doc: dict[str, Any], pngs: dict[str, bytes]) -> str:
    k = doc["k_values"]
    rows, b = doc["rows"], doc["bootstrap"]
    allm = doc["metrics"]["all"]
    sb = doc["strongest_baseline"]
    th = allm["thinkrec"]["metrics"]
    md = [
        "# ThinkRec offline evaluation",
        "",
        f"Config hash `{doc['config_hash']}`; generated {doc['generated_at']}; metrics.json schema `{doc['schema']}`.",
        "",
    ]
    model = doc["model"]
    if model.get("base"):
        md.append(f"- **Model**: base `{model['base']}` ({model['dtype']}).")
    else:
        md.append(
            "- **Model**: tiny random-init Qwen2-style model built locally. Its numbers say whether the pipeline works, not how good ThinkRec is."
        )
    data = doc["data"]
    md.append(
        f"- **Data**: `{data['dataset']}` ({data['source']}), label {data['label_rule']}; split {data['split_rule']}."
    )
    if data.get("split_rows"):
        md.append(f"- **Rows per split**: {data['split_rows']}.")
    t = doc["teacher"]
    md.append(
        f"- **Teacher**: {', '.join(f'`{a}` ({c})' for a, c in t['by_teacher'].items())}"
        if t["present"]
        else "- **Teacher**: no reasoning traces (reason/traces absent)."
    )
    md += [
        "",
        "## Headline",
        "",
        f"ThinkRec AUC **{ci(th['auc'])}**, UAUC **{ci(th['uauc'])}** (95% bootstrap intervals over users, "
        f"{b['resamples']} resamples, seed {b['seed']}).",
        "",
    ]
    if sb["model"]:
        md += [
            f"Strongest baseline by AUC: **{sb['model']}** (AUC {ci(allm[sb['model']]['metrics']['auc'])}); ThinkRec's margin: **{diff(sb['thinkrec_margin'])}** (paired bootstrap).",
            "",
        ]
    md += [
        f"Every model is measured on the same {rows['evaluated']} rows: the test rows ({rows['test']}) that every model scored. "
        "Rows a model did not score:",
        "",
        "| model | scored | missing | scored outside the test rows |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {m} | {r['scored']} | {r['missing']} | {r['outside_test_rows']} |"
        for m, r in rows["by_model"].items()
    ]
    md += [
        "",
        f"Score table: {rows['score_table_rows']} rows, {rows['score_table_unlabelled']} without a label.",
        "",
    ]
    md += [
        "## All models",
        "",
        f"AUC: {doc['auc_method']}. UAUC: mean per-user AUC over users with both classes; GAUC: the same weighted by the user's rows. log-loss and ECE ({10} equal-width bins) of each model's probability.",
        "",
    ]
    md += (
        model_table(allm, k)
        + ["", "### Paired differences (ThinkRec minus model, 95% interval)", ""]
        + diff_table(allm)
        + [""]
    )
    agree = doc.get("score_agreement") or {}
    if agree:
        md += [
            "### What ThinkRec's score follows",
            "",
            "Spearman rank correlation of ThinkRec's score with each model's: over all rows, and the mean "
            "within users (how alike they rank a user's own candidates; none for a score constant within "
            "each user).",
            "",
            "| model | over all rows | within users (mean) | users |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {m} | {fmt(a['spearman'])} | {fmt(a['spearman_within_user'])} | {a['users']} |"
            for m, a in agree.items()
        ]
        md.append("")
    md += img(pngs, "roc_pr.png", "ROC and precision-recall", "ROC needs both classes.")
    md += img(pngs, "reliability.png", "Reliability diagram", "Reliability needs both classes.")
    md += img(pngs, "score_hist.png", "Score histograms by label", "Histograms need both classes.")
    md += [
        "## Slices",
        "",
        f"Intervals from {b['slice_resamples']} resamples.",
        "",
        "| slice | rows | users | ThinkRec AUC | ThinkRec UAUC | "
        + " | ".join(f"{m} AUC" for m in allm if m != "thinkrec")
        + " |",
        "|---|---|---|---|---|" + "---|" * (len(allm) - 1),
    ]
    for name, sl in doc["slices"].items():
        ms = sl["models"]
        if not ms:
            md.append(f"| {name} | 0 | 0 | n/a | n/a |" + " n/a |" * (len(allm) - 1))
            continue
        md.append(
            f"| {name} | {sl['rows']} | {sl['users']} | {ci(ms['thinkrec']['metrics']['auc'])} | {ci(ms['thinkrec']['metrics']['uauc'])} | "
            + " | ".join(ci(ms[m]["metrics"]["auc"]) for m in allm if m != "thinkrec")
            + " |"
        )
    md += [""] + img(pngs, "slices.png", "Slices", "No slice has rows.")
    g = doc["gates"]
    md += ["## Gates and groups", "", "| gate | rows |", "|---|---|"] + [
        f"| {n} | {c} |" for n, c in g["counts"].items()
    ]
    md += ["", f"By kind: {g['kinds']}; mean largest gate weight {fmt(g['max_weight_mean'])}.", ""]
    md += img(pngs, "gate_usage.png", "Gate usage", "No gates recorded.") + img(
        pngs, "gate_weights.png", "Gate weights", "No gate weights."
    )
    gr = doc.get("groups")
    if gr:
        md += [
            f"User groups: {gr.get('n_groups')} by {gr.get('method')} ({gr.get('chosen_by')}), sizes {gr.get('sizes')}, mean Cohen's d {fmt(gr.get('cohens_d_mean'))}; pairs {gr.get('cohens_d_pairs')}.",
            "",
        ]
        md += img(pngs, "group_sizes.png", "Group sizes", "")
    else:
        md += ["> train/groups.json is absent: no expert groups in this run.", ""]
    md += ["## Training and scoring", ""]
    for phase, records in (doc.get("training_restarts") or {}).items():
        tried = "; ".join(
            f"attempt {r.get('attempt')}: best validation AUC {fmt(r.get('best_auc'))} over {r.get('epochs')}"
            f" epoch(s), chance band below {fmt(r.get('below'))}"
            for r in records
        )
        md += [
            f"> Phase `{phase}` stalled and started over {len(records)} time(s) (`train.projector_restarts`):"
            f" {tried}. The curves are the last attempt's.",
            "",
        ]
    md += img(
        pngs,
        "curves.png",
        "Training curves",
        "No training curves: train/curves.json is absent or holds no numeric series.",
    )
    tp = doc.get("score_throughput")
    if tp:
        md += [
            "Score stage throughput (its manifest; the stage's wall time from start to commit):",
            "",
            "| rows | wall seconds | pairs/s | backend |",
            "|---|---|---|---|",
            f"| {tp.get('rows')} | {fmt(tp.get('wall_s'))} | {fmt(tp.get('pairs_per_s'))} | {tp.get('backend')} |",
            "",
        ]
    else:
        md += ["> Score stage throughput: not recorded in the score table's manifest.", ""]
    md += ["## Explanations", ""]
    e = doc.get("explanations")
    if not e:
        md += ["> No explanations: explain/explanations is absent (run the explain stage).", ""]
    else:
        md += [
            f"{e['rows']} explanations, {e['with_reference']} with a reference.",
            "",
            "| BLEU-4 | ROUGE-L F | METEOR | BERTScore F1 | distinct-2 | degenerate share | states Yes/No | agrees with decision |",
            "|---|---|---|---|---|---|---|---|",
            f"| {fmt(e['bleu4'])} | {fmt(e['rouge_l_f'])} | {fmt(e['meteor'])} | {fmt(e['bertscore_f1'])} | {fmt(e.get('distinct_2'))} | {fmt(e['degenerate_share'])} | {fmt(e.get('states_answer_share'))} | {fmt(e.get('answer_agrees_share'))} |",
            "",
        ]
        if "names_items_share" in e:
            md += [
                f"Named items: {fmt(e['names_items_share'])} of the explanations name at least one item "
                f"besides the one explained ({e['items_named']} named in all); {fmt(e['named_in_history_share'])} "
                "of the named items are in the user's history (titles from prepare/items).",
                "",
            ]
        else:
            md += [f"Named items: {e.get('named_items_check', 'not computed')}.", ""]
        md += [
            "BLEU-4: sacrebleu; ROUGE-L: rouge-score; METEOR: nltk with WordNet; BERTScore F1: bert-score with all-MiniLM-L6-v2 (offline). "
            + e["bleurt"]
            + ".",
            "",
        ]
        for s in e["samples"]:
            text = (s.get("explanation") or "").replace("\n", " ")[:300]
            md.append(
                f"- user {s['user_id']}, item {s['item_id']}, label {s['label']}: “{text}” (ROUGE-L {fmt(s.get('rouge_l_f'))}, METEOR {fmt(s.get('meteor'))}, BERTScore {fmt(s.get('bertscore_f1'))}, degenerate {s.get('degenerate')}"
                + (
                    f", names {', '.join(s['items_named']) or 'no item'}"
                    f" ({s['items_named_in_history']} in the history)"
                    if "items_named" in s
                    else ""
                )
                + ")"
            )
        md.append("")
    md += ["## Quarantine", "", "| table | rows | quarantined | reasons |", "|---|---|---|---|"]
    md += [
        f"| {t} | {q['rows']} | {q['rows_quarantined']} | {q['reasons'] or ''} |"
        for t, q in doc["quarantine"].items()
    ]
    md.append("")
    if doc["notes"]:
        md += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    ml1m = data["dataset"] == "ml-1m"
    md += [
        "## The paper's table (not this run)",
        "",
        "From Yu et al., *ThinkRec* (WWW 2026), ML-1M with Llama-3-8B-Instruct: the paper's numbers, quoted for orientation"
        + (
            ", beside ours (same dataset)"
            if ml1m
            else "; this run's dataset differs, so they are not comparable"
        )
        + ".",
        "",
    ]
    ours = {"MF": "cf_mf", "ThinkRec": "thinkrec", "LightGCN": "cf_lightgcn", "SASRec": "cf_sasrec"}
    md += [
        "| method | paper AUC | paper UAUC |" + (" this run AUC | this run UAUC |" if ml1m else ""),
        "|---|---|---|" + ("---|---|" if ml1m else ""),
    ]
    for m, r in doc["paper_reference_ml1m_llama3_8b"].items():
        row = f"| {m} (paper) | {r['auc']:.4f} | {r['uauc']:.4f} |"
        if ml1m:
            o = allm.get(ours.get(m, ""), {}).get("metrics", {})
            row += f" {fmt((o.get('auc') or {}).get('value'))} | {fmt((o.get('uauc') or {}).get('value'))} |"
        md.append(row)
    md.append("")
    return "\n".join(md)
