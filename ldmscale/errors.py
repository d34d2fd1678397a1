"""The one error users see: a UserError is printed by the CLI as one line, with exit code 2."""


class UserError(Exception):
    """Bad input from the user (a path, a name, a value). The CLI prints it and exits with code 2."""
