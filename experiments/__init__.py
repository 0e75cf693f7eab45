"""What to run: the command line, paper configurations and reports."""
