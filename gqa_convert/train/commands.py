"""Placeholder: subcommand registered here (being built)."""


def register(sub) -> None:
    pass
