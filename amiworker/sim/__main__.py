"""``python -m amiworker.sim``: run a simulated PBX (see ``amiworker simulate --help``)."""

import sys

from amiworker.sim.command import main

sys.exit(main())
