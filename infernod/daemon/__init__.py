"""The daemon: sockets and dispatch (``server``), request handlers wired to their services
(``core``), the scheduler and the services that move requests through it, models and the
registry, persistent jobs, the publisher, access control. ``python -m infernod`` runs it."""
