"""The `schedscope` command line: one module per subcommand, `main.py` wires them."""
