"""DKIM signing (RFC 6376) with RSA or Ed25519 keys (RFC 8463), by dkimpy.

The settings (read once, by :func:`dkim_signer_from_config`):

- ``MAIL_DKIM_KEY``: the private key, as PEM text or the path of a PEM file:
  RSA of 1024 to 4096 bits (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8, as
  ``openssl genpkey -algorithm ed25519`` writes it; the bare base64 key that
  dkimpy's ``dknewkey --ktype ed25519`` writes is taken too). Unencrypted.
- ``MAIL_DKIM_SELECTOR``: the selector its public key is published under
  (``<selector>._domainkey.<domain>``); required with a key.
- ``MAIL_DKIM_DOMAIN``: the ``d=`` domain; by default the domain of each
  message's From address, which is what DMARC aligns with.
- ``MAIL_DKIM_SECOND_KEY`` and ``MAIL_DKIM_SECOND_SELECTOR``: a second key of
  the other algorithm, for dual RSA + Ed25519 signatures (RFC 8463 section 5:
  verifiers that know no Ed25519 still find the RSA one).

:meth:`DKIMSigner.sign` takes the flattened message (CRLF line ends, as
quartmail writes it) and returns it with the DKIM-Signature header(s) on top,
relaxed/relaxed, covering the headers in :data:`SIGNED_HEADERS` that the
message has, and From once more than it occurs, so that no From can be added
without breaking the signature. RSA signing is pure Python in dkimpy: about
10 ms a message at 2048 bits and 65 ms at 4096 on a busy 2-core machine,
against 0.4 ms for Ed25519; callers on an event loop run it in a thread
(:attr:`DKIMSigner.blocks`, :meth:`DKIMSigner.sign_async`). A thread does
not free the loop entirely: each of dkimpy's two big-number ``pow()`` calls
(CRT) holds the GIL for its whole length, so the loop may still pause for up
to about half a signature at a time, instead of all of it.
:meth:`DKIMSigner.check` raises what :meth:`DKIMSigner.sign` would, without
signing, so that a message signed later fails in its caller.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any, Literal

from ._extras import missing_extra
from .errors import ConfigError, MessageError

try:
    import dkim
    import nacl.signing  # noqa: F401 (dkimpy's Ed25519 backend: fail here, not at the first send)
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
except ModuleNotFoundError as error:
    raise missing_extra(error, "dkim", "DKIM signing") from None

__all__ = ["SIGNED_HEADERS", "DKIMKey", "DKIMSigner", "dkim_signer_from_config"]

log = logging.getLogger("quartmail")

#: The header fields signed when the message has them (lower case, as in ``h=``).
SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "reply-to",
    "list-unsubscribe",
    "list-unsubscribe-post",
)

# RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits;
# verifiers need only handle keys up to 4096 bits.
_RSA_BITS = (1024, 4096)
# RFC 6376 section 3.1: a selector is one or more LDH labels, like a domain.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# dkimpy folds the signature at 72 columns and splits a longer unbroken run,
# such as "i=@<domain>;", with a line break inside the value, which breaks the
# signature: up to 68 characters fit.
_MAX_DOMAIN = 64

# A PEM key is a few KiB; read no more of whatever file the setting names.
_MAX_KEY_FILE = 64 * 1024

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]


@dataclass(frozen=True, slots=True)
class DKIMKey:
    """One private key and the selector its public key is published under."""

    algorithm: Algorithm
    selector: str
    bits: int
    #: The public key's DNS TXT record value (``v=DKIM1; k=...; p=...``).
    dns_record: str
    # What dkimpy signs with: PKCS#1 PEM (RSA) or the base64 seed (Ed25519).
    _private: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DKIMSigner:
    """Signs flattened messages with one key, or two (RSA and Ed25519).

    Made once from the settings by :func:`dkim_signer_from_config`; safe to
    share between tasks and threads.
    """

    keys: tuple[DKIMKey, ...]
    #: The ``d=`` domain; None signs for each message's From domain.
    domain: str | None = None

    @property
    def blocks(self) -> bool:
        """True when :meth:`sign` takes long enough (RSA) that an event loop
        should run it in a thread (``await asyncio.to_thread(signer.sign, data)``)."""
        return any(key.algorithm == "rsa-sha256" for key in self.keys)

    async def sign_async(self, message: bytes) -> bytes:
        """:meth:`sign`, in a worker thread when the keys make it slow (RSA),
        so that the event loop keeps serving meanwhile."""
        if self.blocks:
            return await asyncio.to_thread(self.sign, message)
        return self.sign(message)

    def dns_records(self, domain: str | None = None) -> dict[str, str]:
        """The TXT records to publish: ``{"<selector>._domainkey.<domain>": "v=DKIM1; ..."}``."""
        domain = domain or self.domain
        if domain is None:
            raise ValueError("no domain: pass the domain of your From addresses")
        return {f"{key.selector}._domainkey.{domain}": key.dns_record for key in self.keys}

    def check(self, message: bytes) -> None:
        """Raise the :class:`~quartmail.MessageError` that :meth:`sign` would
        raise for *message* (no From domain to sign for, or a message that
        cannot be parsed), without the cost of signing: so that a message
        signed later, in the background, fails in its caller."""
        self._prepare(message)

    def sign(self, message: bytes) -> bytes:
        """Return *message* with a DKIM-Signature header prepended for each key.

        *message* is the RFC 5322 message with CRLF line ends. Raises
        :class:`~quartmail.MessageError` when it has no From domain to sign for
        (and no ``MAIL_DKIM_DOMAIN``) or cannot be parsed.
        """
        signer, domain, include = self._prepare(message)
        signatures = []
        for key in self.keys:
            try:
                signatures.append(
                    signer.sign(
                        key.selector.encode("ascii"),
                        domain,
                        key._private,
                        signature_algorithm=key.algorithm.encode("ascii"),
                        canonicalize=(b"relaxed", b"relaxed"),
                        include_headers=include,
                    )
                )
            except dkim.DKIMException as err:
                raise MessageError(f"DKIM: the message cannot be signed: {err}") from err
        return b"".join(signatures) + message

    def _prepare(self, message: bytes) -> tuple[dkim.DKIM, bytes, list[bytes]]:
        """dkimpy's parse of *message*, the ``d=`` domain and the ``h=`` list."""
        try:
            signer = dkim.DKIM(message, linesep=b"\r\n")
        except dkim.DKIMException as err:
            raise MessageError(f"DKIM: the message cannot be parsed: {err}") from err
        headers: list[tuple[bytes, bytes]] = [(name, value) for name, value in signer.headers]
        domain = (self.domain or _from_domain(headers)).encode("ascii")
        include = [name.lower() for name, _ in headers if name.lower().decode() in SIGNED_HEADERS]
        # RFC 6376 section 8.15: listing From once more than it occurs signs
        # its absence, so a second From added on the way breaks the signature.
        include.append(b"from")
        return signer, domain, include


