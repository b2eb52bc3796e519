"""Boot selection: one backend per boot firmware (tryboot, U-Boot, GRUB) behind one interface.

See ``bootloader_hooks.base`` for the interface. Importing this package registers every
backend in ``bootloader_hooks.base.BACKENDS``.
"""

from bootloader_hooks import grub, tryboot, uboot  # noqa: F401 (registers the backends)
