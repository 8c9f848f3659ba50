"""`python -m jobs.ablation --config configs/ml100k-ablation.yaml`: the ablation comparison."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("ablation")
