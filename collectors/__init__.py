"""tokentop: collectors."""
