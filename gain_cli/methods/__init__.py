"""Adaptation methods. Importing this package registers every method kind."""

from gain_cli.methods import full_ft, gain, lora  # noqa: F401  (registration)
from gain_cli.methods.base import METHOD_KINDS, Method, build_method

__all__ = ["METHOD_KINDS", "Method", "build_method"]
