"""Check that the generated protobuf modules match the .proto sources (`make protos` regenerates)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"


def main() -> int:
    sources = sorted(PROTO_ROOT.glob("pigment/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(PROTO_ROOT / "pigment", Path(tmp) / "pigment", ignore=shutil.ignore_patterns("*.py*"))
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"--python_out={tmp}",
               f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *[str(Path(tmp) / s.relative_to(PROTO_ROOT)) for s in sources]]
        subprocess.run(cmd, check=True)
        stale = [
            str(p.relative_to(tmp))
            for p in sorted(Path(tmp).glob("pigment/v1/*_pb2*.py*"))
            if not filecmp.cmp(p, PROTO_ROOT / p.relative_to(tmp), shallow=False)
        ]
    if stale:
        print(f"generated protos are stale: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        return 1
    print(f"protos up to date ({len(sources)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
