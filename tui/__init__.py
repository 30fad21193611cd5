"""tokentop: tui."""
