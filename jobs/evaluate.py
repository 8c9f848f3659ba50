"""`python -m jobs.evaluate --config FILE [key=value ...]`: the evaluate stage (see `thinkrec evaluate --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
