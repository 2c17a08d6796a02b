"""One module per `dsv2` subcommand."""
