"""`python -m jobs.keywords --config FILE [key=value ...]`: the keywords stage (see `thinkrec keywords --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("keywords")
