"""The command line: shared flags once, one module per subcommand."""
