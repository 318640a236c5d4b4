"""Downloads and prepares a TFDS dataset as array_record files for :mod:`jaxdiff.data`.

Needs TensorFlow (``pip install -e '.[prepare]'``) and the network, once per dataset::

    python -m jaxdiff.prepare mnist --data_dir ~/tensorflow_datasets

The same as ``tfds build mnist --file_format=array_record --data_dir DIR``. Training then
reads the files with ``tfds.data_source`` and needs neither TensorFlow nor the network.
"""

from __future__ import annotations

import argparse
import os

import tensorflow_datasets as tfds

__all__ = ["prepare", "main"]


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Prepares dataset ``name`` (``name[/config][:version]``); returns where it is."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="TFDS dataset name, e.g. mnist, cifar10, celeb_a")
    parser.add_argument("--data_dir", default=None,
                        help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    args = parser.parse_args(argv)
    print(f"prepared {args.name} in {prepare(args.name, args.data_dir)}")


if __name__ == "__main__":
    main()
