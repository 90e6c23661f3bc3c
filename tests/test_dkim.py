"""DKIM signing: messages made by quartmail, signed, then verified by dkimpy
against the public key served by a DNS function of our own (no network)."""

from __future__ import annotations

import base64
import logging
import pathlib
import re
import secrets
from collections.abc import Callable

import aiosmtplib
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from quartmail import ConfigError, Message, MessageError
from quartmail.dkim import DKIMSigner, dkim_signer_from_config
from quartmail.testing import SMTPTestServer

DNSFunction = Callable[..., bytes | None]

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def rsa_signer(rsa_key: rsa.RSAPrivateKey) -> DKIMSigner:
    signer = dkim_signer_from_config({"MAIL_DKIM_KEY": pem(rsa_key), "MAIL_DKIM_SELECTOR": "s1"})
    assert signer is not None
    return signer


@pytest.fixture
def ed_signer(ed_key: ed25519.Ed25519PrivateKey) -> DKIMSigner:
    signer = dkim_signer_from_config({"MAIL_DKIM_KEY": pem(ed_key), "MAIL_DKIM_SELECTOR": "ed"})
    assert signer is not None
    return signer


def dns_for(signer: DKIMSigner, domain: str) -> DNSFunction:
    """dkimpy's DNS lookup, answered from the records the signer says to publish."""
    records = signer.dns_records(domain)

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        record = records.get(name.decode("ascii").rstrip("."))
        return None if record is None else record.encode("ascii")

    return lookup


def verify(data: bytes, dns: DNSFunction, index: int = 0) -> bool:
    """dkimpy's verdict on the index-th signature (a bad body hash raises in dkimpy)."""
    try:
        return bool(dkim.DKIM(data).verify(idx=index, dnsfunc=dns))
    except dkim.DKIMException:
        return False


def signature_tags(data: bytes, index: int = 0) -> dict[str, str]:
    headers, _ = dkim.rfc822_parse(data)
    values = [value for name, value in headers if name.lower() == b"dkim-signature"]
    tags = dkim.util.parse_tag_value(values[index])
    return {key.decode(): re.sub(r"\s+", "", value.decode()) for key, value in tags.items()}


def unicode_message() -> Message:
    msg = Message(
        "Grüße aus Zürich: 你好, ça va? " * 3,
        sender=("Jürgen Größ", "jurgen@example.com"),
        recipients=[("Zoë", "zoe@example.org")],
        cc=["cc@example.net"],
        reply_to="replies@example.com",
        body="Hallo Zoë,\nanbei das Bild.\n",
        html="<p>Hallo Zoë, anbei das Bild.</p>",
        extra_headers={"List-Unsubscribe": "<https://example.com/u/abc>"},
    )
    msg.attach("Größe 📷.png", "image/png", PNG)
    msg.attach("notes.txt", "text/plain", "Ünïcödé notes\n" * 50)
    return msg


@pytest.mark.parametrize("signer_name", ["rsa_signer", "ed_signer"])
def test_a_signed_message_verifies(signer_name: str, request: pytest.FixtureRequest) -> None:
    signer: DKIMSigner = request.getfixturevalue(signer_name)
    signed = signer.sign(unicode_message().as_bytes())
    assert signed.startswith(b"DKIM-Signature: ")
    assert verify(signed, dns_for(signer, "example.com"))
    tags = signature_tags(signed)
    assert tags["a"] == signer.keys[0].algorithm
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == "example.com"  # the From domain
    assert tags["s"] == signer.keys[0].selector


def test_the_signed_headers_and_from_once_more(rsa_signer: DKIMSigner) -> None:
    msg = unicode_message()
    msg.extra_headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.extra_headers["X-Campaign"] = "autumn"
    signed = rsa_signer.sign(msg.as_bytes())
    signed_names = signature_tags(signed)["h"].split(":")
    assert sorted(signed_names) == sorted(
        [
            "from",
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
        ]
    )


def test_tampering_breaks_the_signature(rsa_signer: DKIMSigner, ed_signer: DKIMSigner) -> None:
    for signer in (rsa_signer, ed_signer):
        dns = dns_for(signer, "example.com")
        signed = signer.sign(unicode_message().as_bytes())
        head, _, body = signed.partition(b"\r\n\r\n")
        assert verify(signed, dns)
        tampered = body.replace(b"anbei", b"ANBEI", 1)
        assert tampered != body
        assert not verify(head + b"\r\n\r\n" + tampered, dns)
        assert not verify(signed.replace(b"To: ", b"To: evil@example.net, ", 1), dns)
        # A second From, added above the first, is caught because From is
        # signed once more than it occurs.
        lines = head.split(b"\r\n")
        at = next(i for i, line in enumerate(lines) if line.startswith(b"From: "))
        lines.insert(at, b"From: ceo@example.com")
        assert not verify(b"\r\n".join(lines) + b"\r\n\r\n" + body, dns)
        # Refolding and recasing headers is what relaxed canonicalization allows.
        assert verify(signed.replace(b"Subject: ", b"subject:   ", 1), dns)


