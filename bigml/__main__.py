"""`python -m bigml ...` is the same as the `bigml` console script."""

import sys

from bigml.cli import main

if __name__ == "__main__":
    sys.exit(main())
