"""What the API's handlers are given: the node's services, as FastAPI dependencies.

:class:`AppServices` is everything the application serves from; ``create_app``
puts it on the app once, and :func:`services_of` is the one place that reads
it back. Handlers declare what they need with the ``Annotated`` aliases here
(``Services``, ``NodeDep``, ``Records``) instead of reaching into
``request.app.state``. The providers are ``async`` on purpose: FastAPI runs a
sync dependency in a worker thread, a hop that costs more than the look-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request

from medledger.ledger.clock import Clock
from medledger.ledger.ordering.observed import ObservedOrderer
from medledger.node import Node
from medledger.services.oauth.server import AuthorizationServer
from medledger.services.records.service import RecordsService
from medledger.storage.ports import TokenStore

__all__ = [
    "AppServices",
    "FailureBudget",
    "NodeDep",
    "Records",
    "Services",
    "always_ready",
    "install_services",
    "services_of",
]


class FailureBudget(Protocol):
    """Failed authentications charged per client (``api.auth.AuthFailures``)."""

    async def charge(self, request: Request, token: str = "") -> None:
        """Count one failure of ``request``'s client; raise ``RateLimited`` once over budget."""
        ...


def always_ready() -> str | None:
    """The readiness of a node whose caller owns its lifetime: nothing pending."""
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class AppServices:
    """The node and what the HTTP layer adds around it, for one application.

    ``oauth``: the node's authorization server (``api.oauth``);
    ``not_ready``: why the node's lifecycle is not ready (``/readyz``'s status,
    e.g. ``catching up`` or ``stopping``), None when it is
    (:meth:`medledger.lifecycle.NodeRuntime.not_ready`); ``ordering``: the
    observed ordering connection, for ``/metrics``.
    """

    node: Node
    tokens: TokenStore
    clock: Clock
    auth_failures: FailureBudget
    not_ready: Callable[[], str | None] = always_ready
    ordering: ObservedOrderer | None = None
    #: The SMART on FHIR authorization server (``None``: the app was made without its store).
    oauth: AuthorizationServer | None = None
    #: Sign-in steps each client address may open (``api.auth.SignInOpens``).
    sign_in_opens: FailureBudget | None = None
    #: Where clients reach this node (``config.public_base_url``): what the authorization
    #: server names itself as. ``None``: unknown (no ``advertise``, a wildcard listening
    #: address), and then the node offers no sign-in rather than guess from a request.
    public_url: str | None = None
    #: What ``/readyz`` adds about this host's sequencer role (``role``, ``active``: the
    #: active sequencer's address), when the node is elected through PostgreSQL.
    role: Callable[[], dict[str, Any]] | None = None


#: Where :func:`install_services` also keeps the services: a plain attribute of the app.
_SERVICES = "_medledger_services"


def install_services(app: FastAPI, services: AppServices) -> None:
    """Make ``services`` what ``app``'s handlers are given."""
    app.state.services = services
    # Every request looks them up, a read twice: ``app.state.services`` reaches
    # Starlette's ``State.__getattr__`` only after a failed attribute lookup (about
    # ten times the cost of a plain attribute), so they are kept on the app too.
    setattr(app, _SERVICES, services)


def services_of(app: FastAPI) -> AppServices:
    """The services ``app`` serves from (set by :func:`install_services`)."""
    services: AppServices | None = getattr(app, _SERVICES, None)
    if services is None:  # an object that only shares the app's ``state``
        services = app.state.services
    return services


async def _services(request: Request) -> AppServices:
    return services_of(request.app)


Services = Annotated[AppServices, Depends(_services)]


# Each provider reads the request alone: a provider that depends on another
# provider makes FastAPI solve a nested dependency tree on every request
# (decision 0035: a read solves four dependency lists instead of six).
async def _node(request: Request) -> Node:
    return services_of(request.app).node


NodeDep = Annotated[Node, Depends(_node)]


async def _records(request: Request) -> RecordsService:
    return services_of(request.app).node.records


Records = Annotated[RecordsService, Depends(_records)]
