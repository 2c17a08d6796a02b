"""HF safetensors → Orbax: the same as `dsv2 convert HF_DIR OUT_DIR [--dtype D] [--force]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv2_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
