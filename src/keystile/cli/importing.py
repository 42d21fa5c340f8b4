"""``keystile import SOURCE``: the keys another library issued, into the key database.

One subcommand per source (``drf-api-key``, ``keygate``, ``keyshield``, ``csv``), each
with the options of its storage. The importers (``keystile.importers``) are imported
when the command runs, never for ``--help``. The key database must exist (``keystile
init``), as for every command but ``init``, ``create`` and ``demo``. The import is one
transaction: all of it
or, on an error, nothing; ``--dry-run`` writes nothing. It prints what it imported and
what it skipped or renamed, by reason (``--json``: one object).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import arguments as types
from .command import Command, on_keys
from .output import err, json_line

if TYPE_CHECKING:
    from ..manager import KeyManager

__all__ = ["COMMANDS", "SOURCES"]

#: The sources, their help and what they read (``keystile.importers.SOURCES``, pinned by
#: a test: that module is not imported here).
SOURCES = {
    "drf-api-key": "djangorestframework-api-key's table, from the Django project's database",
    "keygate": "fastapi-keygate's keygate_keys table",
    "keyshield": "keyshield's api_keys table (its SQLAlchemy repository)",
    "csv": "a CSV or JSON Lines file: id, owner, name, scopes, created_at, expires_at,"
    " revoked, hash_algorithm, hash",
}
_FORMATS = ("drf-api-key", "keygate", "keyshield")


def _arguments(p: argparse.ArgumentParser) -> None:
    sources = p.add_subparsers(dest="source", metavar="SOURCE", parser_class=type(p))
    sources.required = True
    for name, help_text in SOURCES.items():
        sp = sources.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[types.global_options(on_command=True, parser_class=type(p))],
        )
        sp.set_defaults(source_url=None, file=None, table=None, key_format=None, prefix="ak_v1")
        if name == "csv":
            sp.add_argument("--file", required=True, metavar="PATH", help=".csv, or .jsonl")
            sp.add_argument(
                "--format",
                dest="key_format",
                choices=_FORMATS,
                default="drf-api-key",
                help="the shape of the key strings, whose public part the id column is"
                " (default: drf-api-key, <id>.<secret>)",
            )
        else:
            sp.add_argument(
                "--source-url",
                required=True,
                metavar="URL",
                help="the source's database: sqlite:///path or postgresql://…[?schema=…]",
            )
            sp.add_argument("--table", metavar="NAME", help="a table of another name")
        if name == "keyshield":
            sp.add_argument("--prefix", help="the keys' global prefix (default: ak_v1)")
        who = sp.add_mutually_exclusive_group()
        who.add_argument("--owner", type=types.owner, help="the owner of every imported key")
        who.add_argument(
            "--owner-from",
            choices=("name",),
            help="each key's owner is its name (for sources without owners)",
        )
        sp.add_argument("--dry-run", action="store_true", help="write nothing; say what would be")
        types.add_actor_option(sp)


async def _import(args: argparse.Namespace, manager: KeyManager) -> None:
    from ..importers import import_source

    report = await import_source(
        manager.store,
        args.source,
        source_url=args.source_url,
        file=args.file,
        table=args.table,
        key_format=args.key_format,
        owner=args.owner,
        owner_from_name=args.owner_from == "name",
        actor=manager.actor,
        dry_run=args.dry_run,
        keyshield_prefix=args.prefix or "ak_v1",
    )
    if args.json:
        json_line(report.to_dict())
        return
    verb = "would import" if args.dry_run else "imported"
    err(f"{verb} {report.imported} key(s) from {args.source} into {manager.store.display_url}")
    for what, counts in (("skipped", report.skipped), ("renamed", report.renamed)):
        if counts:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
            err(f"{what} {sum(counts.values())}: {reasons}")


COMMANDS = (
    Command(
        "import",
        "import the keys another library issued; they keep working (legacy_formats)",
        "keystile import drf-api-key --source-url sqlite:///db.sqlite3 --owner-from name",
        _arguments,
        on_keys(_import),
    ),
)
