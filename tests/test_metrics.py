"""Metrics and traces (MAIL_METRICS, MAIL_TRACING): after real sends to the SMTP test
server, failures, retries, background delivery and the outbox (SQLite and PostgreSQL),
the registry holds what an operator would read, with labels that never name a person;
spans are recorded by the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry
from quart import Quart
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from quartmail import ConfigError, Mail, Message, RecipientsRefusedError, SendError
from quartmail.metrics import MailMetrics, error_labels
from quartmail.outbox import OutboxMessage, OutboxTable
from quartmail.settings import MailSettings
from quartmail.testing import SMTPTestServer

from conftest import SENDER, MakeMail

FAST = {"MAIL_RETRY_DELAY": 0.02, "MAIL_OUTBOX_POLL": 0.05, "MAIL_METRICS_INTERVAL": 0.05}
ADDRESS = re.compile(r"[^\s@]+@[^\s@]+")


def message(n: int = 0, *recipients: str) -> Message:
    return Message(f"metrics {n}", recipients=list(recipients or ["admin@example.com"]), body="b")


class Reading:
    """The values of one registry, as a scrape reads them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def samples(self, prefix: str) -> list[tuple[str, dict[str, str]]]:
        return [
            (sample.name, sample.labels)
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name.startswith(prefix)
        ]

    async def until(self, name: str, value: float, within: float = 10.0, **labels: str) -> None:
        async with asyncio.timeout(within):
            while self(name, **labels) != value:  # noqa: ASYNC110 (a registry has no event)
                await asyncio.sleep(0.01)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def read(registry: CollectorRegistry) -> Reading:
    return Reading(registry)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# --- sending now: mail.send and mail.connect ---------------------------------------------


async def test_sends_and_sessions_are_counted(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry)
    async with app.app_context():
        await mail.send(message(1))
        async with mail.connect() as connection:
            await connection.send(message(2))
            await connection.send(message(3))
    assert len(await smtp_server.wait_for_messages(3)) == 3
    assert read("quartmail_messages_sent_total") == 3
    assert read("quartmail_smtp_sessions_opened_total") == 2  # one per send, one connect()
    assert read("quartmail_send_duration_seconds_count", outcome="sent") == 3
    assert read("quartmail_send_duration_seconds_sum", outcome="sent") > 0
    assert read("quartmail_send_duration_seconds_count", outcome="failed") == 0
    assert read.samples("quartmail_messages_failed") == []


async def test_a_refused_send_counts_as_failed_by_error_and_code_class(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry)
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    smtp_server.refuse_recipients["nobody@example.com"] = "550 5.1.1 No such user"
    async with app.app_context():
        with pytest.raises(SendError):
            await mail.send(message(1))
        with pytest.raises(SendError):
            await mail.send(message(2, "nobody@example.com"))
    assert read("quartmail_messages_failed_total", error="SendError", code_class="5xx") == 1
    assert (
        read("quartmail_messages_failed_total", error="RecipientsRefusedError", code_class="5xx")
        == 1
    )
    assert read("quartmail_send_duration_seconds_count", outcome="failed") == 2
    assert read("quartmail_messages_sent_total") == 0


async def test_a_server_that_cannot_be_reached_counts_as_failed(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry)
    await smtp_server.stop()
    async with app.app_context():
        with pytest.raises(SendError):
            await mail.send(message())
    assert read("quartmail_messages_failed_total", error="ConnectError", code_class="none") == 1
    assert read("quartmail_smtp_sessions_opened_total") == 0


async def test_labels_never_name_a_person(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    # Twenty different refusals, each quoting its address: one series.
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry)
    for n in range(20):
        address = f"user{n}@example.com"
        smtp_server.refuse_recipients[address] = f"550 5.1.1 <{address}> unknown, code {n}"
    async with app.app_context():
        for n in range(20):
            with pytest.raises(SendError):
                await mail.send(message(n, f"user{n}@example.com"))
    failed = read.samples("quartmail_messages_failed")
    assert {tuple(sorted(labels.items())) for _, labels in failed} == {
        (("code_class", "5xx"), ("error", "RecipientsRefusedError"))
    }
    every_label = [value for _, labels in read.samples("quartmail_") for value in labels.values()]
    assert not [value for value in every_label if ADDRESS.search(value)]


