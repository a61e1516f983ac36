"""Lane leases that cost one KV write per member and renewal, however many lanes it holds.

A lane's lease is a key in the ``<stream_prefix>_attempts`` bucket
(``<topic>/<group>/<partition>/lease``) whose value names the *incarnation* holding it:
``<member id>.<nonce>``, a name a member takes when it first needs one and never again after it
ends. The incarnation lives while its key ``l/<incarnation>`` in the ``<stream_prefix>_pins``
bucket does; that bucket's TTL is the lease time, and a renewal is one revision-checked update of
that key. A lane is held while its key names a live incarnation:

* taking a lane creates its key; when the key names another incarnation, it is taken over (a
  revision-checked update) only when that incarnation has ended: its key is gone, which the taker
  makes sure of by creating the key again (value ``ended``: the holder's renewal now fails);
* renewing writes the incarnation's key only (and, once an hour, each lane key: the attempts
  bucket ages entries out after a day). Once that key has aged out, the update fails: the
  incarnation ended, every lease of it is lost, and the member takes a new name for its next
  lanes. An incarnation that ended never lives again, so a member paused past its lease time
  holds nothing when it wakes, whether or not another member took its lanes meanwhile;
* releasing deletes the lane's key (revision-checked). A member taking a lane whose key names
  its own incarnation (a release of it still on its way) rewrites it, revision-checked too: of
  the two, exactly one takes effect. Each taking has a token of its own.

Before, each lane's key sat in the pins bucket and every renewal rewrote all of them: a member
holding 1,024 lanes wrote about 1,600 keys a second, idle (docs/providers/nats.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import nats.js.errors
from msgbroker.spi import Lane
from nats.js.kv import KeyValue

from ._errors import map_error, through_elections

LANE_REFRESH = 3600.0
"""Seconds between rewrites of a held lane's key (the attempts bucket's entries age out after a
day: a lane held longer must not lose its key)."""
_FORGET_DEAD_AT = 10_000
"""Ended incarnations remembered (each saves a read when a lane it held is taken over)."""
_GONE = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)
_WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a revision-checked write whose revision is not the key's last."""
_ENDED = b"ended"
"""The value of an incarnation's key written by a member that found it gone (see Leases._ended)."""


def lane_key(lane: Lane) -> str:
    return f"{lane.topic}/{lane.group}/{lane.partition}/lease"  # '/' is in neither name


def life_key(incarnation: str) -> str:
    return f"l/{incarnation}"


def member_of(incarnation: str) -> str:
    """The member id in an incarnation's name (``<member id>.<nonce>``)."""
    return incarnation.rpartition(".")[0]


@dataclass
class _Life:
    name: str
    revision: int
    sent: float
    """When its last write was sent (monotonic): the bucket counts the lease time from when it
    stored that write, which is no earlier."""
    ended: bool = False


