"""The errors a command line turns into one line. Each message names the problem and what to do;
raising one never changes saved work. Every module may import this one: it imports nothing."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


class WorkdirError(ValueError):
  """A workdir whose saved files do not fit the request; nothing in it was changed."""


class DataError(ValueError):
  """Data that is missing or unusable."""


class Interrupted(Exception):
  """`train` stopped by SIGTERM or SIGINT after saving the step it was on (not an error of the
  input; the command line exits with 128 + the signal's number)."""

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step = signum, step
