"""`python -m jobs.train --config FILE [key=value ...]`: the train stage (see `thinkrec train --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("train")
