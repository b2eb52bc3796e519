"""Boot selection: one backend per boot firmware (tryboot, U-Boot, GRUB) behind one interface.

See ``bootloader_hooks.base`` for the interface. Importing this package registers every
backend in ``bootloader_hooks.base.BACKENDS``.
"""
