class ConfigError(ValueError):
    """Bad user input (flags, DeepSpeed JSON, data, checkpoints): reported as one line, exit code 2."""
