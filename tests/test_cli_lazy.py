"""Commands loaded on first use (``cli/lazy.py``): every one still listed, found and helped.

The listing is compared with the same group built the ordinary way (every
subcommand added up front), so ``--help`` reads as it did before the commands
were loaded lazily; which modules a run imports is checked in a fresh
interpreter by ``test_cli_imports.py``.
"""

from __future__ import annotations

import importlib.metadata

import click
import pytest

from cli_support import run_in_process
from medledger.cli import cli
from medledger.cli.lazy import LazyGroup

#: Every command of ``medledger``, and of ``medledger node`` (two of which live elsewhere).
TOP_LEVEL = {
    "audit", "backup", "bench", "chain", "consent", "consortium", "demo", "keys", "migrate",
    "nats", "network", "node", "patient", "record", "restore", "share", "token", "verify",
}  # fmt: skip
NODE = {"init", "member-info", "nats-key", "oauth-client", "show", "start", "status", "tls-cert"}


def _groups() -> dict[str, tuple[str, ...]]:
    """Every group of the command tree: its command path, and the names leading to it."""
    found: dict[str, tuple[str, ...]] = {}
    pending: list[tuple[tuple[str, ...], click.Group]] = [((), cli)]
    while pending:
        names, group = pending.pop(0)
        found[" ".join(("medledger", *names))] = names
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if isinstance(command, click.Group):
                pending.append(((*names, name), command))
    return found


def _context(names: tuple[str, ...]) -> click.Context:
    """The context of the group at ``names`` as ``medledger NAMES --help`` makes it.

    Through its parents, as click does: a subgroup inherits ``-h`` from the top level.
    """
    ctx = cli.make_context("medledger", [], resilient_parsing=True, terminal_width=80)
    for name in names:
        group = ctx.command
        assert isinstance(group, click.Group)
        command = group.get_command(ctx, name)
        assert isinstance(command, click.Group), name
        ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
    return ctx


def _eager(group: click.Group, ctx: click.Context) -> click.Group:
    """``group`` built as a plain :class:`click.Group` with every subcommand added up front."""
    eager = click.Group(
        name=group.name,
        callback=group.callback,
        params=group.params,
        help=group.help,
        context_settings=group.context_settings,
    )
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        eager.add_command(command, name)
    return eager


def test_every_command_is_listed_and_found_under_its_own_name() -> None:
    ctx = click.Context(cli)
    assert set(cli.list_commands(ctx)) == TOP_LEVEL
    for name in TOP_LEVEL:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(), name  # the listing shows a line for it
    node = cli.get_command(ctx, "node")
    assert isinstance(node, click.Group)
    assert set(node.list_commands(click.Context(node))) == NODE
    assert cli.get_command(ctx, "no-such-command") is None


def _commands_section(group: click.Group, ctx: click.Context) -> str:
    """The "Commands:" part of ``group``'s help: what lazy loading could change.

    Only that part: click caches a group's ``--help`` option on the group object
    the first time it is used, so the options part of a shared group's help
    depends on how earlier tests in this process invoked it.
    """
    formatter = ctx.make_formatter()
    group.format_commands(ctx, formatter)
    return formatter.getvalue()


@pytest.mark.parametrize("path", list(_groups()))
def test_help_of_every_group_lists_what_every_command_added_up_front_lists(path: str) -> None:
    ctx = _context(_groups()[path])
    group = ctx.command
    assert isinstance(group, click.Group)
    listed = _commands_section(group, ctx)
    eager = _eager(group, ctx)
    eager_ctx = eager.make_context(
        ctx.info_name, [], parent=ctx.parent, resilient_parsing=True, terminal_width=80
    )
    assert listed == _commands_section(eager, eager_ctx)
    assert listed.startswith("Commands:\n")
    for name in group.list_commands(ctx):
        assert f"\n  {name} " in listed or listed.endswith(f"\n  {name}\n"), name
    assert group.get_help(ctx).startswith(f"Usage: {path} ")


def test_a_lazy_entry_that_names_another_command_is_refused() -> None:
    group = LazyGroup(name="g", lazy_commands={"show": "medledger.cli.chain:verify"})
    with pytest.raises(TypeError, match="is not the click command 'show'"):
        group.get_command(click.Context(group), "show")
    missing = LazyGroup(name="g", lazy_commands={"x": "medledger.cli.chain:no_such_thing"})
    with pytest.raises(AttributeError):
        missing.get_command(click.Context(missing), "x")


def test_version_is_the_installed_package_version() -> None:
    # `--version` prints medledger.__version__ (no metadata look-up at run time):
    # it must be what the installed package says it is.
    outcome = run_in_process(["--version"])
    assert outcome.code == 0
    assert outcome.out == f"medledger, version {importlib.metadata.version('medledger')}\n"
