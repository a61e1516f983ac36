"""Rule 13, request and reply (docs/semantics.md, "Request and reply"): the cases of a provider
that declares ``request_reply``. Part of :class:`ConformanceSuite`."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import msgbroker
from msgbroker import Message, MessageContext

from ._cases import case, requires
from ._harness import ConformanceHarness
from ._support import ConformanceFailure, ConformanceMessage, Scenario

__all__ = ["ConformanceReply", "RequestReplyCases"]


class ConformanceReply(Message):
    """What the cases' handlers answer: the request's sequence number and the attempt it took."""

    seq: int
    attempt: int
    text: str = ""


class RequestReplyCases:
    """Request and reply, gated on the ``request_reply`` capability."""

    harness: ClassVar[ConformanceHarness | None] = None

    @requires("request_reply")
    @case("semantics", rules=("13", "2", "api"))
    async def test_a_request_is_answered_by_what_its_handler_returns(self, s: Scenario) -> None:
        """A request published by one connection is handled by a member on another; the message
        its handler returns comes back decoded as ``reply_type``, in order with the ordinary
        messages of its partition (it waits behind one being handled); ``None`` returned is
        ``None`` received; without ``reply_type`` the reply is the JSON as Python data."""
        handler_side = await s.connect()
        requester = await s.connect()
        topic, group = s.topic(), s.group()
        first_in = asyncio.Event()
        release = asyncio.Event()
        handled: list[int] = []

        async def answer(ctx: MessageContext[ConformanceMessage]) -> ConformanceReply | None:
            handled.append(ctx.message.seq)
            if ctx.message.seq == 0:
                first_in.set()
                await release.wait()
                return None
            if ctx.message.text == "no reply":
                return None
            return ConformanceReply(seq=ctx.message.seq, attempt=ctx.delivery_attempt,
                                    text=ctx.message.text + " ✓")

        await handler_side.subscribe(topic, group, answer, message_type=ConformanceMessage)
        await requester.publish(topic, ConformanceMessage(key="seat", seq=0))
        await s.eventually(first_in.is_set, "the first message of the partition to be handled")
        pending = asyncio.ensure_future(requester.request(
            topic, ConformanceMessage(key="seat", seq=1, text="lock A1"), reply_type=ConformanceReply,
            timeout=s.timeout(20)))
        await asyncio.sleep(s.timeout(0.3))
        assert not pending.done(), (
            "a request was answered while an earlier message of its partition was still being handled "
            f"(rule 2 holds for requests too): {pending.result() if not pending.exception() else pending.exception()}")
        assert handled == [0], f"the request overtook the message ahead of it: handled {handled}"
        release.set()
        try:
            reply = await pending
        except msgbroker.SerializationError as exc:  # the provider's reply channel changed the reply
            raise ConformanceFailure(f"the reply did not come back as sent: {exc}") from exc
        assert isinstance(reply, ConformanceReply), f"the reply should decode as ConformanceReply, got {reply!r}"
        assert (reply.seq, reply.attempt, reply.text) == (1, 1, "lock A1 ✓"), f"wrong reply {reply!r}"
        assert handled == [0, 1], f"handled {handled}"
        nothing = await requester.request(topic, ConformanceMessage(key="seat", seq=2, text="no reply"),
                                          reply_type=ConformanceReply, timeout=s.timeout(20))
        assert nothing is None, f"a handler that returned None should answer None, got {nothing!r}"
        raw = await requester.request(topic, ConformanceMessage(key="other", seq=3, text="raw"), timeout=s.timeout(20))
        assert isinstance(raw, dict) and raw.get("seq") == 3 and raw.get("text") == "raw ✓", (
            f"without reply_type the reply is its JSON as Python data, got {raw!r}")

    @requires("request_reply")
    @case("semantics", rules=("13",))
    async def test_a_request_nobody_answers_times_out_naming_the_topic(self, s: Scenario) -> None:
        """No member handles the topic: :class:`RequestTimeoutError` after the timeout, naming
        the topic and the request's id; a timeout that is not positive is refused."""
        requester = await s.connect()
        topic = s.topic("unanswered")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await requester.request(topic, ConformanceMessage(key="k", seq=0), timeout=0.5)
        except msgbroker.RequestTimeoutError as exc:
            waited = loop.time() - started
            assert topic in str(exc), f"the timeout error should name the topic {topic!r}: {exc}"
            assert waited >= 0.5 - 0.05, f"the request gave up after {waited:.2f}s of its 0.5s"
        else:
            raise AssertionError("a request nobody handles must raise RequestTimeoutError")
        for bad in (0, -1.0):
            try:
                await requester.request(topic, ConformanceMessage(key="k", seq=1), timeout=bad)
            except msgbroker.ConfigurationError as exc:
                assert "timeout" in str(exc), f"the error should name the timeout: {exc}"
            else:
                raise AssertionError(f"request(timeout={bad}) must raise ConfigurationError")

    @requires("request_reply")
    @case("semantics", rules=("13", "1", "3", "4"))
    async def test_a_failed_request_is_retried_then_answers_or_reports_its_dead_letter(self, s: Scenario) -> None:
        """A request whose handler raises once is retried and answered by its second attempt; a
        request that fails every attempt is dead-lettered and its requester gets
        :class:`RequestFailedError` with the dead letter's error, not a timeout."""
        handler_side = await s.connect(max_retry_attempts=2)
        requester = await s.connect()
        topic, group = s.topic(), s.group()

        async def flaky(ctx: MessageContext[ConformanceMessage]) -> ConformanceReply:
            if ctx.message.text == "always" or ctx.delivery_attempt == 1:
                raise RuntimeError(f"conformance: seat {ctx.message.seq} is jammed")
            return ConformanceReply(seq=ctx.message.seq, attempt=ctx.delivery_attempt)

        await handler_side.subscribe(topic, group, flaky, message_type=ConformanceMessage)
        reply = await requester.request(topic, ConformanceMessage(key="a", seq=1), reply_type=ConformanceReply,
                                        timeout=s.timeout(30))
        assert reply is not None and (reply.seq, reply.attempt) == (1, 2), (
            f"expected the second attempt's reply: {reply!r}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = s.timeout(30)
        try:
            await requester.request(topic, ConformanceMessage(key="b", seq=2, text="always"), timeout=timeout)
        except msgbroker.RequestFailedError as exc:
            assert "seat 2 is jammed" in str(exc), f"the error should carry the dead letter's error: {exc}"
            assert loop.time() - started < timeout, "the dead-letter answer came only at the timeout"
        else:
            raise AssertionError("a request that was dead-lettered must raise RequestFailedError")
        letters = await handler_side.dead_letters(topic, group)
        assert [letter.attempts for letter in letters] == [2], f"one dead letter after 2 attempts, got {letters}"
        assert not any(name.lower() == msgbroker.wire.REPLY_TO_HEADER for name in letters[0].headers), (
            f"a dead letter must not carry the reply address (a replay would answer a stale requester): "
            f"{letters[0].headers}")
