"""Test-wide setup. Ray must bind to 127.0.0.1 only: with this set before ray is imported,
every Ray node (including ``ray.cluster_utils.Cluster`` nodes) advertises the loopback
address instead of the machine's network address."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
