"""Error types whose message is a single line the user can act on.

``UsageError`` is raised for bad input (unknown names, bad hparams, missing data); the CLI prints its
message as one line and exits with code 2. ``TrainingError`` marks a run that cannot go on (a non-finite
loss); the CLI prints it as one line and exits with code 1: a diverged run is not misuse of the command.
"""


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message says what to change."""
