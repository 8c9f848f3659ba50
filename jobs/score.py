"""`python -m jobs.score --config FILE [key=value ...]`: the score stage (see `thinkrec score --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("score")
