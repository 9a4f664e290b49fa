"""``python -m harness`` (also what torchrun launches)."""

from harness.cli import main

if __name__ == "__main__":
    main()
