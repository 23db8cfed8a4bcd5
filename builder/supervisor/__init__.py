"""The supervisor entrypoint that runs inside the image.

Standard library only (the image has no pip) and compatible with Python 3.10
(Ubuntu 22.04) and 3.11 (Debian 12). The host imports the pure parts (shard
names) from here too, so both sides agree on them.
"""
