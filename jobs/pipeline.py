"""`python -m jobs.pipeline --config FILE [key=value ...]`: the pipeline stage (see `thinkrec pipeline --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("pipeline")
