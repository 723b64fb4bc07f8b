"""``python -m beam_pipeline --input PATH --output DIR [options] [Beam options]``."""
import logging
import sys

from beam_pipeline import pipeline


def main() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(pipeline.main())


if __name__ == "__main__":
    main()
