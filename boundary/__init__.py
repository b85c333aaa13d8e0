"""The Flower boundary that the server (``strategies``) and the clients (``clients``) share.

``boundary.records`` turns Flower records into plain numpy and back; the numerics in
``fedprune`` never import Flower. Importing this package also keeps Flower from calling out (no
telemetry, no update check): Flower reads these variables when it is first imported, and the
``clients``, ``strategies`` and ``simulations`` packages import this one first, so it runs
before any ``flwr`` import of theirs; the Makefile and the scripts export the same values for
the processes Flower starts.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
