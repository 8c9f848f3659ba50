"""A trained ThinkRec model's files inside the train stage's output: the adapters' directory (the
global adapter and one per expert), the CF projector and the fusion's gate. Kept apart from the
torch code so that the scorer actor's module imports no torch before it starts its prompt process."""

ADAPTERS = "adapters"
GLOBAL = "global"
PROJECTOR = "projector.safetensors"
FUSION = "fusion.json"
CURVES = "curves.json"
"""The learning curves (train loss per step, validation AUC/UAUC per epoch): each phase's result and
the train stage's output carry one, and the ablation runner reads the latter."""
