"""The errors a command line turns into one line. Each message names the problem and what to do;
raising one never changes saved work. Every module may import this one: it imports nothing."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


class WorkdirError(ValueError):
  """A workdir whose saved files do not fit the request; nothing in it was changed."""


class DataError(ValueError):
  """Data that is missing or unusable."""
