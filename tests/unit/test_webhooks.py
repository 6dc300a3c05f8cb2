"""Webhook signatures (against the independent `standardwebhooks` package), the destination
policy's refusals and allowlist, and the notify settings that hold secrets."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import standardwebhooks
from pydantic import ValidationError

from conveyor.services.notify.settings import NotifySettings
from conveyor.webhooks import (
    WebhookVerificationError,
    new_secret,
    secret_key,
    sign,
    verify,
)
from conveyor.webhooks.policy import DestinationPolicy, DestinationRefusedError, redact

BODY = b'{"task_id":"t-1","status":"completed"}'


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    return lambda host, port: table.get(host) or [host]


# -- signatures -------------------------------------------------------------------------------


def test_our_signature_verifies_with_the_standardwebhooks_package() -> None:
    secret = new_secret()
    headers = sign([secret_key(secret)], "msg_2Lh9", BODY)
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == verify(BODY, headers, secret)


def test_standardwebhooks_signature_verifies_with_ours() -> None:
    secret = new_secret()
    now = datetime.now(UTC)
    theirs = standardwebhooks.Webhook(secret).sign("msg_x", now, BODY.decode())
    headers = {
        "Webhook-Id": "msg_x",  # any case
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": theirs,
    }
    assert verify(BODY, headers, secret)["task_id"] == "t-1"
    assert (
        sign([secret_key(secret)], "msg_x", BODY, timestamp=int(now.timestamp()))[
            "webhook-signature"
        ]
        == theirs
    )


def test_a_replayed_webhook_outside_the_window_is_refused_by_both_verifiers() -> None:
    secret = new_secret()
    old = int(time.time()) - 301
    headers = sign([secret_key(secret)], "msg_1", BODY, timestamp=old)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(BODY, headers, secret)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY, headers)
    verify(BODY, headers, secret, tolerance_s=600)  # a wider window accepts it
    future = sign([secret_key(secret)], "msg_1", BODY, timestamp=int(time.time()) + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(BODY, future, secret)


def test_tampered_body_id_or_wrong_secret_fail_verification() -> None:
    secret = new_secret()
    headers = sign([secret_key(secret)], "msg_1", BODY)
    with pytest.raises(WebhookVerificationError):
        verify(BODY + b" ", headers, secret)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, {**headers, "webhook-id": "msg_2"}, secret)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, new_secret())
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(BODY, {"webhook-id": "msg_1"}, secret)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, {**headers, "webhook-signature": "v1,ünicode"}, secret)


def test_rotation_signs_with_every_key_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = sign([secret_key(new), secret_key(old)], "msg_1", BODY)
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (old, new):
        verify(BODY, headers, secret)
        standardwebhooks.Webhook(secret).verify(BODY, headers)
    verify(BODY, headers, [new_secret(), old])  # a receiver holding several secrets


def test_secrets_must_be_whsec_base64_of_24_to_64_bytes() -> None:
    assert len(secret_key(new_secret())) == 32
    for bad in ("plain-text-secret", "whsec_!!!", "whsec_c2hvcnQ="):
        with pytest.raises(ValueError):
            secret_key(bad)


# -- destination policy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2/admin",
        "http://localhost:8080/",
        "http://127.1/",
        "http://2130706434/",
        "http://0x7f000003/",
        "http://017700000001/",
        "http://[::ffff:127.0.0.2]/",
        "http://[::1]/",
        "http://[::]/",
        "http://0.0.0.0/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://172.20.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:7f00:1::]/",
        "http://[::127.0.0.1]/",
        "http://255.255.255.255/",
    ],
)
def test_internal_destinations_and_their_odd_spellings_are_refused(url: str) -> None:
    with pytest.raises(DestinationRefusedError, match="refused"):
        DestinationPolicy().check(url)


def test_a_name_resolving_to_metadata_is_refused_and_the_reason_names_it() -> None:
    policy = DestinationPolicy(resolver=resolver({"evil.test": ["169.254.169.254"]}))
    with pytest.raises(DestinationRefusedError, match=r"169\.254\.169\.254 is link-local"):
        policy.check("https://user:pw@evil.test/hook?token=abc")
    try:
        policy.check("https://user:pw@evil.test/hook?token=abc")
    except DestinationRefusedError as exc:
        assert "pw" not in str(exc) and "token" not in str(exc)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "http:///nohost", "x" * 3000]
)
def test_only_http_and_https_urls_with_a_host_are_accepted(url: str) -> None:
    with pytest.raises(DestinationRefusedError):
        DestinationPolicy().check(url)


def test_public_addresses_pass_and_only_checked_addresses_are_kept() -> None:
    table = {"hooks.example.com": ["93.184.215.14", "10.0.0.5", "2606:4700::1"]}
    dest = DestinationPolicy(resolver=resolver(table)).check("https://hooks.example.com/h?x=1")
    assert dest.addresses == ("93.184.215.14", "2606:4700::1")  # never the internal one
    assert (dest.host, dest.port, dest.target) == ("hooks.example.com", 443, "/h?x=1")


def test_allowlisted_networks_and_hosts_pass() -> None:
    table = {"hooks.internal": ["10.8.0.7"], "a.svc.cluster.local": ["10.9.0.1"]}
    policy = DestinationPolicy(
        ["127.0.0.1/32", "hooks.internal", "*.svc.cluster.local"], resolver=resolver(table)
    )
    assert policy.check("http://127.0.0.1:9000/h").addresses == ("127.0.0.1",)
    assert policy.check("http://[::ffff:127.0.0.1]:9000/h").addresses == ("127.0.0.1",)
    assert policy.check("http://hooks.internal/h").addresses == ("10.8.0.7",)
    assert policy.check("http://a.svc.cluster.local/h").addresses == ("10.9.0.1",)
    with pytest.raises(DestinationRefusedError):
        policy.check("http://127.0.0.2/")  # outside the allowed /32


def test_redact_drops_userinfo_query_and_fragment() -> None:
    assert redact("https://u:secret@h.example:8443/p/a?token=x#f") == "https://h.example:8443/p/a"
    assert redact("http://[::1]/x?y") == "http://[::1]/x"


# -- settings -------------------------------------------------------------------------------


def test_a_malformed_secret_is_reported_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_WEBHOOK_SECRETS", '{"acme": "whsec_dG9vc2hvcnQ="}')
    with pytest.raises(ValidationError) as info:
        NotifySettings(stage="notify")
    assert "acme" in str(info.value) and "dG9vc2hvcnQ" not in str(info.value)


def test_secrets_are_secretstr_and_never_in_the_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_secret()
    monkeypatch.setenv("CONVEYOR_WEBHOOK_SECRETS", f'{{"acme": "{secret}"}}')
    monkeypatch.setenv("CONVEYOR_WEBHOOK_ALLOW", "127.0.0.1/32, hooks.internal")
    settings = NotifySettings(stage="notify")
    assert secret not in repr(settings) and secret not in str(settings.model_dump())
    assert settings.webhook_keys("acme") == [secret_key(secret)]
    assert settings.webhook_keys("globex") == []
    assert settings.webhook_allow == ["127.0.0.1/32", "hooks.internal"]


def test_the_shared_default_secret_is_rejected_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_WEBHOOK_DEFAULT_SECRET", "shared")
    with pytest.raises(ValidationError, match="give each tenant its own secret"):
        NotifySettings(stage="notify")


def test_a_bad_allowlist_entry_fails_at_start() -> None:
    with pytest.raises(ValidationError, match="neither a network nor a host name"):
        NotifySettings(stage="notify", webhook_allow=["10.0.0.0/33"])


def test_a_webhook_deadline_longer_than_the_liveness_limit_fails_at_start() -> None:
    with pytest.raises(ValidationError, match="health_stall_s"):
        NotifySettings(stage="notify", webhook_timeout_s=60, health_stall_s=30)
    NotifySettings(stage="notify", webhook_timeout_s=60, health_stall_s=130)
