"""Boot selection: one backend per boot firmware (tryboot, U-Boot, GRUB) behind one interface."""
