"""The services an app serves from are found where ``install_services`` put them.

``services_of`` reads a plain attribute of the app (``app.state``'s lookup costs
every request a failed attribute lookup first); installing again replaces what
it finds, and an object that only shares the app's ``state`` (a worker's
forwarding app) still finds them there.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from fastapi import FastAPI

from medledger.api.deps import AppServices, install_services, services_of


def _services(label: str) -> AppServices:
    none = cast(Any, None)
    return AppServices(
        node=none, tokens=none, clock=none, auth_failures=none, public_url=f"https://{label}"
    )


def test_installed_services_are_found_and_replaced() -> None:
    app = FastAPI()
    first, second = _services("first"), _services("second")
    install_services(app, first)
    assert services_of(app) is first
    assert app.state.services is first
    install_services(app, second)
    assert services_of(app) is second
    assert app.state.services is second
    sharing_state = cast(FastAPI, SimpleNamespace(state=app.state))
    assert services_of(sharing_state) is second
