"""Regenerate the client's stubs from ../../protos: ``python clients/python/generate.py`` (``--check``: exit 1
if the committed stubs differ). The server's stubs are ``pigment.v1``; the client's are the same code under
``pigment_client.v1``, so both can be installed side by side."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parents[1] / "protos"
OUT = HERE / "src" / "pigment_client" / "v1"


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(
            str(p.relative_to(PROTOS)) for p in (PROTOS / "pigment" / "v1").glob("*.proto")
        )
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ]
        if protoc.main([*args, *files]) != 0:
            raise SystemExit("protoc failed")
        return {
            p.name: p.read_text().replace("from pigment.v1 import", "from pigment_client.v1 import")
            for p in sorted((Path(tmp) / "pigment" / "v1").iterdir())
            if p.suffix in (".py", ".pyi")
        }


def main() -> int:
    stubs = generate()
    if "--check" in sys.argv:
        stale = [
            n
            for n, text in stubs.items()
            if not (OUT / n).exists() or (OUT / n).read_text() != text
        ]
        if stale:
            print(
                f"client stubs out of date: {stale}; run python clients/python/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for name, text in stubs.items():
        (OUT / name).write_text(text)
    (OUT / "__init__.py").write_text(
        '"""Generated from protos/pigment/v1 by clients/python/generate.py."""\n'
    )
    print(f"wrote {len(stubs)} files to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
