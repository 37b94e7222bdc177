"""The D-Bus layer: a thin adapter from the core to dbus-fast.

Everything transport-specific lives here: the bus connection and its three
repairs (:mod:`.bus`), the exported interfaces (:mod:`.interfaces`) and the glue
that keeps the object tree in step with the core (:mod:`.service`).
"""
