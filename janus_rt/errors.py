"""UsageError: a request the user can fix (a flag's value, a size, a path, a run folder). The command line says it in
one `janus-rt CMD: ...` line; anything else raised inside janus_rt keeps its traceback (a bug to report)."""


class UsageError(ValueError):
    """A ValueError caused by what the caller asked for, not by janus_rt itself."""
