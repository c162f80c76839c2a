"""Container-runtime adapters: Docker's graphdriver plugin server and its daemon.

``server`` implements the plugin calls, ``daemon`` runs the process that
owns the store, ``mounts`` decides where the FUSE filesystem is mounted, and
``streams`` moves tar data between the event loop and worker threads.
"""
