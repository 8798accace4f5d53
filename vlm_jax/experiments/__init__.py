"""Experiments on the stack: each a job module; nothing in the library imports them."""
