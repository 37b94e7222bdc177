"""stillctl: the command-line client of stillsvc.

Each subcommand is one ``async`` function registered with
:func:`stillsvc.ctl.base.command` in the module of its group (``devices``:
list, info, monitor, lock; ``scan``: scan, items, props; ``events``: agent,
register, apps, default, events); it gets a :class:`~stillsvc.ctl.base.Ctl` and
the parsed arguments, and returns the exit status. ``main`` builds the parser
from every registered subcommand. Everything stillctl says to the service goes
through the client library, :mod:`stillsvc.client`; its errors are printed as
``stillctl: <message>``.

Exit status: 0 on success; 1 when the service is not running or answers with an
error; 2 for bad usage; ``stillctl lock`` exits with its command's status.
"""

from stillsvc.ctl.main import main

__all__ = ["main"]
