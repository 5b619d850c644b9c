"""User-facing errors: printed as one line by the CLI, exit code 2, no traceback."""


class FactmemError(Exception):
    """A problem with the user's input (config, data file, model name). The message is the whole
    story: it names the file, line, field or key and what would be valid."""


class ConfigError(FactmemError):
    pass


class DataError(FactmemError):
    pass


class ModelError(FactmemError):
    pass
