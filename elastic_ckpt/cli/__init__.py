"""``elastic-ckpt``: list, inspect, verify and export checkpoints from the command line.

``main.py`` parses arguments and maps errors to exit codes; ``views.py`` turns checkpoints
into plain JSON-able dicts and human-readable text. Single process; never starts Ray.
"""
