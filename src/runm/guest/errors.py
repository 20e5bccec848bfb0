"""The one error type of runm.guest."""

from __future__ import annotations

__all__ = ["GuestImageError"]


class GuestImageError(Exception):
    """The guest image is missing, corrupt or could not be built.

    The message is a full sentence with context, e.g. ``guest image not found in
    /var/lib/runm/guest: run `runm guest build``` or ``building guest image: mkfs.erofs not
    found (install erofs-utils)``.
    """
