"""The command line of ``nbdvma serve`` and ``nbdvma backup``: options in, messages out.

Everything that parses arguments, prints or installs signal handlers for the two
long-running commands lives here; the library (:mod:`nbdvma.session`,
:mod:`nbdvma.backup`) does neither.  :mod:`nbdvma.cli` wires these into ``nbdvma``.
"""
