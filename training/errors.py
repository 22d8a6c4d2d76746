"""The project's errors, in a module of their own so that the data code (utils.py) and the run
machinery can both raise them without importing each other."""


class UserError(ValueError):
    """A mistake in the input (flags, files). An ordinary exception, so a notebook or a caller
    can catch it; a command (`console.run_command`) prints it as one line, exit status 1, no
    traceback."""


class DatasetNotFound(UserError):
    """A dataset's files are not where they were looked for (the message says where and how to
    get them)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or does not fit the run that reads it."""
