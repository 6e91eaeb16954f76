"""`python -m ltoflow` is the `ltoflow` command."""

from ltoflow.cli import entry

entry()
