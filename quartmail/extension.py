"""The Quart extension: :class:`Mail` and :class:`Connection`.

``Mail`` is the front: it reads an app's ``MAIL_*`` settings into the
app's :class:`~quartmail.core.MailCore` (message checking, sessions, the
outcome rules, the signals) and hands each message to the path asked for:
a new session (``send``), one kept session (``connect``), background
delivery (``send_background``) or the outbox. Its API is Flask-Mail's, with
``await``. The layers are drawn in :mod:`quartmail.core`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from quart import Quart, current_app, has_app_context

from .cli import cli
from .compat import FlaskMailSettings
from .core import MailCore
from .delivery import Delivery
from .errors import SendError
from .message import Envelope, Message
from .settings import DevInboxSettings, MailSettings
from .smtp import SendResult, SMTPSession

if TYPE_CHECKING:
    # Only the outbox needs SQLAlchemy: quartmail imports it when it is used.
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .devinbox import DevInbox
    from .dispatcher import Dispatcher
    from .outbox import Outbox
    from .suppression import SuppressionList

__all__ = ["Connection", "Mail", "MailState", "SendResult"]


class MailState(FlaskMailSettings):
    """One app's mail state, kept in ``app.extensions["mail"]``.

    It is also what Flask-Mail code finds there: the settings as attributes
    (``server``, ``port``, ``default_sender``, ...; see
    :class:`~quartmail.compat.FlaskMailSettings`) and ``send``,
    ``send_message``, ``connect`` and ``record_messages``.
    """

    def __init__(self, app: Quart, settings: MailSettings) -> None:
        self.app = app
        self.core = MailCore(app, settings)
        self.delivery = Delivery(self.core)
        self.outbox: Outbox | None = None
        self.dispatcher: Dispatcher | None = None  # the outbox's
        self.suppression: SuppressionList | None = None

    def __repr__(self) -> str:
        return f"<MailState {self.app.name!r} {self.settings.smtp!r} {self.delivery!r}>"

    @property
    def settings(self) -> MailSettings:
        """The app's checked ``MAIL_*`` settings."""
        return self.core.settings

    @settings.setter
    def settings(self, settings: MailSettings) -> None:
        self.core.settings = settings  # (Flask-Mail code changing default_sender, say)

    @property
    def recordings(self) -> list[list[Message]]:
        """The open ``record_messages()`` lists."""
        return self.core.recordings

    async def startup(self) -> None:
        """The app's ``before_serving``: start background delivery and the
        outbox's dispatcher, which sends over it."""
        if self.delivery.closed:  # a second lifespan of the same app
            self.delivery = Delivery(self.core)
        if self.suppression is not None:
            await self.suppression.create_table()
        self.delivery.start()
        if self.dispatcher is not None:
            await self.dispatcher.start(self.delivery)

    async def shutdown(self) -> None:
        """The app's ``after_serving``: stop the outbox, drain background
        delivery, both within one ``MAIL_SHUTDOWN_TIMEOUT``; past it nothing
        new starts and only sends already on the wire may finish."""
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        if self.dispatcher is not None:
            await self.dispatcher.stop(deadline)
        await self.delivery.close(deadline)
        if self.dispatcher is not None:
            await self.dispatcher.close(deadline)
        await self.core.close(deadline)  # the signals' tasks

    def envelope(self, message: Message) -> Envelope:
        """Check *message*, fill in the default sender and the date, and
        flatten it (not DKIM-signed: ``Mail`` signs what it sends)."""
        return self.core.envelope(message)

    # Flask-Mail's methods on app.extensions["mail"], for code that calls them there.

    async def send(self, message: Message) -> SendResult:
        """Send *message* over a new SMTP session; see :meth:`Mail.send`."""
        async with self.connect() as connection:
            return await connection.send(message)

    async def send_message(self, *args: Any, **kwargs: Any) -> SendResult:
        """Build a :class:`~quartmail.Message` from the arguments and send it."""
        return await self.send(Message(*args, **kwargs))

    def connect(self) -> Connection:
        """One SMTP session for many messages; see :meth:`Mail.connect`."""
        return Connection(self)

    @contextmanager
    def record_messages(self) -> Iterator[list[Message]]:
        """Collect every message this app sends; see :meth:`Mail.record_messages`."""
        # Recorded directly rather than through email_dispatched (as
        # Flask-Mail does), so that a message is in the list as soon as it is
        # sent, before the async signal receivers have run.
        outbox: list[Message] = []
        recordings = self.core.recordings
        recordings.append(outbox)
        try:
            yield outbox
        finally:
            # By identity: two open lists may be equal (both empty, say).
            recordings[:] = [other for other in recordings if other is not outbox]


