"""The monitor's alerting: evaluates the policy's rules every few seconds, keeps the alert book in the
monitor's bucket (compare-and-set, so replicas send each transition once), sends firings and resolutions to
the log, NATS and webhooks, takes silences, and rolls a policy back when its rules say so."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from contracts import subjects as s
from contracts.events import Alert, AlertResolved, PolicyRolledBack
from contracts.policy import AlertRule
from contracts.queries import AlertsQuery, AlertsReply, SilenceAlert
from services.monitor.alerts import (
    MAX_HISTORY, AlertBook, Pending, above_at, evaluate, missed_change, observe, policy_changed, should_roll_back)
from services.monitor.handlers import Metrics
from services.monitor.webhooks import WebhookSender
from shared.bus import Bus
from shared.policy import PolicyView, kept_entries, rollback
from shared.quarantine import Quarantine

log = logging.getLogger(__name__)
BOOK = "alerts"
ROLLBACK_RULE = "policy_rolled_back"
_encode = msgspec.json.Encoder().encode
_decode_book = msgspec.json.Decoder(AlertBook).decode


class AlertDesk:
    def __init__(self, bus: Bus, kv: KeyValue, policy_kv: KeyValue, policy: PolicyView, metrics: Metrics,
                 quarantine: Quarantine, webhooks: WebhookSender, clock: Any = time.time) -> None:
        self.bus, self.kv, self.policy_kv, self.policy, self.metrics = bus, kv, policy_kv, policy, metrics
        self.quarantine, self.webhooks, self.clock = quarantine, webhooks, clock
        self.pending = Pending()
        self.book, self.revision = AlertBook(), 0
        self.seen_version = policy.version
        self.ran_before = False  # a snapshot says a monitor ran on this stack before this one started
        self.counts = {"evaluations": 0, "fired": 0, "resolved": 0, "rolled_back": 0, "lost_races": 0}

    async def load(self) -> None:
        try:
            entry = await self.kv.get(BOOK)
        except KeyNotFoundError:
            self.book, self.revision = AlertBook(), 0
            return
        self.revision = entry.revision or 0
        try:
            self.book = _decode_book(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            await self.quarantine.note(s.KV_MONITOR, BOOK, self.revision, entry.value, exc)
            self.book = AlertBook()  # replaced at the next write

    async def _write(self, book: AlertBook) -> bool:
        """Store `book` if no one else wrote since we read; False (and the book re-read) if someone did."""
        try:
            if self.revision:
                self.revision = await self.kv.update(BOOK, _encode(book), last=self.revision)
            else:
                self.revision = await self.kv.create(BOOK, _encode(book))
        except (KeyWrongLastSequenceError, Exception) as exc:  # noqa: BLE001 - another replica wrote first, or
            # the server is busy: read again and decide again next round
            if not isinstance(exc, KeyWrongLastSequenceError):
                log.warning("could not write the alert book: %r", exc)
            self.counts["lost_races"] += 1
            await self.load()
            return False
        self.book = book
        return True

    async def run(self, stop: anyio.Event) -> None:
        await self.load()
        try:
            await self.judge_missed_change()
        except Exception:  # noqa: BLE001 - the policy bucket is busy: the change goes unjudged, as before
            log.exception("could not judge the policy change made while no monitor ran")
        while not stop.is_set():
            try:
                await self.evaluate_once()
            except Exception:  # noqa: BLE001 - one bad round must not end the alerting
                log.exception("alert evaluation failed")
            with anyio.move_on_after(self.policy().alerting.evaluate_every_s):
                await stop.wait()

    async def evaluate_once(self) -> None:
        now, policy, version = self.clock(), self.policy(), self.policy.version
        self.counts["evaluations"] += 1
        book = self.book
        if version != self.seen_version:
            if version != book.change.version:
                book = policy_changed(book, version, self.seen_version, now)
            self.seen_version = version
        rules = policy.alerting.rules
        observed = {rule.name: observe(self.metrics, rule, now) for rule in rules}
        book, done = evaluate(book, rules, observed, self.pending, now, version)
        rollback_for = next(((rule, alert) for rule, alert in done.fired
                             if should_roll_back(book, rule, alert, now, policy.alerting.rollback_window_s)), None)
        if rollback_for:
            book = msgspec.structs.replace(book, change=msgspec.structs.replace(book.change, rolled_back=True))
        if book is self.book or not await self._write(book):
            return
        for _, alert in done.fired:
            await self.send(alert)
        for resolved in done.resolved:
            await self.send(resolved)
        if rollback_for:
            await self.roll_back(*rollback_for)

    async def judge_missed_change(self) -> None:
        """A policy change made while no monitor ran (a monitor ran before, and the book's latest change is an
        older one) is judged as if seen, from the time the policy bucket stamped on it, if that is within the
        rollback window; the figures, rebuilt from the streams, tell what was above a threshold then
        (alerts.above_at)."""
        version, book = self.policy.version, self.book
        if not self.ran_before or not version or version <= book.change.version:
            return
        kept = [entry for entry in await kept_entries(self.policy_kv) if entry.revision and entry.value]
        made = next((entry for entry in kept if entry.revision == version), None)
        earlier = [entry.revision for entry in kept if entry.revision < version]
        now, alerting = self.clock(), self.policy().alerting
        if made is None or made.created is None or not earlier:
            return
        at = made.created.timestamp()
        if not 0 <= now - at <= alerting.rollback_window_s:
            return
        above = set().union(*(above_at(self.metrics, rule, at, now) for rule in alerting.rules))
        if await self._write(missed_change(book, version, earlier[-1], at, above)):
            log.warning("policy version %d was applied %.0f s ago while no monitor ran: judging it from then",
                        version, now - at)

    async def send(self, event: Alert | AlertResolved) -> None:
        """Every sink: the log, NATS (the signals stream keeps it), the webhooks."""
        if isinstance(event, Alert):
            self.counts["fired"] += 1
            log.warning("ALERT %s [%s] %s: %s", event.rule, event.severity, event.scope, event.message)
        else:
            self.counts["resolved"] += 1
            log.info("RESOLVED %s [%s] %s: %.4g", event.rule, event.severity, event.scope, event.value)
        try:
            await self.bus.emit(s.alert(event.severity, event.rule), event)
        except Exception as exc:  # noqa: BLE001 - the log and the webhooks still have it
            log.warning("could not publish %s %s: %r", type(event).__name__, event.rule, exc)
        self.webhooks.send(event, self.policy().alerting.webhooks)

    async def roll_back(self, rule: AlertRule, alert: Alert) -> None:
        change = self.book.change
        if self.policy.version != change.version:
            log.warning("not rolling back policy %d: version %d is current now", change.version, self.policy.version)
            return
        to_version = await rollback(self.policy_kv)
        restored = await self.restored_version(to_version)
        self.counts["rolled_back"] += 1
        await self.bus.emit(s.POLICY_ROLLED_BACK, PolicyRolledBack(from_version=change.version, to_version=to_version,
                                                                   restored_version=restored, alert=alert))
        own = Alert(rule=ROLLBACK_RULE, severity="high", scope="all", figure=alert.figure, value=alert.value,
                    threshold=alert.threshold, window=alert.window, policy_version=change.version,
                    message=f"policy {change.version} rolled back to {restored} (as {to_version}): {rule.name} "
                            f"fired in {alert.scope} {self.clock() - change.at:.0f} s after the change")
        book = msgspec.structs.replace(self.book, history=[*self.book.history, own][-MAX_HISTORY:])
        self.seen_version = to_version
        book = msgspec.structs.replace(book, change=msgspec.structs.replace(book.change, version=to_version))
        if await self._write(book):
            await self.send(own)

    async def restored_version(self, to_version: int) -> int:
        """Which earlier version the rollback copied (the newest good one before the change)."""
        history = [entry.revision for entry in await kept_entries(self.policy_kv) if entry.revision]
        earlier = [revision for revision in history if revision < self.book.change.version]
        return earlier[-1] if earlier else 0

    # --- the endpoints ---

    async def alerts(self, data: bytes) -> bytes:
        query = msgspec.json.decode(data or b"{}", type=AlertsQuery)
        await self.load()  # another replica may have written since
        return _encode(self.reply(history=query.history))

    async def silence(self, data: bytes) -> bytes:
        command = msgspec.json.decode(data, type=SilenceAlert)
        for _ in range(5):
            until = {**self.book.silences, command.rule: self.clock() + command.for_s}
            if not command.for_s:
                until.pop(command.rule, None)
            now = self.clock()
            until = {rule: end for rule, end in until.items() if end > now}
            if await self._write(msgspec.structs.replace(self.book, silences=until)):
                log.warning("alert rule %s silenced for %.0f s by %s", command.rule, command.for_s, command.by or "?")
                break
        return _encode(self.reply())

    def reply(self, history: bool = False) -> AlertsReply:
        change = self.book.change
        return AlertsReply(firing=list(self.book.firing.values()), history=list(self.book.history) if history else [],
                           silences=dict(self.book.silences),
                           policy_change={"version": change.version, "previous": change.previous, "at": change.at,
                                          "rolled_back": float(change.rolled_back)})

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "firing": len(self.book.firing), "webhooks": self.webhooks.stats()}
