"""``python -m updater.cli``: the ``fleet-updater`` command."""

from updater.cli import main

# guarded: importing the module (pkgutil.walk_packages does) must not run the command
if __name__ == "__main__":
    main()
