"""``medledger node oauth-client``: register, list and remove the SMART on FHIR apps of a node.

The node's own portal (client id ``medledger-portal``) is always registered;
other apps are added here. A confidential client's secret is printed once and
stored only as a hash.
"""

from __future__ import annotations

from pathlib import Path

import click

from medledger.cli.common import dir_option, emit
from medledger.ledger.clock import SystemClock

__all__ = ["oauth_client"]


@click.group("oauth-client")
def oauth_client() -> None:
    """Register, list and remove the apps that may sign users in through this node (SMART)."""


@oauth_client.command("add")
@dir_option
@click.option("--name", required=True, help="The app's name, shown on the approval page.")
@click.option(
    "--redirect-uri",
    "redirect_uris",
    multiple=True,
    help="A redirect URI, matched exactly (repeat for several).",
)
@click.option("--confidential", is_flag=True, help="The app keeps a client secret (a server).")
@click.option(
    "--system-role",
    type=click.Choice(("clinician", "auditor", "admin")),
    default=None,
    help="Confidential apps only: may obtain system/ tokens (client_credentials) with this role.",
)
@click.option("--client-id", default=None, help="The client id (default: a random one).")
def oauth_client_add(
    root: Path,
    name: str,
    redirect_uris: tuple[str, ...],
    confidential: bool,
    system_role: str | None,
    client_id: str | None,
) -> None:
    """Register an app; a confidential app's secret is printed once."""
    from medledger.services.oauth.server import register_client
    from medledger.stores import open_oauth_store

    store = open_oauth_store(root)
    try:
        client, secret = register_client(
            store,
            now_ms=SystemClock().now_ms(),
            name=name,
            redirect_uris=redirect_uris,
            confidential=confidential,
            system_role=system_role,
            client_id=client_id,
        )
    finally:
        store.close()
    answer: dict[str, object] = {
        "client_id": client.id,
        "name": client.name,
        "redirect_uris": list(client.redirect_uris),
        "confidential": client.confidential,
        "system_role": client.system_role,
    }
    if secret is not None:
        answer["client_secret"] = secret
    emit(answer)


@oauth_client.command("list")
@dir_option
def oauth_client_list(root: Path) -> None:
    """List the registered apps (never their secrets)."""
    from medledger.services.oauth.server import PORTAL_CLIENT
    from medledger.stores import open_oauth_store

    store = open_oauth_store(root)
    try:
        clients = [PORTAL_CLIENT, *store.clients()]
    finally:
        store.close()
    emit(
        [
            {
                "client_id": c.id,
                "name": c.name,
                "redirect_uris": list(c.redirect_uris),
                "confidential": c.confidential,
                "system_role": c.system_role,
            }
            for c in clients
        ]
    )


@oauth_client.command("remove")
@dir_option
@click.option("--client-id", required=True, help="The app to unregister.")
def oauth_client_remove(root: Path, client_id: str) -> None:
    """Unregister an app (a leaked secret, a retired app): every grant it holds ends now."""
    from medledger.core.errors import InvalidInput, NotFound
    from medledger.services.oauth.server import PORTAL_CLIENT
    from medledger.stores import open_oauth_store

    if client_id == PORTAL_CLIENT.id:
        raise InvalidInput("the node's own portal is always registered; it cannot be removed")
    store = open_oauth_store(root)
    try:
        revoked = store.remove_client(client_id)
    finally:
        store.close()
    if revoked is None:
        raise NotFound(f"no app {client_id!r} is registered at this node")
    emit({"removed": client_id, "grants_revoked": revoked})
