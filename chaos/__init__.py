"""The lab: virtual devices and fleets, fault injectors and the QEMU harness."""