class Leases:
    """A connection's leases. ``pins`` and ``attempts`` open the two buckets; ``ttl`` reads
    the lease time (the pins bucket's TTL, known once it is open)."""

    def __init__(self, pins: Callable[[], Awaitable[KeyValue]], attempts: Callable[[], Awaitable[KeyValue]],
                 ttl: Callable[[], float]) -> None:
        self._pins = pins
        self._attempts = attempts
        self._ttl = ttl
        self._lives: dict[str, _Life] = {}
        """member id -> its current incarnation."""
        self._by_name: dict[str, _Life] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        """Per member: its incarnation is created or renewed by one call at a time (two
        revision-checked writes of one key at once would fail one of them)."""
        self._held: dict[str, tuple[int, float]] = {}
        """A lease's token -> (its lane key's revision now, when that key was last written)."""
        self._dead: set[str] = set()
        """Incarnations known to have ended (they never live again)."""

    # -- incarnations ------------------------------------------------------------------------

    def _lock(self, member_id: str) -> asyncio.Lock:
        return self._locks.setdefault(member_id, asyncio.Lock())

    def _fresh(self, life: _Life, within: float) -> bool:
        return not life.ended and time.monotonic() - life.sent < self._ttl() * within

    def _end(self, life: _Life) -> None:
        life.ended = True
        if len(self._dead) >= _FORGET_DEAD_AT:
            self._dead.clear()
        self._dead.add(life.name)
        self._by_name.pop(life.name, None)
        member = member_of(life.name)
        if self._lives.get(member) is life:
            del self._lives[member]
        for token in [t for t in self._held if t.rpartition(":")[0] == life.name]:
            self._held.pop(token, None)

    async def _renew(self, life: _Life) -> bool:
        """One revision-checked rewrite of the incarnation's key; False (and ended) once it aged out."""
        kv = await self._pins()
        sent = time.monotonic()
        try:
            life.revision = await through_elections(lambda: kv.update(life_key(life.name), b"", last=life.revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            self._end(life)
            return False
        life.sent = sent
        return True

    async def _life(self, member_id: str) -> _Life:
        """The member's live incarnation for taking lanes: the current one, renewed first unless
        that was done within a quarter of the lease time (a lane taken gets at least three
        quarters of it before the next renewal is due, as a lease key of its own would have had),
        or a new one."""
        async with self._lock(member_id):
            life = self._lives.get(member_id)
            if life is not None and not life.ended and (self._fresh(life, 0.25) or await self._renew(life)):
                return life
            kv = await self._pins()
            name = f"{member_id}.{secrets.token_hex(6)}"
            sent = time.monotonic()
            revision = await through_elections(lambda: kv.create(life_key(name), b""))
            life = self._lives[member_id] = self._by_name[name] = _Life(name, revision, sent)
            return life

    async def _lives_now(self, incarnation: str) -> bool:
        """Whether ``incarnation``'s key is in the pins bucket now (a read: on a cluster perhaps
        a follower's, a moment behind; only for views and checks that may err towards "lives")."""
        if incarnation in self._dead:
            return False
        try:
            entry = await (await self._pins()).get(life_key(incarnation))
        except _GONE:
            return False
        return entry.value != _ENDED

    async def _ended(self, incarnation: str) -> bool:
        """Whether ``incarnation`` has ended, made sure of by a write rather than a read: once its
        key is gone, creating it again (with the value ``ended``) makes the holder's next renewal
        fail. A read, served on a cluster by a follower a moment behind, could find the key gone
        while the leader has just renewed it."""
        if incarnation in self._dead:
            return True
        kv = await self._pins()
        try:
            # Written only where the key has no entry (revision 0): nats-py's create would read
            # the key once more on the refusal. A delete marker (no msgbroker deletes these keys)
            # is refused too, and read below as gone: a renewal over it fails all the same.
            await through_elections(lambda: kv.update(life_key(incarnation), _ENDED, last=0))
        except nats.js.errors.KeyWrongLastSequenceError:
            with contextlib.suppress(*_GONE):
                if (await kv.get(life_key(incarnation))).value != _ENDED:
                    return False  # it lives
        if len(self._dead) >= _FORGET_DEAD_AT:
            self._dead.clear()
        self._dead.add(incarnation)
        return True

    # -- the lease primitives ------------------------------------------------------------------

    async def acquire(self, lanes: Sequence[Lane], member_id: str, new: Collection[Lane] = ()) -> dict[Lane, str]:
        """Take each lane that is free (no key, or its holder ended); the tokens of those taken.
        The writes are sent together. On an error the leases taken are kept (the others at the
        next heartbeat); with none taken it is raised. ``new``: lanes whose key was most likely
        never written (their consumer was just created), tried with a create first."""
        try:
            life = await self._life(member_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"starting the leases of {member_id}") from exc
        asked: dict[str, asyncio.Future[bool]] = {}
        results = await asyncio.gather(*(self._take(lane, life, lane in new, asked) for lane in lanes),
                                       return_exceptions=True)
        taken = {lane: token for lane, token in zip(lanes, results, strict=True) if isinstance(token, str)}
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None and not taken:
            raise failed
        return taken

    async def _take(self, lane: Lane, life: _Life, new: bool, asked: dict[str, asyncio.Future[bool]]) -> str | None:
        try:
            kv = await self._attempts()
            taken = await through_elections(lambda: self._try_take(kv, lane, life, new, asked))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"taking the lease of {lane.topic}[{lane.partition}] for {lane.group}") from exc
        if taken is None or life.ended:
            return None
        revision, written = taken
        # One token per taking (the key's revision): a release of an earlier taking of the same
        # lane must not end this one.
        token = f"{life.name}:{revision}"
        self._held[token] = (revision, written)
        return token

    async def _try_take(self, kv: KeyValue, lane: Lane, life: _Life, new: bool,
                        asked: dict[str, asyncio.Future[bool]]) -> tuple[int, float] | None:
        """One try at taking ``lane``: its key's revision and when it was written, or None.

        The key is read first, then written revision-checked: two requests, whether it is new,
        released (a delete marker) or held. nats-py's ``create`` costs one for a key never written,
        but three over a delete marker (a refused write, a read, a write) and three before a held
        key's holder is known (a refused write, two reads) — and a lane is mostly taken again (a
        restart, a rebalance) or asked for while another member holds it. A ``new`` lane's key
        is created at once (one request), read only when that is refused. Whether a holder ended
        is asked once per ``asked`` (one acquire): a member asking for the 256 lanes another
        holds asked 256 times."""
        key = lane_key(lane)
        written = time.monotonic()
        if new:
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                return await kv.update(key, life.name.encode(), last=0), written
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError as gone:
            # Never written (or aged out): revision 0; released: its delete marker's revision.
            # Either way written only if nobody wrote it since.
            last = gone.entry.revision if gone.entry is not None else 0
            try:
                revision = await kv.update(key, life.name.encode(), last=last)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None  # taken (or released again) just now: the next heartbeat looks again
            return revision, written
        holder = (entry.value or b"").decode()
        if holder != life.name:
            verdict = asked.get(holder)
            if verdict is None:
                verdict = asked[holder] = asyncio.ensure_future(self._ended(holder))
            if not await asyncio.shield(verdict):  # shared: one taker's cancellation is not the others'
                return None
            try:
                revision = await kv.update(key, life.name.encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None  # another member took it over first
        else:
            # This incarnation's own key, which the engine does not hold: a release of it
            # still on its way, or one that failed. Rewritten revision-checked, so that of
            # the two (the release deletes revision-checked) exactly one takes effect.
            try:
                revision = await kv.update(key, life.name.encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None  # released just now: the next heartbeat takes it
        return revision, written

    async def renew(self, leases: Mapping[Lane, str]) -> set[Lane]:
        """Rewrite the key of each incarnation holding ``leases`` (one per member), and the lane
        keys not written for :data:`LANE_REFRESH`; the lanes still held."""
        kept: set[Lane] = set()
        by_life: dict[str, list[Lane]] = {}
        for lane, token in leases.items():
            if token in self._held:
                by_life.setdefault(token.rpartition(":")[0], []).append(lane)
        try:
            for name, lanes in by_life.items():
                life = self._by_name.get(name)
                if life is None or life.ended:
                    continue
                async with self._lock(member_of(name)):
                    if life.ended or not await self._renew(life):
                        continue
                now = time.monotonic()
                lanes = [lane for lane in lanes if leases[lane] in self._held]  # not released meanwhile
                kept.update(lanes)
                stale = [lane for lane in lanes if now - self._held[leases[lane]][1] >= LANE_REFRESH]
                if stale:
                    refreshed = await asyncio.gather(*(self._refresh(lane, leases[lane], life) for lane in stale))
                    kept.difference_update(lane for lane, ok in zip(stale, refreshed, strict=True) if not ok)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, "renewing leases") from exc
        return kept

    async def _refresh(self, lane: Lane, token: str, life: _Life) -> bool:
        held = self._held.get(token)
        if held is None:
            return False
        written = time.monotonic()
        try:
            kv = await self._attempts()
            revision = await through_elections(lambda: kv.update(lane_key(lane), life.name.encode(), last=held[0]))
        except nats.js.errors.KeyWrongLastSequenceError:
            self._held.pop(token, None)
            return False
        self._held[token] = (revision, written)
        return True

    def is_fresh(self, token: str, within: float = 0.75) -> bool:
        """Whether ``token`` surely holds its lane now without asking: its incarnation's key
        written within ``within`` of the lease time (the engine renews every quarter)."""
        life = self._by_name.get(token.rpartition(":")[0])
        return token in self._held and life is not None and self._fresh(life, within)

    async def holds(self, lane: Lane, token: str) -> bool:
        """Whether ``token`` still holds ``lane``: yes while renewed within half the lease time,
        else once its incarnation's key is renewed now (a member paused past its lease must not
        settle). A renewal that passes proves every lease of the incarnation still held: a lane
        is taken over only once that key is gone, and the taker's write of ``ended`` makes the
        renewal fail. One write serves every settle of the member waiting on it; before, each
        such settle read the lane's key and the incarnation's (a member of 1,024 lanes slowed by a
        profiler, whose beats came late, did so for about one settle in thirty; unprofiled
        drains did not meet a late beat)."""
        if token not in self._held:
            return False
        if self.is_fresh(token, 0.5):
            return True
        life = self._by_name.get(token.rpartition(":")[0])
        if life is None or life.ended:
            return False
        try:
            async with self._lock(member_of(life.name)):
                if not life.ended and not self._fresh(life, 0.5):
                    await self._renew(life)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, f"checking the lease of {lane.topic}[{lane.partition}] for {lane.group}") from exc
        return not life.ended and token in self._held

    async def release(self, lane: Lane, token: str) -> None:
        held = self._held.pop(token, None)
        if held is None:
            return
        try:
            kv = await self._attempts()
            await through_elections(lambda: kv.delete(lane_key(lane), last=held[0]))
        except nats.js.errors.APIError as exc:
            # Rewritten since (taken again, or over): not ours to delete. nats-py's delete answers
            # the server's "wrong last sequence" with a BadRequestError, its update with
            # KeyWrongLastSequenceError.
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise

    def forget(self, member_id: str) -> None:
        """Drop what this connection keeps of a member that left holding nothing (its
        incarnation's key ages out by itself); a subscription closed and opened again all day
        kept one entry more each time."""
        life = self._lives.get(member_id)
        if life is not None:
            prefix = f"{life.name}:"
            if any(token.startswith(prefix) for token in self._held):
                return  # a release that failed: its lane stays fenced by the key until it ages out
            del self._lives[member_id]
            self._by_name.pop(life.name, None)
        lock = self._locks.get(member_id)
        if lock is not None and not lock.locked():
            del self._locks[member_id]

    async def holders(self, lanes: Sequence[Lane]) -> dict[int, str]:
        """Each lane's holder now (a member id), read from the buckets: the dashboard's view."""
        kv = await self._attempts()
        alive: dict[str, bool] = {}
        owners: dict[int, str] = {}
        for lane in lanes:
            try:
                entry = await kv.get(lane_key(lane))
            except _GONE:
                continue
            holder = (entry.value or b"").decode()
            if holder and holder not in alive:
                alive[holder] = await self._lives_now(holder)
            if holder and alive[holder]:
                owners[lane.partition] = member_of(holder)
        return owners
