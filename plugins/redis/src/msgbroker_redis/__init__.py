"""msgbroker-redis: the Redis Streams provider of msgbroker (``redis://``, ``rediss://``).

Installed, it is found through the ``msgbroker.providers`` entry point; use it with
``msgbroker.connect("redis://localhost:6379")``. See docs/providers/redis.md.
"""

from __future__ import annotations

# First: with an untested redis-py installed, importing the package fails here, naming it.
from ._compat import UntestedClientVersion

# isort: split
from ._settings import RedisSettings
from ._transport import RedisLaneConsumer, RedisTransport, TopicKeys

__all__ = ["RedisLaneConsumer", "RedisSettings", "RedisTransport", "TopicKeys", "UntestedClientVersion"]