def dkim_signer_from_config(config: Mapping[str, Any]) -> DKIMSigner | None:
    """Read and check the ``MAIL_DKIM_*`` settings; None when no key is set.

    Raises :class:`~quartmail.ConfigError` naming the setting for a key that
    cannot be read, is encrypted, is of another type or is too short or too
    long, a missing or malformed selector, or a malformed domain.
    """
    key = config.get("MAIL_DKIM_KEY") or None
    second = config.get("MAIL_DKIM_SECOND_KEY") or None
    if key is None:
        if second is not None:
            raise ConfigError("MAIL_DKIM_SECOND_KEY is set but MAIL_DKIM_KEY is not")
        for name in ("MAIL_DKIM_SELECTOR", "MAIL_DKIM_DOMAIN"):
            if config.get(name):
                log.warning("%s is set but MAIL_DKIM_KEY is not: mail is not DKIM-signed", name)
        return None
    keys = [_key(config, "MAIL_DKIM_KEY", key, "MAIL_DKIM_SELECTOR")]
    if second is not None:
        keys.append(_key(config, "MAIL_DKIM_SECOND_KEY", second, "MAIL_DKIM_SECOND_SELECTOR"))
        if keys[0].algorithm == keys[1].algorithm:
            raise ConfigError(
                "MAIL_DKIM_SECOND_KEY must be of the other algorithm than MAIL_DKIM_KEY "
                f"(both are {keys[0].algorithm}): one RSA key and one Ed25519 key"
            )
    domain = config.get("MAIL_DKIM_DOMAIN") or None
    return DKIMSigner(
        keys=tuple(keys),
        domain=None if domain is None else _domain_name("MAIL_DKIM_DOMAIN", domain),
    )


