"""`python -m jobs.cf --config FILE [key=value ...]`: the cf stage (see `thinkrec cf --help`)."""

from thinkrec.cli import run_stage

if __name__ == "__main__":
    run_stage("cf")
