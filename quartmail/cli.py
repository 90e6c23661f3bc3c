"""The ``mail`` command group of an app's CLI: ``quart --app ... mail doctor``.

Quart's commands get no app context and must not nest event loops, so each
command loads the app, then runs one ``asyncio.run`` in an app context.
"""

from __future__ import annotations

import asyncio
import ipaddress

import click
from quart.cli import AppGroup, ScriptInfo, pass_script_info

from .doctor import Finding, all_well, diagnose

__all__ = ["cli"]

#: The ``mail`` group; ``app.cli.add_command(cli)`` adds it to an app.
cli = AppGroup("mail", help="Check and look after the app's mail.")

_LABELS = {"ok": "ok", "warning": "WARNING", "error": "ERROR"}
_COLOURS = {"ok": "green", "warning": "yellow", "error": "red"}


@cli.command("doctor")
@click.option(
    "--dns",
    "check_dns",
    is_flag=True,
    help="Also check the sender domain's SPF, DKIM and DMARC records (needs quartmail[doctor]).",
)
@click.option("--domain", help="The sender domain for --dns (default: MAIL_DEFAULT_SENDER's).")
@click.option(
    "--dkim-selector",
    help="Without MAIL_DKIM_KEY: the selector of the key your provider signs with.",
)
@click.option(
    "--nameserver",
    metavar="IP[:PORT]",
    help="Ask this DNS server instead of the system's resolver.",
)
@pass_script_info
def doctor(
    info: ScriptInfo,
    check_dns: bool,
    domain: str | None,
    dkim_selector: str | None,
    nameserver: str | None,
) -> None:
    """Check the mail settings against the SMTP server, without sending a message.

    Reports the TLS mode against the port, certificate problems, the login and the
    server's extensions; with --dns, the sender domain's SPF, DKIM and DMARC records.
    Each problem says what to change. Exits with status 0 only when all is well.
    """
    address = _nameserver(nameserver) if nameserver is not None else None
    app = info.load_app()

    async def run() -> list[Finding]:
        async with app.app_context():
            return await diagnose(
                app,
                dns=check_dns,
                domain=domain,
                dkim_selector=dkim_selector,
                nameserver=address,
            )

    findings = asyncio.run(run())
    for finding in findings:
        label = click.style(f"{_LABELS[finding.level]:8}", fg=_COLOURS[finding.level])
        click.echo(f"{label} {finding.topic:12} {finding.what}")
        if finding.do:
            click.echo(f"{'':8} {'':12} -> {finding.do}")
    problems = [finding for finding in findings if finding.level != "ok"]
    if all_well(findings):
        click.echo("All is well.")
        return
    click.echo(f"{len(problems)} problem(s) to fix.")
    raise SystemExit(1)


def _nameserver(value: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` -> ``(ip, port)``."""
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        raise click.BadParameter(
            f"{value!r} is not IP or IP:PORT (e.g. 127.0.0.1:5353)", param_hint="--nameserver"
        )
    return host, number
