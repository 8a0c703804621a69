"""Thin absl mains. The library never imports this package."""
