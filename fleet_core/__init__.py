"""Foundation shared by every Metrica Fleet package.

It holds only what every layer needs and nothing that knows about slots, bundles or servers:
the base error class (so every command maps failures to one exit code), the one helper that
writes files durably, and the root of the ``fleet`` command, which loads each package's own
command group lazily so that a device never imports the server's web stack.
"""
