"""A command group whose subcommands are imported only when one of them is used.

Every ``medledger`` run starts a Python interpreter; what it imports before the
command runs is paid on every start (scripts and tests run the CLI hundreds of
times). A :class:`LazyGroup` names each subcommand's module and attribute as a
string and imports that module the first time the subcommand is looked up, so
``medledger token list`` loads the token commands and nothing of the chain
verifier, the benchmarks or the network tooling. Listing the subcommands
(``--help``) loads every one of them, as click needs each command's help text.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import click

__all__ = ["LazyGroup"]


class LazyGroup(click.Group):
    """A :class:`click.Group` with subcommands loaded on first use.

    ``lazy_commands`` maps a subcommand's name to ``"module:attribute"``, the
    :class:`click.Command` it stands for; that command's own name must be the
    same (a mismatch is a programming error, raised when the command is first
    looked up). Subcommands added with :meth:`add_command` work as in any group.
    The subcommands are listed in name order, as :class:`click.Group` lists them.
    """

    def __init__(
        self, *args: Any, lazy_commands: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self.add_command(self._load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name: str) -> click.Command:
        module_name, _, attribute = self.lazy_commands[cmd_name].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command) or command.name != cmd_name:
            raise TypeError(f"{self.lazy_commands[cmd_name]} is not the click command {cmd_name!r}")
        return command
