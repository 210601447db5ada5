"""`sma`: run the system, migrate the database, manage API tokens."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import timedelta


def _cmd_run(_args) -> int:
    from core.embedded import run
    return run()


def _cmd_migrate(args) -> int:
    from core.settings import get_settings
    from storage.migrate import alembic_config
    from alembic import command

    url = get_settings().resolved_database_url()
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    cfg = alembic_config(url)
    if args.revision.startswith("-") or args.down:
        command.downgrade(cfg, args.revision)
    else:
        command.upgrade(cfg, args.revision)
    print(f"database at {args.revision}")
    return 0


async def _with_db(fn):
    from core.settings import get_settings
    from storage.db import Database
    from storage.redis import make_redis

    settings = get_settings()
    db = Database(settings.resolved_database_url())
    redis = make_redis(settings.redis_url)
    try:
        async with db.transaction() as session:
            return await fn(session, redis)
    finally:
        await redis.aclose()
        await db.dispose()


def _cmd_token_create(args) -> int:
    from core.principal import TokenKind
    from services import tokens

    async def create(session, _redis):
        issued = await tokens.issue_token(
            session, TokenKind(args.kind), user_id=uuid.UUID(args.user_id) if args.user_id else None,
            name=args.name, expires_in=timedelta(days=args.expires_days) if args.expires_days else None)
        return issued

    issued = asyncio.run(_with_db(create))
    print(json.dumps({"id": str(issued.record.id), "kind": issued.record.kind,
                      "user_id": str(issued.record.user_id) if issued.record.user_id else None,
                      "token": issued.token}))
    print("The token is shown once; only its hash is stored.", file=sys.stderr)
    return 0


def _cmd_token_list(args) -> int:
    from services import tokens

    async def list_(session, _redis):
        rows, _ = await tokens.list_tokens(session, limit=100, offset=0)
        return rows

    for row in asyncio.run(_with_db(list_)):
        print(json.dumps({"id": str(row.id), "kind": row.kind, "name": row.name,
                          "user_id": str(row.user_id) if row.user_id else None,
                          "created_at": row.created_at.isoformat(),
                          "expires_at": row.expires_at.isoformat() if row.expires_at else None,
                          "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None}))
    return 0


def _cmd_token_revoke(args) -> int:
    from services import tokens

    async def revoke(session, redis):
        return await tokens.revoke_token(session, redis, uuid.UUID(args.token_id))

    row = asyncio.run(_with_db(revoke))
    print(f"revoked {row.id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sma", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run everything on embedded defaults").set_defaults(fn=_cmd_run)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--down", action="store_true", help="downgrade to the revision")
    migrate.set_defaults(fn=_cmd_migrate)

    token = sub.add_parser("token", help="manage API tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="issue a token (printed once)")
    create.add_argument("--kind", choices=["user", "service", "admin"], required=True)
    create.add_argument("--user-id")
    create.add_argument("--name", default="cli")
    create.add_argument("--expires-days", type=int)
    create.set_defaults(fn=_cmd_token_create)
    token.add_parser("list", help="list tokens (never their secrets)").set_defaults(fn=_cmd_token_list)
    revoke = token.add_parser("revoke", help="revoke a token at once")
    revoke.add_argument("token_id")
    revoke.set_defaults(fn=_cmd_token_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import AppError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
