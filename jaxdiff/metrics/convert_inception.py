"""Convert pytorch-fid's Inception weights (.pth) to the safetensors file that
:func:`~jaxdiff.metrics.inception.load_inception` reads.

The weights are pytorch-fid's release asset (the TensorFlow FID Inception graph of 2015-12-05,
ported to torch)::

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(95,628,359 bytes, sha256 ``6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2``;
torch caches it under ``~/.cache/torch/hub/checkpoints/`` once pytorch-fid has run.) Usage::

    pip install 'jaxdiff[convert]'    # torch: needed here only
    python -m jaxdiff.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth inception.safetensors

The file's sha256 is checked first (``--allow-other-hash`` converts another file with the same
keys), it is read with ``torch.load(..., weights_only=True)`` (the loader that refuses arbitrary
pickled objects), its keys and shapes are checked against the network, and the state dict is
written unchanged (same key names, torch layouts) with ``safetensors``. An existing output file
is never overwritten. Errors are printed as ``error: ...`` with exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile

__all__ = ["FID_WEIGHTS_SHA256", "FID_WEIGHTS_URL", "convert", "main"]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class ConversionError(Exception):
    """A problem with the input or output file, reported as one ``error:`` line."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_torch_state_dict(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ConversionError("reading a .pth file needs torch: pip install 'jaxdiff[convert]'") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{path}: cannot be read by torch.load(weights_only=True) (only plain tensors "
                              f"are accepted): {first}") from e
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not named tensors: {bad[:5]}")
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def _publish(tmp: str, dst: str) -> None:
    """Give the finished ``tmp`` the name ``dst``, raising ``FileExistsError`` rather than overwriting."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: exclusive create, then copy
        with open(tmp, "rb") as f, open(dst, "xb") as g:
            shutil.copyfileobj(f, g)


def convert(src: str, dst: str, *, check_hash: bool = True) -> int:
    """Write ``dst`` (safetensors) from pytorch-fid's ``src`` (.pth); returns the tensor count.
    Raises ``ConversionError`` before writing anything if a check fails."""
    from safetensors.numpy import save_file

    from jaxdiff.metrics.inception import check_state_dict

    if not os.path.isfile(src):
        raise ConversionError(f"input file {src!r} does not exist (download it from {FID_WEIGHTS_URL})")
    if os.path.lexists(dst):
        raise ConversionError(f"output file {dst!r} exists; remove it or choose another name")
    if check_hash:
        digest = sha256_of(src)
        if digest != FID_WEIGHTS_SHA256:
            raise ConversionError(f"{src}: sha256 {digest} is not that of pt_inception-2015-12-05-6726825d.pth "
                                  f"({FID_WEIGHTS_SHA256}); pass --allow-other-hash to convert it anyway")
    arrays = _load_torch_state_dict(src)
    try:
        check_state_dict(arrays, source=src)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    out_dir = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".inception-", suffix=".safetensors.tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata={"source": os.path.basename(src)})
        try:
            _publish(tmp, dst)
        except FileExistsError as e:
            raise ConversionError(f"output file {dst!r} exists; remove it or choose another name") from e
    finally:
        os.remove(tmp)
    return len(arrays)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdiff.metrics.convert_inception",
                                description="Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                            "to safetensors.")
    p.add_argument("src", help="pytorch-fid's .pth weight file")
    p.add_argument("dst", help="the safetensors file to write (must not exist)")
    p.add_argument("--allow-other-hash", action="store_true", help="skip the sha256 check of SRC")
    args = p.parse_args(argv)
    try:
        n = convert(args.src, args.dst, check_hash=not args.allow_other_hash)
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
