"""The one error type for bad input: it names the input and the reason, so a batch job can
turn it into an error row for that case and carry on with the others."""

from __future__ import annotations


class InputError(ValueError):
    """An input (image, label, bundle, case id) that cannot be used, and why."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str]]:
        # Pickled across processes (Ray tasks); the default would call __init__ with the message only.
        return (InputError, (self.source, self.reason))
