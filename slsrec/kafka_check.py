"""Does the configured Kafka answer and accept our TLS and credentials? One bounded check, one clear line.

librdkafka connects in the background. A refused password or an untrusted certificate reaches the
application only through the client's error callback; the call that waits (``list_topics``) just
times out with "broker transport failure". :func:`check_kafka` waits a bounded time, stops early on
errors that retrying cannot fix, and turns the callback's reason into a :class:`ServiceError`.
librdkafka never puts the SASL password into its messages, so the line is safe to print.

>>> _strip("sasl_ssl://127.0.0.1:9094/bootstrap: SASL authentication error: denied (after 3ms in state AUTH_REQ)")
'SASL authentication error: denied'
"""

from __future__ import annotations

import logging
import re
import time

from slsrec.errors import ServiceError, Unavailable
from slsrec.settings import Settings

# librdkafka's own log lines ("connection refused" while a broker starts, "SASL authentication
# error" on every retry) would interleave with the CLI's output: the reason reaches the user once,
# through check_kafka or the client call that fails.
QUIET = logging.getLogger("slsrec.librdkafka")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False

_SLICE_S = 0.5  # how often the wait looks at the error callback's findings


def check_kafka(settings: Settings, timeout_s: float = 10.0):
    """The cluster metadata (all topics) of ``settings``' Kafka, fetched within ``timeout_s``.

    Raises :class:`ServiceError` naming the broker and the reason: credentials refused, TLS handshake
    failed (untrusted certificate), or no answer in time (:class:`Unavailable`, with a hint when a
    plaintext client may be talking to a TLS listener).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[KafkaError] = []
    admin = AdminClient({**settings.kafka_config(), "logger": QUIET, "error_cb": errors.append})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.list_topics(timeout=_SLICE_S)
        except KafkaException as e:
            last = e.args[0]
        admin.poll(0)  # serves the error callback
        final = [e for e in errors if e.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL)]
        if final:
            raise ServiceError(_reason(settings, final[0], [*errors, last], timeout_s))
        if time.monotonic() > deadline:
            raise Unavailable(_reason(settings, None, [*errors, last], timeout_s))


def _reason(settings: Settings, final, seen: list, timeout_s: float) -> str:
    from confluent_kafka import KafkaError

    where = f"Kafka at {settings.kafka_bootstrap}"
    if final is not None and final.code() == KafkaError._AUTHENTICATION:
        return (f"{where} refused the credentials of user {settings.kafka_sasl_username!r} "
                f"({settings.kafka_sasl_mechanism}): {_strip(final.str())}")
    if final is not None:
        return (f"{where}: TLS handshake failed (is SLSREC_KAFKA_SSL_CA_LOCATION the CA that signed the broker's "
                f"certificate?): {_strip(final.str())}")
    hint = ("; if its listener uses TLS, set SLSREC_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL"
            if "SSL" not in settings.kafka_security_protocol else "")
    # "Connection refused" says more than "1/1 brokers are down" or the call's own "transport failure"
    detail = next((e for e in seen if e.code() != KafkaError._ALL_BROKERS_DOWN), seen[-1])
    return f"{where} did not answer within {timeout_s:.0f} s: {_strip(detail.str())}{hint}"


def _strip(message: str) -> str:
    """librdkafka's reason without the broker URL in front and the state timing behind."""
    message = re.sub(r"^\w+://\S+/(bootstrap|\d+): ", "", message)
    return re.sub(r" \(after \d+ms in state \w+\)$", "", message)
