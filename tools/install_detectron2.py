#!/usr/bin/env python
"""Install detectron2 into the current interpreter's environment, if it lacks one.

An official detectron2 (built from its repository, with the compiled ``detectron2._C``) is used as
it is. Otherwise the pure-Python snapshot ``pb1-detectron2==0.6`` (detectron2 v0.6) is installed
from the package index *without* its C++ extension: its source distribution lacks
``detectron2/layers/csrc``, so building the extension always fails. ``kd.compat`` supplies what
the missing extension would have provided.

Run by ``make setup``; safe to run again (it does nothing when detectron2 is importable).
"""

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SNAPSHOT = "pb1-detectron2==0.6"


def detectron2_installed() -> bool:
    probe = "import importlib.util as u; raise SystemExit(u.find_spec('detectron2') is None)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def install_snapshot(workdir: Path) -> None:
    # --no-build-isolation: the sdist's setup.py imports torch to describe its extension.
    pip(
        "download",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        ":all:",
        SNAPSHOT,
        "-d",
        str(workdir),
    )
    (archive,) = workdir.glob("pb1-detectron2-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    (src,) = [p for p in workdir.iterdir() if p.is_dir()]
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    # The C++ sources are not in the sdist: build the Python package only.
    text, n = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
    if n != 1:
        raise SystemExit(f"{setup_py}: unexpected layout, cannot disable the C++ extension")
    setup_py.write_text(text)
    # --no-deps: its pins (black==21.4b2, ...) conflict with ours; requirements.txt holds the deps.
    pip("install", "-q", "--no-deps", "--no-build-isolation", str(src))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall the snapshot")
    args = parser.parse_args()
    if detectron2_installed() and not args.force:
        print("detectron2 already installed; keeping it")
        return
    with tempfile.TemporaryDirectory() as tmp:
        install_snapshot(Path(tmp))
    print(f"installed {SNAPSHOT} (Python only; kd.compat stands in for detectron2._C)")


if __name__ == "__main__":
    main()
