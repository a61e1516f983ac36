"""Headers fuzzed with Hypothesis, on every provider's real server.

Each example publishes good messages and poison messages (bytes that are not the message's
JSON), each with drawn headers: control characters, non-ASCII, long names, names that look like
a broker's own syntax. A good message must reach the handler with exactly its headers; a poison
one must be dead-lettered with the reason and its headers kept; the subscriber must go on
(the good messages after the poison ones are handled). A header a broker cannot carry must be
refused at publish with an ``InvalidNameError`` naming it — never mangled, never a hang.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgbroker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgbroker import MessageContext
from msgbroker.testing import eventually

from .model import FaultMessage
from .test_faults import PARTITIONS, _providers, provider_url, settings_for

_name = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    st.sampled_from(["a.b", "*", ">", "a b", "x:y", "\r\nInjected: 1", "$SYS", "#", "%", "amq.x", "~"]),
    st.integers(100, 300).map(lambda n: ("abc" * n)[:n]),  # around AMQP's 128-byte field name
).filter(lambda n: not n.lower().startswith("msgbroker-"))  # the prefix is msgbroker's own
_value = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
                   st.sampled_from(["", "\r\n\r\n", "\x00", "PUB x 1\r\n"]), st.integers(2000, 3000).map("v".__mul__))
_headers = st.dictionaries(_name, _value, min_size=1, max_size=4)


@pytest.mark.parametrize("provider", _providers())
@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_fuzzed_headers_arrive_intact_or_are_refused_and_poison_is_dead_lettered(provider: str,
                                                                                      data: st.DataObject) -> None:
    drawn: list[dict[str, str]] = data.draw(st.lists(_headers, min_size=6, max_size=6), label="headers")
    topic, group = f"hdr-{uuid.uuid4().hex[:8]}", "g"
    seen: dict[str, dict[str, str]] = {}

    async def handle(ctx: MessageContext[FaultMessage]) -> None:
        seen[ctx.message_id] = dict(ctx.headers)

    async with msgbroker.connect(provider_url(provider), **settings_for(provider)) as broker:
        subscription = None
        try:
            subscription = await broker.subscribe(topic, group, handle, message_type=FaultMessage)
            good: dict[str, dict[str, str]] = {}
            poison: dict[str, dict[str, str]] = {}
            for index, headers in enumerate(drawn):
                message = FaultMessage(key=f"k{index % 2}", seq=index)
                try:
                    message_id = await broker.publish(topic, message, headers=headers)
                except msgbroker.InvalidNameError as exc:
                    assert any(repr(n)[:30] in str(exc) or n[:30] in str(exc) for n in headers), str(exc)
                    continue
                good[message_id] = headers
                bad = msgbroker.OutgoingRecord(topic, msgbroker.partition_for(message.key, PARTITIONS), message.key,
                                               f"poison-{index}", headers, b"\xff not json")
                await broker.transport.publish([bad], None)
                poison[bad.message_id] = headers
            last = FaultMessage(key="k0", seq=99)  # after every poison message of its partition
            good[await broker.publish(topic, last)] = {}

            await eventually(lambda: set(good) <= set(seen), timeout=60, interval=0.05,
                             what="every good message handled")
            for message_id, headers in good.items():
                got = {k: v for k, v in seen[message_id].items() if k in headers}
                assert got == headers, f"{provider}: headers of {message_id} changed in transit"

            async def all_dead() -> bool:
                return len(await broker.dead_letters(topic, group)) == len(poison)

            await eventually(all_dead, timeout=60, interval=0.1, what="every poison message dead-lettered")
            for letter in await broker.dead_letters(topic, group):
                assert "cannot decode" in letter.error
                got = {k: v for k, v in letter.headers.items() if k in poison[letter.message_id]}
                assert got == poison[letter.message_id], f"{provider}: dead letter {letter.message_id} lost headers"
        finally:  # thousands of idle queues would stall RabbitMQ: every example removes its own
            if subscription is not None:
                await subscription.close()
            await _drop(broker, topic, group)


async def _drop(broker: Any, topic: str, group: str) -> None:
    delete = getattr(broker.transport, "delete_topic", None)
    if delete is not None:
        await delete(topic, [group])
