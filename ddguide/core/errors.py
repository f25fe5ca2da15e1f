"""Domain errors. Library code raises them; the CLI turns each into one line and exit code 2."""


class UserError(Exception):
    """Bad usage or bad input: the user can fix it (exit code 2)."""
