"""Start the langsam web demo: ``python demos/app.py [--sam-type vit_b] [--port 7860] ...``.

The same as ``langsam demo``; see ``python demos/app.py --help`` for the model flags (also
read from the LANGSAM_* environment variables). It listens on 127.0.0.1 only.
"""

import sys
from pathlib import Path

try:
    import langsam  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langsam.demo import main

if __name__ == "__main__":
    sys.exit(main())
