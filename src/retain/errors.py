"""User-facing errors: one clear line naming the file, field or value; the CLI exits 2 on them."""


class RetainError(Exception):
    """Bad input from the user (config, flag, file, name). The message is the whole story: one line."""
