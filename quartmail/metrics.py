"""Prometheus metrics and OpenTelemetry spans (the ``metrics`` extra).

``MAIL_METRICS = True`` registers quartmail's metrics (docs/metrics.md lists
them) in prometheus-client's default registry, or in the
:class:`~prometheus_client.CollectorRegistry` given as ``MAIL_METRICS``;
``MAIL_TRACING = True`` wraps each SMTP transaction in an OpenTelemetry span
of the global tracer provider, or of the one given as ``MAIL_TRACING``.
:meth:`quartmail.Mail.init_app` builds a :class:`MailMetrics` for the app
and sets it as its core's :class:`~quartmail.observer.MailObserver`.

Labels take a few values only, so that a series never names a person: the
class of quartmail error (``SendTimeoutError``) and the class of the SMTP
reply code (``4xx``), never an address or a reply's text. A span carries the
server's address and port and the number of recipients, not who they are.

The metrics are made once per registry and shared by every app that uses
it; the gauges add up the apps. Background delivery's gauges are read when
scraped (counters in memory); the outbox's need a query, which the
dispatcher runs every ``MAIL_METRICS_INTERVAL`` seconds, so a scrape never
waits on the database.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING

from ._extras import missing_extra

try:
    from opentelemetry import trace
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily, Metric
except ModuleNotFoundError as error:
    raise missing_extra(error, "metrics", "Metrics and traces (quartmail.metrics)") from None

from . import errors
from .errors import ConfigError, MailError
from .observer import MailObserver

if TYPE_CHECKING:
    from .message import Envelope
    from .settings import MailSettings
    from .smtp import SMTPSettings

__all__ = ["OUTBOX_STATES", "MailMetrics", "error_labels", "registry_for"]

#: The outbox's states: each has a ``quartmail_outbox_messages`` series once counted.
OUTBOX_STATES = ("queued", "sending", "sent", "failed")

# From a few milliseconds (a relay on the same host) to MAIL_TIMEOUT's default (30 s).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ERROR_LABELS = ("error", "code_class")
_OUR_ERRORS = frozenset(errors.__all__)


def error_labels(error: BaseException) -> tuple[str, str]:
    """The labels of a failure: the quartmail error class it is (the
    nearest one of :mod:`quartmail.errors`, ``other`` for anything else)
    and the class of its SMTP code (``4xx``, ``5xx``; ``none`` without one)."""
    name = "other"
    if isinstance(error, MailError):
        name = next(
            cls.__name__
            for cls in type(error).__mro__
            if cls.__module__ == errors.__name__ and cls.__name__ in _OUR_ERRORS
        )
    code = getattr(error, "code", None)
    code_class = f"{code // 100}xx" if isinstance(code, int) and 200 <= code < 600 else "none"
    return name, code_class


class MailMetrics(MailObserver):
    """One app's observer: it counts into the registry's metrics and opens
    spans with the tracer; made by :meth:`quartmail.Mail.init_app`.

    *backlog* returns background delivery's messages (waiting, being sent),
    read at each scrape.
    """

    def __init__(self, settings: MailSettings, backlog: Callable[[], tuple[int, int]]) -> None:
        self._metrics: _Metrics | None = None
        if settings.metrics is not None:
            self._metrics = _Metrics.of(registry_for(settings.metrics))
            self._metrics.gauges.apps.add(self)
            self.outbox_interval = settings.metrics_interval
        self._tracer = _tracer(settings.tracing) if settings.tracing is not None else None
        self.backlog = backlog
        self.outbox: tuple[dict[str, int], float | None] | None = None  # the last status

    def __repr__(self) -> str:
        on = [name for name, part in (("metrics", self._metrics), ("traces", self._tracer)) if part]
        return f"<MailMetrics {' '.join(on)}>"

    @contextmanager
    def sending(self, envelope: Envelope, smtp: SMTPSettings) -> Iterator[None]:
        """Time the transaction and count it; trace it in a span (kind
        CLIENT, named ``smtp send``) when tracing is on."""
        span = None
        if self._tracer is not None:
            # OpenTelemetry's general attributes (server.*, error.type); the
            # rest are quartmail's own: there are no conventions for SMTP.
            span = self._tracer.start_span(
                "smtp send",
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "server.address": smtp.hostname,
                    "server.port": smtp.port,
                    "network.protocol.name": "smtp",
                    "quartmail.recipient_count": len(envelope.recipients),
                    "quartmail.message_size": len(envelope.data),
                },
            )
        started = time.perf_counter()
        try:
            if span is None:
                yield
            else:
                # Neither the exception's text (it may quote addresses) nor its
                # traceback go into the span: set below, by class only.
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    yield
        except BaseException as error:
            # CancelledError too: the caller cancelled it, or the app stops.
            name, _ = error_labels(error) if isinstance(error, Exception) else ("cancelled", "")
            if self._metrics is not None and isinstance(error, Exception):
                self._metrics.duration.labels("failed").observe(time.perf_counter() - started)
            if span is not None:
                span.set_attribute("error.type", name)
                code = getattr(error, "code", None)
                if isinstance(code, int):
                    span.set_attribute("quartmail.smtp_code", code)
                span.set_status(trace.StatusCode.ERROR, name)
            raise
        else:
            if self._metrics is not None:
                self._metrics.duration.labels("sent").observe(time.perf_counter() - started)
                self._metrics.sent.inc()
        finally:
            if span is not None:
                span.end()

    def session_opened(self) -> None:
        if self._metrics is not None:
            self._metrics.sessions.inc()

    def retried(self, error: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.retried.labels(*error_labels(error)).inc()

    def failed(self, error: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.failed.labels(*error_labels(error)).inc()

    def throttled(self, error: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.throttled.labels(*error_labels(error)).inc()

    def outbox_status(self, counts: Mapping[str, int], oldest_due_age: float | None) -> None:
        self.outbox = (dict(counts), oldest_due_age)


class _Metrics:
    """quartmail's metrics in one registry, shared by the apps that use it."""

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Metrics:
        """The metrics in *registry*, registered there on first use."""
        metrics = _MADE.get(registry)
        if metrics is None:
            metrics = _MADE[registry] = cls(registry)
        return metrics

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter(
            "quartmail_messages_sent",
            "Messages an SMTP server accepted (for at least one recipient).",
            registry=registry,
        )
        self.failed = Counter(
            "quartmail_messages_failed",
            "Messages that failed for good, by quartmail error class and SMTP code class.",
            _ERROR_LABELS,
            registry=registry,
        )
        self.retried = Counter(
            "quartmail_messages_retried",
            "Retries scheduled after a failed attempt, by error class and SMTP code class.",
            _ERROR_LABELS,
            registry=registry,
        )
        self.throttled = Counter(
            "quartmail_throttled",
            "Times a server asked to slow down and sending backed off, by error and code class.",
            _ERROR_LABELS,
            registry=registry,
        )
        self.sessions = Counter(
            "quartmail_smtp_sessions_opened",
            "SMTP sessions opened (connected, TLS and AUTH done).",
            registry=registry,
        )
        self.duration = Histogram(
            "quartmail_send_duration_seconds",
            "Seconds per SMTP transaction (one attempt at one message), by outcome.",
            ("outcome",),
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        for outcome in ("sent", "failed"):
            self.duration.labels(outcome)  # both series from the start, at zero
        self.gauges = _Gauges()
        registry.register(self.gauges)


class _Gauges:
    """The gauges, read from the apps' state at each scrape (a collector)."""

    def __init__(self) -> None:
        self.apps: weakref.WeakSet[MailMetrics] = weakref.WeakSet()

    def collect(self) -> Iterable[Metric]:
        queued = GaugeMetricFamily(
            "quartmail_background_queued_messages",
            "Messages in background delivery waiting for a worker or for their retry.",
        )
        in_flight = GaugeMetricFamily(
            "quartmail_background_in_flight_messages",
            "Messages a background worker holds: connecting or sending.",
        )
        rows = GaugeMetricFamily(
            "quartmail_outbox_messages",
            "Outbox rows by state (the table's, the same in every process), "
            "counted every MAIL_METRICS_INTERVAL seconds.",
            labels=("state",),
        )
        oldest = GaugeMetricFamily(
            "quartmail_outbox_oldest_due_age_seconds",
            "Seconds the oldest outbox row due for sending has waited past its due time "
            "(0 when none is due).",
        )
        apps = list(self.apps)
        backlogs = [app.backlog() for app in apps]
        queued.add_metric((), sum(waiting for waiting, _ in backlogs))
        in_flight.add_metric((), sum(sending for _, sending in backlogs))
        statuses = [app.outbox for app in apps if app.outbox is not None]
        if statuses:
            states = {state for counts, _ in statuses for state in counts} | set(OUTBOX_STATES)
            for state in sorted(states):
                rows.add_metric((state,), sum(counts.get(state, 0) for counts, _ in statuses))
            oldest.add_metric((), max(age or 0.0 for _, age in statuses))
        return [queued, in_flight, rows, oldest]

    def describe(self) -> Iterable[Metric]:
        # The names, so that the registry refuses a clash at registration.
        return self.collect()


# Each registry's metrics: made once, as a registry refuses a name twice.
_MADE: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def registry_for(value: object) -> CollectorRegistry:
    """The registry ``MAIL_METRICS`` names (its value in :class:`~quartmail.settings.MailSettings`):
    prometheus-client's default one for True, or the one given."""
    if value is True:
        return REGISTRY
    if isinstance(value, CollectorRegistry):
        return value
    raise ConfigError(
        "MAIL_METRICS must be true, false or a prometheus_client.CollectorRegistry, "
        f"got a {type(value).__name__}"
    )


def _tracer(value: object) -> trace.Tracer:
    quartmail = version("quartmail")
    if value is True:
        return trace.get_tracer("quartmail", quartmail)  # the global provider, set now or later
    if isinstance(value, trace.TracerProvider):
        return value.get_tracer("quartmail", quartmail)
    raise ConfigError(
        "MAIL_TRACING must be true, false or an opentelemetry.trace.TracerProvider, "
        f"got a {type(value).__name__}"
    )
