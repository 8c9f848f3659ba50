"""The prepared tables' places in a run's output root (written by data/prepare.py). Apart from
prepare, so that the tables' readers (the scorer actors and their prompt processes) need not import
prepare's readers (Ray Data, pandas)."""

INTERACTIONS = "prepare/interactions"
ITEMS = "prepare/items"
USERS = "prepare/users"
