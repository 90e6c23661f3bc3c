"""The settings reference (docs/settings.md) says what the code does.

Every ``MAIL_*`` setting is read in one place, :meth:`MailSettings.from_config`;
the sign-up app adds its own in ``quartmail/app/config.py``. These tests read
the tables in docs/settings.md and hold them to both, so that a setting added,
removed or given a new default fails here until its row says so.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from quartmail.app.config import CONFIGS, ENVIRONMENT_KEYS, config_values
from quartmail.settings import MailSettings

SETTINGS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"

# Defaults that depend on something else, each checked by its own test below.
DESCRIBED_DEFAULTS = {"MAIL_PORT", "MAIL_SUPPRESS_SEND", "MAIL_DEBUG", "MAIL_LOCAL_HOSTNAME"}


class RecordingConfig(Mapping[str, Any]):
    """An app config that remembers every key looked up in it."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("from_config must look settings up by name, not list them")

    def __len__(self) -> int:
        return len(self._values)


def table(heading: str) -> dict[str, str]:
    """The rows of the table under *heading*: setting name to default cell."""
    text = SETTINGS_PAGE.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| `([A-Z][A-Z0-9_]*)` \| (.+?) \| .+ \|", line)
        if match:
            assert match[1] not in rows, f"{match[1]} has two rows"
            rows[match[1]] = match[2]
    assert rows, f"no table under '## {heading}' in {SETTINGS_PAGE}"
    return rows


def plain_default(cell: str) -> Any:
    """The Python value of a default cell written as one literal in backticks."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"default {cell!r} is neither one literal in backticks nor described"
    return ast.literal_eval(match[1])


def keys_read(values: Mapping[str, Any]) -> set[str]:
    config = RecordingConfig(values)
    MailSettings.from_config(config, testing=False, debug=False)
    return config.read


def defaults(**values: Any) -> MailSettings:
    return MailSettings.from_config(values, testing=False, debug=False)


def test_every_setting_read_has_a_row_and_every_row_is_read() -> None:
    # With TLS on and off, in case a setting is only read for one of them.
    read = keys_read({}) | keys_read({"MAIL_USE_TLS": True}) | keys_read({"MAIL_USE_SSL": True})
    assert set(table("Mail settings")) == read


def test_every_plain_default_is_the_one_used() -> None:
    # Setting a documented default explicitly must change nothing.
    checked = 0
    for key, cell in table("Mail settings").items():
        if key in DESCRIBED_DEFAULTS:
            continue
        assert defaults(**{key: plain_default(cell)}) == defaults(), f"{key}: {cell}"
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    ("values", "port"),
    [({}, 25), ({"MAIL_USE_SSL": True}, 465), ({"MAIL_USE_TLS": True}, 587)],
)
def test_the_port_default_follows_tls(values: dict[str, Any], port: int) -> None:
    assert table("Mail settings")["MAIL_PORT"] == (
        "25; 465 with `MAIL_USE_SSL`, 587 with `MAIL_USE_TLS`"
    )
    assert defaults(**values).smtp.port == port


@pytest.mark.parametrize("flag", [True, False])
def test_suppress_send_and_debug_follow_the_app(flag: bool) -> None:
    rows = table("Mail settings")
    assert rows["MAIL_SUPPRESS_SEND"] == "the app's `testing`"
    assert rows["MAIL_DEBUG"] == "the app's `debug`"
    assert MailSettings.from_config({}, testing=flag, debug=False).suppress_send is flag
    assert MailSettings.from_config({}, testing=False, debug=flag).smtp.debug is flag


def test_the_local_hostname_is_looked_up_when_unset() -> None:
    # None here: the name is looked up (socket.getfqdn) when a session opens.
    assert table("Mail settings")["MAIL_LOCAL_HOSTNAME"] == "this host's fully qualified name"
    assert defaults().smtp.local_hostname is None


def test_the_app_takes_every_setting_from_the_environment() -> None:
    mail_keys = set(table("Mail settings"))
    app_keys = set(table("The sign-up app's settings"))
    assert set(ENVIRONMENT_KEYS) == mail_keys | app_keys
    assert not mail_keys & app_keys


def test_the_app_settings_defaults() -> None:
    production = config_values(CONFIGS["production"])
    for key, cell in table("The sign-up app's settings").items():
        if re.fullmatch(r"`[^`]+`", cell):
            assert production[key] == plain_default(cell), key
