"""``python -m langsam``: the same command line as the ``langsam`` console script."""

from langsam.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
