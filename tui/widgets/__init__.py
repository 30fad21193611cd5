"""tokentop: tui/widgets."""
