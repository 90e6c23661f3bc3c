"""Messages per second of one SMTP session to a relay 5, 20 and 50 ms away (and 0 ms).

Between the client and the SMTP server, a delaying TCP proxy (``bench/proxy.py``, its own
process) adds the round trip: half of it each way, order kept. Each variant opens one
session, sends ``-n`` messages (~1 KB, text + HTML, built per mail) and QUITs, all timed:
``raw``, the baseline, raw aiosmtplib ``send_message()`` (a round trip per command: MAIL,
RCPT, DATA, the message); quartmail's ``connect()`` batch with ``chunking`` (PIPELINING
and CHUNKING advertised: MAIL, RCPT and ``BDAT <n> LAST`` in one write, one round trip per
message), ``pipelining`` (PIPELINING only: MAIL, RCPT, DATA in one write, then the message)
and ``off`` (``MAIL_PIPELINING = False``: quartmail before pipelining). At 0 ms (no proxy)
the same variants show what pipelining costs on a fast local server.
Targets at 20 ms: chunking >= 3x raw, pipelining >= 2x raw; at 0 ms chunking no slower than
off (>= 0.95x: noise). Round trips per session of n messages: raw and off 3 + 4n (greeting,
EHLO, QUIT; MAIL, RCPT, DATA, the message), pipelining 3 + 2n (the message waits for the 354:
DATA ends a group, RFC 2920 3.1), chunking 3 + n; so pipelining alone tends to 2x from below.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable

import harness
import proxy
from quart import Quart
from send import build_email_message, connect_session

from quartmail import Mail

RTTS_MS = (5, 20, 50)
VARIANTS = ("raw", "chunking", "pipelining", "off")


def variants(
    config: dict[str, str | int],
    only_pipelining: dict[str, str | int],
    server: harness.SMTPServer,
    count: int,
    warmup: int,
) -> dict[str, harness.Variant]:
    """The variants against the server at *config* (PIPELINING and CHUNKING), and, for
    ``pipelining``, the one at *only_pipelining* (PIPELINING alone)."""
    hostname = socket.getfqdn()  # quartmail looks it up once per app: so does the baseline

    def quartmail(
        settings: dict[str, str | int], **extra: object
    ) -> Callable[[int], Awaitable[float]]:
        app = Quart(__name__)
        app.config.update(server.mail_config(), **settings, **extra)
        mail = Mail(app)

        return lambda count: connect_session(app, mail, count)

    async def raw(count: int) -> float:
        start = time.perf_counter()
        client = server.raw_client(hostname)
        client.hostname, client.port = str(config["MAIL_SERVER"]), int(config["MAIL_PORT"])
        async with client:
            for i in range(count):
                await client.send_message(build_email_message(i))
        return time.perf_counter() - start

    return {
        "raw": harness.Variant("raw aiosmtplib (baseline)", raw, count, warmup),
        "chunking": harness.Variant(
            "quartmail, PIPELINING + CHUNKING", quartmail(config), count, warmup
        ),
        "pipelining": harness.Variant(
            "quartmail, PIPELINING alone", quartmail(only_pipelining), count, warmup
        ),
        "off": harness.Variant(
            "quartmail, MAIL_PIPELINING off",
            quartmail(config, MAIL_PIPELINING=False),
            count,
            warmup,
        ),
    }


async def benchmark() -> int:
    args = harness.Arguments(
        {
            "n": (40, 5, "messages per session (round) and variant, through the proxy"),
            "n_local": (1000, 100, "messages per round and variant at 0 ms"),
            "rounds": (3, 1, "rounds; the best is reported"),
            "warmup": (5, 1, "warm-up messages per variant"),
        },
        only=VARIANTS,
    ).parse()
    ok = True
    servers = (
        harness.smtp_server(pipelining=True, chunking=True),
        harness.smtp_server(pipelining=True),
    )
    async with servers[0] as full, servers[1] as only:
        targets = [[c["MAIL_SERVER"], c["MAIL_PORT"]] for c in (full.config, only.config)]
        options = {"kind": "proxy", "targets": targets, "rtt": 0.0}
        async with harness.children(__file__, [options]) as (relay,):
            ports = relay.ready["ports"]
            print(f"latency: {args.n} messages per session ({args.n_local} at 0 ms), ")
            print(f"  {args.rounds} round(s); the server advertises PIPELINING (and CHUNKING)")
            for rtt in (0, *RTTS_MS):
                if rtt:
                    await relay.ask(f"rtt {rtt / 1000!r}")
                    config = {"MAIL_SERVER": harness.HOST, "MAIL_PORT": ports[0]}
                    only_config = {"MAIL_SERVER": harness.HOST, "MAIL_PORT": ports[1]}
                else:
                    config = {k: full.config[k] for k in ("MAIL_SERVER", "MAIL_PORT")}
                    only_config = {k: only.config[k] for k in ("MAIL_SERVER", "MAIL_PORT")}
                count = args.n if rtt else args.n_local
                chosen = variants(config, only_config, full, count, args.warmup)
                runs = [chosen[name] for name in args.only]
                print(f"{rtt} ms round trip{' (no proxy)' if not rtt else ''}:")
                await harness.take_turns(runs, args.rounds)
                baseline = chosen["raw"] if "raw" in args.only else None
                harness.print_table(runs, baseline, "raw aiosmtplib")
                names = set(args.only)
                if rtt == 20 and {"raw", "chunking"} <= names:
                    ratio = chosen["chunking"].best / chosen["raw"].best
                    harness.target("20 ms: PIPELINING + CHUNKING vs raw", ratio, at_least=3.0)
                if rtt == 20 and {"raw", "pipelining"} <= names:
                    ratio = chosen["pipelining"].best / chosen["raw"].best
                    harness.target("20 ms: PIPELINING alone vs raw", ratio, at_least=2.0)
                if rtt == 0 and {"off", "chunking"} <= names:
                    ratio = chosen["chunking"].best / chosen["off"].best
                    harness.target("0 ms: PIPELINING + CHUNKING vs off", ratio, at_least=0.95)
                for run in runs:
                    sent = len(run.rates) * run.count + run.warmup
                    target = only if run is chosen["pipelining"] else full
                    target.expected += sent
        ok = await full.check() and ok
        ok = await only.check() and ok
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark, {"proxy": proxy.serve})
