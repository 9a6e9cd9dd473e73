"""Embedded data: a public-domain text sample for the demo (see LICENSE-gutenberg.md)."""
