"""The progress sink library code reports to; the CLI renders it (:class:`mpq_cli.cli.output.RichReporter`)."""

from __future__ import annotations


class Reporter:
    """Progress sink; library code reports here and never prints. The CLI renders it."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1, **fields: float) -> None:
        pass

    def stop(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass
