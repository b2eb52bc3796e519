"""The root of every error Metrica Fleet raises on purpose."""


class FleetError(Exception):
    """An expected failure with a message fit to show an operator on one line.

    Every package derives its own errors from this class; the command-line tools turn it into
    ``error: <message>`` and exit status 1, while anything else is a bug and keeps its traceback.
    """
