"""runm.guest: building the guest image (kernel, initramfs, root image with python3 + runc +
the agent), cached by content hash. The API lives in :mod:`runm.guest.image`."""

from runm.guest.errors import GuestImageError
from runm.guest.image import (
    GuestImage,
    build_image,
    default_data_dir,
    ensure_image,
    find_image,
    image_digest,
)

__all__ = [
    "GuestImage",
    "GuestImageError",
    "build_image",
    "default_data_dir",
    "ensure_image",
    "find_image",
    "image_digest",
]
