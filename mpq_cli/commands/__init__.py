"""One module per command (or group of commands); :mod:`mpq_cli.api` re-exports the public functions."""