class Mail:
    """Flask-Mail's ``Mail`` for Quart.

    Direct use::

        mail = Mail(app)

    or with an app factory::

        mail = Mail()

        def create_app():
            app = Quart(__name__)
            mail.init_app(app)
            return app

    Then, in an app context, ``await mail.send(message)``.
    """

    def __init__(self, app: Quart | None = None) -> None:
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> MailState:
        """Read and check the app's ``MAIL_*`` settings; return the state
        kept in ``app.extensions["mail"]``.

        Raises :class:`~quartmail.errors.ConfigError` naming the setting
        when one is wrong. With ``MAIL_DEV_INBOX`` on, the app's mail goes to
        its development inbox instead (:mod:`quartmail.devinbox`).
        """
        inbox = _dev_inbox(app)  # first: it points MAIL_SERVER and MAIL_PORT at itself
        try:
            settings = MailSettings.from_config(app.config, testing=app.testing, debug=app.debug)
            state = MailState(app, settings)
            if settings.metrics is not None or settings.tracing is not None:
                _observe(state)
        except BaseException:
            if inbox is not None:
                inbox.close()
            raise
        app.extensions["mail"] = state
        # Quart runs these in `async with app.test_app()` and under Hypercorn.
        # Quart drains its own background tasks before after_serving.
        if inbox is not None:
            app.before_serving(inbox.start)
        app.before_serving(state.startup)
        app.after_serving(state.shutdown)
        if inbox is not None:
            app.after_serving(inbox.stop)  # after the drain, which still sends to it
        app.cli.add_command(cli)  # quart --app ... mail doctor
        return state

    def init_mail(
        self, config: Mapping[str, Any], debug: bool | int = False, testing: bool = False
    ) -> MailState:
        """Flask-Mail's: a state read from *config* (checked as in
        :meth:`init_app`), for the app given to ``Mail(app)`` or the current
        one. It is neither kept in ``app.extensions`` nor started."""
        app = self.app
        if app is None and has_app_context():
            app = cast(Any, current_app)._get_current_object()  # the app, not the proxy
        if app is None:
            raise RuntimeError("No app: use Mail(app), or call init_mail in an app context")
        settings = MailSettings.from_config(config, testing=testing, debug=bool(debug))
        return MailState(app, settings)

    def init_outbox(self, app: Quart, engine: AsyncEngine) -> Outbox:
        """Keep *app*'s mail in a durable outbox in *engine*'s database (call
        after :meth:`init_app`). Its table is created at start-up if missing,
        and a dispatcher runs from start-up to shutdown; see
        :mod:`quartmail.outbox`. Then use :attr:`outbox` to enqueue.

        With ``MAIL_RATE_LIMIT``, the limit is kept in that database from
        then on, shared by every process that uses it (:mod:`quartmail.sharedlimit`)."""
        # SQLAlchemy only when the outbox is used.
        from .dispatcher import Dispatcher
        from .outbox import Outbox

        state: MailState = app.extensions["mail"]
        if state.suppression is None:
            self.init_suppression(app, engine)
        state.outbox = Outbox(engine, state.core)
        state.dispatcher = Dispatcher(state.outbox, state.core)
        limit = state.settings.rate_limit
        if limit is not None:
            # Every process of this database shares the account's limit, whatever path sends.
            from .ratelimit import RateLimiter
            from .sharedlimit import DatabaseSlots, account_of

            smtp = state.settings.smtp
            account = account_of(smtp.username, smtp.hostname, smtp.port)
            slots = DatabaseSlots(engine, limit, account, hold=2 * smtp.timeout)
            state.core.limiter = RateLimiter(limit, slots)
        return state.outbox

    def init_suppression(self, app: Quart, engine: AsyncEngine) -> SuppressionList:
        """Keep *app*'s suppression list in *engine*'s database (call after
        :meth:`init_app`; :meth:`init_outbox` does it with its engine).
        Background and outbox sends then leave suppressed recipients out,
        and every path adds the ones a server refuses as unknown; see
        :mod:`quartmail.suppression`. Its table is created at start-up if
        missing. Then use :attr:`suppression` to add, remove and list."""
        from .suppression import SuppressionList  # SQLAlchemy only when it is used

        state: MailState = app.extensions["mail"]
        state.suppression = SuppressionList(engine)
        state.core.suppression = state.suppression
        return state.suppression

    @property
    def suppression(self) -> SuppressionList:
        """The current app's suppression list:
        ``await mail.suppression.add(address, "manual", "admin")``."""
        suppression = self.state.suppression
        if suppression is None:
            raise RuntimeError(
                "This app has no suppression list: call mail.init_suppression(app, engine)"
            )
        return suppression

    @property
    def outbox(self) -> Outbox:
        """The current app's outbox: ``await mail.outbox.enqueue(session, message)``."""
        outbox = self.state.outbox
        if outbox is None:
            raise RuntimeError("This app has no outbox: call mail.init_outbox(app, engine)")
        return outbox

    @property
    def state(self) -> MailState:
        """The state of the current app (or of the app given to ``Mail(app)``)."""
        app = current_app if has_app_context() else self.app
        if app is None:
            raise RuntimeError(
                "No app: use Mail inside an app context (async with app.app_context())"
            )
        try:
            state: MailState = app.extensions["mail"]
        except KeyError:
            raise RuntimeError("Mail.init_app(app) was not called for this app") from None
        return state

    async def send(self, message: Message) -> SendResult:
        """Send *message* over a new SMTP session and return what the server said.

        Raises :class:`~quartmail.errors.MessageError` (no sender, no
        recipients, a bad address) or :class:`~quartmail.errors.BadHeaderError`
        before connecting, and a :class:`~quartmail.errors.SendError` when the
        server or the network fails, or refuses every recipient.

        It sends to every recipient given, suppressed or not (as Flask-Mail
        does; the caller sees each refusal), but adds those a server refuses
        as unknown to the suppression list, if the app has one.
        """
        return await self.state.send(message)

    async def send_message(self, *args: Any, **kwargs: Any) -> SendResult:
        """Build a :class:`~quartmail.Message` from the arguments and send it."""
        return await self.send(Message(*args, **kwargs))

    def send_background(self, message: Message) -> asyncio.Future[SendResult]:
        """Queue *message* for delivery in the background and return at once.

        The message is checked here, so :class:`~quartmail.BadHeaderError`
        and :class:`~quartmail.MessageError` are raised to the caller and
        nothing is queued. The returned future resolves to the
        :class:`SendResult` when the server accepted the message, or raises
        a :class:`~quartmail.MailError` when it failed for good (after
        ``MAIL_RETRIES`` for a transient failure, and at the latest
        ``MAIL_DELIVERY_TIMEOUT`` seconds after this call, whatever the
        server does). Awaiting it is optional: a failure is also logged and
        sent as ``email_failed``, and so are the recipients the server
        refused when it took the message for the others.

        Messages are sent over at most ``MAIL_POOL_SIZE`` reused SMTP
        sessions; the app's shutdown waits up to ``MAIL_SHUTDOWN_TIMEOUT``
        for every queued message.
        """
        return self.state.delivery.submit(message)

    async def shutdown(self) -> None:
        """Deliver what :meth:`send_background` queued (within
        ``MAIL_SHUTDOWN_TIMEOUT``) and close its connections.

        The app's lifespan does this at shutdown; call it yourself only where
        there is no lifespan, such as at the end of a CLI command.
        """
        await self.state.shutdown()

    def connect(self) -> Connection:
        """One SMTP session for many messages::

            async with mail.connect() as conn:
                for message in messages:
                    await conn.send(message)

        It connects at the first send, and reconnects after
        ``MAIL_MAX_EMAILS`` messages when that is set.
        """
        return self.state.connect()

    @contextmanager
    def record_messages(self) -> Iterator[list[Message]]:
        """Collect every message this app sends (or would send, when
        ``MAIL_SUPPRESS_SEND`` is on) while the block runs::

            with mail.record_messages() as outbox:
                await mail.send_message("Hi", recipients=["a@x.org"])
            assert outbox[0].subject == "Hi"
        """
        with self.state.record_messages() as outbox:
            yield outbox


