"""``python -m flwr_serverless`` runs the command-line interface."""

import sys

from flwr_serverless.cli import main

if __name__ == "__main__":  # spawned simulation workers re-import this module as __mp_main__
    sys.exit(main())