def test_error_labels_are_our_classes_only() -> None:
    class CustomError(SendError):
        pass

    assert error_labels(SendError("x", code=421)) == ("SendError", "4xx")
    assert error_labels(CustomError("y", code=550)) == ("SendError", "5xx")  # the nearest of ours
    assert error_labels(RuntimeError("a bug")) == ("other", "none")
    assert error_labels(SendError("no reply", code=999)) == ("SendError", "none")


# --- background delivery ------------------------------------------------------------------


async def test_background_retries_then_delivery(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry, **FAST)
    smtp_server.data_replies.extend(["451 4.3.0 Try again later"] * 2)
    async with app.test_app(), app.app_context():
        await mail.send_background(message())
    assert read("quartmail_messages_retried_total", error="SendError", code_class="4xx") == 2
    assert read("quartmail_messages_sent_total") == 1
    assert read("quartmail_send_duration_seconds_count", outcome="failed") == 2
    assert read.samples("quartmail_messages_failed") == []


async def test_background_gives_up_after_the_retries(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry, MAIL_RETRIES=1, **FAST)
    smtp_server.data_replies.extend(["451 4.3.0 Try again later"] * 2)
    async with app.test_app(), app.app_context():
        with pytest.raises(SendError):
            await mail.send_background(message())
    assert read("quartmail_messages_retried_total", error="SendError", code_class="4xx") == 1
    assert read("quartmail_messages_failed_total", error="SendError", code_class="4xx") == 1
    assert read("quartmail_messages_sent_total") == 0


async def test_queue_depth_and_messages_in_flight(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry, MAIL_POOL_SIZE=2, **FAST)
    smtp_server.data_delay = 60.0  # held at DATA until the test lets them go
    async with app.test_app(), app.app_context():
        futures = [mail.send_background(message(n)) for n in range(5)]
        await read.until("quartmail_background_in_flight_messages", 2)
        assert read("quartmail_background_queued_messages") == 3
        smtp_server.data_delay = 0.0
        await smtp_server.restart()  # drops the held sends: retried, then delivered
        async with asyncio.timeout(30):
            await asyncio.gather(*futures)
        assert read("quartmail_background_in_flight_messages") == 0
        assert read("quartmail_background_queued_messages") == 0


async def test_a_throttling_reply_is_counted_as_throttled(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    # SES throttles the first MAIL FROM; the app backs off, then the message goes.
    app, mail = make_mail(smtp_server, MAIL_METRICS=registry, MAIL_RETRIES=0, **FAST)
    smtp_server.command_replies["MAIL"] = ["454 4.7.0 Throttling failure: Maximum sending rate"]
    async with app.test_app(), app.app_context():
        async with asyncio.timeout(30):
            await mail.send_background(message())
    assert read("quartmail_throttled_total", error="SendError", code_class="4xx") == 1
    assert read("quartmail_messages_sent_total") == 1
    assert read.samples("quartmail_messages_failed") == []


def test_a_partial_throttling_refusal_counts_as_recipients_refused(
    make_mail: MakeMail, registry: CollectorRegistry, read: Reading
) -> None:
    app, _ = make_mail(MAIL_METRICS=registry)
    observer = app.extensions["mail"].core.observer
    observer.throttled(RecipientsRefusedError("4.7.1 slow down", code=451, refused={}))
    assert read("quartmail_throttled_total", error="RecipientsRefusedError", code_class="4xx") == 1


# --- the outbox ----------------------------------------------------------------------------


def outbox_app(engine: AsyncEngine, server: SMTPTestServer, **config: Any) -> tuple[Quart, Mail]:
    app = Quart(__name__)
    app.config.update(server.mail_config(), MAIL_DEFAULT_SENDER=SENDER, **FAST)
    app.config.update(config)
    mail = Mail(app)
    mail.init_outbox(app, engine)
    return app, mail


async def test_outbox_rows_by_state_and_sends(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    registry: CollectorRegistry,
    read: Reading,
) -> None:
    app, mail = outbox_app(engine, smtp_server, MAIL_METRICS=registry)
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine) as session:
            for n in range(3):
                await mail.outbox.enqueue(session, message(n))
            await session.commit()
        await read.until("quartmail_outbox_messages", 2, state="sent")
        await read.until("quartmail_outbox_messages", 1, state="failed")
        assert read("quartmail_outbox_messages", state="queued") == 0
        assert read("quartmail_outbox_messages", state="sending") == 0
        assert read("quartmail_outbox_oldest_due_age_seconds") == 0
    assert read("quartmail_messages_sent_total") == 2
    assert read("quartmail_messages_failed_total", error="SendError", code_class="5xx") == 1