def test_dual_rsa_and_ed25519_signatures(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    signer = dkim_signer_from_config(
        {
            "MAIL_DKIM_KEY": pem(rsa_key),
            "MAIL_DKIM_SELECTOR": "rsa2026",
            "MAIL_DKIM_SECOND_KEY": pem(ed_key),
            "MAIL_DKIM_SECOND_SELECTOR": "ed2026",
            "MAIL_DKIM_DOMAIN": "Mail.Example.com",
        }
    )
    assert signer is not None
    assert signer.domain == "mail.example.com"
    signed = signer.sign(unicode_message().as_bytes())
    dns = dns_for(signer, "mail.example.com")
    assert [signature_tags(signed, i)["a"] for i in (0, 1)] == ["rsa-sha256", "ed25519-sha256"]
    assert [signature_tags(signed, i)["d"] for i in (0, 1)] == ["mail.example.com"] * 2
    assert verify(signed, dns, 0)
    assert verify(signed, dns, 1)
    assert set(signer.dns_records()) == {
        "rsa2026._domainkey.mail.example.com",
        "ed2026._domainkey.mail.example.com",
    }


def test_signature_lines_are_short_and_end_in_crlf(ed_signer: DKIMSigner) -> None:
    domain = "a" * 40 + ".mail.example.com"
    msg = unicode_message()
    msg.sender = f"noreply@{domain}"
    data = msg.as_bytes()
    signed = ed_signer.sign(data)
    assert signed.endswith(data)
    header = signed[: -len(data)]
    assert header.count(b"\n") == header.count(b"\r\n")
    assert max(len(line) for line in header.split(b"\r\n")) <= 78
    assert verify(signed, dns_for(ed_signer, domain))


def test_smtputf8_addresses_sign_and_verify(ed_signer: DKIMSigner) -> None:
    msg = Message("Hi", sender="jürgen@bücher.example", recipients=["zoë@example.org"], body="x")
    envelope = msg.envelope()
    assert "SMTPUTF8" in envelope.mail_options
    signed = ed_signer.sign(envelope.data)
    assert signature_tags(signed)["d"] == "xn--bcher-kva.example"
    assert verify(signed, dns_for(ed_signer, "xn--bcher-kva.example"))


def test_d_needs_one_from_domain(ed_signer: DKIMSigner) -> None:
    data = unicode_message().as_bytes()
    no_from = re.sub(rb"^From: .*?\r\n", b"", data, count=1, flags=re.MULTILINE)
    with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
        ed_signer.sign(no_from)
    two_domains = data.replace(b"From: ", b"From: a@one.example, ", 1)
    with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
        ed_signer.sign(two_domains)
    with pytest.raises(MessageError, match="cannot be parsed"):
        ed_signer.sign(b"From: a@example.com\r\nnot a header line\r\n\r\nbody\r\n")


async def test_sign_async_gives_the_same_verifiable_bytes(
    rsa_signer: DKIMSigner, ed_signer: DKIMSigner
) -> None:
    assert rsa_signer.blocks  # RSA is slow in dkimpy: a thread keeps the loop free
    assert not ed_signer.blocks
    for signer in (rsa_signer, ed_signer):
        data = unicode_message().as_bytes()
        signed = await signer.sign_async(data)
        assert signed.endswith(data)
        assert verify(signed, dns_for(signer, "example.com"))


def test_an_international_dkim_domain_is_written_as_a_labels(
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    signer = dkim_signer_from_config(
        {
            "MAIL_DKIM_KEY": pem(ed_key),
            "MAIL_DKIM_SELECTOR": "e",
            "MAIL_DKIM_DOMAIN": "Bücher.Example.",
        }
    )
    assert signer is not None
    assert signer.domain == "xn--bcher-kva.example"
    signed = signer.sign(unicode_message().as_bytes())
    assert signature_tags(signed)["d"] == "xn--bcher-kva.example"
    assert verify(signed, dns_for(signer, "xn--bcher-kva.example"))


async def test_a_signed_message_arrives_verifiable(
    smtp_server: SMTPTestServer, rsa_signer: DKIMSigner
) -> None:
    envelope = unicode_message().envelope()
    await aiosmtplib.send(
        rsa_signer.sign(envelope.data),
        sender=envelope.sender,
        recipients=envelope.recipients,
        hostname="127.0.0.1",
        port=smtp_server.port,
        mail_options=envelope.mail_options,
    )
    [received] = await smtp_server.wait_for_messages(1)
    assert verify(received.data, dns_for(rsa_signer, "example.com"))
    parsed = received.parsed()
    assert parsed["Subject"].startswith("Grüße aus Zürich")
    attachment = next(part for part in parsed.iter_attachments() if part.get_filename())
    assert attachment.get_content() == PNG


# Keys from files and in other formats.


def test_keys_from_files_paths_and_bytes(
    tmp_path: pathlib.Path, rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert pkcs1.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    (tmp_path / "rsa.pem").write_bytes(pkcs1.replace(b"\n", b"\r\n"))  # a Windows editor
    # dkimpy's own dknewkey --ktype ed25519 writes the bare base64 seed.
    seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    (tmp_path / "ed.key").write_bytes(base64.b64encode(seed))
    reference = dkim_signer_from_config({"MAIL_DKIM_KEY": pem(ed_key), "MAIL_DKIM_SELECTOR": "e"})
    assert reference is not None

    for value, algorithm in [
        (str(tmp_path / "rsa.pem"), "rsa-sha256"),
        (tmp_path / "rsa.pem", "rsa-sha256"),
        (pkcs1, "rsa-sha256"),
        (str(tmp_path / "ed.key"), "ed25519-sha256"),
        (base64.b64encode(seed).decode(), "ed25519-sha256"),
    ]:
        signer = dkim_signer_from_config({"MAIL_DKIM_KEY": value, "MAIL_DKIM_SELECTOR": "e"})
        assert signer is not None
        assert signer.keys[0].algorithm == algorithm
        signed = signer.sign(unicode_message().as_bytes())
        assert verify(signed, dns_for(signer, "example.com"))
    ed_from_file = dkim_signer_from_config(
        {"MAIL_DKIM_KEY": str(tmp_path / "ed.key"), "MAIL_DKIM_SELECTOR": "e"}
    )
    assert ed_from_file is not None
    assert ed_from_file.keys[0].dns_record == reference.keys[0].dns_record


def test_no_key_is_no_signer(caplog: pytest.LogCaptureFixture) -> None:
    assert dkim_signer_from_config({}) is None
    assert dkim_signer_from_config({"MAIL_DKIM_KEY": ""}) is None
    with caplog.at_level(logging.WARNING, "quartmail"):
        assert dkim_signer_from_config({"MAIL_DKIM_SELECTOR": "s1"}) is None
    assert "MAIL_DKIM_SELECTOR is set but MAIL_DKIM_KEY is not" in caplog.text


def test_the_private_key_stays_out_of_reprs(
    rsa_signer: DKIMSigner, rsa_key: rsa.RSAPrivateKey
) -> None:
    secret_line = pem(rsa_key).splitlines()[5]
    text = repr(rsa_signer)
    assert "rsa-sha256" in text
    assert "PRIVATE" not in text
    assert secret_line not in text


# Bad settings: a ConfigError naming the setting, never quoting the key.


def _small_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key shorter than cryptography will generate (a Fermat-tested test key)."""

    def prime(size: int) -> int:
        while True:
            # The top two bits set, so that p * q has exactly 2 * size bits.
            candidate = secrets.randbits(size) | (3 << (size - 2)) | 1
            if all(pow(base, candidate - 1, candidate) == 1 for base in (2, 3, 5, 7, 11, 13)):
                return candidate

    e = 65537
    while True:
        p, q = prime(bits // 2), prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return numbers.private_key()


def _encrypted(key: ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2"),
    ).decode("ascii")


def test_bad_settings_name_the_setting(
    tmp_path: pathlib.Path, rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    good = pem(ed_key)
    garbled = good.replace(good.splitlines()[1][:10], "AAAAAAAAAA")
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"MAIL_DKIM_KEY": good}, "MAIL_DKIM_SELECTOR", "required"),
        ({"MAIL_DKIM_KEY": good, "MAIL_DKIM_SELECTOR": "bad selector"}, "MAIL_DKIM_SELECTOR", ""),
        ({"MAIL_DKIM_KEY": garbled}, "MAIL_DKIM_KEY", "not a readable PEM"),
        ({"MAIL_DKIM_KEY": "-----BEGIN PRIVATE KEY-----\nxx"}, "MAIL_DKIM_KEY", "not a readable"),
        ({"MAIL_DKIM_KEY": str(tmp_path / "missing.pem")}, "MAIL_DKIM_KEY", "No such file"),
        ({"MAIL_DKIM_KEY": _encrypted(ed_key)}, "MAIL_DKIM_KEY", "encrypted"),
        ({"MAIL_DKIM_KEY": pem(ec.generate_private_key(ec.SECP256R1()))}, "MAIL_DKIM_KEY", "RSA"),
        ({"MAIL_DKIM_KEY": pem(_small_rsa_key(512))}, "MAIL_DKIM_KEY", "512 bits"),
        ({"MAIL_DKIM_KEY": 42}, "MAIL_DKIM_KEY", "int"),
        ({"MAIL_DKIM_SECOND_KEY": good}, "MAIL_DKIM_SECOND_KEY", "MAIL_DKIM_KEY is not"),
        (
            {"MAIL_DKIM_KEY": good, "MAIL_DKIM_SECOND_KEY": pem(rsa_key)},
            "MAIL_DKIM_SECOND_SELECTOR",
            "required",
        ),
        (
            {"MAIL_DKIM_KEY": good, "MAIL_DKIM_SECOND_KEY": good, "MAIL_DKIM_SECOND_SELECTOR": "b"},
            "MAIL_DKIM_SECOND_KEY",
            "other algorithm",
        ),
        ({"MAIL_DKIM_KEY": good, "MAIL_DKIM_DOMAIN": "not a domain"}, "MAIL_DKIM_DOMAIN", ""),
        (
            {"MAIL_DKIM_KEY": good, "MAIL_DKIM_DOMAIN": "x" * 60 + ".example.com"},
            "MAIL_DKIM_DOMAIN",
            "at most 64",
        ),
    ]
    key_text = good.splitlines()[1]
    for config, setting, detail in cases:
        config.setdefault("MAIL_DKIM_SELECTOR", "s1")
        if setting == "MAIL_DKIM_SELECTOR" and detail == "required":
            del config["MAIL_DKIM_SELECTOR"]
        with pytest.raises(ConfigError) as caught:
            dkim_signer_from_config(config)
        message = str(caught.value)
        assert message.startswith(setting) or f" {setting} " in message, message
        assert detail in message
        assert key_text not in message
        # Nothing chained either: a parser's error could quote the key.
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__ or caught.value.__context__ is None


def test_an_rsa_key_over_4096_bits_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096 + 64)
    with pytest.raises(ConfigError, match="MAIL_DKIM_KEY: the RSA key has 4160 bits"):
        dkim_signer_from_config({"MAIL_DKIM_KEY": pem(key), "MAIL_DKIM_SELECTOR": "s"})


def test_check_raises_what_sign_would_without_signing(ed_signer: DKIMSigner) -> None:
    data = unicode_message().as_bytes()
    ed_signer.check(data)  # signable: no error, and nothing returned to send
    no_from = re.sub(rb"^From: .*?\r\n", b"", data, count=1, flags=re.MULTILINE)
    with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
        ed_signer.check(no_from)
    with pytest.raises(MessageError, match="cannot be parsed"):
        ed_signer.check(b"From: a@example.com\r\nnot a header line\r\n\r\nbody\r\n")


def test_domains_that_are_not_names_are_refused(ed_key: ed25519.Ed25519PrivateKey) -> None:
    good = pem(ed_key)
    for domain, detail in ((42, "got int"), ("x" * 64 + ".example.com", "must be a domain name")):
        config = {"MAIL_DKIM_KEY": good, "MAIL_DKIM_SELECTOR": "s1", "MAIL_DKIM_DOMAIN": domain}
        with pytest.raises(ConfigError, match=f"MAIL_DKIM_DOMAIN.*{detail}"):
            dkim_signer_from_config(config)
    # 44 characters that are not base64: not a bare Ed25519 seed either.
    with pytest.raises(ConfigError, match="MAIL_DKIM_KEY"):
        dkim_signer_from_config({"MAIL_DKIM_KEY": "!" * 44, "MAIL_DKIM_SELECTOR": "s1"})


def test_a_from_domain_that_is_not_a_name_cannot_be_signed_for(ed_signer: DKIMSigner) -> None:
    data = b"From: a@" + b"x" * 64 + b".example.com\r\nSubject: s\r\n\r\nbody\r\n"
    with pytest.raises(MessageError, match="DKIM: cannot sign for the From domain"):
        ed_signer.sign(data)
    with pytest.raises(ValueError, match="no domain"):
        ed_signer.dns_records()
    assert ed_signer.dns_records("example.com").keys() == {"ed._domainkey.example.com"}
