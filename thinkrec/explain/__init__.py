"""The explain stage (thinkrec/explain/stage.py)."""
