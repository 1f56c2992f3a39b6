"""Settings derive what they can from each other."""

from __future__ import annotations

import pytest

from labcommons.config import Settings


@pytest.mark.parametrize(
    ("env", "secure"),
    [
        ({}, False),
        ({"LABCOMMONS_PUBLIC_BASE_URL": "https://labs.example.org"}, True),
        ({"LABCOMMONS_PUBLIC_BASE_URL": "https://labs.example.org", "LABCOMMONS_COOKIE_SECURE": "false"}, False),
        ({"LABCOMMONS_COOKIE_SECURE": "true"}, True),
    ],
)
def test_cookies_are_secure_when_served_over_https(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], secure: bool
) -> None:
    for key in ("LABCOMMONS_PUBLIC_BASE_URL", "LABCOMMONS_COOKIE_SECURE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings().cookie_secure is secure