async def test_the_oldest_due_row_is_how_long_it_waited(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    # A row due an hour ago and never claimed: the sign that no dispatcher is sending.
    app, mail = outbox_app(engine, smtp_server)
    table = OutboxTable(engine)
    await table.create_table()
    async with app.app_context(), AsyncSession(engine) as session:
        await mail.outbox.enqueue(session, message(1))
        await mail.outbox.enqueue(session, message(2))
        await session.commit()
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    async with engine.begin() as connection:
        await connection.execute(
            update(OutboxMessage).where(OutboxMessage.id == 1).values(next_attempt_at=hour_ago)
        )
        await connection.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == 2)
            .values(next_attempt_at=datetime.now(UTC) + timedelta(hours=1))
        )
    status = await table.status()
    assert status.counts == {"queued": 2}
    assert status.oldest_due_age is not None
    assert 3590 < status.oldest_due_age < 3700


async def test_outbox_retries_are_counted(
    engine: AsyncEngine, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    app, mail = outbox_app(engine, smtp_server, MAIL_METRICS=registry)
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()
        await read.until("quartmail_outbox_messages", 1, state="sent")
    assert read("quartmail_messages_retried_total", error="SendError", code_class="4xx") == 1
    assert read("quartmail_messages_sent_total") == 1


# --- registries and settings -----------------------------------------------------------------


async def test_two_apps_share_a_registry_and_add_up(
    make_mail: MakeMail, smtp_server: SMTPTestServer, registry: CollectorRegistry, read: Reading
) -> None:
    apps = [make_mail(smtp_server, MAIL_METRICS=registry) for _ in range(2)]
    for app, mail in apps:
        async with app.app_context():
            await mail.send(message())
    assert read("quartmail_messages_sent_total") == 2


async def test_true_uses_the_default_registry(
    make_mail: MakeMail, smtp_server: SMTPTestServer
) -> None:
    read = Reading(REGISTRY)
    before = read("quartmail_messages_sent_total")  # other tests' apps count here too
    app, mail = make_mail(smtp_server, MAIL_METRICS="true")
    async with app.app_context():
        await mail.send(message())
    assert read("quartmail_messages_sent_total") == before + 1


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("MAIL_METRICS", "maybe", "MAIL_METRICS must be true or false"),
        ("MAIL_METRICS", object(), "MAIL_METRICS must be true, false or a prometheus_client"),
        ("MAIL_TRACING", object(), "MAIL_TRACING must be true, false or an opentelemetry"),
        ("MAIL_METRICS_INTERVAL", 0, "MAIL_METRICS_INTERVAL must be a number of seconds"),
    ],
)
def test_a_bad_setting_stops_the_app(make_mail: MakeMail, key: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        make_mail(**{key: value})


def test_off_by_default(make_mail: MakeMail) -> None:
    app, _ = make_mail()
    assert not isinstance(app.extensions["mail"].core.observer, MailMetrics)


# --- traces ----------------------------------------------------------------------------------


def finished(exporter: InMemorySpanExporter, name: str = "smtp send") -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def test_a_span_around_each_send(
    make_mail: MakeMail,
    smtp_server: SMTPTestServer,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app, mail = make_mail(smtp_server, MAIL_TRACING=provider)
    smtp_server.refuse_recipients["nobody@example.com"] = "550 5.1.1 <nobody@example.com> unknown"
    async with app.app_context():
        await mail.send(message(1, "a@example.com", "b@example.com"))
        with pytest.raises(SendError):
            await mail.send(message(2, "nobody@example.com"))
    sent, refused = finished(exporter)
    assert sent.kind is trace.SpanKind.CLIENT
    assert sent.attributes is not None and refused.attributes is not None
    assert sent.attributes["server.address"] == smtp_server.mail_config()["MAIL_SERVER"]
    assert sent.attributes["server.port"] == smtp_server.port
    assert sent.attributes["quartmail.recipient_count"] == 2
    assert sent.status.status_code is trace.StatusCode.UNSET
    assert "error.type" not in sent.attributes
    assert refused.status.status_code is trace.StatusCode.ERROR
    assert refused.status.description == "RecipientsRefusedError"
    assert refused.attributes["error.type"] == "RecipientsRefusedError"
    assert refused.attributes["quartmail.smtp_code"] == 550
    # Nothing in a span names a recipient: no attribute, no event (exception text).
    assert refused.events == ()
    for attributes in (sent.attributes, refused.attributes):
        assert not [v for v in attributes.values() if ADDRESS.search(str(v))]


async def test_a_background_send_is_a_child_of_its_submitters_span(
    make_mail: MakeMail,
    smtp_server: SMTPTestServer,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app, mail = make_mail(smtp_server, MAIL_TRACING=provider, **FAST)
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    tracer = provider.get_tracer("test")
    async with app.test_app(), app.app_context():
        with tracer.start_as_current_span("sign-up request") as request_span:
            future = mail.send_background(message())
        await future
    first, second = finished(exporter)
    for span in (first, second):  # the failed attempt and its retry
        assert span.parent is not None
        assert span.parent.span_id == request_span.get_span_context().span_id
    assert first.attributes is not None
    assert first.attributes["error.type"] == "SendError"
    assert second.status.status_code is trace.StatusCode.UNSET


async def test_tracing_alone_with_the_global_provider(
    make_mail: MakeMail, smtp_server: SMTPTestServer
) -> None:
    # No SDK set up globally: opentelemetry-api's no-op tracer, and mail goes out.
    app, mail = make_mail(smtp_server, MAIL_TRACING=True)
    async with app.app_context():
        await mail.send(message())
    assert len(await smtp_server.wait_for_messages(1)) == 1
    assert repr(app.extensions["mail"].core.observer) == "<MailMetrics traces>"


async def test_a_cancelled_send_ends_its_span(
    make_mail: MakeMail,
    smtp_server: SMTPTestServer,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app, mail = make_mail(smtp_server, MAIL_TRACING=provider)
    smtp_server.data_delay = 60.0
    async with app.app_context():
        sending = asyncio.create_task(mail.send(message()))
        await smtp_server.wait_for(lambda: smtp_server.data_attempts == 1, timeout=10)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
    [span] = finished(exporter)
    assert span.attributes is not None
    assert span.attributes["error.type"] == "cancelled"


# --- docs/metrics.md --------------------------------------------------------------------------

METRICS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: metric name -> (type, label names)."""
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in METRICS_PAGE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\| `(quartmail_\w+)` \| (\w+) \|([^|]*)\| .+ \|", line)
        if match:
            assert match[1] not in rows, f"{match[1]} has two rows"
            labels = {label.strip().strip("`") for label in match[3].split(",") if label.strip()}
            rows[match[1]] = (match[2], labels)
    return rows


def registered() -> dict[str, tuple[str, set[str]]]:
    """What a registry holds once every hook has been called: name -> (type, label names)."""
    registry = CollectorRegistry()
    settings = MailSettings.from_config({"MAIL_METRICS": registry}, testing=False, debug=False)
    observer = MailMetrics(settings, lambda: (0, 0))
    error = SendError("451 4.3.0 Try again later", code=451)
    observer.failed(error)
    observer.retried(error)
    observer.throttled(error)
    observer.outbox_status({"queued": 1}, 3.0)
    found: dict[str, tuple[str, set[str]]] = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        found[name] = (family.type, labels)
    return found


def test_the_page_lists_exactly_the_metrics_registered() -> None:
    assert documented() == registered()
