#!/usr/bin/env python
"""Write ``kd.pth`` into the running interpreter's site-packages (called by ``make setup``).

The ``.pth`` file puts ``projects/`` on ``sys.path`` (so ``import kd`` works anywhere) and installs
``kd.compat``'s stand-in for ``detectron2._C`` at interpreter start. ``kd/compat.py`` is loaded by
its file path, registered as ``kd.compat``, so that starting Python does not import the ``kd``
package (and with it torch).
"""

import sys
import sysconfig
from pathlib import Path


def main() -> None:
    projects = Path(sys.argv[1]).resolve()
    compat = projects / "kd" / "compat.py"
    if not compat.is_file():
        raise SystemExit(f"{compat} not found: pass the repository's projects/ folder")
    boot = (
        "import sys, importlib.util as _u; "
        f"_s = _u.spec_from_file_location('kd.compat', {str(compat)!r}); "
        "_m = _u.module_from_spec(_s); sys.modules.setdefault('kd.compat', _m); "
        "_s.loader.exec_module(_m); _m.install_import_hook()"
    )
    target = Path(sysconfig.get_paths()["purelib"]) / "kd.pth"
    target.write_text(f"{projects}\n{boot}\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
