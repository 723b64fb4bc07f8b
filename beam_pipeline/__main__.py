"""``python -m beam_pipeline --input PATH --output DIR [options] [Beam options]``."""
import sys

from beam_pipeline import cli


def main() -> None:
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