def _key(config: Mapping[str, Any], setting: str, value: object, selector_setting: str) -> DKIMKey:
    selector = config.get(selector_setting) or None
    if selector is None:
        raise ConfigError(f"{selector_setting} is required with {setting}")
    if not isinstance(selector, str) or not _DOMAIN_NAME.fullmatch(selector) or len(selector) > 63:
        raise ConfigError(
            f"{selector_setting} must be DNS labels (letters, digits, hyphens, dots; at most 63 "
            f"characters), got {selector!r}"
        )
    private = _load(setting, _key_bytes(setting, value))
    if isinstance(private, rsa.RSAPrivateKey):
        bits = private.key_size
        if not _RSA_BITS[0] <= bits <= _RSA_BITS[1]:
            raise ConfigError(
                f"{setting}: the RSA key has {bits} bits; DKIM takes {_RSA_BITS[0]} to "
                f"{_RSA_BITS[1]} (RFC 8301 section 3.2), and 2048 is the usual choice"
            )
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return DKIMKey(
            algorithm="rsa-sha256",
            selector=selector,
            bits=bits,
            dns_record=f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode('ascii')}",
            _private=private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        )
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = serialization.Encoding.Raw
        seed = private.private_bytes(
            raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
        return DKIMKey(
            algorithm="ed25519-sha256",
            selector=selector,
            bits=256,
            # RFC 8463 section 4: p= is the bare 32-byte public key, base64.
            dns_record=f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode('ascii')}",
            _private=base64.b64encode(seed),
        )
    raise ConfigError(
        f"{setting} is a {type(private).__name__.removeprefix('_')}; DKIM signs with RSA "
        "or Ed25519 keys"
    )


def _key_bytes(setting: str, value: object) -> bytes:
    """The key's text: *value* itself when it holds PEM (or a bare Ed25519
    seed), otherwise the contents of the file it names."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and ("-----BEGIN" in value or _seed(value.encode()) is not None):
        return value.encode("ascii", "replace")
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(
            f"{setting} must be PEM text or the path of a PEM file, got {type(value).__name__}"
        )
    try:
        with open(value, "rb") as file:
            return file.read(_MAX_KEY_FILE)
    except OSError as err:
        # Never the value itself: a mangled key must not end up in a log.
        raise ConfigError(
            f"{setting} is neither PEM text ('-----BEGIN ... PRIVATE KEY-----') nor a "
            f"readable key file: {err.strerror or type(err).__name__}"
        ) from None


def _load(setting: str, data: bytes) -> object:
    seed = _seed(data)
    if seed is not None:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{setting} is an encrypted key; give it unencrypted "
            "(openssl pkey -in key.pem -out plain.pem) and protect the file instead"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # Not chained: the library's errors may quote the key.
        raise ConfigError(
            f"{setting} is not a readable PEM private key (RSA or Ed25519, unencrypted)"
        ) from None


def _seed(data: bytes) -> bytes | None:
    """The 32-byte Ed25519 seed of a bare base64 key (``dknewkey``'s format)."""
    text = data.strip()
    if len(text) != 44:
        return None
    try:
        seed = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return seed if len(seed) == 32 else None


def _domain_name(setting: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{setting} must be a domain name, got {type(value).__name__}")
    try:
        # The d= tag holds A-labels (RFC 6376 section 3.5).
        ascii_name = value.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        ascii_name = ""
    if not _DOMAIN_NAME.fullmatch(ascii_name) or len(ascii_name) > 253:
        raise ConfigError(f"{setting} must be a domain name, got {value!r}")
    if len(ascii_name) > _MAX_DOMAIN:
        raise ConfigError(
            f"{setting}: DKIM signs for domains of at most {_MAX_DOMAIN} characters; "
            f"{ascii_name!r} has {len(ascii_name)} (set MAIL_DKIM_DOMAIN to a parent domain)"
        )
    return ascii_name


def _from_domain(headers: list[tuple[bytes, bytes]]) -> str:
    """The one domain of the message's From address(es), for ``d=``."""
    values = [value for name, value in headers if name.lower() == b"from"]
    text = [value.decode("utf-8", "replace") for value in values]
    domains = {addr.rpartition("@")[2].lower() for _, addr in getaddresses(text) if "@" in addr}
    if len(values) != 1 or len(domains) != 1:
        raise MessageError(
            "DKIM: the message needs one From header with addresses of one domain to sign "
            "for, or set MAIL_DKIM_DOMAIN"
        )
    try:
        return _domain_name("From", domains.pop())
    except ConfigError as err:
        raise MessageError(f"DKIM: cannot sign for the From domain: {err}") from None
