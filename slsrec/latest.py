"""Each user's latest recommendation in Redis, for the HTTP API (``slsrec api``).

The long-term store (:mod:`slsrec.store`) holds published versions; this module holds what the API
serves, and is the API's only way to Redis. Key layout (``prefix`` defaults to ``slsrec``)::

    {prefix}:latest:{user_id}    string   the user's latest Recommendation, the JSON the flow wrote
                                          (it names its model and long-term versions); expires
                                          ``ttl_s`` after it was written
    {prefix}:latest:changes:{db} pub/sub  one message per recommendation: user_id, 0x1F, the JSON
                                          (channels are not per database, so the name carries it)

The value is stored byte for byte as it came from Kafka, so a GET answers without parsing or
re-encoding. Every API process subscribes to the channel, so live updates reach a browser whichever
replica consumed the record and whichever replica the browser is connected to.

>>> split_change(join_change("u1", b'{"user_id": "u1"}'))
('u1', b'{"user_id": "u1"}')
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

import redis
import redis.asyncio
from pydantic import SecretStr

from slsrec.store import connect, node_url, redis_errors, redis_location

log = logging.getLogger(__name__)

# Ids never hold control characters (schemas.events.Id), so one can end the user id.
_SEP = b"\x1f"


def join_change(user_id: str, body: bytes) -> bytes:
    return user_id.encode() + _SEP + body


def split_change(message: bytes) -> tuple[str, bytes]:
    user, _, body = message.partition(_SEP)
    return user.decode(), body


class LatestStore:
    """The latest recommendation per user: written by the API's Kafka consumer, read by its handlers.

    Parameters
    ----------
    url
        Redis URL (may carry a password or ``rediss://``); only ``host:port`` is ever shown.
    ttl_s
        Seconds a user's latest recommendation stays servable after it was written.
    prefix
        Key namespace, shared with :class:`slsrec.store.LongTermStore`.
    """

    def __init__(self, url: SecretStr | str, ttl_s: int, prefix: str = "slsrec"):
        secret = url if isinstance(url, SecretStr) else SecretStr(url)
        self.location = redis_location(secret)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._url = secret
        self._tls = secret.get_secret_value().startswith("rediss")  # rediss:// or rediss+cluster://
        # Sync for the consumer thread; async for the request handlers, made in their event loop.
        self._r = connect(secret.get_secret_value(), socket_connect_timeout=5, socket_timeout=30)
        pool = getattr(self._r, "connection_pool", None)  # a cluster has no pool, and one database: 0
        self.channel = f"{prefix}:latest:changes:{pool.connection_kwargs.get('db', 0) if pool else 0}"
        self._ar: redis.asyncio.Redis | None = None

    def __repr__(self) -> str:
        return f"LatestStore({self.location!r}, prefix={self.prefix!r})"

    def key(self, user_id: str) -> str:
        return f"{self.prefix}:latest:{user_id}"

    def _errors(self):
        return redis_errors(self.location, self._tls)

    @property
    def _async(self) -> redis.asyncio.Redis:
        if self._ar is None:
            self._ar = connect(self._url.get_secret_value(), aio=True, socket_connect_timeout=5, socket_timeout=5)
        return self._ar

    # Writing (the consumer thread).
    def put_many(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Store each user's last record of ``records`` (in order) and announce every one: one round trip."""
        if not records:
            return
        latest = dict(records)  # the last one per user wins, as in the topic's order
        with self._errors():
            pipe = self._r.pipeline(transaction=False)
            for user, body in latest.items():
                pipe.set(self.key(user), body, ex=self.ttl_s)
            for user, body in records:
                pipe.publish(self.channel, join_change(user, body))
            pipe.execute()

    # Reading (the request handlers).
    async def get(self, user_id: str) -> bytes | None:
        """The user's latest recommendation JSON, or ``None`` (never had one, or it expired)."""
        with self._errors():
            return await self._async.get(self.key(user_id))

    async def ping(self) -> None:
        with self._errors():
            await self._async.ping()

    async def changes(self, on_subscribed: Callable[[], None] = lambda: None) -> AsyncIterator[tuple[str, bytes]]:
        """Every recommendation stored from now on, as (user_id, JSON), until cancelled; ``on_subscribed``
        is called once the subscription stands (from then on, nothing stored is missed)."""
        # Its own connection without a read timeout: a quiet channel is not a failure.
        listener = redis.asyncio.Redis.from_url(node_url(self._url.get_secret_value()), socket_connect_timeout=5,
                                                socket_timeout=None, health_check_interval=30)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        try:
            with self._errors():
                await pubsub.subscribe(self.channel)
                await pubsub.get_message(timeout=5)  # the confirmation, which the listener would skip
                on_subscribed()
                async for message in pubsub.listen():
                    yield split_change(message["data"])
        finally:
            await pubsub.aclose()
            await listener.aclose()

    def users(self, limit: int) -> list[str]:
        """Up to ``limit`` users that have a latest recommendation (for load tests and examples)."""
        start = len(self.key(""))
        out = []
        with self._errors():
            for k in self._r.scan_iter(match=self.key("*"), count=1000):
                out.append(k.decode()[start:])
                if len(out) >= limit:
                    break
        return out

    async def aclose(self) -> None:
        if self._ar is not None:
            await self._ar.aclose()
            self._ar = None

    def close(self) -> None:
        self._r.close()
