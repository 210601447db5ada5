"""Register an Epistemic Me developer and print the API key to configure.

    python -m clients.epistemic_cli register --base-url URL --name NAME --email EMAIL

The `SMA_EPISTEMIC_API_KEY=...` line goes to stdout (so it can be appended to an env file);
everything else goes to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from clients.epistemic import API_KEY_SETTING, BASE_URL_SETTING, EpistemicClient
from core.errors import AppError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients.epistemic_cli",
                                     description="Epistemic Me helper commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register = sub.add_parser("register", help="create a developer and print its API key")
    register.add_argument("--base-url", default=os.environ.get(BASE_URL_SETTING, ""),
                          help=f"Epistemic Me base URL (default: ${BASE_URL_SETTING})")
    register.add_argument("--name", required=True)
    register.add_argument("--email", required=True)
    register.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return parser


async def _register(base_url: str, name: str, email: str, timeout: float) -> tuple[str, str]:
    # CreateDeveloper is the one method that needs no key.
    async with EpistemicClient(base_url, "", timeout=timeout) as client:
        developer = await client.create_developer(name, email)
    if not developer.api_keys:
        raise AppError("Epistemic Me created the developer but returned no API key")
    return developer.id, developer.api_keys[0]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.base_url:
        print(f"error: pass --base-url or set {BASE_URL_SETTING}", file=sys.stderr)
        return 2
    try:
        developer_id, key = asyncio.run(_register(args.base_url, args.name, args.email,
                                                  args.timeout))
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"Registered Epistemic Me developer {developer_id} ({args.email}).", file=sys.stderr)
    print(f"Configure this API key as {API_KEY_SETTING}:", file=sys.stderr)
    print(f"{API_KEY_SETTING}={key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
