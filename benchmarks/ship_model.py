"""Get a packaged model's weights onto the GPU machine, which reaches no package index and takes 64 MiB a call.

Recipe (one lease; the machine stays warm about 30 s between calls, so make the calls back to back):

1. Here: ``python benchmarks/ship_model.py split qwen2.5-coder-0.5b`` joins and verifies the model (as
   ``kvslim models fetch`` does) and cuts its GGUF into 50,000,000-byte pieces under ``.models/`` (git-ignored).
   It prints one device command per piece. A call carries its piece and the working tree within 64 MiB: 50 MB
   pieces leave the tree 17 MB (60 MB pieces left it 7 MB, which the recorded results outgrew).
2. Device, once per piece, ``carry=[".models/<piece>"]``: ``mkdir -p ~/ship && mv .models/<piece> ~/ship/``.
3. Device, last call: ``python3 benchmarks/ship_model.py join qwen2.5-coder-0.5b --pieces ~/ship && <the job>``.
   ``join`` concatenates the pieces into kvslim's cache and checks the pinned SHA-256 before anything uses
   them, so ``--model qwen2.5-coder-0.5b`` then works there (de-quantized on first load; the GGUF reader needs
   the ``gguf`` wheel carried in ``.whl/``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvslim.models import packaged

PIECE = 50_000_000
OUT = Path(".models")


def split(name: str) -> list[Path]:
    """Cut the verified GGUF into pieces under ``.models/``; returns them in order."""
    model = packaged.get(name)
    source = packaged.verified_gguf(model, progress=True)
    OUT.mkdir(exist_ok=True)
    pieces = []
    with open(source, "rb") as src:
        while chunk := src.read(PIECE):
            piece = OUT / f"{name}.part{len(pieces):02d}"
            piece.write_bytes(chunk)
            pieces.append(piece)
    return pieces


def join(name: str, pieces_dir: Path) -> Path:
    """Join ``<name>.partNN`` pieces in order into the cache, verified against the pinned hash."""
    model = packaged.get(name)
    pieces = sorted(pieces_dir.expanduser().glob(f"{name}.part*"))
    if not pieces:
        raise SystemExit(f"no pieces {name}.part* in {pieces_dir}: send them first (see this script's docstring)")
    return packaged.join_and_verify(model, pieces, model.gguf_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["split", "join"])
    parser.add_argument("name", help="a packaged model, e.g. qwen2.5-coder-0.5b")
    parser.add_argument("--pieces", default="~/ship", help="join: the folder holding the pieces")
    args = parser.parse_args()
    if args.action == "split":
        for piece in split(args.name):
            print(f"carry=[{str(piece)!r}]  command: mkdir -p ~/ship && mv {piece} ~/ship/")
    else:
        print(f"joined and verified: {join(args.name, Path(args.pieces))}", file=sys.stderr)


if __name__ == "__main__":
    main()
