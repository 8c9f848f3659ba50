"""`python -m jobs.prepare --config FILE [key=value ...]`: the prepare stage (see `thinkrec prepare --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare")
