"""Shim: `python cli.py fit -c configs/...` is the same as `lmmr1 fit -c configs/...`."""

from lmmr1.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
