"""What each option accepts, as argparse types, and the options several commands share.

A check's ``ValueError`` or ``KeystileError`` becomes argparse's one line, which names the
option as typed (``argument --scope: …``), so the operator reads the flag they typed,
never a parameter name of the Python API. The checks themselves (``validation``,
``limits``, ``principal``, ``tokens``) are imported when an option is converted, not when
the parser is built: ``keystile --help`` loads none of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ..database_url import DATABASE_URL_ENV, DEFAULT_DATABASE_URL
from ..durations import format_duration, parse_duration
from ..errors import KeystileError

__all__ = [
    "MAX_COUNT",
    "MAX_QUOTA",
    "actor",
    "add_actor_option",
    "add_key_id",
    "add_limit_options",
    "checked",
    "cidr",
    "count",
    "duration",
    "global_options",
    "key_id",
    "key_name",
    "metadata_pair",
    "new_quota",
    "owner",
    "port",
    "positive_duration",
    "quota",
    "rate_limit",
    "scope",
    "whole",
]

T = TypeVar("T")
P = TypeVar("P", bound=argparse.ArgumentParser)

#: Past these a number is refused: a quota is exact up to 2**53 - 1 everywhere (the
#: stores, Redis's Lua, JSON: ``limits.MAX_QUOTA``, not imported so that ``--help`` stays
#: light); a count is a 32-bit SQL LIMIT.
MAX_QUOTA, MAX_COUNT = 2**53 - 1, 2**31 - 1


def global_options(*, on_command: bool, parser_class: type[P]) -> P:
    """``--database-url`` and ``--json``, taken before the command and after it, as gh and
    stripe take theirs. On a command they default to ``SUPPRESS``: a command that was not
    given the option leaves the value given before the command alone."""
    options = parser_class(add_help=False)
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if on_command else {}
    options.add_argument(
        "--database-url",
        metavar="URL",
        help=f"key database (default: ${DATABASE_URL_ENV}, else {DEFAULT_DATABASE_URL})",
        **default,
    )
    options.add_argument(
        "--json",
        action="store_true",
        help="JSON on stdout: one object per line for lists, one object for one key",
        **default,
    )
    return options


def checked(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a check raising ``ValueError`` or ``KeystileError``."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except (ValueError, KeystileError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def whole(what: str, least: int, most: int, hint: str = "") -> Callable[[str], int]:
    """An argparse type for a whole number from ``least`` to ``most``."""

    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"invalid {what} {text!r}: a whole number") from None
        if value < least:
            raise ValueError(f"invalid {what} {text!r}: at least {least}{hint}")
        if value > most:
            raise ValueError(f"invalid {what} {text!r}: at most {most}")
        return value

    return checked(number)


def _at_least_duration(shortest: timedelta) -> Callable[[str], timedelta]:
    def at_least(text: str) -> timedelta:
        value = parse_duration(text)
        if value < shortest:
            raise ValueError(f"invalid duration {text!r}: at least {format_duration(shortest)}")
        return value

    return checked(at_least)


def _owner(text: str) -> str:
    from ..validation import validate_owner

    return validate_owner(text)


def _name(text: str) -> str:
    from ..validation import validate_name

    return validate_name(text)


def _actor(text: str) -> str:
    from ..validation import validate_actor

    return validate_actor(text)


def _scope(text: str) -> str:
    from ..validation import validate_scopes

    return validate_scopes([text])[0]


def _cidr(text: str) -> str:
    from ..principal import normalize_cidrs

    return normalize_cidrs([text])[0]


def _rate_limit(text: str) -> str:
    from ..limits import normalize_rate_limit

    return str(normalize_rate_limit(text))


def _pair(text: str) -> tuple[str, str]:
    from ..validation import validate_metadata

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"KEY=VALUE, got {text!r}")
    validate_metadata({key: value})
    return key, value


def _named_limit(text: str) -> tuple[str, str]:
    from ..limits import parse_rate_limits

    name, sep, rate = text.partition("=")
    if not sep:
        raise ValueError(f"NAME=N/UNIT, e.g. burst=50/second, got {text!r}")
    return name, parse_rate_limits({name: rate})[name].text


def key_id(text: str) -> str:
    """A key's id, or its display form ``ks_<id>…`` (or a whole key pasted by mistake)."""
    from ..tokens import normalize_key_id

    return normalize_key_id(text)


duration = checked(parse_duration)
positive_duration = _at_least_duration(timedelta(seconds=1))
rate_limit = checked(_rate_limit)
named_limit = checked(_named_limit)
quota = whole("quota", 0, MAX_QUOTA)
new_quota = whole("quota", 1, MAX_QUOTA, " (a key with a quota of 0 could never be used)")
count = whole("count", 1, MAX_COUNT)
port = whole("port", 0, 65535)
owner = checked(_owner)
key_name = checked(_name)
scope = checked(_scope)
cidr = checked(_cidr)
metadata_pair = checked(_pair)
actor = checked(_actor)


def add_key_id(p: argparse.ArgumentParser) -> None:
    """KEY_ID (the id or its display form, ``ks_<id>…``) and the ``--owner`` it must have."""
    p.add_argument("key_id", metavar="KEY_ID", type=key_id)
    p.add_argument("--owner", required=True, type=owner)


def add_named_limits_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        action="append",
        dest="limits",
        type=named_limit,
        metavar="NAME=N/UNIT",
        help="a named rate limit, e.g. burst=50/second; each needs room (repeatable;"
        " on update, the named limits become those given)",
    )


def add_actor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--actor",
        type=actor,
        help="who the audit log names for this change (default: cli:<user>@<host>)",
    )


def add_limit_options(p: argparse.ArgumentParser, *, quota: Callable[[str], int]) -> None:
    p.add_argument(
        "--rate-limit", type=rate_limit, metavar="N/UNIT", help="e.g. 10/second, 100/minute, 5/day"
    )
    add_named_limits_option(p)
    p.add_argument("--quota", type=quota, metavar="N", help="uses allowed (in each refill period)")
    p.add_argument(
        "--quota-refill",
        type=positive_duration,
        metavar="DURATION",
        help="refill the quota every, e.g. 1d",
    )
