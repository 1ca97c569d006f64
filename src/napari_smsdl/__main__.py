"""``python -m napari_smsdl ...`` is the same as the ``smsdl`` console script (also under torchrun)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
