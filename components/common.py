"""What every kubetrain component shares: the image it runs in and how it is built.

`install_kfp_package=False`: the image already has kfp and kubetrain, so a
task starts in ~0.1 s instead of pip-installing kfp first (and kfp.local does
not touch the user's environment). `make compile TARGET=cluster` swaps in the
registry image per task; this default names the CPU image `make images` builds.
"""

from __future__ import annotations

import functools

from kfp import dsl

from kubetrain import __version__

IMAGE_REPOSITORY = "ghcr.io/kubetrain/kubetrain"
BASE_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"

component = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)
