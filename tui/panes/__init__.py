"""tokentop: tui/panes."""
