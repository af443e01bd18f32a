"""The fleet map: every node as one cell, live, in a browser (``fleetkeeper ui``)."""
