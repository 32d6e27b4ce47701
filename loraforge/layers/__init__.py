"""One file per parametrisation; importing this package registers them all."""

from . import lora  # noqa: F401
