"""Translations (zh-CN and en) from the packaged .po catalogues, and the request's locale."""

from __future__ import annotations

import gettext
from contextvars import ContextVar
from functools import cache
from importlib import resources

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

LOCALES = ("zh_CN", "en")
DEFAULT_LOCALE = "zh_CN"
_current: ContextVar[str] = ContextVar("labcommons_locale", default=DEFAULT_LOCALE)


@cache
def translations(locale: str) -> gettext.NullTranslations:
    """The compiled catalogue of a locale; English is the source language, so it needs none."""
    if locale == "en":
        return gettext.NullTranslations()
    import io

    po = resources.files("labcommons").joinpath(f"locale/{locale}/LC_MESSAGES/messages.po")
    with po.open("rb") as fh:
        catalog = read_po(fh, locale=locale)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def set_locale(locale: str) -> None:
    _current.set(locale if locale in LOCALES else DEFAULT_LOCALE)


def get_locale() -> str:
    return _current.get()


def gettext_(message: str) -> str:
    """Translate a message into the current request's language."""
    return translations(get_locale()).gettext(message)


def ngettext_(singular: str, plural: str, n: int) -> str:
    return translations(get_locale()).ngettext(singular, plural, n)


def pick_locale(query_lang: str | None, cookie_lang: str | None, accept_language: str | None) -> str:
    """The locale asked for by ?lang=, then the cookie, then Accept-Language, else Chinese."""
    for candidate in (query_lang, cookie_lang):
        if candidate:
            normalised = _normalise(candidate)
            if normalised:
                return normalised
    for part in (accept_language or "").split(","):
        normalised = _normalise(part.split(";")[0].strip())
        if normalised:
            return normalised
    return DEFAULT_LOCALE


def _normalise(tag: str) -> str | None:
    tag = tag.replace("-", "_").lower()
    if tag.startswith("zh"):
        return "zh_CN"
    if tag.startswith("en"):
        return "en"
    return None
