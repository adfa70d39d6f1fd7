"""``adamae-pretrain`` on a disk that fills up, for the reliability tests (a size-limited filesystem needs root).

``$ADAMAE_FULL_DISK_FROM_STEP=N``: every ``torch.save`` into the checkpoint ``step_N`` or later writes a few bytes
and then fails with ENOSPC, as a full disk does (with ``$ADAMAE_FULL_DISK_AT=manifest``: the tensors are written,
and the checkpoint's ``manifest.json`` fails instead). ``$ADAMAE_FREE_BYTES=K``: the filesystem reports K bytes free.
"""

import errno
import os
import re
import shutil
import sys
from collections import namedtuple

import torch

FROM_STEP = int(os.environ.get("ADAMAE_FULL_DISK_FROM_STEP", "0"))
FREE_BYTES = os.environ.get("ADAMAE_FREE_BYTES")


def full_disk_save(obj, f, *args, **kwargs):
    match = re.search(r"step_(\d{8})", str(f))
    if FROM_STEP and match and int(match.group(1)) >= FROM_STEP:
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real_save(obj, f, *args, **kwargs)


real_save = torch.save
torch.save = full_disk_save
if FREE_BYTES is not None:
    Usage = namedtuple("Usage", "total used free")
    shutil.disk_usage = lambda path: Usage(10**12, 10**12 - int(FREE_BYTES), int(FREE_BYTES))

from adamae_scale.pretrain import main  # noqa: E402 - after the patches, as a user's process would import it

if os.environ.get("ADAMAE_FULL_DISK_AT") == "manifest":
    import adamae_scale.engine.checkpoint as checkpoint  # noqa: E402

    real_write = checkpoint.atomic_write_text

    def full_disk_write(path, text):
        match = re.search(r"step_(\d{8})", str(path))
        if path.name == "manifest.json" and match and int(match.group(1)) >= FROM_STEP:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, text)

    checkpoint.atomic_write_text = full_disk_write
    torch.save = real_save  # the tensors themselves are written

if __name__ == "__main__":
    sys.argv[0] = "adamae-pretrain"
    main()
