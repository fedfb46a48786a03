"""nbdvma: an NBD server that writes QEMU backups into Proxmox VMA archives."""

__version__ = "0.1.0"

__all__ = ["__version__"]
