"""`python -m jobs.explain --config FILE [key=value ...]`: the explain stage (see `thinkrec explain --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("explain")
