"""`python -m ltoflow` is the `ltoflow` command (through the same entry point, which handles a
Ctrl-C while the engine loads; here the package is loaded before it runs)."""

from ltoflow_command import main

main()
