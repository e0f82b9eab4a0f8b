"""`python -m duboko ...` (and `torchrun -m duboko ...`) run the CLI."""

from duboko.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
