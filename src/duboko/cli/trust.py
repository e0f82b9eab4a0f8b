"""Placeholder: this family's commands are registered here."""


def register(sub) -> None:
    pass
