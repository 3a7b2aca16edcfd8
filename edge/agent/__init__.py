"""``tandem agent``: the device-side daemon.

It keeps the edge variant of each tracked model up to date from the cloud registry (verified,
probation-tested, atomically activated, rolled back on failure), serves apps on the device through a
loopback/Unix-socket local API that runs the router, and stores route records, telemetry and feedback
in a bounded SQLite outbox that is forwarded to the cloud when it is reachable.

Modules: :mod:`.config` (settings), :mod:`.store` (installed versions, activation, probation),
:mod:`.sync` (registry polling and resumable downloads), :mod:`.outbox` (store-and-forward),
:mod:`.routing` (the HybridClient per active version, swapped without failing calls),
:mod:`.local_api` (the HTTP/Unix-socket API, for apps on the device only), :mod:`.lock` (one agent
per data directory), :mod:`.daemon` (wires it together), :mod:`.status`.
"""
