"""Keep Flower from calling out: no telemetry, no update check.

Flower reads these variables when it is first imported and, by default, posts telemetry events
and checks for updates over the internet. The ``clients``, ``strategies`` and ``simulations``
packages import this module first, so it runs before any ``flwr`` import of theirs; the Makefile
and the scripts export the same values for the processes Flower starts.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
