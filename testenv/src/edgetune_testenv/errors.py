"""Errors the test environment raises, each saying what was expected and what was found."""


class EnvironmentSetupError(RuntimeError):
    """A tool, binary, port or server the test environment needs is missing or broken."""


class ComponentCrashedError(EnvironmentSetupError):
    """A server process the environment started exited while it was needed."""
