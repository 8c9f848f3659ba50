"""`python -m jobs.reason --config FILE [key=value ...]`: the reason stage (see `thinkrec reason --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("reason")
