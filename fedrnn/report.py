"""``python -m fedrnn.report RUN_DIR [RUN_DIR ...]``: compare runs (see ``fedrnn.runs.report``)."""

from fedrnn.runs.report import main

if __name__ == "__main__":
    main()