def _observe(state: MailState) -> None:
    """Metrics and traces (MAIL_METRICS, MAIL_TRACING; see :mod:`quartmail.metrics`)."""
    from .metrics import MailMetrics  # the metrics extra only when one is on

    def backlog() -> tuple[int, int]:
        delivery = state.delivery  # a new one in each lifespan
        return delivery.pending - delivery.in_flight, delivery.in_flight

    state.core.observer = MailMetrics(state.settings, backlog)


def _dev_inbox(app: Quart) -> DevInbox | None:
    """The app's development inbox when ``MAIL_DEV_INBOX`` is on (see :mod:`quartmail.devinbox`)."""
    settings = DevInboxSettings.from_config(app.config, testing=app.testing, debug=app.debug)
    if settings is None:
        return None
    from .devinbox import DevInbox  # aiosmtpd (the testing extra) only when it is on

    return DevInbox(app, settings)


class Connection:
    """One SMTP session used for many messages; made by :meth:`Mail.connect`.

    Not safe to share between tasks that send at the same time: give each
    task its own (background delivery keeps a pool of them).
    """

    def __init__(self, state: MailState) -> None:
        self._core = state.core
        self._session: SMTPSession | None = None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(
        self, message: Message, envelope_from: str | tuple[str, str] | None = None
    ) -> SendResult:
        """Send *message* on this connection; see :meth:`Mail.send`.

        ``envelope_from`` overrides the envelope sender (``MAIL FROM``), as in
        Flask-Mail.
        """
        envelope = self._core.envelope(message)
        if envelope_from:  # checked like any address; "" or None: the sender, as in Flask-Mail
            envelope = envelope.with_sender(envelope_from)
        if self._core.settings.suppress_send:
            await self._core.dispatched(message)
            return SendResult(message_id=envelope.message_id)

        envelope = await self._core.sign(message, envelope)
        current, self._session = self._session, None
        loop_time = asyncio.get_running_loop().time()
        try:
            session = self._session = await self._core.session(current)
            # MAIL_DELIVERY_TIMEOUT bounds a wait for MAIL_RATE_LIMIT here too; the
            # throttling back-off is waited for at most MAIL_TIMEOUT: a caller (a
            # request, most often) waits no longer than for a command.
            # A session spent by the send closes itself.
            result = await self._core.transaction(
                session,
                envelope,
                loop_time + self._core.settings.delivery_timeout,
                back_off_deadline=loop_time + self._core.settings.smtp.timeout,
            )
        except SendError as error:
            self._core.observer.failed(error)  # raised to the caller: no retry here
            self._core.bounced(envelope.message_id, error.refused)
            raise
        self._core.bounced(envelope.message_id, result.refused)
        await self._core.dispatched(message)
        return result

    async def send_message(self, *args: Any, **kwargs: Any) -> SendResult:
        """Build a :class:`~quartmail.Message` from the arguments and send it."""
        return await self.send(Message(*args, **kwargs))

    async def close(self) -> None:
        """QUIT and close the session, if one is open."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
