"""The QEMU reference device: real UEFI firmware (OVMF), real GRUB, a Debian kernel and the real
updater, booting the disk ``fleet image disk --layout grub`` builds (docs/qemu.md)."""
