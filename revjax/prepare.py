"""`python -m revjax.prepare`: the command-line entry of `revjax.data.prepare`."""

import sys

from revjax.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
