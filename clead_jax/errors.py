"""The one error type users see: a single line naming the field or file, the cause and the fix."""


class UserError(Exception):
  """Bad input or environment. Entry points print `error: <message>` and exit non-zero."""
