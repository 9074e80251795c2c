"""A digest of the C++/CUDA sources (csrc/), recorded in _build_config.json by setup.py, so that a compiled
library carried to another machine (bench/gpu_check.sh) can be checked against the checkout it runs in.
Standard library only: setup.py loads this file by path, before anything is built."""
import hashlib
from pathlib import Path


def sources_digest(root: Path) -> str:
    """sha256 over the relative paths and contents of every file under root/csrc, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (Path(root) / "csrc").rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


if __name__ == "__main__":  # python resnet_fused/_sources.py ROOT: prints the digest of ROOT's sources
    import sys

    print(sources_digest(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
