"""check_kafka without a broker: the wait is bounded and the reason is one line."""

from __future__ import annotations

import time

import pytest

from slsrec.errors import ServiceError
from slsrec.kafka_check import check_kafka
from slsrec.settings import Settings


def test_no_broker_is_one_line_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as info:
        check_kafka(Settings(kafka_bootstrap="127.0.0.1:1"), timeout_s=1.0)  # nothing listens on port 1
    assert time.monotonic() - t0 < 5
    message = str(info.value)
    assert message.startswith("Kafka at 127.0.0.1:1 did not answer within 1 s: ") and "\n" not in message
    assert "Connection refused" in message and "SLSREC_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL" in message
