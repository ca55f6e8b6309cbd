class RunError(Exception):
    """A run that cannot go on (bad input, a non-finite loss): reported as one `error:` line, exit code 2."""


class ConfigError(RunError, ValueError):
    """Bad user input: flags, DeepSpeed JSON, data, checkpoints."""
