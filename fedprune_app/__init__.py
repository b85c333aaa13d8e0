"""The Flower app's entry points: with ``pyproject.toml`` and the licence, the whole app bundle.

Flower ships the bundle (FAB) to every SuperNode at the start of every run, so it carries only
this package; the code is the ``fedprune`` distribution installed on each machine (``pip install
.`` on a node, the editable install of ``make venv``), and the ServerApp checks that every node
runs the same install (:mod:`boundary.install`). One module per app, so that a SuperNode's
ClientApp process never imports the server.
"""
