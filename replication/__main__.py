"""`python -m replication ...` runs the `sae-seeds` command (see `replication.cli`)."""
import sys

from .cli import main

sys.exit(main())
