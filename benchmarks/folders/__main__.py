"""`python -m benchmarks.folders NAME OUTPUT_DIR`: write one folder of the registry."""

import sys

from benchmarks import folders


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m benchmarks.folders NAME OUTPUT_DIR   (NAME: {', '.join(folders.names())})")
    root = folders.build(sys.argv[1], sys.argv[2])
    print(f"{root}: {len(list((root / 'train').iterdir()))} classes, train/ and validation/")
