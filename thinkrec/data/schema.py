"""Every table's columns, defined once. Stages import names from here, never spell them."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

# -- column names ---------------------------------------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
RAW_USER_ID = "raw_user_id"
RAW_ITEM_ID = "raw_item_id"
RATING = "rating"
LABEL = "label"
TIMESTAMP = "timestamp"
SPLIT = "split"
HISTORY_ITEMS = "history_items"
HISTORY_LABELS = "history_labels"
NOT_COLD = "not_cold"
TITLE = "title"
KEYWORDS = "keywords"
DESCRIPTION = "description"
EXTRACTOR = "extractor"
GROUP = "group"
SCORE = "score"
P_YES = "p_yes"
GATE = "gate"
VERSION = "version"
CF_SCORE = "cf_score"
REASONING = "reasoning"
TEACHER = "teacher"
EXPLANATION = "explanation"
# Generation outputs (thinkrec/generation/stage.py): the row key, the prompt, the text (or the error
# that quarantines the row) and what produced it.
ROW_KEY = "row_key"
PROMPT = "prompt"
GENERATED = "generated"
GEN_ERROR = "gen_error"
GEN_TRIES = "gen_tries"
NEW_TOKENS = "new_tokens"
BACKEND = "backend"
GEN_MODEL = "gen_model"
ADAPTER = "adapter"
DECODING_HASH = "decoding_hash"
PROMPT_HASH = "prompt_hash"

SPLITS = ("train", "valid", "test")

# -- table schemas (under the output root) --------------------------------------------------------
INTERACTIONS = pa.schema(
    [
        (USER_ID, pa.int64()),
        (ITEM_ID, pa.int64()),
        (RATING, pa.float32()),
        (LABEL, pa.int8()),
        (TIMESTAMP, pa.int64()),
        (SPLIT, pa.string()),
        (HISTORY_ITEMS, pa.list_(pa.int64())),
        (HISTORY_LABELS, pa.list_(pa.int8())),
        (NOT_COLD, pa.bool_()),
    ]
)
"""prepare/interactions: one row per (user, item, time) sample, with its history and split."""

ITEMS = pa.schema(
    [
        (ITEM_ID, pa.int64()),
        (RAW_ITEM_ID, pa.string()),
        (TITLE, pa.string()),
        (KEYWORDS, pa.list_(pa.string())),
        (DESCRIPTION, pa.list_(pa.string())),
    ]
)
"""prepare/items: remapped id, original id, title, the keywords the source ships (MovieLens genres,
Amazon and Yelp categories) and the description fields (plain text, one string per field; empty
for MovieLens). Prompts take keywords from keywords/keywords (thinkrec/data/items.py)."""

KEYWORDS_TABLE = pa.schema(
    [
        (ITEM_ID, pa.int64()),
        (KEYWORDS, pa.list_(pa.string())),
        (EXTRACTOR, pa.string()),
    ]
)
"""keywords/keywords: up to ``keywords.max_keywords`` keywords per item and the extractor that made
them (``genres``, ``tfidf``, ``llm`` or a ``module:Class``)."""

USERS = pa.schema([(USER_ID, pa.int64()), (RAW_USER_ID, pa.string())])
"""prepare/users: remapped id and original id."""

USER_IDS = pa.schema([(RAW_USER_ID, pa.string()), (USER_ID, pa.int64())])
"""prepare/user_ids: raw user id (always a string) -> internal id 1..N."""

ITEM_IDS = pa.schema([(RAW_ITEM_ID, pa.string()), (ITEM_ID, pa.int64())])
"""prepare/item_ids: raw item id (always a string) -> internal id 1..N."""

CF_SCORES = pa.schema(
    [
        (USER_ID, pa.int64()),
        (ITEM_ID, pa.int64()),
        (LABEL, pa.int8()),
        (SPLIT, pa.string()),
        (CF_SCORE, pa.float32()),
    ]
)
"""cf/scores: the CF model's logit for each valid/test sample; the table adds one ``cf_<model>``
float32 column per CF model trained in the run (``cf_scores_schema``)."""


def cf_column(model: str) -> str:
    """cf/scores column of one CF model's logit: ``cf_mf``, ``cf_mf_nobias``, ``cf_lightgcn``, ..."""
    return f"{CF_SCORE.removesuffix('score')}{model}"


def cf_scores_schema(columns: Iterable[str]) -> pa.Schema:
    """CF_SCORES followed by the given ``cf_<model>`` columns (float32), in that order."""
    return pa.schema([*CF_SCORES, *((name, pa.float32()) for name in columns)])


REASONING_TABLE = pa.schema(
    [
        (USER_ID, pa.int64()),
        (ITEM_ID, pa.int64()),
        (TIMESTAMP, pa.int64()),
        (LABEL, pa.int8()),
        (REASONING, pa.string()),
        (TEACHER, pa.string()),
        (BACKEND, pa.string()),
        (GEN_MODEL, pa.string()),
        (ADAPTER, pa.string()),
        (DECODING_HASH, pa.string()),
    ]
)
"""reason/traces: a reasoning trace for each hard training sample, the teacher that wrote it and, for
a teacher that generates (``llm``), what generated it (backend, model, adapter, decoding-settings hash;
null for the rule-based ``grounded`` teacher)."""

SCORES = pa.schema(
    [
        (USER_ID, pa.int64()),
        (ITEM_ID, pa.int64()),
        (LABEL, pa.int8()),
        (SCORE, pa.float32()),
        (P_YES, pa.float32()),
        (GATE, pa.string()),
        (VERSION, pa.string()),
    ]
)
"""score/scores: the Yes logit, p_yes = sigmoid(Yes logit), the adapter or mixture used, model version.
``label`` is null when the candidate table has none."""

EXPLANATIONS = pa.schema(
    [
        (USER_ID, pa.int64()),
        (ITEM_ID, pa.int64()),
        (LABEL, pa.int8()),
        (EXPLANATION, pa.string()),
        (REASONING, pa.string()),
        (BACKEND, pa.string()),
        (GEN_MODEL, pa.string()),
        (ADAPTER, pa.string()),
        (DECODING_HASH, pa.string()),
        (PROMPT_HASH, pa.string()),
    ]
)
"""explain/explanations: generated text, with the reference reasoning when one exists, and what
generated it (backend, model, the row's adapter or mixture, decoding-settings and prompt hashes)."""

CANDIDATE_COLUMNS = (USER_ID, ITEM_ID)
"""Required columns of a candidate table; ``label`` is optional."""
