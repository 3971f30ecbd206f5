"""Running it: the per-connection handler, the application, the process runner, the supervisor, the CLI."""
